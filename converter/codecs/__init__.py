"""Quantized bases as codecs: a registry keyed by the base's ``quantization_config.quant_method``.

A codec knows how one quantized format stores a weight (its codes plus scales or quant
state, under which tensor names) and turns those tensors into the weight they stand for
(``decode``, equal to the library's own dequantization) and back (``encode``, for
``--keep-quantization``). ``decoded(base, config)`` wraps a base checkpoint so that the
planner and the merge see every quantized weight under its own name, with its real shape
and dtype, decoded when it is read: quantized codes are never taken for weights. A base
whose format has no codec is refused before any work, naming what was found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from converter.checkpoint import Checkpoint, RowSource, TensorSpec, quantized_tensor
from converter.errors import BadInputError, UnsupportedBaseError
from converter.modelinfo import config_scopes

DEQUANTIZE_FIX = ("merge into a dequantized copy of the base: its bfloat16/float16 release, or the base loaded with "
                  "transformers, dequantized (model.dequantize()) and saved with save_pretrained")


@dataclass(frozen=True)
class Stored:
    """One weight as a quantized checkpoint stores it: its tensors by role, and what they decode to."""

    name: str  # the weight's own name (what a dense checkpoint calls it)
    parts: dict[str, TensorSpec]  # role -> the stored tensor ("codes", "scale", "absmax", ...)
    shape: tuple[int, ...]  # the weight's shape
    dtype: torch.dtype  # the dtype the weight is used in (the model's compute dtype)
    meta: dict = field(default_factory=dict, compare=False)  # codec-specific facts (block size, quant state)


class Codec:
    """One quantized format. Subclasses set ``label`` and implement ``find``, ``decode`` and ``encode``."""

    label: str = ""  # for messages and the receipt, e.g. "bitsandbytes 4-bit nf4"
    method: str = ""  # quant_method
    package: str | None = None  # what decoding needs installed, if anything
    # full verification of an output kept in this format (re-encoding costs accuracy): max |Δ| / max |ref|, KL, top-1
    kept_tolerance = {"max_rel_diff": 0.25, "max_kl": 0.02, "min_top1": 0.8}

    def __init__(self, quant_config: dict, config: dict):
        self.quant_config, self.config = quant_config, config

    def find(self, specs: dict[str, TensorSpec], read: Callable[[str], torch.Tensor]) -> dict[str, Stored]:
        """Every weight stored quantized, by name, its parts checked (missing or mis-shaped: a BadInputError
        naming the tensor). ``read`` reads a (small) stored tensor where the layout needs it."""
        raise NotImplementedError

    def decode(self, stored: Stored, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight (float, ``stored.shape``) from its stored tensors (by role)."""
        raise NotImplementedError

    def encode(self, stored: Stored, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors (by checkpoint name) of a new value of the weight, in the base's own layout."""
        raise NotImplementedError

    def row_block(self, stored: Stored) -> int | None:
        """Rows decode on their own in groups of this many (``decode_rows``); None: whole weights only."""
        return None

    def decode_rows(self, stored: Stored, codes: torch.Tensor, parts: dict[str, torch.Tensor], r0: int,
                    r1: int) -> torch.Tensor:
        """Rows r0:r1 of the weight (float32) from the same rows of its codes and its other (whole) stored tensors."""
        raise NotImplementedError

    def encode_block(self, stored: Stored) -> int | None:
        """Rows encode on their own in groups of this many (``encode_rows``); None: whole weights only."""
        return None

    def encode_rows(self, stored: Stored, rows: torch.Tensor, r0: int) -> list[tuple[str, int, torch.Tensor]]:
        """The stored tensors of rows r0:r0+len(rows) of a new value: (name, first row of that tensor, rows)."""
        raise NotImplementedError

    def encoded_specs(self, stored: Stored) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of what ``encode`` writes for this weight: the base's own stored tensors."""
        return [(spec.name, spec.dtype, spec.shape) for spec in stored.parts.values()]

    def unloadable(self, stored: dict[str, Stored]) -> str | None:
        """Why transformers cannot load this base (so no unmerged reference can be built), or None."""
        return None

    def output_config(self) -> dict:
        """The ``quantization_config`` an output kept in this format declares."""
        return dict(self.quant_config)


def model_dtype(config: dict, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype the model's config declares (``dtype`` or ``torch_dtype``, also in ``text_config``)."""
    for scope in config_scopes(config):
        for key in ("dtype", "torch_dtype"):
            value = scope.get(key)
            if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
                return getattr(torch, value)
    return default


def quant_config_of(config: dict) -> dict | None:
    """The base's ``quantization_config`` (or ``compression_config``), at the top level or in ``text_config``."""
    for scope in config_scopes(config):
        qc = scope.get("quantization_config") or scope.get("compression_config")
        if qc:
            return qc if isinstance(qc, dict) else {"quant_method": "unreadable"}
    return None


def _registry() -> dict[str, Callable[[dict, dict], Codec]]:
    from converter.codecs import bnb, fp8

    return {"bitsandbytes": bnb.codec_for, "fp8": fp8.codec_for}


SUPPORTED = ("bitsandbytes (4-bit nf4/fp4, with or without double quantization; 8-bit)",
             "fp8 (float8_e4m3fn with weight_scale_inv, block-scaled or per-tensor)")


class DecodedCheckpoint(Checkpoint):
    """A quantized base as the merge sees it: each stored weight under its own name, shape and dtype, decoded when
    read; its scales and quant state are not tensors of the model. Other tensors are read as they are."""

    def __init__(self, raw: Checkpoint, codec: Codec, stored: dict[str, Stored]):
        self.directory, self.files, self._bins, self.readable = raw.directory, raw.files, raw._bins, raw.readable
        self.raw, self.codec, self.stored = raw, codec, stored
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_of: tuple | None = None
        hidden = {spec.name for s in stored.values() for spec in s.parts.values()}
        self.specs = {}
        for name, spec in raw.specs.items():
            if name in stored:
                self.specs[name] = TensorSpec(name, stored[name].dtype, stored[name].shape, spec.file)
            elif name not in hidden:
                self.specs[name] = spec

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``: decoded from its stored parts when it is stored quantized."""
        stored = self.stored.get(name)
        if stored is None:
            return self.raw.get(name)
        return self.codec.decode(stored, {role: self.raw.get(spec.name) for role, spec in stored.parts.items()})

    def row_source(self, name: str) -> RowSource | None:
        """A stored weight's rows: its codes' byte range, decoded on the device by the codec; else the raw tensor's."""
        stored = self.stored.get(name)
        if stored is None:
            return self.raw.row_source(name)
        block = self.codec.row_block(stored)
        codes = self.raw.specs[stored.parts["codes"].name]
        if block is None or codes.start is None:
            return None
        return RowSource(codes, partial(self._decode_rows, stored), block)

    def _decode_rows(self, stored: Stored, codes: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        if self._parts_of != (stored.name, codes.device):  # the (small) scales, read once per weight
            self._parts = {role: self.raw.get(spec.name).to(codes.device) for role, spec in stored.parts.items()
                           if role != "codes"}
            self._parts_of = (stored.name, codes.device)
        return self.codec.decode_rows(stored, codes, self._parts, r0, r1)

    def read_order(self, name: str) -> tuple[str, int]:
        """Where the tensor's bytes (its codes) lie, to read the base in file order."""
        stored = self.stored.get(name)
        spec = self.raw.specs[stored.parts["codes"].name] if stored else self.raw.specs[name]
        return str(spec.file), spec.start or 0

    def close(self) -> None:
        """Drop what the raw checkpoint holds in memory."""
        self.raw.close()


def decoded(base: Checkpoint, config: dict, shown: str) -> Checkpoint:
    """``base`` itself when it stores plain weights, else its DecodedCheckpoint; a format without a codec
    (or without the package its codec needs) is refused, naming it (``shown``: the base as the user gave it)."""
    qc = quant_config_of(config)
    if qc is None:
        found = quantized_tensor(base.specs)
        if found:
            raise UnsupportedBaseError(
                f"base {shown} holds quantized tensors ({found}) but its config.json has no quantization_config, "
                "so nothing says how to decode them", hint="restore the base's config.json, or " + DEQUANTIZE_FIX)
        return base
    method = str(qc.get("quant_method") or "unknown")
    make = _registry().get(method)
    if make is None:
        raise UnsupportedBaseError(
            f"base {shown} is stored quantized with quant_method {method!r}, which converter cannot decode "
            f"(it decodes: {'; '.join(SUPPORTED)})", hint=DEQUANTIZE_FIX)
    codec = make(qc, config)
    _check_package(codec, shown)
    return DecodedCheckpoint(base, codec, codec.find(base.specs, base.get if base.readable else _unread(shown)))


def _unread(shown: str) -> Callable[[str], torch.Tensor]:
    def read(name: str) -> torch.Tensor:
        raise BadInputError(f"base {shown}: checking it needs {name} (the shapes of its quantized weights are stored "
                            "in their quant state), and only its file headers were read",
                            hint="download the base first (hf download), or run the merge itself")
    return read


def _check_package(codec: Codec, shown: str) -> None:
    if codec.package is None:
        return
    import importlib.util

    if importlib.util.find_spec(codec.package) is None:
        raise UnsupportedBaseError(f"base {shown} is stored as {codec.label}, and decoding it needs the "
                                   f"{codec.package} package, which is not installed",
                                   hint=f"pip install {codec.package}, or {DEQUANTIZE_FIX}")
