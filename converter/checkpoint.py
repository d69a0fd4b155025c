"""Lazy access to the tensors of a checkpoint directory, never the whole model.

Safetensors files are read through their headers (names, dtypes, shapes, byte ranges)
and ranged reads into fresh tensors (no mmap, so file pages do not pile up in RSS);
``pytorch_model*.bin`` through ``torch.load(weights_only=True,
mmap=True)``. Nothing is read until a tensor is asked for.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.errors import BadInputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SINGLES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int | None = None  # absolute byte range in a safetensors file
    end: int | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.numel * dtype_size(self.dtype)


@dataclass(frozen=True)
class RowSource:
    """Where rows of a tensor are read from: a stored tensor's byte range, and how its rows become the tensor's."""

    spec: TensorSpec  # the stored tensor whose rows are read: the tensor itself, or its quantized codes
    decode: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None  # (stored rows, r0, r1) -> float rows
    block: int = 1  # chunks start at multiples of this many rows


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """A JSON file that must hold an object (a config, an index), or a BadInputError naming it and the fix."""
    try:
        value = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BadInputError(f"cannot read {what} {path}: {exc.strerror or exc}", hint=fix) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{what} {path} is not valid JSON ({exc})", hint=fix) from None
    if not isinstance(value, dict):
        raise BadInputError(f"{what} {path} holds a JSON {type(value).__name__}, not an object", hint=fix)
    return value


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset). Raises BadInputError for truncated or corrupt files."""
    size = path.stat().st_size
    fix = f"re-download or re-save {path.name}; the file is damaged"
    if size < 8:
        raise BadInputError(f"{path}: truncated safetensors file ({size} bytes)", hint=fix)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n <= 0 or 8 + n > size or n > 100_000_000:
            raise BadInputError(f"{path}: corrupt safetensors header (header length {n}, file size {size})", hint=fix)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: corrupt safetensors header ({exc})", hint=fix) from None
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: corrupt safetensors header (not a JSON object)", hint=fix)
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1))
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise BadInputError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}", hint=fix)
        expected = dtype_size(SAFETENSORS_DTYPES[info["dtype"]])
        for d in info.get("shape", []):
            expected *= d
        if end - begin != expected or data_start + end > size:
            raise BadInputError(
                f"{path}: truncated or corrupt safetensors file: tensor {name} needs bytes "
                f"{data_start + begin}..{data_start + end} but the file has {size}",
                hint=fix,
            )
    return header, data_start


def safetensors_specs(path: Path) -> list[TensorSpec]:
    """The tensors of a safetensors file (name, dtype, shape, byte range), in file order."""
    header, data_start = read_safetensors_header(path)
    specs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        specs.append(
            TensorSpec(name, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), path, data_start + begin,
                       data_start + end)
        )
    specs.sort(key=lambda s: s.start)
    return specs


def read_range(spec: TensorSpec) -> torch.Tensor:
    """A fresh CPU tensor with the bytes of ``spec`` (positional reads, no mmap)."""
    out = torch.empty(spec.shape, dtype=spec.dtype)
    if spec.end != spec.start:
        read_into(spec, spec.start, out.reshape(-1).view(torch.uint8))
    return out


