"""Optimizers with parameter-sized state (NOT_INFERENCE_LEVEL in test_memory.py): their step peak is
inference-level MeZO plus exactly their state, counted by the tracker, and it does not grow."""

from __future__ import annotations

import pytest

from tests.memory.test_memory import NOT_INFERENCE_LEVEL, measure_in_process

pytestmark = pytest.mark.memory

STATE_BYTES_PER_PARAM = {"zo_adam": 8, "hizoo": 4, "loren": 4, "dizo": 0}
"""Per parameter owned by the rank: ZO-Adam's fp32 moments (8·P/N), HiZOO's fp32 diagonal Hessian (4·P/N),
LOREN's fp32 momentum (4·P_2D/N: not on 1-D tensors), corrected by STATE_OFFSET."""
STATE_OFFSET = {"loren": 4 * (1408 - 320), "dizo": 4 * 8192}
"""LOREN on tiny-llama: + its replicated fp32 a (4·Σin, Σin = 1408) − no momentum on the 320 1-D elements.
DiZO: its fp32 anchor of the 2 layers' k_proj and v_proj weights (8,192 elements of 3,219,776); measured from
step zo.dizo.interval, so the first of the 3 steps runs the projection's 20-forward search."""


def test_every_listed_optimizer_has_a_state_figure():
    assert set(NOT_INFERENCE_LEVEL) == set(STATE_BYTES_PER_PARAM)


def test_state_optimizers_are_mezo_plus_their_state():
    names = ["mezo", *STATE_BYTES_PER_PARAM]
    report = measure_in_process(optimizers=names, num_steps=3)
    (rank,) = report["ranks"]
    mezo = rank["optimizers"]["mezo"]["zo_step"]["total"]
    numel = rank["inference"]["breakdown"]["sharded_params"] // 4  # fp32 weights, all on this one rank
    for name, per_param in STATE_BYTES_PER_PARAM.items():
        o = rank["optimizers"][name]
        state = per_param * numel + STATE_OFFSET.get(name, 0)
        assert o["optimizer_state_bytes"] == state, (name, o["optimizer_state_bytes"], numel)
        extra = o["zo_step"]["total"] - mezo
        # the state, plus at most a few chunk-sized temporaries of the update pass (chunk 16384 fp32 = 64 KiB;
        # LOREN: also its K·Σin float64 column sums, 110 KiB here)
        assert state <= extra <= state + 8 * 64 << 10, (name, extra, state)
        after = o["current_after_step"]
        assert max(after) <= after[0], (name, after)

