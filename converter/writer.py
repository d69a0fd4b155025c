"""A safetensors writer that writes shard files tensor by tensor.

The layout (shards, headers, offsets) is computed up front from the tensor specs,
so each tensor goes straight to its place in its shard and memory stays at about one
tensor. Shard naming and the index follow huggingface_hub's own splitting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from converter.checkpoint import DTYPE_NAMES, TensorSpec
from converter.errors import MergeError, write_failure

ALIGN = 8
COPY_CHUNK = 64 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    """Linux's sync_file_range(2), to start writing a finished range to disk while the merge goes on
    (the final fsync then has little left to do); None where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_START_WRITEBACK = _sync_file_range()


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return TensorSpec(self.name, self.dtype, self.shape, Path()).nbytes


def _header(entries: dict, size: int | None = None) -> bytes:
    """A safetensors header: the length, then the JSON of ``entries`` padded with spaces to ``size``
    bytes (or to the 8-byte alignment), as safetensors allows."""
    raw = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    raw += b" " * ((size - len(raw)) if size is not None else (-(len(raw) + 8) % ALIGN))
    return struct.pack("<Q", len(raw)) + raw


def _entry(dtype: torch.dtype, shape, begin: int, end: int) -> dict:
    return {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}


def write_index(directory: Path, weight_map: dict[str, str], total_size: int, metadata: dict | None = None) -> None:
    """``model.safetensors.index.json`` of a sharded checkpoint (tensor name -> shard file)."""
    path = directory / "model.safetensors.index.json"
    index = {"metadata": {**(metadata or {}), "total_size": total_size}, "weight_map": weight_map}
    try:
        path.write_text(json.dumps(index, indent=2) + "\n")
    except OSError as exc:
        raise _io_error(path, exc) from None


class _Shard:
    def __init__(self, path: Path, specs: list[OutSpec]):
        self.path = path
        self.specs = specs
        entries: dict = {}
        offset = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        for spec in specs:
            entries[spec.name] = _entry(spec.dtype, spec.shape, offset, offset + spec.nbytes)
            self.offsets[spec.name] = (offset, offset + spec.nbytes)
            offset += spec.nbytes
        self.header = _header(entries)
        self.data_bytes = offset
        self.fd: int | None = None
        self.written: dict[str, int] = {}  # bytes written per tensor


def _io_error(path: Path, exc: OSError) -> MergeError:
    return write_failure(exc, "writing", path)


def _copy_range(src_fd: int, dst_fd: int, offset: int, out: int, remaining: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), or by reads and writes where it cannot."""
    try:
        while remaining:
            n = os.copy_file_range(src_fd, dst_fd, min(remaining, COPY_CHUNK), offset, out)
            if n == 0:
                raise OSError(errno.EIO, "short copy")
            remaining, offset, out = remaining - n, offset + n, out + n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while remaining:
            chunk = os.pread(src_fd, min(remaining, COPY_CHUNK), offset)
            if not chunk:
                raise OSError(errno.EIO, "short read") from None
            os.pwrite(dst_fd, chunk, out)
            remaining, offset, out = remaining - len(chunk), offset + len(chunk), out + len(chunk)


class ShardedWriter:
    """Writes ``specs`` into ``directory`` as HF-named safetensors shards.

    Every tensor has a fixed place in its shard, computed up front, so tensors (and row
    ranges of a tensor) may be written in any order and from several threads
    (``os.pwrite``); ``finalize`` checks that every byte was written.
    """

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
        self.specs = by_name
        self.order = [s.name for sh in self.shards for s in sh.specs]
        self.total_size = sum(s.nbytes for s in specs)
        self._lock = threading.Lock()

    def _fd(self, shard: _Shard) -> int:
        with self._lock:
            if shard.fd is None:
                try:
                    fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.pwrite(fd, shard.header, 0)
                    os.ftruncate(fd, len(shard.header) + shard.data_bytes)
                except OSError as exc:
                    raise _io_error(shard.path, exc) from None
                shard.fd = fd
            return shard.fd

    def _place(self, name: str, offset: int, nbytes: int) -> tuple[_Shard, int]:
        shard = self.tensor_to_shard[name]
        begin, end = shard.offsets[name]
        if offset < 0 or begin + offset + nbytes > end:
            raise MergeError(f"internal: bytes {offset}..{offset + nbytes} of {name} lie outside the tensor")
        return shard, len(shard.header) + begin + offset

    def _done(self, shard: _Shard, name: str, nbytes: int, pos: int, fd: int) -> None:
        if _START_WRITEBACK is not None:
            _START_WRITEBACK(fd, pos, nbytes, SYNC_FILE_RANGE_WRITE)  # asynchronous; errors surface at fsync
        with self._lock:
            shard.written[name] = shard.written.get(name, 0) + nbytes

    def rows_block(self, name: str) -> int | None:
        """Rows of any tensor may be written as they come (a writer that encodes them may need blocks of rows)."""
        return 1

    def row_encoder(self, name: str):
        """None: rows are written as they are (a writer that keeps a quantized format encodes them)."""
        return None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor into its planned place."""
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise MergeError(f"internal: {name} is {tensor.dtype}{tuple(tensor.shape)}, "
                             f"planned {spec.dtype}{spec.shape}")
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, offset: int, tensor: torch.Tensor) -> None:
        """Write a contiguous part of a tensor (e.g. a range of rows) at byte ``offset`` within it."""
        if tensor.dtype != self.specs[name].dtype:
            raise MergeError(f"internal: {name} part is {tensor.dtype}, planned {self.specs[name].dtype}")
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        shard, pos = self._place(name, offset, len(data))
        fd = self._fd(shard)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], pos + done)
        except OSError as exc:
            raise _io_error(shard.path, exc) from None
        self._done(shard, name, len(data), pos, fd)

    def copy_bytes(self, name: str, src: Path, start: int, end: int) -> None:
        """Copy a tensor's bytes unchanged from a source safetensors file (no decode, in the kernel)."""
        shard, pos = self._place(name, 0, end - start)
        fd = self._fd(shard)
        try:
            with open(src, "rb") as s:
                _copy_range(s.fileno(), fd, start, pos, end - start)
        except OSError as exc:
            raise _io_error(shard.path, exc) from None
        self._done(shard, name, end - start, pos, fd)

    def finalize(self) -> list[str]:
        """Check that every byte was written, fsync and close every shard, write the index;
        returns the file names written."""
        names = []
        for shard in self.shards:
            short = [s.name for s in shard.specs if shard.written.get(s.name, 0) != s.nbytes]
            if short:
                raise MergeError(f"internal: tensors not (or not fully) written to {shard.path.name}: {short[:5]}")
            fd = self._fd(shard)
            try:
                os.fsync(fd)
                os.close(fd)
            except OSError as exc:
                raise _io_error(shard.path, exc) from None
            finally:
                shard.fd = None
            names.append(shard.path.name)
        if self.is_sharded:
            write_index(self.directory, {n: self.tensor_to_shard[n].path.name for n in self.order}, self.total_size,
                        self.metadata)
            names.append("model.safetensors.index.json")
        return names

    def abort(self) -> None:
        """Close every shard still open (after a failure; the staging directory is removed by the caller)."""
        for shard in self.shards:
            if shard.fd is not None:
                try:
                    os.close(shard.fd)
                except OSError:
                    pass
                shard.fd = None


