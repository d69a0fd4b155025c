"""The streaming merge: base tensors in row chunks, fp32 on the job's device, one or many adapters.

A plain LoRA on a linear weight (nearly every tensor an adapter changes) is merged in
chunks of rows: the chunk is read once into a reused buffer, and for every adapter of
the pass ``B[rows] @ A`` goes into a reused fp32 scratch, is scaled and added to the
rows widened to fp32 (``lora_math.merge_linear``, PEFT's operations), and the sum is
rounded once into a reused output buffer that a writer thread puts in place in the shard. Nothing grows with the
model: memory is a few chunks, and no page of a fresh allocation is faulted in per
tensor. Everything else (DoRA, embeddings, Conv1D, lora_bias, trainable tokens,
replaced tensors) goes through ``merged_value`` on the whole tensor. Tensors nothing
changes are copied byte for byte in the kernel (``copy_file_range``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from converter import lora_math
from converter.adapter import Adapter
from converter.checkpoint import Checkpoint, read_into
from converter.errors import MergeError
from converter.plan import LoraOp, MergePlan, TensorPlan
from converter.writer import OutSpec, ShardedWriter

# Relative error of a probe through a merged weight, by output dtype (rounding only).
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@dataclass
class MergeStats:
    changed: int = 0  # tensors whose written value differs from the base
    probes: dict[str, float] = field(default_factory=dict)  # module -> relative error
    failed_probes: list[str] = field(default_factory=list)

    def record_probe(self, module: str, err: float, tol: float) -> None:
        self.probes[module] = err
        if not err <= tol:
            self.failed_probes.append(f"{module}: relative error {err:.3g} > {tol:g}")


def output_dtype(spec_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    return out_dtype if spec_dtype.is_floating_point else spec_dtype


def output_specs(plan: MergePlan, out_dtype: torch.dtype) -> list[OutSpec]:
    return [OutSpec(t.name, output_dtype(t.dtype, out_dtype), t.shape) for t in plan.tensors.values()]


def merged_value(tp: TensorPlan, start: torch.Tensor, adapter: Adapter, out_dtype: torch.dtype, device) -> torch.Tensor:
    """W' for one tensor in fp32 from its starting value (the base's, or the adapter's replacement),
    already in the output dtype, as PEFT merges into the base as loaded: LoRA / DoRA, lora_bias,
    trainable token rows."""
    f32 = dict(device=device, dtype=torch.float32)
    weight = start.to(**f32, copy=True)  # our own copy: the math below works in place
    if tp.lora is not None:
        weight = apply_lora(weight, tp.lora, adapter, out_dtype, device)
    if tp.bias_key:
        weight = lora_math.lora_bias(weight, adapter.get(tp.bias_key).to(**f32), tp.bias_scale)
    if tp.rows_key:
        weight = lora_math.overwrite_rows(weight, tp.rows, adapter.get(tp.rows_key).to(**f32), out_dtype)
    return weight


def apply_lora(weight: torch.Tensor, op: LoraOp, adapter: Adapter, out_dtype: torch.dtype, device) -> torch.Tensor:
    a = adapter.get(op.a_key).to(device=device, dtype=torch.float32)
    b = adapter.get(op.b_key).to(device=device, dtype=torch.float32)
    magnitude = adapter.get(op.magnitude_key).to(device=device, dtype=torch.float32) if op.magnitude_key else None
    if op.kind == "embedding":
        delta = lora_math.embedding_delta(a, b, op.scale)
        if magnitude is not None:
            return lora_math.dora_embedding(weight, delta, magnitude)
        return lora_math.add_delta_rounded(weight, delta, out_dtype)
    if magnitude is None:
        return lora_math.merge_linear(weight, a, b, op.scale, op.fan_in_fan_out)
    delta = lora_math.linear_delta(a, b, op.scale, op.fan_in_fan_out)
    return lora_math.dora_linear(weight, delta, magnitude, op.fan_in_fan_out)


def probe_error(merged: torch.Tensor, unmerged: torch.Tensor, op: LoraOp, adapter: Adapter, seed: int = 0) -> float:
    """Relative error of random probes through W' against W·x + s·B·(A·x) (DoRA: times m/‖W+sBA‖)."""
    g = torch.Generator().manual_seed(seed)
    a = adapter.get(op.a_key).float()
    b = adapter.get(op.b_key).float()
    w = unmerged.float().cpu()
    merged = merged.float().cpu()
    magnitude = adapter.get(op.magnitude_key).float() if op.magnitude_key else None
    if op.kind == "embedding":  # rows of the table for random token ids
        idx = torch.randint(0, w.shape[0], (16,), generator=g)
        ref = w[idx] + op.scale * (a[:, idx].T @ b.T)
        if magnitude is not None:
            norm = torch.linalg.vector_norm(w + op.scale * (b @ a).T, dim=0)
            ref = ref * (magnitude / norm).view(1, -1)
        got = merged[idx]
    else:
        w_std = lora_math.transpose(w, op.fan_in_fan_out)
        x = torch.randn(w_std.shape[1], 8, generator=g)
        ref = w_std @ x + op.scale * (b @ (a @ x))
        if magnitude is not None:
            norm = torch.linalg.vector_norm(w_std + op.scale * (b @ a), dim=1)
            ref = ref * (magnitude / norm).view(-1, 1)
        got = lora_math.transpose(merged, op.fan_in_fan_out) @ x
    return relative_error(got, ref)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


