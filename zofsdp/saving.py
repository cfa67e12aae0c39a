"""Save at scale: a Hugging Face safetensors folder written by every rank, never whole on one host.

The tensors (tied weights once) are packed in order into files of at most `max_file_bytes`; file i is
written by rank i mod world size. The header of every file is known before any data (shapes and dtypes
come from the sharded model's metadata), so each file is streamed: for every tensor in turn, all ranks
send their pieces of it point-to-point to the writer of its file (FSDP2's rows, ZeRO-3's flat
partitions), which converts it, 64 MiB at a time, and appends it.
A rank therefore holds its shard plus one gathered tensor (plus a 64 MiB cast buffer); the ranks write
their files in parallel. Several files get a `model.safetensors.index.json`, as `from_pretrained` expects.

The folder is assembled under `<folder>.tmp` and renamed when complete: a crash never leaves a folder that
looks loadable. With several nodes, `folder` must be on a file system every node sees.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MAX_FILE_BYTES = 5 * 10**9  # transformers' default shard size ("5GB")
CAST_CHUNK_BYTES = 64 << 20
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


@dataclass
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: int = 0

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty(0, dtype=self.dtype).element_size()


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The global shape of a whole, FSDP2-sharded (DTensor) or ZeRO-3-partitioned tensor."""
    return tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)


def plan(model: nn.Module, save_dtype: torch.dtype | None, max_file_bytes: int = MAX_FILE_BYTES) -> list[Entry]:
    """The tensors to write, in state-dict order without tied aliases, each assigned to a file."""
    from zofsdp.models import untied_state

    state = untied_state(model, model.state_dict(keep_vars=True))
    entries, size, file = [], 0, 0
    for key, t in state.items():
        dtype = save_dtype if save_dtype is not None and t.is_floating_point() else t.dtype
        entry = Entry(key, full_shape(t), dtype)
        if size and size + entry.nbytes > max_file_bytes:
            file, size = file + 1, 0
        entry.file, size = file, size + entry.nbytes
        entries.append(entry)
    return entries


def file_names(num_files: int) -> list[str]:
    if num_files == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_files:05d}.safetensors" for i in range(num_files)]


def header(entries: list[Entry]) -> bytes:
    """A safetensors header (8-byte length, then JSON padded to 8 bytes) for tensors stored in order."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        meta[e.key] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                       "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_tensor(handle, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Append `tensor` cast to `dtype`, converting and copying to the host 64 MiB at a time."""
    flat = tensor.detach().reshape(-1)
    step = max(CAST_CHUNK_BYTES // max(flat.element_size(), 1), 1)
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step].to(device="cpu", dtype=dtype).contiguous()
        handle.write(chunk.view(torch.uint8).numpy().data)


def save_sharded(backend, model: nn.Module, folder: Path, save_dtype: torch.dtype | None = None,
                 tokenizer=None, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Write `model` as a Hugging Face folder with every rank writing its files; a collective."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    rank, world = backend.rank, backend.world_size
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    entries = plan(model, save_dtype, max_file_bytes)
    names = file_names(entries[-1].file + 1)
    mine = {i for i in range(len(names)) if i % world == rank}
    with ExitStack() as files:
        handles = {i: files.enter_context(open(tmp / names[i], "wb")) for i in mine}
        for i, handle in handles.items():
            handle.write(header([e for e in entries if e.file == i]))
        by_key = {e.key: e for e in entries}
        owners = [(e.key, e.file % world) for e in entries]
        for key, full in backend.full_tensors(owners):  # one tensor at a time, whole on its writer only
            if full is not None:
                write_tensor(handles[by_key[key].file], full, by_key[key].dtype)
            del full
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())  # on disk before rank 0 publishes the folder
    backend.barrier()  # every file complete
    if rank == 0:
        _finish(model, tmp, folder, entries, names, save_dtype, tokenizer)
    backend.barrier()


def _finish(model, tmp: Path, folder: Path, entries, names, save_dtype, tokenizer) -> None:
    """Config, index and tokenizer beside the weights, then publish the folder in one rename."""
    config = copy.deepcopy(model.config)
    if save_dtype is not None:
        config.dtype = save_dtype
    config.to_json_file(str(tmp / "config.json"))
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.key: names[e.file] for e in entries}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def gather_to(t: torch.Tensor, owner: int, rank: int, world_size: int) -> torch.Tensor | None:
    """The whole tensor on rank `owner` (None elsewhere) from FSDP2's Shard(0) pieces, by point-to-point
    sends into one preallocated tensor: the owner holds one tensor, the others nothing extra (an all-gather
    would give every rank a copy, and gloo's doubles it). A plain tensor is whole already."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t if rank == owner else None
    local = t.to_local()
    if rank != owner:
        if local.numel():
            dist.send(local.contiguous(), dst=owner)
        return None
    out = torch.empty(t.shape, dtype=t.dtype, device=local.device)
    rows = t.shape[0]
    step = -(-rows // world_size)  # FSDP2 splits dim 0 like torch.chunk
    for r in range(world_size):
        lo, hi = min(r * step, rows), min((r + 1) * step, rows)
        if hi <= lo:
            continue
        if r == rank:
            out[lo:hi].copy_(local)
        else:
            dist.recv(out[lo:hi], src=r)
    return out


def gather_partitions(part: torch.Tensor, owner: int, rank: int, world_size: int) -> torch.Tensor | None:
    """ZeRO-3's equal-length flat partitions, concatenated on rank `owner` (None elsewhere), point-to-point."""
    import torch.distributed as dist

    if rank != owner:
        dist.send(part.contiguous(), dst=owner)
        return None
    n = part.numel()
    out = torch.empty(world_size * n, dtype=part.dtype, device=part.device)
    for r in range(world_size):
        if r == rank:
            out[r * n : (r + 1) * n].copy_(part)
        else:
            dist.recv(out[r * n : (r + 1) * n], src=r)
    return out
