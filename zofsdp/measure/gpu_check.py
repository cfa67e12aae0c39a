"""GPU check of the fused `philox` noise (run by launch/gpu_check.sh; needs CUDA and Triton).

On one GPU, with a random-weight model built from an architecture JSON (no weights to download):
- noise GB/s: one fused perturb pass over a flat fp32 tensor (read + write) vs `copy_` of the same bytes;
- z agreement: the kernel's z vs the CPU reference (`zofsdp.philox`) on up to 1M elements;
- launches per MeZO step (counted by the kernels) vs the chunked path's chunk operations (planned);
- step ÷ forwards: median MeZO step time over the median time of its two forwards;
- peak GPU memory of a step vs of an inference forward (torch.cuda.max_memory_allocated).
Writes a JSON and a markdown table. Every figure is measured here; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--model-json", default="configs/models/llama-2-7b.json")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: as in the JSON)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--optimizers", default="mezo",
                   help="comma-separated zo.optimizer names or protocol arms (zofsdp.measure.protocol.ARMS, e.g. "
                   "uniform:0.1) whose steps are timed beside MeZO's")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing each optimizer beyond MeZO")
    p.add_argument("--noise-numel", type=int, default=1 << 28, help="elements of the GB/s test tensor")
    p.add_argument("--json", default="docs/gpu_check.json")
    p.add_argument("--markdown", default="docs/gpu_check.md")
    p.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # tests: CPU + interpreter
    return p


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int:
    """Peak allocated bytes since the last reset (1 on CPU, where only the dry run comes: no division by 0)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 1


def noise_bandwidth(n: int, reps: int, device) -> dict:
    from zofsdp import philox
    from zofsdp.noise import Noise, Shard, mix_seed

    data, source = torch.zeros(n, device=device), torch.randn(n, device=device)
    shard = Shard("bench.weight", data, 0, n, 1, True, "layers.0")
    noise = Noise(0, kind="philox", device=device)
    noise.add_([shard], (0, 0), 1e-3)  # compile
    copy = [timed(lambda: data.copy_(source), device) for _ in range(reps)]
    fused = [timed(lambda: noise.add_([shard], (1, 0), 1e-3), device) for _ in range(reps)]
    gbytes = 2 * 4 * n / 1e9  # read + write of fp32
    m = min(1 << 20, n)
    probe = Shard("probe", torch.zeros(m, device=device), 12345, 1 << 30, 7, True, "layers.0")
    z = noise.slice(probe, (3, 0)).cpu()
    ref = philox.normal(mix_seed(0, 3, 0, 7), 12345, 12345 + m)
    return {"numel": n, "copy_GBps": gbytes / statistics.median(copy), "noise_GBps": gbytes / statistics.median(fused),
            "noise_vs_copy": statistics.median(copy) / statistics.median(fused),
            "z_max_abs_diff_vs_cpu_reference": float((z - ref).abs().max())}


def build_model(args, device):
    from transformers import AutoModelForCausalLM

    from zofsdp.measure.simulate import load_model_config

    config = load_model_config(args.model_json)
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.requires_grad_(False).eval()
    model.config.use_cache = False
    return model, config


def step_check(args, device) -> dict:
    from zofsdp.config import ZOConfig
    from zofsdp.measure.launches import count
    from zofsdp.models import param_info
    from zofsdp.noise import Shard, block_id
    from zofsdp.optim.mezo import MeZO
    from zofsdp.optim.probe import Probe
    from zofsdp.parallel.precision import probe_by_swapping

    model, config = build_model(args, device)
    # bf16 weights are never perturbed in place (+εz, −2εz, +εz does not restore them): as in training on one
    # process, each module's forward sees a perturbed copy of its weights (zofsdp.optim.probe).
    probe = None
    if args.dtype != "float32":
        probe = Probe()
        probe_by_swapping(model, probe)
    info = param_info(model)  # (decay, layer group): the units of the sparse samplers, as in training
    shards = [Shard(n, p.data.view(-1), 0, p.numel(), block_id(n), *info[n]) for n, p in model.named_parameters()]
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def forward() -> float:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    forward()
    reset_peak(device)
    forward_s = [timed(forward, device) for _ in range(args.reps)]
    inference_peak = peak(device)
    opt = MeZO(shards, ZOConfig(lr=1e-7, eps=1e-3, noise="philox"), seed=0, device=device, probe=probe)
    opt.step(forward, 0)  # compile the kernels
    launches_before = opt.noise.kernels.num_launches
    reset_peak(device)
    step_s = [timed(lambda s=s: opt.step(forward, s), device) for s in range(1, args.reps + 1)]
    step_peak = peak(device)
    launches = (opt.noise.kernels.num_launches - launches_before) / args.reps
    counts = count(shards)
    return {"model": Path(args.model_json).stem, "layers": config.num_hidden_layers, "dtype": args.dtype,
            "probe": "swapped copies" if probe is not None else "in place",
            "params": sum(s.numel for s in shards), "batch": args.batch, "seq": args.seq,
            "forward_s": statistics.median(forward_s), "step_s": statistics.median(step_s),
            "step_over_forwards": statistics.median(step_s) / (2 * statistics.median(forward_s)),
            "launches_per_step": launches, "chunk_ops_per_step_chunked": counts["chunked"]["chunk_ops_per_step"],
            "inference_peak_bytes": inference_peak, "step_peak_bytes": step_peak,
            "step_over_inference_memory": step_peak / inference_peak,
            "optimizers": other_steps(args, shards, probe, forward, device, statistics.median(step_s),
                                      statistics.median(forward_s), inference_peak)}


