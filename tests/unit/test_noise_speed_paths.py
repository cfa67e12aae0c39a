"""The noise pass's speed paths: one CPU thread for its small ops, off for any other device; same values."""

from __future__ import annotations

import torch

from zofsdp.noise import Noise, Shard, default_threads, one_thread


def shard_of(n: int) -> Shard:
    return Shard("w", torch.zeros(n), 0, n, 7, True, "layers.0")


def test_one_thread_restores_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with one_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        Noise(0, chunk_numel=1024, threads=2).add_([shard_of(5000)], (1, 0), 0.5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_one_thread_is_off_for_other_devices():
    """A GPU's noise pass must not touch the CPU thread pool (selected off without a GPU to run on)."""
    threads = torch.get_num_threads()
    with one_thread(torch.device("cuda", 0)):
        assert torch.get_num_threads() == threads
    with one_thread(torch.device("meta")):
        assert torch.get_num_threads() == threads


def test_noise_lanes_follow_the_cpu_threads_and_are_one_elsewhere():
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            assert default_threads("cpu") == count
        assert default_threads(torch.device("cuda", 0)) == 1
        assert default_threads("meta") == 1
    finally:
        torch.set_num_threads(threads)


def test_single_threaded_pass_gives_the_same_values():
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            for kind in ("gaussian", "table"):
                noise = Noise(3, kind=kind, chunk_numel=1024, table_numel=1 << 14)
                shard = shard_of(5000)
                noise.add_([shard], (2, 0), 1.0)
                results.append(shard.data.clone())
        assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
        assert not torch.equal(results[0], results[1])
    finally:
        torch.set_num_threads(threads)