# The header of a shard written in order is filled in last (a packed quant_state's length is known only once it is
# quantized), in a space reserved up front: this many bytes of JSON per tensor beyond its quoted name.
_ENTRY_BOUND = 160


def start_writeback(file, nbytes: int) -> None:
    """Start writing the last ``nbytes`` written to the (buffered) ``file`` to disk now, without waiting: a big
    file written in one go otherwise piles up dirty pages until the kernel throttles the writer."""
    if _START_WRITEBACK is None:
        return
    file.flush()
    end = file.tell()
    _START_WRITEBACK(file.fileno(), end - nbytes, nbytes, SYNC_FILE_RANGE_WRITE)  # asynchronous; errors at fsync


class AppendingShard:
    """A safetensors file written tensor after tensor, when sizes are known only as each tensor comes
    (quantized variants); ``names`` bounds the header, whose space is reserved up front."""

    def __init__(self, path: Path, names: list[str]):
        self.path = path
        bound = 64 + sum(len(json.dumps(n)) + _ENTRY_BOUND for n in names)
        self.reserved = bound + (-(bound + 8) % ALIGN)
        self.entries: dict = {}
        self.offset = 0
        try:
            self.file = open(path, "wb")
            self.file.write(b"\0" * (8 + self.reserved))
        except OSError as exc:
            raise _io_error(path, exc) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor after the previous ones."""
        self.write_bands(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def write_bands(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], bands) -> None:
        """Append a tensor given band of rows by band of rows (``bands``: CPU or device tensors, in order)."""
        begin = self.offset
        for band in bands:
            data = band.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            try:
                self.file.write(memoryview(data))
                start_writeback(self.file, data.nbytes)
            except OSError as exc:
                raise _io_error(self.path, exc) from None
            self.offset += data.nbytes
        if self.offset - begin != math.prod(shape) * dtype.itemsize:
            raise MergeError(f"internal: {name} got {self.offset - begin} bytes for shape {tuple(shape)} {dtype}")
        self.entries[name] = _entry(dtype, shape, begin, self.offset)

    def close(self) -> None:
        """Write the header into its reserved space, fsync and close."""
        header = _header(self.entries, self.reserved)
        try:
            if len(header) != 8 + self.reserved:
                raise MergeError(f"internal: safetensors header of {self.path.name} outgrew its reserved space")
            self.file.seek(0)
            self.file.write(header)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise _io_error(self.path, exc) from None
        finally:
            self.file.close()
