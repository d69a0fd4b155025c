"""The streaming merge: base tensors in row chunks, fp32 on the job's device, one or many adapters.

A plain LoRA on a linear weight (nearly every tensor an adapter changes) is merged in
chunks of rows: the chunk is read once into a reused buffer, and for every adapter of
the pass ``B[rows] @ A`` goes into a reused fp32 scratch, is scaled and added to the
rows widened to fp32 (``merged_rows``, PEFT's operations), and the sum is rounded once
into a reused output buffer that a writer thread puts in place in the shard. Nothing
grows with the model: memory is a few chunks, and no page of a fresh allocation is
faulted in per tensor. Everything else (DoRA, embeddings, Conv1D, lora_bias, trainable
tokens, replaced tensors) goes through ``merged_value`` on the whole tensor. Tensors
nothing changes are copied byte for byte in the kernel (``copy_file_range``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from converter import experts, lora_math
from converter.adapter import Adapter
from converter.checkpoint import Checkpoint, RowSource, read_into
from converter.errors import MergeError
from converter.plan import LoraOp, MergePlan, TensorPlan
from converter.verify import PROBE_TOLERANCE, RowProbe, probe_error
from converter.writer import OutSpec, ShardedWriter

# A chunk of rows holds about this many elements: on CPU the fp32 delta stays in cache,
# on CUDA each copy is large enough to run at full bandwidth.
CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 16 << 20}
# Matrix products of a few rows take another kernel on some BLAS builds and round
# differently; chunks never have fewer rows than this (their product then equals the
# same rows of the whole product, bit for bit; tests/test_engine.py checks it).
MIN_CHUNK_ROWS = 32
# Module probes check rows of this many chunks of a tensor (spread from its first rows to its last).
PROBED_CHUNKS = 4


@dataclass
class MergeStats:
    changed: int = 0  # tensors whose written value differs from the base
    probes: dict[str, float] = field(default_factory=dict)  # module -> relative error
    failed_probes: list[str] = field(default_factory=list)

    def record_probe(self, module: str, err: float, tol: float) -> None:
        """Record a module's probe error, and a failure when over ``tol``."""
        self.probes[module] = err
        if not err <= tol:
            self.failed_probes.append(f"{module}: relative error {err:.3g} > {tol:g}")


def output_dtype(spec_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written in: the output dtype for floating point, its own otherwise."""
    return out_dtype if spec_dtype.is_floating_point else spec_dtype


def output_specs(plan: MergePlan, out_dtype: torch.dtype) -> list[OutSpec]:
    """Name, dtype and shape of every tensor the plan writes."""
    return [OutSpec(t.name, output_dtype(t.dtype, out_dtype), t.shape) for t in plan.tensors.values()]


# ---------------------------------------------------------------------------------------------------------------------
# The math of one tensor, whole or a chunk of its rows (twins), and the checks both share.
# ---------------------------------------------------------------------------------------------------------------------

def merged_value(tp: TensorPlan, start: torch.Tensor, adapter: Adapter, out_dtype: torch.dtype, device,
                 probe=None) -> torch.Tensor:
    """W' for one whole tensor, in fp32, from its starting value (the base's, or the adapter's replacement,
    already in the output dtype), as PEFT merges into the base as loaded: LoRA / DoRA, lora_bias, token rows.
    A stack's next adapters (``tp.then``) merge in turn into the weight rounded to the output dtype, as PEFT
    merges one adapter after another into the loaded model. ``probe(link, before, after, norm_base)``: called
    for each adapter's change (``norm_base``: the unmerged weight a DoRA merged after others took its norm from)."""
    layer = PeftLayer(adapter, out_dtype, device)
    value = start
    for link in (tp, *tp.then):
        before = start if link is tp else value.to(out_dtype)
        value = _link_value(link, before, adapter, out_dtype, device, layer)
        if probe is not None:
            probe(link, before, value.to(out_dtype), layer.base)
    return value