# A chunk of rows holds about this many elements: on CPU the fp32 delta stays in cache,
# on CUDA each copy is large enough to run at full bandwidth.
CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 16 << 20}
# Matrix products of a few rows take another kernel on some BLAS builds and round
# differently; chunks never have fewer rows than this (their product then equals the
# same rows of the whole product, bit for bit; tests/test_engine.py checks it).
MIN_CHUNK_ROWS = 32
PROBE_ROWS_PER_CHUNK = 4
PROBE_COLS = 8


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
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    changed: bool = False
    probe_x: torch.Tensor | None = None
    got: list = field(default_factory=list)
    ref: list = field(default_factory=list)


@dataclass(eq=False)
class _Step:
    kind: str  # "copy" | "chunks" | "whole"
    source: str | None
    uses: list[_Use]


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


def is_chunkable(tp: TensorPlan, src) -> bool:
    """A plain LoRA (or nothing) on a 2-D base tensor read straight from a safetensors file."""
    op = tp.lora
    if tp.replace_key or tp.bias_key or tp.rows_key or src is None or src.start is None:
        return False
    if tuple(src.shape) != tuple(tp.shape) or len(tp.shape) != 2 or 0 in tp.shape:
        return False
    return op is None or (op.kind == "linear" and not op.fan_in_fan_out and op.magnitude_key is None)


