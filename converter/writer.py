"""A safetensors writer that writes shard files tensor by tensor.

The layout (shards, headers, offsets) is computed up front from the tensor specs,
so each tensor goes straight to its place in its shard and memory stays at about one
tensor. Shard naming and the index follow huggingface_hub's own splitting.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from converter.checkpoint import DTYPE_NAMES, TensorSpec
from converter.errors import MergeError

ALIGN = 8
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.dtype, self.shape, Path()).nbytes


class _Shard:
    def __init__(self, path: Path, specs: list[OutSpec]):
        self.path = path
        self.specs = specs
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        for spec in specs:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            self.offsets[spec.name] = (offset, offset + spec.nbytes)
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % ALIGN)
        self.header = struct.pack("<Q", len(raw)) + raw
        self.data_bytes = offset
        self.file = None
        self.written: set[str] = set()


def _io_error(path: Path, exc: OSError) -> MergeError:
    if exc.errno == errno.ENOSPC:
        return MergeError(f"no space left on the device while writing {path}: free some space, or choose another --output")
    return MergeError(f"could not write {path}: {exc.strerror or exc}. Check that the output location is writable.")


class ShardedWriter:
    """Writes ``specs`` (in order) into ``directory`` as HF-named safetensors shards."""

    def __init__(self, directory: Path, specs: list[OutSpec], max_shard_size: int | str):
        self.directory = Path(directory)
        split = split_state_dict_into_shards_factory(
            {s.name: s for s in specs},
            get_storage_size=lambda s: s.nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        by_name = {s.name: s for s in specs}
        self.shards = [_Shard(self.directory / fname, [by_name[n] for n in names])
                       for fname, names in split.filename_to_tensors.items()]
        self.is_sharded = split.is_sharded
        self.metadata = split.metadata
        self.tensor_to_shard = {n: sh for sh in self.shards for n in sh.offsets}
        self.order = [s.name for sh in self.shards for s in sh.specs]
        self.total_size = sum(s.nbytes for s in specs)

    def _open(self, shard: _Shard):
        if shard.file is None:
            try:
                shard.file = open(shard.path, "wb")
                shard.file.write(shard.header)
            except OSError as exc:
                raise _io_error(shard.path, exc) from None
        return shard.file

    def _check_position(self, shard: _Shard, name: str) -> None:
        begin, _ = shard.offsets[name]
        if shard.file.tell() != len(shard.header) + begin:
            raise MergeError(f"internal: {name} written out of order in {shard.path.name}")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard = self.tensor_to_shard[name]
        spec = next(s for s in shard.specs if s.name == name)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise MergeError(f"internal: {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {spec.dtype}{spec.shape}")
        f = self._open(shard)
        self._check_position(shard, name)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            f.write(memoryview(data))
        except OSError as exc:
            raise _io_error(shard.path, exc) from None
        shard.written.add(name)

    def copy_bytes(self, name: str, src: Path, start: int, end: int) -> None:
        """Copy a tensor's bytes unchanged from a source safetensors file (no decode)."""
        shard = self.tensor_to_shard[name]
        f = self._open(shard)
        self._check_position(shard, name)
        try:
            f.flush()
            with open(src, "rb") as s:
                remaining, offset = end - start, start
                try:
                    while remaining:
                        n = os.copy_file_range(s.fileno(), f.fileno(), min(remaining, COPY_CHUNK), offset)
                        if n == 0:
                            raise OSError(errno.EIO, "short copy")
                        remaining -= n
                        offset += n
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    s.seek(offset)
                    while remaining:
                        chunk = s.read(min(remaining, COPY_CHUNK))
                        f.write(chunk)
                        remaining -= len(chunk)
                f.seek(0, os.SEEK_END)
        except OSError as exc:
            raise _io_error(shard.path, exc) from None
        shard.written.add(name)

    def finalize(self) -> list[str]:
        """Close and fsync every shard, write the index; returns the file names written."""
        names = []
        for shard in self.shards:
            missing = [s.name for s in shard.specs if s.name not in shard.written]
            if missing:
                raise MergeError(f"internal: tensors never written to {shard.path.name}: {missing[:5]}")
            f = self._open(shard)
            try:
                f.flush()
                os.fsync(f.fileno())
                f.close()
            except OSError as exc:
                raise _io_error(shard.path, exc) from None
            names.append(shard.path.name)
        if self.is_sharded:
            index = {"metadata": {**self.metadata, "total_size": self.total_size},
                     "weight_map": {n: self.tensor_to_shard[n].path.name for n in self.order}}
            path = self.directory / "model.safetensors.index.json"
            try:
                path.write_text(json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise _io_error(path, exc) from None
            names.append(path.name)
        return names

    def abort(self) -> None:
        for shard in self.shards:
            if shard.file is not None and not shard.file.closed:
                shard.file.close()
