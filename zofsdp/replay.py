"""`zofsdp replay --base MODEL --run OUTPUT_DIR --out DIR`: rebuild a run's fine-tuned weights from the base
model and the run's seed log alone (zofsdp.seedlog), with no forward pass and no training data.

The optimizer the run used is built again, on one process, from the config in the log's header, and each
logged step is run with a loss oracle that hands back the logged losses. The step then perturbs, restores
and updates exactly as in training (the restore is part of the arithmetic: where +εz, −2εz, +εz does not
give the weight back to the bit, training kept that bit and so does replay), CurvZO draws the same masks and
AdaLeZO the same layers (their state evolves only from those losses), and non-finite losses skip the same
steps. Replaying on the device kind the run trained on gives the same noise; fp32 weights then come out
bitwise equal to one process's training, and within an ulp of a sharded run's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from zofsdp import seedlog
from zofsdp.errors import UserError

log = logging.getLogger("zofsdp")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zofsdp replay", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the model the run started from (its model.name_or_path)")
    p.add_argument("--run", required=True, help="the run's output_dir (holds seedlog.bin)")
    p.add_argument("--out", required=True, help="folder for the rebuilt model (Hugging Face safetensors)")
    p.add_argument("--steps", type=int, default=0, help="replay only the first N steps (default: all)")
    args = p.parse_args(argv)
    result = replay(args.base, Path(args.run), Path(args.out), args.steps)
    print(json.dumps(result))
    return 0


def replay(base: str, run: Path, out: Path, steps: int = 0) -> dict:
    """Rebuild the weights after `steps` (0: all) logged steps of `run` into `out`; returns a summary."""
    from zofsdp.checkpoint import check_model, model_signature
    from zofsdp.metrics import setup_logging
    from zofsdp.models import load_tokenizer
    from zofsdp.optim import build_optimizer, param_shapes
    from zofsdp.parallel.none import NoneBackend
    from zofsdp.saving import save_sharded

    setup_logging(0)
    if not (run / seedlog.FILE).is_file():
        raise UserError(f"--run {run}: no {seedlog.FILE} there (not a run's output_dir, or a run from before "
                        "the seed log existed)")
    header, records = seedlog.read(run / seedlog.FILE)
    records = _usable(header, records, steps)
    cfg = replay_config(header, base)
    backend = NoneBackend(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = backend.wrap(backend.load_model(cfg.model, len(tokenizer)))
    check_model(header["model"], model_signature(model), run / seedlog.FILE,
                hint=f"--base must be the model the run started from ({header['config']['model']['name_or_path']})")
    model.register_forward_pre_hook(_no_forward)
    optimizer = build_optimizer(cfg.zo, backend.shards(), cfg.train.seed, backend.device, blocks=backend.blocks(),
                                probe=backend.probe, rounding=cfg.model.update_rounding,
                                all_reduce=backend.all_reduce_sum, shapes=param_shapes(backend))
    start = time.perf_counter()
    with torch.no_grad():
        for record in records:
            optimizer.step(_oracle(record), record.step)
    seconds = time.perf_counter() - start
    log.info("replayed %d steps in %.1f s (%.3f s per step, no forward pass)", len(records), seconds,
             seconds / max(len(records), 1))
    save_sharded(backend, model, out, getattr(torch, cfg.model.dtype), tokenizer)
    return {"steps": len(records), "replay_s": round(seconds, 3), "out": str(out),
            "optimizer": cfg.zo.optimizer, "noise": header["noise_kind"]}


def replay_config(header: dict, base: str):
    """The run's config on one process, from `base`, with the noise kind the run resolved `auto` to."""
    from zofsdp.config import RunConfig, from_dict

    tree = json.loads(json.dumps(header["config"]))
    tree["model"]["name_or_path"] = base
    tree["parallel"] = {**tree["parallel"], "backend": "none"}
    tree["zo"]["noise"] = header["noise_kind"]
    tree["train"]["resume"] = ""
    return from_dict(RunConfig, tree)


def _usable(header: dict, records: list[seedlog.Record], steps: int) -> list[seedlog.Record]:
    """The records to replay: consecutive from step 1, not past where the log stops being replayable."""
    for i, record in enumerate(records):
        if record.step != i + 1:
            raise UserError(f"the seed log jumps from step {i} to {record.step}: it is not a whole run")
    wanted = steps or len(records)
    if wanted > len(records):
        raise UserError(f"--steps {steps}: the seed log holds {len(records)} steps")
    until = header.get("replayable_until")
    if until is not None and wanted > until:
        raise UserError(f"the seed log replays only up to step {until}: the run was resumed there with "
                         f"{header.get('not_replayable_because')}. Pass --steps {until} for that step's weights")
    return records[:wanted]


def _oracle(record: seedlog.Record):
    """loss_fn for one step: the logged floats, in the order training's forwards returned them (and its
    `decide` took them: DiZO's projection factors come back as the run decided them)."""
    values = iter(record.losses)

    def loss_fn(batch: int = 0, per_example: bool = False) -> float:  # per-example statistics come via decide
        try:
            return next(values)
        except StopIteration:
            raise RuntimeError(f"step {record.step}: the optimizer asked for more losses than the "
                               f"{len(record.losses)} logged; the log does not match this zofsdp") from None

    loss_fn.decide = lambda decided: [loss_fn() for _ in decided]
    return loss_fn


def _no_forward(module, args):
    raise RuntimeError("replay ran a forward pass: it must rebuild the weights from the log alone")