def read_into(spec: TensorSpec, offset: int, buf: torch.Tensor) -> None:
    """Fill the uint8 CPU tensor ``buf`` with bytes of ``spec``'s file from ``offset`` (positional reads,
    no mmap); a file that ends early is named as truncated."""
    view = memoryview(buf.numpy())
    with open(spec.file, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = os.preadv(f.fileno(), [view[done:]], offset + done)
            if not n:
                raise BadInputError(f"{spec.file}: truncated while reading {spec.name}", hint="re-download the file")
            done += n


BAND_BYTES = 64 << 20  # variants read (and write) a big tensor in bands of rows of about this size


def row_bands(spec: TensorSpec, multiple: int = 1):
    """The tensor's rows read a band at a time, each band about BAND_BYTES (a whole number of ``multiple`` rows),
    into a fresh CPU tensor: a big tensor is never whole in memory."""
    rows = spec.shape[0] if spec.shape else 1
    row_bytes = (spec.end - spec.start) // max(rows, 1)
    step = max(multiple, BAND_BYTES // max(row_bytes, 1) // multiple * multiple)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out = torch.empty((r1 - r0, *spec.shape[1:]) if spec.shape else (), dtype=spec.dtype)
        if out.numel():
            read_into(spec, spec.start + r0 * row_bytes, out.reshape(-1).view(torch.uint8))
        yield out


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` restricted to tensors: a pickle that would run code is refused."""
    try:  # files in torch's zip format are mapped, not read; the legacy format cannot be
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise BadInputError(
            f"{path}: refused to load: it is not a plain tensor file that torch.load(weights_only=True) accepts "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            hint="convert it to safetensors with a trusted tool, or obtain a safetensors copy; "
            "pickles that run code are never loaded",
        ) from None


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory, in index order."""
    for index_name in WEIGHT_INDEXES:
        index = directory / index_name
        if index.is_file():
            weight_map = read_json_object(index, "weight index", "re-download or re-save the model").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise BadInputError(f"{index}: `weight_map` is missing or not a mapping of tensor names to files",
                                    hint="re-download or re-save the model")
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise BadInputError(f"{index} names shards that are missing: {', '.join(missing)}",
                                    hint="download the missing shard files")
            return [directory / n for n in names]
    for single in WEIGHT_SINGLES:
        if (directory / single).is_file():
            return [directory / single]
    return []


class Checkpoint:
    """The tensors of one model directory, read lazily."""

    readable = True  # False: names, dtypes and shapes only (a hub base's headers)

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files = weight_files(self.directory)
        if not self.files:
            raise BadInputError(
                f"{self.directory}: no model weights found (looked for {', '.join(WEIGHT_INDEXES + WEIGHT_SINGLES)})",
                hint="point --base at a Hugging Face model directory that holds its weights",
            )
        self.specs: dict[str, TensorSpec] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                file_specs = safetensors_specs(path)
            else:
                tensors = load_bin(path)
                self._bins[path] = tensors
                file_specs = [TensorSpec(k, v.dtype, tuple(v.shape), path) for k, v in tensors.items()]
            for spec in file_specs:
                self.specs.setdefault(spec.name, spec)

    @classmethod
    def from_specs(cls, directory: Path, specs: list[TensorSpec]) -> "Checkpoint":
        """Names, dtypes and shapes only (a hub base's headers): enough to plan, not to merge."""
        ckpt = cls.__new__(cls)
        ckpt.directory = Path(directory)
        ckpt.files = sorted({s.file for s in specs})
        ckpt.specs = {s.name: s for s in specs}
        ckpt._bins = {}
        ckpt.readable = False
        return ckpt

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor read with plain reads (no mmap: file pages do not pile up in RSS)."""
        spec = self.specs[name]
        if spec.file in self._bins:
            return self._bins[spec.file][name]
        return read_range(spec)

    def row_source(self, name: str) -> RowSource | None:
        """Where the tensor's rows can be read in chunks (a safetensors byte range), or None."""
        spec = self.specs.get(name)
        return RowSource(spec) if spec is not None and spec.start is not None else None

    def read_order(self, name: str) -> tuple[str, int]:
        """Where the tensor's bytes lie, to read the base in file order."""
        spec = self.specs[name]
        return str(spec.file), spec.start or 0

    def fp32_bytes(self) -> int:
        """The model's size in float32, as verification and quantization figures hold it."""
        return 4 * sum(s.numel for s in self.specs.values())

    def close(self) -> None:
        """Drop the tensors of .bin files held in memory."""
        self._bins.clear()



# Tensor names that only quantized checkpoints hold, and the format they belong to.
QUANTIZED_TENSOR_SUFFIXES = {
    ".SCB": "bitsandbytes 8-bit",
    ".weight_format": "bitsandbytes 8-bit",
    ".absmax": "bitsandbytes 4-bit",
    ".quant_map": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit (nf4)",
    ".quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit (fp4)",
    ".weight_scale_inv": "fp8 block-scaled",
    ".weight_scale": "compressed-tensors",
    ".qweight": "GPTQ/AWQ",
    ".qzeros": "GPTQ/AWQ",
}


def quantized_tensor(specs: dict[str, TensorSpec]) -> str | None:
    """A tensor only quantized checkpoints hold, and its format (``weight_scale_inv``, ``SCB``, float8 weights...),
    or None for plain weights."""
    for name, spec in specs.items():
        for suffix, fmt in QUANTIZED_TENSOR_SUFFIXES.items():
            if name.endswith(suffix):
                return f"{fmt} (tensor {name})"
        if spec.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return f"float8 (tensor {name} is {str(spec.dtype).removeprefix('torch.')})"
    return None
