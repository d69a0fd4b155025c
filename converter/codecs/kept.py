"""``--keep-quantization``: a merged model written in its quantized base's own format and layout.

The writer of one output, in place of the plain ShardedWriter: every tensor keeps the base's
name, dtype and shape. A quantized weight the adapter changes is merged as a dense weight (as
without the option) and re-encoded by its codec as it is written; one the adapter leaves alone
keeps its stored codes and scales, copied byte for byte; other tensors are written as usual.
Each re-encoded weight is decoded again and compared with the dense merge: those figures go in
the receipt.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    max_rel_err: float = 0.0  # max over weights of max |decode(encode(W')) − W'| / max |W'|


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
        err = float((again.float() - weight).abs().max() / weight.abs().max().clamp_min(1e-30))
        self.requantized.tensors += 1
        self.requantized.max_rel_err = max(self.requantized.max_rel_err, err)
        for key, value in encoded.items():
            self.inner.write(key, value)

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