def _link_value(tp: TensorPlan, start: torch.Tensor, adapter: Adapter, out_dtype: torch.dtype, device,
                layer: "PeftLayer") -> torch.Tensor:
    """One adapter's change to the tensor (``merged_value`` without the stack)."""
    f32 = dict(device=device, dtype=torch.float32)
    if tp.expert is not None:  # PEFT's ParamWrapper: the delta rounded to the dtype, then added in it
        weight = experts.merge_tensor(start.to(device), tp.expert.where, tp.expert.lora(adapter, device)).to(**f32)
    else:
        weight = start.to(**f32, copy=True)  # our own copy: the math below works in place
    if tp.lora is not None:
        weight = layer.merge(weight, tp.lora)
    if tp.bias_key:
        weight = lora_math.lora_bias(weight, adapter.get(tp.bias_key).to(**f32), tp.bias_scale)
    if tp.rows_key:
        weight = lora_math.overwrite_rows(weight, tp.rows, adapter.get(tp.rows_key).to(**f32), out_dtype)
    return weight


class PeftLayer:
    """One weight as PEFT's LoRA layer holds it while adapters merge into it, one after another: the ones merged,
    and the norm each DoRA one used. A DoRA adapter merged after others takes its norm from the weight with them
    unmerged (PEFT's ``_unmerged_base_weight``: unmerged in reverse, rounded, then merged again), as here."""

    def __init__(self, adapter: Adapter, out_dtype: torch.dtype, device):
        self.adapter, self.out_dtype, self.device = adapter, out_dtype, device
        self.merged: list[LoraOp] = []
        self.norms: dict[int, torch.Tensor] = {}  # id(op) -> the norm its DoRA merge used
        self.base: torch.Tensor | None = None  # the unmerged weight the last DoRA merge took its norm from

    def merge(self, weight: torch.Tensor, op: LoraOp) -> torch.Tensor:
        """``weight`` (fp32, holding output-dtype values: our own copy) with ``op`` merged, unrounded."""
        self.base = None
        if op.magnitude_key and self.merged:
            self.base = self._unmerged(weight)
            weight = self.base.clone()
            for done in self.merged:
                weight = self._merged(weight, done, self.base).to(self.out_dtype).float()
        value = self._merged(weight, op, self.base)
        self.merged.append(op)
        return value

    def _factors(self, op: LoraOp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(A, B, magnitude or None, delta) in fp32 on the device."""
        f32 = dict(device=self.device, dtype=torch.float32)
        a, b = self.adapter.get(op.a_key).to(**f32), self.adapter.get(op.b_key).to(**f32)
        magnitude = self.adapter.get(op.magnitude_key).to(**f32) if op.magnitude_key else None
        delta = (lora_math.embedding_delta(a, b, op.scale) if op.kind == "embedding"
                 else lora_math.linear_delta(a, b, op.scale, op.fan_in_fan_out))
        return a, b, magnitude, delta

    def _merged(self, weight: torch.Tensor, op: LoraOp, base: torch.Tensor | None) -> torch.Tensor:
        """One LoRA module merged: linear or embedding, plain or DoRA (its norm from ``base``, else ``weight``)."""
        a, b, magnitude, delta = self._factors(op)
        embedding = op.kind == "embedding"
        if magnitude is not None:
            norm = lora_math.dora_norm(weight if base is None else base, delta, op.fan_in_fan_out, embedding)
            self.norms[id(op)] = norm
            if embedding:
                return lora_math.dora_embedding(weight, delta, magnitude, norm)
            return lora_math.dora_linear(weight, delta, magnitude, op.fan_in_fan_out, norm)
        if embedding or op.rounds_delta:  # PEFT's embedding merge, ParamWrapper, a mix: the delta rounded, then added
            return lora_math.add_delta_rounded(weight, delta, self.out_dtype)
        return lora_math.merge_linear(weight, a, b, op.scale, op.fan_in_fan_out)

    def _unmerged(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with every merged adapter taken out, last first, rounded after each (PEFT's ``unmerge``)."""
        for op in reversed(self.merged):
            _, _, magnitude, delta = self._factors(op)
            if magnitude is None:
                weight = lora_math.unmerge_plain(weight, delta, self.out_dtype)
            else:
                weight = lora_math.unmerge_dora(weight, delta, magnitude, self.norms[id(op)], op.fan_in_fan_out,
                                                op.kind == "embedding")
            weight = weight.to(self.out_dtype).float()
        return weight


def merged_rows(start: torch.Tensor, loras: list["RowLora"], r0: int, r1: int, acc: torch.Tensor,
                delta: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """W' for rows r0:r1 of a plain LoRA linear weight (or of an expert tensor), in fp32 in ``acc`` (``delta``:
    scratch for ``B[rows] @ A``): the same rows of ``merged_value``, bit for bit. A stack's LoRAs merge in turn,
    the rows rounded to the output dtype in between."""
    acc.copy_(start)
    for i, lora in enumerate(loras):
        if i and out_dtype != torch.float32:
            acc.copy_(acc.to(out_dtype))
        if lora.fused_dtype is not None:
            lora_math.merge_rows_fused(acc, lora.a, lora.b[r0:r1], lora.scale, lora.fused_dtype, delta)
        else:
            lora_math.merge_linear(acc, lora.a, lora.b[r0:r1], lora.scale, False, delta=delta)
    return acc


@dataclass
class RowLora:
    """The factors of a tensor merged in row chunks (a LoRA module's, or one expert's part of a fused LoRA)."""

    module: str  # how probes name it
    a: torch.Tensor  # (r, in), fp32
    b: torch.Tensor  # (out, r), fp32
    scale: float
    fused_dtype: torch.dtype | None = None  # PEFT's ParamWrapper rounding: the delta to this dtype before adding

    @classmethod
    def chain(cls, tp: TensorPlan, adapter: Adapter, out_dtype: torch.dtype, device) -> list["RowLora"]:
        """The factors of ``tp`` and of the stack's next adapters on it, in merge order."""
        return [cls.of(link, adapter, out_dtype, device) for link in (tp, *tp.then)]

    @classmethod
    def of(cls, tp: TensorPlan, adapter: Adapter, out_dtype: torch.dtype, device) -> "RowLora":
        """The factors of ``tp``'s LoRA or expert op, on ``device``."""
        if tp.expert is not None:
            a, b = tp.expert.row_factors(adapter, device)
            return cls(tp.expert.label, a, b, tp.expert.scale, out_dtype)
        op = tp.lora
        a = adapter.get(op.a_key).to(device=device, dtype=torch.float32)
        b = adapter.get(op.b_key).to(device=device, dtype=torch.float32)
        return cls(op.module, a, b, op.scale, out_dtype if op.rounds_delta else None)


def overflow(name: str, value: torch.Tensor, dtype: torch.dtype) -> MergeError | None:
    """Why ``value`` (fp32) cannot be written as ``dtype``: NaN, infinite, or beyond its range; else None."""
    if not dtype.is_floating_point or not value.numel():
        return None
    lo, hi = torch.aminmax(value)  # NaN and inf propagate
    peak = max(-float(lo), float(hi))
    if peak <= torch.finfo(dtype).max:
        return None
    if peak != peak or peak == float("inf"):
        return MergeError(f"the merged value of {name} holds NaN or infinite values")
    return MergeError(f"the merged value of {name} overflows {dtype} (|value| up to {peak:.3g}): "
                      "choose a wider --dtype (float32 or bfloat16)")


def differs(start: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the written value is not, bit for bit, the starting one."""
    if start.shape != out.shape or start.dtype != out.dtype:
        return True
    if start.dtype.itemsize == 2:  # compares faster as integers, and bit for bit
        return not torch.equal(start.view(torch.int16), out.view(torch.int16))
    return not torch.equal(start, out)


# ---------------------------------------------------------------------------------------------------------------------
# The plan of a pass: one step per base tensor, read once for every member.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(eq=False)  # compared by identity: two members may hold the same adapter
class Member:
    """One adapter of a pass, and where its output goes."""

    plan: MergePlan
    adapter: Adapter
    writer: ShardedWriter
    stats: MergeStats = field(default_factory=MergeStats)
    error: BaseException | None = None  # the first failure; the member is dropped from the pass


@dataclass(eq=False)
class _Use:  # one output tensor computed from a base tensor
    member: Member
    tp: TensorPlan
    out_dtype: torch.dtype
    loras: list[RowLora] | None = None  # the factors (a stack's: several), from the first chunk to the last
    changed: bool = False
    probe: RowProbe | None = None


@dataclass(eq=False)
class _Step:
    kind: str  # "copy" | "chunks" | "whole"
    source: str | None
    uses: list[_Use]
    chunks: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    rows: RowSource | None = None  # chunks: the stored tensor read (the tensor, or its quantized codes)

    @functools.cached_property
    def probed(self) -> set[int]:
        """The first rows of the chunks whose rows the module probes check: a few, spread over the tensor."""
        n = len(self.chunks)
        return {self.chunks[n * i // PROBED_CHUNKS][0] for i in range(min(n, PROBED_CHUNKS))}


def is_chunkable(tp: TensorPlan, src, stored=None) -> bool:
    """A plain LoRA (or an expert's rows, or nothing) on a 2-D base tensor whose rows are read straight from a
    safetensors file (``stored``: the tensor read for its rows, e.g. quantized codes; default ``src`` itself)."""
    op, stored = tp.lora, stored or src
    if tp.replace_key or tp.bias_key or tp.rows_key or src is None or stored is None or stored.start is None:
        return False
    if tuple(src.shape) != tuple(tp.shape) or tuple(stored.shape) != tuple(tp.shape) or len(tp.shape) != 2 \
            or 0 in tp.shape:
        return False
    if tp.then and not all(is_chunkable(link, src, stored) for link in tp.then):
        return False
    if tp.expert is not None:
        return op is None and tp.expert.by_rows
    return op is None or (op.kind == "linear" and not op.fan_in_fan_out and op.magnitude_key is None)


def row_chunks(rows: int, cols: int, elems: int, block: int = 1) -> list[tuple[int, int]]:
    """Equal row ranges of about ``elems`` elements, none under MIN_CHUNK_ROWS rows unless it is the whole tensor,
    each starting on a multiple of ``block`` rows (a quantized weight's row blocks)."""
    per = max(2 * MIN_CHUNK_ROWS, elems // max(cols, 1))
    n = max(1, math.ceil(rows / per))
    blocks = -(-rows // block)
    bounds = sorted({min(rows, block * (blocks * i // n)) for i in range(n)} | {rows})
    return list(zip(bounds[:-1], bounds[1:]))


def _schedule(base: Checkpoint, members: list[Member], out_dtype: torch.dtype, elems: int) -> list[_Step]:
    """One step per base tensor (read once for every member), in file order; then what the adapters replace."""
    by_source: dict[str, list[_Use]] = {}
    alone: list[_Step] = []
    for m in members:
        for name in m.writer.order:
            tp = m.plan.tensors[name]
            use = _Use(m, tp, output_dtype(tp.dtype, out_dtype))
            if tp.replace_key or tp.source is None:
                alone.append(_Step("whole", None, [use]))
            else:
                by_source.setdefault(tp.source, []).append(use)
    steps = []
    for source, uses in by_source.items():
        steps += _steps_of(source, base.specs.get(source), base.row_source(source), uses, elems)
    steps.sort(key=lambda st: base.read_order(st.source) if st.source in base.specs else ("", 0))
    return steps + alone


def _steps_of(source: str, src, rows: RowSource | None, uses: list[_Use], elems: int) -> list[_Step]:
    """A base tensor's copies (bytes unchanged) and its merges (in row chunks where every use allows)."""
    copyable = src is not None and src.start is not None
    copies = [u for u in uses if u.tp.action in ("copy", "add") and copyable and src.dtype == u.out_dtype]
    rest = [u for u in uses if u not in copies]
    steps = [_Step("copy", source, copies)] if copies else []
    blocks = [u.member.writer.rows_block(u.tp.name) for u in rest]
    if rest and rows is not None and None not in blocks and all(is_chunkable(u.tp, src, rows.spec) for u in rest):
        block = math.lcm(rows.block, *blocks)
        steps.append(_Step("chunks", source, rest, row_chunks(src.shape[0], src.shape[1], elems, block), rows))
    elif rest:
        steps.append(_Step("whole", source, rest))
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# The pass: reads run ahead in one thread, writes behind in one or two, this thread computes.
# ---------------------------------------------------------------------------------------------------------------------

def stream_merge_many(base: Checkpoint, members: list[Member], out_dtype: torch.dtype, device: torch.device,
                      probe: bool) -> None:
    """Merge every member's adapter into the same base in one pass: each base tensor is read once.

    A member whose merge fails (non-finite values, a write error) gets ``error`` set and
    is dropped from the rest of the pass; the others go on.
    """
    StreamingPass(base, members, out_dtype, torch.device(device), probe).run()


class _Pool:
    """Reused buffers (pinned for CUDA copies); ``get`` blocks while all are in use, which bounds memory."""

    def __init__(self, nbytes: int, count: int, pin: bool):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count if nbytes else 0):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin))

    def get(self) -> torch.Tensor:
        return self._free.get()

    def put(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class StreamingPass:
    """One pass over a base for several members: owns the read-ahead, the reused buffers and scratch,
    the writer threads and the writes still pending."""

    def __init__(self, base: Checkpoint, members: list[Member], out_dtype: torch.dtype, device: torch.device,
                 probe: bool):
        self.base, self.members, self.device, self.probe = base, members, device, probe
        self.cuda = device.type == "cuda"
        self.tol = PROBE_TOLERANCE.get(out_dtype, 1e-2)
        self.steps = _schedule(base, members, out_dtype, CHUNK_ELEMS["cuda" if self.cuda else "cpu"])
        in_bytes, out_bytes, elems = self._buffer_sizes()
        self.inputs = _Pool(in_bytes, 4, pin=self.cuda)
        self.outputs = _Pool(out_bytes, 2 * len(members) + 2, pin=self.cuda)
        self.scratch = [torch.empty(elems, dtype=torch.float32, device=device) for _ in range(2)] if elems else None
        self.dev_in = torch.empty(in_bytes, dtype=torch.uint8, device=device) if self.cuda and in_bytes else None
        self.dev_out = torch.empty(out_bytes, dtype=torch.uint8, device=device) if self.cuda and out_bytes else None
        self.pending: list[Future] = []
        self.writes: ThreadPoolExecutor | None = None

    def _buffer_sizes(self) -> tuple[int, int, int]:
        """Bytes of the largest chunk read, of the largest chunk written, and its element count."""
        in_bytes = out_bytes = elems = 0
        for st in (s for s in self.steps if s.kind == "chunks"):
            n = max(r1 - r0 for r0, r1 in st.chunks) * st.uses[0].tp.shape[1]
            elems = max(elems, n)
            in_bytes = max(in_bytes, n * st.rows.spec.dtype.itemsize)
            out_bytes = max(out_bytes, n * max(u.out_dtype.itemsize for u in st.uses))
        return in_bytes, out_bytes, elems

    def run(self) -> None:
        """Read, merge and write every step of the pass; each member's failure is its ``error``."""
        items = [(st, r0, r1) for st in self.steps for r0, r1 in st.chunks]
        with _quiet_runtime(self.cuda), ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
                ThreadPoolExecutor(1 if len(self.members) == 1 else 2, thread_name_prefix="write") as self.writes:
            ahead = [reader.submit(self._read, it) for it in items[:2]]
            for i, (st, r0, r1) in enumerate(items):
                got = ahead.pop(0).result()
                if i + 2 < len(items):
                    ahead.append(reader.submit(self._read, items[i + 2]))
                self.pending = [f for f in self.pending if not f.done() or f.result()]  # re-raises internal errors
                live = [u for u in st.uses if u.member.error is None]
                self.STEPS[st.kind](self, st, r0, r1, got, live)
                del got
            for f in self.pending:
                f.result()

    def _read(self, item) -> torch.Tensor | None:
        st, r0, r1 = item
        if st.kind == "copy":
            return None
        if st.kind == "whole":
            u = st.uses[0]
            return u.member.adapter.get(u.tp.replace_key) if st.source is None else self.base.get(st.source)
        spec = st.rows.spec
        row_bytes = spec.shape[1] * spec.dtype.itemsize
        buf = self.inputs.get()
        try:
            read_into(spec, spec.start + r0 * row_bytes, buf[: (r1 - r0) * row_bytes])
        except BaseException:
            self.inputs.put(buf)
            raise
        return buf

    def _write(self, member: Member, fn, *args, done=None) -> None:
        """A write for ``member`` on a writer thread; its failure becomes the member's error, not the pass's."""
        self.pending.append(self.writes.submit(_guard, member, fn, *args, done=done))

    def _copy(self, st: _Step, r0: int, r1: int, got, live: list[_Use]) -> None:
        spec = self.base.specs[st.source]
        for u in live:
            self._write(u.member, u.member.writer.copy_bytes, u.tp.name, spec.file, spec.start, spec.end)

    def _whole(self, st: _Step, r0: int, r1: int, got: torch.Tensor, live: list[_Use]) -> None:
        for u in live:
            if u.tp.action in ("copy", "add"):  # not a safetensors byte range, or another dtype
                self._write(u.member, u.member.writer.write, u.tp.name, got.to(u.out_dtype))
                continue
            start = got.to(u.out_dtype)  # rounded once: the merge starts from it and "changed" compares with it
            errors = []

            def probe(link: TensorPlan, before: torch.Tensor, after: torch.Tensor, norm_base, u=u) -> None:
                if link.lora is not None:
                    errors.append(probe_error(after, before if link is not u.tp else got, link.lora, u.member.adapter,
                                              norm_base=norm_base))

            value = merged_value(u.tp, start, u.member.adapter, u.out_dtype, self.device,
                                 probe if self.probe else None)
            u.member.error = overflow(u.tp.name, value, u.out_dtype)
            if u.member.error is not None:
                continue
            out = value.to(u.out_dtype).cpu()
            u.member.stats.changed += differs(start, out)
            if errors:
                u.member.stats.record_probe(u.tp.lora.module if u.tp.lora else u.tp.name, max(errors), self.tol)
            self._write(u.member, u.member.writer.write, u.tp.name, out)

    def _rows(self, st: _Step, r0: int, r1: int, host_in: torch.Tensor, live: list[_Use]) -> None:
        """Every member's rows r0:r1 of one base tensor, from one read."""
        spec = st.rows.spec
        shape = (r1 - r0, spec.shape[1])
        n = shape[0] * shape[1]
        w = host_in[: n * spec.dtype.itemsize].view(spec.dtype).view(shape)
        if self.cuda:
            w = self.dev_in[: n * spec.dtype.itemsize].view(spec.dtype).view(shape).copy_(w, non_blocking=True)
        if st.rows.decode is not None:  # quantized codes: the weight's rows, decoded on the device
            w = st.rows.decode(w, r0, r1)
        probe = self.probe and r0 in st.probed
        for u in live:
            self._rows_of(u, w, r0, r1, probe)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the copy out of host_in is done
        self.inputs.put(host_in)
        if r1 == st.uses[0].tp.shape[0]:
            for u in live:
                self._tensor_done(u)

    def _rows_of(self, u: _Use, w: torch.Tensor, r0: int, r1: int, probe: bool) -> None:
        """One member's rows: merged (or copied) into a reused output buffer, checked, probed, written."""
        dtype, op = u.out_dtype, u.tp.lora
        start = w if w.dtype == dtype else w.to(dtype)  # PEFT merges into the base as loaded in this dtype
        host_out = self.outputs.get()
        o_host = host_out[: w.numel() * dtype.itemsize].view(dtype).view(w.shape)
        o = self.dev_out[: w.numel() * dtype.itemsize].view(dtype).view(w.shape) if self.cuda else o_host
        if op is None and u.tp.expert is None:
            o.copy_(start)
        else:
            u.loras = u.loras or RowLora.chain(u.tp, u.member.adapter, dtype, self.device)
            acc, delta = (s[: w.numel()].view(w.shape) for s in reversed(self.scratch))
            merged_rows(start, u.loras, r0, r1, acc, delta, dtype)  # rounded once to the output dtype below
            u.member.error = overflow(u.tp.name, acc, dtype)
            if u.member.error is not None:
                self.outputs.put(host_out)
                return
            o.copy_(acc)
            u.changed = u.changed or differs(start, o)
            if probe:
                u.probe = u.probe or RowProbe(u.tp.shape[1], o.device)
                u.probe.add(start, o, u.loras, r0)
        encode = u.member.writer.row_encoder(u.tp.name)  # the base's own format (--keep-quantization)
        pieces = encode(o, r0) if encode else [(u.tp.name, r0 * w.shape[1] * dtype.itemsize, o)]
        self._write_rows(u.member, pieces, host_out)

    def _write_rows(self, member: Member, pieces: list, host_out: torch.Tensor) -> None:
        """(name, byte offset, rows) written from the reused host buffer, returned to the pool when all are."""
        at, parts = 0, []
        for name, offset, rows in pieces:
            view = host_out[at: at + rows.numel() * rows.element_size()].view(rows.dtype).view(rows.shape)
            if view.data_ptr() != rows.data_ptr():
                view.copy_(rows, non_blocking=self.cuda)
            parts.append((name, offset, view))
            at += rows.numel() * rows.element_size()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # dev_out is reused by the next member
        self._write(member, _write_parts, member.writer, parts, done=lambda: self.outputs.put(host_out))

    def _tensor_done(self, u: _Use) -> None:
        if u.member.error is not None:
            return
        u.member.stats.changed += u.changed
        if u.probe is not None:
            u.member.stats.record_probe(u.loras[0].module, u.probe.error(), self.tol)
        u.loras = u.probe = None

    STEPS = {"copy": _copy, "whole": _whole, "chunks": _rows}


@contextlib.contextmanager
def _quiet_runtime(cuda: bool):
    """For the pass: no cyclic GC (thousands of small objects per second, none of them cyclic, over
    a large heap of imported modules), and on CPU fewer compute threads than cores, so that the
    reader and writer threads, which copy every byte in the kernel, are not starved by threads
    spinning for work."""
    threads = torch.get_num_threads()
    gc_was = gc.isenabled()
    gc.disable()
    if not cuda:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 2)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if gc_was:
            gc.enable()


def _write_parts(writer, parts: list) -> None:
    for name, offset, rows in parts:
        writer.write_part(name, offset, rows)


def _guard(member: Member, fn, *args, done=None) -> None:
    """Run a write for a member; its failure becomes the member's error, not the pass's. ``done`` runs after it."""
    try:
        if member.error is None:
            fn(*args)
    except MergeError as exc:
        member.error = exc
    finally:
        if done is not None:
            done()
