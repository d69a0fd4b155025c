"""The streaming merge: one output tensor at a time, fp32 on the job's device."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from converter import lora_math
from converter.adapter import Adapter
from converter.checkpoint import Checkpoint
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
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def stream_merge(plan: MergePlan, base: Checkpoint, adapter: Adapter, writer: ShardedWriter,
                 out_dtype: torch.dtype, device: torch.device, probe: bool) -> MergeStats:
    """Write every output tensor in the writer's order.

    Reading the next tensor and writing the previous one run in two helper threads
    (file reads and writes release the GIL) while this thread computes, so at most three
    tensors are in flight.
    """
    stats = MergeStats()
    tol = PROBE_TOLERANCE.get(out_dtype, 1e-2)
    todo = [plan.tensors[name] for name in writer.order]

    def start_value(tp: TensorPlan):
        if tp.action in ("copy", "add"):
            return None
        return adapter.get(tp.replace_key) if tp.replace_key else base.get(tp.source)

    with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writes:
        pending: list[Future] = []
        ahead = reader.submit(start_value, todo[0]) if todo else None
        for i, tp in enumerate(todo):
            before = ahead.result()
            ahead = reader.submit(start_value, todo[i + 1]) if i + 1 < len(todo) else None
            while pending and (pending[0].done() or len(pending) > 2):  # bounded: at most 3 writes queued
                pending.pop(0).result()  # raises a write error here, early
            dtype = output_dtype(tp.dtype, out_dtype)
            if before is None:
                src = base.specs.get(tp.source)
                if src is not None and src.start is not None and src.dtype == dtype:
                    pending.append(writes.submit(writer.copy_bytes, tp.name, src.file, src.start, src.end))
                else:
                    pending.append(writes.submit(writer.write, tp.name, base.get(tp.source).to(dtype)))
                continue
            out = _merge_one(tp, before, adapter, dtype, device, probe, tol, stats)
            pending.append(writes.submit(writer.write, tp.name, out))
            del before, out
        for f in pending:
            f.result()
    return stats


def _merge_one(tp: TensorPlan, before: torch.Tensor, adapter: Adapter, dtype: torch.dtype, device, probe: bool,
               tol: float, stats: MergeStats) -> torch.Tensor:
    start = before.to(dtype)  # rounded once: the merge starts from it and "changed" compares with it
    value = merged_value(tp, start, adapter, dtype, device)
    if dtype.is_floating_point and value.numel():
        peak = float(value.abs().amax())  # NaN and inf propagate through amax
        if peak != peak or peak == float("inf"):
            raise MergeError(f"the merged value of {tp.name} holds NaN or infinite values")
        if peak > torch.finfo(dtype).max:
            raise MergeError(f"the merged value of {tp.name} overflows {dtype} (|value| up to {peak:.3g}): "
                             "choose a wider --dtype (float32 or bfloat16)")
    out = value.to(dtype).cpu()
    if start.shape != out.shape or not torch.equal(start, out):
        stats.changed += 1
    if probe and tp.lora is not None:
        err = probe_error(out, before, tp.lora, adapter)
        stats.probes[tp.lora.module] = err
        if not err <= tol:
            stats.failed_probes.append(f"{tp.lora.module}: relative error {err:.3g} > {tol:g}")
    return out