def row_chunks(rows: int, cols: int, elems: int) -> list[tuple[int, int]]:
    """Equal row ranges of about ``elems`` elements, none under MIN_CHUNK_ROWS rows unless it is the whole tensor."""
    per = max(2 * MIN_CHUNK_ROWS, elems // max(cols, 1))
    n = max(1, math.ceil(rows / per))
    bounds = [rows * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _schedule(base: Checkpoint, members: list[Member], out_dtype: torch.dtype) -> list[_Step]:
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
        src = base.specs.get(source)
        copies = [u for u in uses if u.tp.action in ("copy", "add") and src is not None and src.start is not None
                  and src.dtype == u.out_dtype]
        rest = [u for u in uses if u not in copies]
        if copies:
            steps.append(_Step("copy", source, copies))
        if rest:
            chunked = all(is_chunkable(u.tp, src) for u in rest)
            steps.append(_Step("chunks" if chunked else "whole", source, rest))
    order = {name: (str(s.file), s.start or 0) for name, s in base.specs.items()}
    steps.sort(key=lambda st: order.get(st.source, ("", 0)))
    return steps + alone


def stream_merge(plan: MergePlan, base: Checkpoint, adapter: Adapter, writer: ShardedWriter,
                 out_dtype: torch.dtype, device: torch.device, probe: bool) -> MergeStats:
    """Merge one adapter; raises the member's error."""
    member = Member(plan, adapter, writer)
    stream_merge_many(base, [member], out_dtype, device, probe)
    if member.error is not None:
        raise member.error
    return member.stats


def stream_merge_many(base: Checkpoint, members: list[Member], out_dtype: torch.dtype, device: torch.device,
                      probe: bool) -> None:
    """Merge every member's adapter into the same base in one pass: each base tensor is read once.

    A member whose merge fails (non-finite values, a write error) gets ``error`` set and
    is dropped from the rest of the pass; the others go on. Reads run ahead in one
    thread, writes behind in two, while this thread computes.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    steps = _schedule(base, members, out_dtype)
    elems = CHUNK_ELEMS["cuda" if cuda else "cpu"]
    chunks = {id(st): row_chunks(st.uses[0].tp.shape[0], st.uses[0].tp.shape[1], elems)
              for st in steps if st.kind == "chunks"}
    in_bytes = out_bytes = max_elems = 0
    for st in steps:
        if st.kind == "chunks":
            cols = st.uses[0].tp.shape[1]
            rows = max(r1 - r0 for r0, r1 in chunks[id(st)])
            max_elems = max(max_elems, rows * cols)
            in_bytes = max(in_bytes, rows * cols * base.specs[st.source].dtype.itemsize)
            out_bytes = max(out_bytes, rows * cols * max(u.out_dtype.itemsize for u in st.uses))
    inputs = _Pool(in_bytes, 4, pin=cuda)
    outputs = _Pool(out_bytes, 2 * len(members) + 2, pin=cuda)
    scratch = [torch.empty(max_elems, dtype=torch.float32, device=device) for _ in range(2)] if max_elems else None
    dev_in = torch.empty(in_bytes, dtype=torch.uint8, device=device) if cuda and in_bytes else None
    dev_out = torch.empty(out_bytes, dtype=torch.uint8, device=device) if cuda and out_bytes else None
    tol = PROBE_TOLERANCE.get(out_dtype, 1e-2)

    def read(item):
        st, r0, r1 = item
        if st.kind == "copy":
            return None
        if st.kind == "whole":
            u = st.uses[0]
            return u.member.adapter.get(u.tp.replace_key) if st.source is None else base.get(st.source)
        spec = base.specs[st.source]
        cols = spec.shape[1]
        nbytes = (r1 - r0) * cols * spec.dtype.itemsize
        buf = inputs.get()
        try:
            read_into(spec, spec.start + r0 * cols * spec.dtype.itemsize, buf[:nbytes])
        except BaseException:
            inputs.put(buf)
            raise
        return buf

    items = [(st, r0, r1) for st in steps for (r0, r1) in chunks.get(id(st), [(0, 0)])]
    with _quiet_runtime(cuda), ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1 if len(members) == 1 else 2, thread_name_prefix="write") as writes:
        pending: list[Future] = []
        ahead = [reader.submit(read, it) for it in items[:2]]
        for i, (st, r0, r1) in enumerate(items):
            got = ahead.pop(0).result()
            if i + 2 < len(items):
                ahead.append(reader.submit(read, items[i + 2]))
            pending = [f for f in pending if not f.done() or f.result()]  # result() re-raises internal errors
            live = [u for u in st.uses if u.member.error is None]
            if st.kind == "copy":
                spec = base.specs[st.source]
                for u in live:
                    pending.append(writes.submit(_guard, u.member, u.member.writer.copy_bytes, u.tp.name,
                                                 spec.file, spec.start, spec.end))
            elif st.kind == "whole":
                for u in live:
                    if u.tp.action in ("copy", "add"):  # not a safetensors byte range, or another dtype
                        pending.append(writes.submit(_guard, u.member, u.member.writer.write, u.tp.name,
                                                     got.to(u.out_dtype)))
                        continue
                    try:
                        out = _merge_one(u.tp, got, u.member.adapter, u.out_dtype, device, probe, tol, u.member.stats)
                    except MergeError as exc:
                        u.member.error = exc
                        continue
                    pending.append(writes.submit(_guard, u.member, u.member.writer.write, u.tp.name, out))
                del got
            else:
                _chunk(st, r0, r1, got, live, base, device, scratch, dev_in, dev_out, outputs, inputs, writes,
                       pending, probe)
                if r1 == st.uses[0].tp.shape[0]:
                    for u in live:
                        _finish(u, probe, tol)
        for f in pending:
            f.result()


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


def _guard(member: Member, fn, *args) -> None:
    """Run a write for a member; its failure becomes the member's error, not the pass's."""
    if member.error is not None:
        return
    try:
        fn(*args)
    except MergeError as exc:
        member.error = exc


def _chunk(st: _Step, r0: int, r1: int, host_in: torch.Tensor, uses: list[_Use], base: Checkpoint, device,
           scratch, dev_in, dev_out, outputs: _Pool, inputs: _Pool, writes, pending: list, probe: bool) -> None:
    """Every member's rows r0:r1 of one base tensor, from one read."""
    spec = base.specs[st.source]
    rows, cols = r1 - r0, spec.shape[1]
    n = rows * cols
    cuda = device.type == "cuda"
    w = host_in[: n * spec.dtype.itemsize].view(spec.dtype).view(rows, cols)
    if cuda:
        w = dev_in[: n * spec.dtype.itemsize].view(spec.dtype).view(rows, cols).copy_(w, non_blocking=True)
    for u in uses:
        dtype = u.out_dtype
        start = w if w.dtype == dtype else w.to(dtype)  # PEFT merges into the base as loaded in this dtype
        host_out = outputs.get()
        o_host = host_out[: n * dtype.itemsize].view(dtype).view(rows, cols)
        o = dev_out[: n * dtype.itemsize].view(dtype).view(rows, cols) if cuda else o_host
        op = u.tp.lora
        if op is None:
            o.copy_(start)
        else:
            if u.a is None:
                u.a = u.member.adapter.get(op.a_key).to(device=device, dtype=torch.float32)
                u.b = u.member.adapter.get(op.b_key).to(device=device, dtype=torch.float32)
            acc = scratch[1][:n].view(rows, cols)
            acc.copy_(start)  # PEFT's math on these rows, in fp32; rounded once to the output dtype below
            lora_math.merge_linear(acc, u.a, u.b[r0:r1], op.scale, False, delta=scratch[0][:n].view(rows, cols))
            if dtype.is_floating_point:
                lo, hi = torch.aminmax(acc)  # NaN and inf propagate
                peak = max(-float(lo), float(hi))
                if not peak <= torch.finfo(dtype).max:
                    u.member.error = _non_finite(u.tp.name, peak, dtype)
                    outputs.put(host_out)
                    continue
            o.copy_(acc)
            if not u.changed:
                u.changed = not _equal(start, o)
            if probe:
                _probe_rows(u, start, o, r0, r1)
        if cuda:
            o_host.copy_(o, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()  # dev_out is reused by the next member
        pending.append(writes.submit(_write_rows, u.member, u.tp.name, r0 * cols * dtype.itemsize, o_host,
                                     outputs, host_out))
    if cuda:
        torch.cuda.current_stream(device).synchronize()  # the copy out of host_in is done
    inputs.put(host_in)


def _write_rows(member: Member, name: str, offset: int, tensor: torch.Tensor, outputs: _Pool,
                buf: torch.Tensor) -> None:
    try:
        _guard(member, member.writer.write_part, name, offset, tensor)
    finally:
        outputs.put(buf)


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype.itemsize == 2 and y.dtype == x.dtype:  # compares faster as integers, and bit for bit
        return torch.equal(x.view(torch.int16), y.view(torch.int16))
    return torch.equal(x, y)


def _non_finite(name: str, peak: float, dtype: torch.dtype) -> MergeError:
    if peak != peak or peak == float("inf"):
        return MergeError(f"the merged value of {name} holds NaN or infinite values")
    return MergeError(f"the merged value of {name} overflows {dtype} (|value| up to {peak:.3g}): "
                      "choose a wider --dtype (float32 or bfloat16)")


def _probe_rows(u: _Use, start: torch.Tensor, out: torch.Tensor, r0: int, r1: int) -> None:
    """A few rows of every chunk through W' against W·x + s·B·(A·x)."""
    op = u.tp.lora
    if u.probe_x is None:
        g = torch.Generator().manual_seed(0)
        u.probe_x = torch.randn(u.tp.shape[1], PROBE_COLS, generator=g).to(out.device)
    idx = torch.linspace(0, r1 - r0 - 1, min(PROBE_ROWS_PER_CHUNK, r1 - r0)).round().long().to(out.device)
    x = u.probe_x
    u.ref.append(start[idx].float() @ x + op.scale * (u.b[r0 + idx] @ (u.a @ x)))
    u.got.append(out[idx].float() @ x)


def _finish(u: _Use, probe: bool, tol: float) -> None:
    if u.member.error is not None:
        return
    if u.changed:
        u.member.stats.changed += 1
    if probe and u.tp.lora is not None and u.got:
        u.member.stats.record_probe(u.tp.lora.module, relative_error(torch.cat(u.got), torch.cat(u.ref)), tol)
    u.a = u.b = u.probe_x = None
    u.got, u.ref = [], []


def _merge_one(tp: TensorPlan, before: torch.Tensor, adapter: Adapter, dtype: torch.dtype, device, probe: bool,
               tol: float, stats: MergeStats) -> torch.Tensor:
    start = before.to(dtype)  # rounded once: the merge starts from it and "changed" compares with it
    value = merged_value(tp, start, adapter, dtype, device)
    if dtype.is_floating_point and value.numel():
        peak = float(value.abs().amax())  # NaN and inf propagate through amax
        if not peak <= torch.finfo(dtype).max:
            raise _non_finite(tp.name, peak, dtype)
    out = value.to(dtype).cpu()
    if start.shape != out.shape or not torch.equal(start, out):
        stats.changed += 1
    if probe and tp.lora is not None:
        stats.record_probe(tp.lora.module, probe_error(out, before, tp.lora, adapter), tol)
    return out
