"""`zofsdp train|eval ...`: parse, build, run, close. Started by python, torchrun or deepspeed alike."""

from __future__ import annotations

import argparse
import json
import sys

from zofsdp.config import load_config


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("-c", "--config", help="run YAML (default: the built-in defaults)")
    sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. zo.lr=1e-5 train.steps=100")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zofsdp", description="Zeroth-order fine-tuning on sharded models.",
        epilog="also: `zofsdp memory --help` (memory report), `zofsdp bench --help` (benchmarks)")
    commands = p.add_subparsers(dest="command", required=True)
    _common(commands.add_parser("train", help="fine-tune with a ZO optimizer"))
    ev = commands.add_parser("eval", help="accuracy of a model (base or saved run) on the held-out split")
    _common(ev)
    ev.add_argument("--json", help="also write the result to this file")
    return p


# Commands with their own argument parsers, in their own modules.
SUBPROGRAMS = {"memory": "zofsdp.measure.memory", "bench": "zofsdp.measure.bench"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBPROGRAMS:
        import importlib

        return importlib.import_module(SUBPROGRAMS[argv[0]]).main(argv[1:])
    args, extra = parser().parse_known_args(argv)
    # deepspeed's launcher appends --local_rank=N; the rank also arrives in the environment.
    extra = [a for a in extra if not a.startswith("--local_rank")]
    if extra:
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"zofsdp: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "train":
        from zofsdp.train import train

        train(cfg)
        return 0
    if args.command == "eval":
        return _eval(cfg, args.json)
    return 1


def _eval(cfg, json_path: str | None) -> int:
    from zofsdp.train import evaluate, held_out, setup

    session = setup(cfg)
    try:
        result = evaluate(session, held_out(session))
    finally:
        session.backend.close()
    result.update(model=cfg.model.name_or_path, task=cfg.data.task, split=cfg.data.eval_split)
    if session.backend.rank == 0:
        print(json.dumps(result))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
