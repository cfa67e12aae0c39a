"""Compile every variant of the philox kernels for a CUDA target on a machine without a GPU (Triton's
frontend, LLVM and the ptxas bundled in its wheel), catching what the interpreter lets through (types,
casts, pointer tables). Run as a script by test_philox_kernels.py: it must not see TRITON_INTERPRET=1.
Prints one line per variant; exit status 1 if any variant fails to compile."""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zofsdp import _triton_noise as tn

SHARD = {"x_ptr": None, "n": "i32", "start": "i64", "key_lo": "i64", "key_hi": "i64", "sr_lo": "i64",
         "sr_hi": "i64", "perturb": "fp32", "restore": "fp32", "update": "fp32", "decay": "fp32"}
GROUP = {"tile_shard": "*i64", "tile_counter": "*i64", "addrs": "*i64", "numels": "*i64", "starts": "*i64",
         "keys": "*i64", "scalars": "*fp32"}


def variants():
    for store, ptr in ((0, "*fp32"), (1, "*bf16"), (2, "*fp16")):
        for mode in (0, 1):
            for sr in (False, True) if store and mode else (False,):
                yield ptr, {"BLOCK": 256, "MODE": mode, "STORE": store, "SR": sr,
                            "HAS_RESTORE": mode == 1 and store == 0, "HAS_DECAY": mode == 1}


def main(arch: int) -> int:
    target, failed = GPUTarget("cuda", arch, 32), 0
    for ptr, const in variants():
        flags = {k: "constexpr" for k in const}
        for name, fn, sig in (("shard", tn.shard_kernel, {**SHARD, "x_ptr": ptr, **flags}),
                              ("group", tn.group_kernel, {**GROUP, **flags})):
            try:
                kernel = triton.compile(ASTSource(fn, sig, constexprs=const), target=target)
                print(f"ok {name} {const} cubin {len(kernel.asm['cubin'])} B")
            except Exception as err:  # noqa: BLE001  (report every variant, then fail)
                failed += 1
                print(f"FAILED {name} {const}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