def other_steps(args, shards, probe, forward, device, mezo_s: float, forward_s: float, inference_peak: int) -> dict:
    """Median step time of each `--optimizers` entry beyond MeZO, on the same model, batch and probe path:
    the GPU wall time that a per-step speedup converts to (sparse samplers skip unsampled blocks' noise)."""
    from zofsdp.config import load_config
    from zofsdp.measure.protocol import ARMS
    from zofsdp.optim import build_optimizer

    out = {}
    for name in [n for n in args.optimizers.split(",") if n and n != "mezo"]:
        # a protocol arm (e.g. uniform:0.1) or a plain zo.optimizer name
        arm = ARMS.get(name, [f"zo.optimizer={name}"])
        zo = load_config(None, [*arm, "zo.lr=1e-7", "zo.eps=1e-3", "zo.noise=philox"]).zo
        opt = build_optimizer(zo, shards, 0, device, probe=probe)
        for s in range(args.warmup):
            opt.step(forward, s)
        reset_peak(device)
        records, times = [], []
        for s in range(args.warmup, args.warmup + args.reps):
            times.append(timed(lambda s=s: records.append(opt.step(forward, s)), device))
        step_s = statistics.median(times)
        out[name] = {"step_s": step_s, "step_over_mezo_step": step_s / mezo_s,
                     "step_over_forwards": step_s / (2 * forward_s),
                     "forward_passes": statistics.mean(r.get("forward_passes", 2) for r in records),
                     "keep_fraction": statistics.mean(r.get("keep_fraction", 1.0) for r in records),
                     "step_over_inference_memory": peak(device) / inference_peak}
        del opt
    return out


def markdown(r: dict) -> str:
    n, s = r["noise"], r["step"]
    return "\n".join([
        f"GPU check on {r['device']} (torch {r['torch']}, triton {r['triton']}):", "",
        "| figure | value |", "|---|---|",
        f"| noise pass, fp32, {n['numel']:,} elements | {n['noise_GBps']:.0f} GB/s |",
        f"| copy of the same bytes | {n['copy_GBps']:.0f} GB/s |",
        f"| noise / copy bandwidth | {n['noise_vs_copy']:.2f} |",
        f"| kernel z vs CPU reference, max abs diff | {n['z_max_abs_diff_vs_cpu_reference']:.2e} |",
        f"| model | {s['model']} ({s['layers']} layers, {s['params']:,} params, {s['dtype']}; probes {s['probe']}) |",
        f"| batch x seq | {s['batch']} x {s['seq']} |",
        f"| forward / MeZO step | {s['forward_s'] * 1e3:.1f} ms / {s['step_s'] * 1e3:.1f} ms |",
        f"| step / forwards | {s['step_over_forwards']:.2f} |",
        f"| kernel launches per step (fused) | {s['launches_per_step']:.0f} |",
        f"| chunk operations per step (chunked path, planned) | {s['chunk_ops_per_step_chunked']:,} |",
        (f"| peak memory: inference / step | {s['inference_peak_bytes'] / 2**30:.2f} GiB / "
         f"{s['step_peak_bytes'] / 2**30:.2f} GiB ({s['step_over_inference_memory']:.3f}x) |"),
        *[f"| {name} step (keep fraction {o['keep_fraction']:.2f}, {o['forward_passes']:.1f} forwards) | "
          f"{o['step_s'] * 1e3:.1f} ms: {o['step_over_mezo_step']:.2f}x MeZO's, {o['step_over_forwards']:.2f}x its "
          f"forwards, memory {o['step_over_inference_memory']:.3f}x |" for name, o in s["optimizers"].items()], ""])


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.cpu_dry_run:  # the code path, not the figures: Triton's interpreter on CPU tensors
        import os

        os.environ.update(TRITON_INTERPRET="1", ZOFSDP_PHILOX_KERNELS="1")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
              "nothing measured, nothing written. Run it on a GPU host.", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)", "torch": torch.__version__,
              "triton": triton.__version__, "args": vars(args),
              "noise": noise_bandwidth(args.noise_numel, args.reps, device), "step": step_check(args, device)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    Path(args.markdown).write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
