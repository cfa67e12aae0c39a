"""`zofsdp train|eval|memory|bench ...`: parse, build, run, close. Started by python, torchrun or deepspeed.

Options and `section.key=value` overrides mix in any order (launch scripts put overrides first), so each
command has its own parser and they are parsed intermixed.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys

from zofsdp.config import load_config
from zofsdp.errors import UserError

# Commands with their own argument parsers, in their own modules.
SUBPROGRAMS = {"memory": "zofsdp.measure.memory", "bench": "zofsdp.measure.bench", "replay": "zofsdp.replay"}
COMMANDS = {"train": "fine-tune with a ZO optimizer",
            "eval": "accuracy of a model (base or saved run) on the held-out split",
            "memory": "peak memory of a ZO step against inference, measured or simulated",
            "bench": "step overhead, noise throughput, traffic, convergence",
            "replay": "rebuild a run's weights from the base model and its seed log (no forward pass)"}


def versions() -> dict[str, str]:
    """The versions a bug report needs: zofsdp and the libraries that decide its numbers (read from the
    installed packages' metadata, so nothing heavy is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from zofsdp import __version__

    out = {"zofsdp": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zofsdp", description="Zeroth-order fine-tuning on sharded models.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(f"  {k:8} {v}" for k, v in COMMANDS.items())
                                + "\n\n`zofsdp COMMAND --help` for each.")
    p.add_argument("command", choices=list(COMMANDS))
    p.add_argument("--version", action="store_true", help="print the versions of zofsdp, torch, ... and exit")
    return p


def without_local_rank(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that DeepSpeed's launcher puts before the command (the rank also arrives
    in the environment as LOCAL_RANK)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out


def command_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"zofsdp {command}", description=COMMANDS[command])
    p.add_argument("-c", "--config", help="run YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. zo.lr=1e-5 train.steps=100")
    if command == "eval":
        p.add_argument("--json", help="also write the result to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = without_local_rank(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(" ".join(f"{k} {v}" for k, v in versions().items()))
        return 0
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)  # prints usage, --help or --version, and exits
        return 2
    command, rest = argv[0], argv[1:]
    try:
        return run(command, rest)
    except UserError as err:
        return report_user_error(str(err))
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise
        return report_user_error(f"{err.strerror}: {err.filename or err}")
    finally:
        release()


def release() -> None:
    """Free the finished command's model now, while Python is whole.

    A sharded model is cyclic garbage once its command returns (FSDP's hooks refer back to the modules),
    so without this the cyclic collector frees it whenever it next runs, possibly during interpreter
    shutdown. Its process group's gloo threads then tear down against a half-finalised interpreter, and
    a thread that needs the GIL there is ended by a forced unwind that C++ turns into `std::terminate`:
    "terminate called without an active exception" (SIGABRT) at random, seen once in CI (issue 9).
    """
    import gc

    gc.collect()
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():  # a command that failed before closing its group
        dist.destroy_process_group()


USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS}
"""A full disk, a quota, a folder you may not write: the user's to fix, so one line, no traceback."""


def report_user_error(message: str) -> int:
    """One line per rank (`ZOFSDP_TRACEBACK=1` re-raises for the full traceback instead)."""
    if os.environ.get("ZOFSDP_TRACEBACK"):
        raise
    rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"zofsdp: error{rank}: {message}", file=sys.stderr)
    return 2


def run(command: str, rest: list[str]) -> int:
    if command in SUBPROGRAMS:
        return importlib.import_module(SUBPROGRAMS[command]).main(rest)
    args = command_parser(command).parse_intermixed_args(rest)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:  # every config mistake: the message names the key
        raise UserError(f"config: {err}") from err
    if command == "train":
        from zofsdp.train import train

        train(cfg)
        return 0
    return _eval(cfg, args.json)


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
