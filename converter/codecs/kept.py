"""``--keep-quantization``: a merged model written in its quantized base's own format and layout.

The writer of one output, in place of the plain ShardedWriter: every tensor keeps the base's
name, dtype and shape. A quantized weight the adapter changes is merged as a dense weight (as
without the option) and re-encoded by its codec as it is written; one the adapter leaves alone
keeps its stored codes and scales, copied byte for byte; other tensors are written as usual.
Each re-encoded weight is decoded again and compared with the dense merge: those figures go in
the receipt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from converter.checkpoint import TensorSpec
from converter.codecs import DecodedCheckpoint, Stored
from converter.merge import output_dtype
from converter.plan import MergePlan
from converter.writer import OutSpec, ShardedWriter


@dataclass
class Requantized:
    """The re-encoded weights against the dense merge they were encoded from."""

    tensors: int = 0
    max_rel_err: float = 0.0  # max over weights (and row blocks) of max |decode(encode(W')) − W'| / max |W'|


class KeptFormatWriter:
    """Writes a merged model in the base's quantized format; the pass sees a writer of the dense tensors it merges."""

    def __init__(self, directory: Path, plan: MergePlan, out_dtype: torch.dtype, base: DecodedCheckpoint,
                 max_shard_size: int | str):
        self.codec = base.codec
        self.encoded: dict[str, Stored] = {}  # weights the adapter changes: re-encoded
        self.kept: list[TensorSpec] = []  # stored tensors of weights the adapter leaves alone: copied
        self.requantized = Requantized()
        specs = []
        for tp in plan.tensors.values():
            stored = base.stored.get(tp.name) if tp.source == tp.name else None
            if stored is None:
                specs.append(OutSpec(tp.name, output_dtype(tp.dtype, out_dtype), tp.shape))
                continue
            if tp.action == "copy":
                self.kept += [base.raw.specs[spec.name] for spec in stored.parts.values()]
                specs += [OutSpec(spec.name, spec.dtype, spec.shape) for spec in stored.parts.values()]
            else:
                self.encoded[tp.name] = stored
                specs += [OutSpec(*s) for s in self.codec.encoded_specs(stored)]
        self.inner = ShardedWriter(directory, specs, max_shard_size)
        kept = {spec.name for spec in self.kept}
        self.order = [n for n in self.inner.order if n in plan.tensors and n not in kept]
        self._raw = base.raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """A merged tensor: re-encoded when its base weight is stored quantized, else written as it is."""
        stored = self.encoded.get(name)
        if stored is None:
            self.inner.write(name, tensor)
            return
        weight = tensor.float()
        encoded = self.codec.encode(stored, weight)
        again = self.codec.decode(stored, {role: encoded[spec.name] for role, spec in stored.parts.items()})
        self._account(stored, again, weight, 0)
        for key, value in encoded.items():
            self.inner.write(key, value)

    def rows_block(self, name: str) -> int | None:
        """A re-encoded weight's rows go in its codec's row blocks (None: whole); others as they come."""
        stored = self.encoded.get(name)
        return 1 if stored is None else self.codec.encode_block(stored)

    def row_encoder(self, name: str) -> Callable | None:
        """For a re-encoded weight: (merged rows, r0) -> its stored tensors' (name, byte offset, rows)."""
        stored = self.encoded.get(name)
        return None if stored is None else partial(self._encode_rows, stored)

    def _encode_rows(self, stored: Stored, rows: torch.Tensor, r0: int) -> list[tuple[str, int, torch.Tensor]]:
        weight = rows.float()
        pieces = self.codec.encode_rows(stored, weight, r0)
        roles = {spec.name: role for role, spec in stored.parts.items()}
        parts = {roles[name]: value for name, _, value in pieces}
        self._account(stored, self.codec.decode_rows(stored, parts["codes"], parts, 0, len(rows)), weight, r0)
        return [(name, first * _row_bytes(self.inner.specs[name]), value) for name, first, value in pieces]

    def _account(self, stored: Stored, again: torch.Tensor, weight: torch.Tensor, r0: int) -> None:
        """The re-encoded value against the dense merge: one more weight (at its first rows), its error."""
        err = float((again.float() - weight).abs().max() / weight.abs().max().clamp_min(1e-30))
        self.requantized.tensors += r0 == 0
        self.requantized.max_rel_err = max(self.requantized.max_rel_err, err)

    def write_part(self, name: str, offset: int, tensor: torch.Tensor) -> None:
        """Rows of a tensor that is not stored quantized."""
        self.inner.write_part(name, offset, tensor)

    def copy_bytes(self, name: str, src: Path, start: int, end: int) -> None:
        """A tensor copied unchanged."""
        self.inner.copy_bytes(name, src, start, end)

    def finalize(self) -> list[str]:
        """The untouched quantized weights copied as stored, then every shard checked, synced and indexed."""
        for spec in self.kept:
            if spec.start is None:
                self.inner.write(spec.name, self._raw.get(spec.name))
            else:
                self.inner.copy_bytes(spec.name, spec.file, spec.start, spec.end)
        return self.inner.finalize()

    def abort(self) -> None:
        """Close every shard still open."""
        self.inner.abort()


def _row_bytes(spec: OutSpec) -> int:
    """Bytes of one row (first-dimension index) of a planned tensor."""
    n = spec.dtype.itemsize
    for d in spec.shape[1:]:
        n *= d
    return n
