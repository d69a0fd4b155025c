"""What a job's inputs are, learnt before any work: sources resolved, adapter read and checked,
the merge planned, the output dtype and the fingerprint. ``inspect_job`` writes nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from converter import codecs, publish, quantize, sources, stack
from converter.adapter import Adapter, check_finite, load_adapter, named_adapter
from converter.checkpoint import Checkpoint
from converter.errors import AdapterMismatchError, BadInputError, JobWarning, UnsupportedBaseError
from converter.experts import ExpertPlan, meta_model, plan_experts
from converter.lora_math import lora_scale
from converter.modelinfo import ModelInfo, base_config, describe, import_class
from converter.options import DTYPES, MergeJob
from converter.plan import MergePlan, build_plan, needs_peft_engine, pattern_value
from converter.resources import resolve_device
from converter.sources import Resolved
from converter.stack import Part, StackedTensors, check_stack

ENGINE_VERSION = 1  # part of every fingerprint: a change that alters outputs bumps it


@dataclass
class Inputs:
    """Everything learnt before any work starts."""

    adapter: Adapter | StackedTensors  # the tensors the merge reads: the adapter's, or a stack's
    base: Checkpoint
    info: ModelInfo
    plan: MergePlan | None  # None: PEFT's engine merges this adapter
    engine: str  # "streaming" | "peft"
    engine_reason: str | None
    out_dtype: torch.dtype
    fingerprint: str
    warnings: list[JobWarning]
    base_src: Resolved
    parts: list[Part]  # every adapter, in merge order (a stack: several)
    mismatch: str | None = None  # a base mismatch the job allowed (allow_base_mismatch)


    @property
    def model_cls(self):
        """The class full verification builds: the task class of a head the adapter adds, else the base's."""
        head = self.plan.head if self.plan else None
        return self.info.model_cls if head is None else import_class(head.cls_path)

    @property
    def config_overrides(self) -> dict:
        """What loading the base as the task class needs: its head's size, and a pad token for a sequence classifier
        fed a batch (it finds each row's last token by it; -1: no probe token is padding)."""
        head = self.plan.head if self.plan else None
        if head is None:
            return {}
        pad = {"pad_token_id": -1} if head.task_type == "SEQ_CLS" and self.info.config.get("pad_token_id") is None \
            else {}
        return {"num_labels": head.num_labels, **pad}

    @property
    def adapter_src(self) -> Resolved:
        """Where the (first) adapter was resolved to."""
        return self.parts[0].src

    @property
    def adapter_dirs(self) -> list[Path]:
        """Where each adapter of the job lies, in merge order."""
        return [p.src.path for p in self.parts]

    @property
    def codec(self) -> codecs.Codec | None:
        """The codec a quantized base is decoded with; None for plain weights."""
        return self.base.codec if isinstance(self.base, codecs.DecodedCheckpoint) else None


@dataclass
class Ready:
    """A job that passed every check and has work to do; ``timings`` fills in as it goes."""

    index: int
    job: MergeJob
    inputs: Inputs
    variants: list  # (QuantSpec, variant directory)
    timings: dict = field(default_factory=dict)

    @property
    def partial(self) -> Path:
        """The staging directory of the job's output."""
        return publish.partial_dir(self.job.output)

    def own_seconds(self, finish_started: float) -> float:
        """This job's own time: its checks, its share of the merge pass, and its steps since ``finish_started``."""
        share = self.timings.get("merge_share_s", 0.0)
        return round(self.timings["inspect_s"] + share + time.perf_counter() - finish_started, 3)


def inspect_job(job: MergeJob, metadata_only: bool = False) -> Inputs:
    """Every check that needs no writing, in order; the first problem found fails the job (BadInputError).

    ``metadata_only`` (validate, inspect): a hub base is read through its safetensors headers
    alone when the hub can be reached, without downloading its weights.
    """
    base_src, base = sources.open_base(job.base, job.base_revision, job.base_subfolder, job.cache_dir,
                                       job.trust_remote_code, metadata_only)
    base = codecs.decoded(base, base_config(base_src.path), job.base)  # quantized codes are never weights
    if job.keep_quantization and job.quantize and isinstance(base, codecs.DecodedCheckpoint):
        raise BadInputError(f"--keep-quantization writes the output as {base.codec.label}; --quantize variants are "
                            "made from a dense output", hint="drop one of --keep-quantization and --quantize")
    parts, warnings = open_adapters(job)
    check_stack(parts, job.weighted, job.allow_base_mismatch)
    mismatch = _base_mismatch(parts, base_src)
    if mismatch and not job.allow_base_mismatch:
        raise AdapterMismatchError(mismatch, hint="merge into the base the adapter was trained on, or set "
                                   "allow_base_mismatch (--allow-base-mismatch) if you know they match")
    info = describe(base_src.path, list(base.specs), job.trust_remote_code)
    engine_reason = None if job.weighted else needs_peft_engine(parts[0].adapter)  # a stack's are all LoRAs
    if engine_reason and isinstance(base, codecs.DecodedCheckpoint):
        raise UnsupportedBaseError(f"{engine_reason}, which merges into the base as transformers loads it; the base "
                                   f"is stored as {base.codec.label}", hint=codecs.DEQUANTIZE_FIX)
    warnings += [w for p in parts for w in _unchecked_revision(p.adapter, base_src)]
    plan, adapter = (None, parts[0].adapter) if engine_reason else \
        plan_merge(parts, base, info, base_src.path, job, warnings)
    _check_labels(job, plan)
    resolve_device(job.device)
    _check_quantize(job, info, publish.tokenizer_source(base_src.path, [p.src.path for p in parts]))
    return Inputs(adapter, base, info, plan, "peft" if engine_reason else "streaming", engine_reason,
                  output_dtype(job.dtype, base), fingerprint(job, base_src, base, parts), warnings, base_src, parts,
                  mismatch if job.allow_base_mismatch else None)


def open_adapters(job: MergeJob) -> tuple[list[Part], list[JobWarning]]:
    """Every adapter of the job, resolved (an adapter PEFT saved under its own name found), read and checked for
    non-finite values; the warnings that finding them gave."""
    parts, warnings = [], []
    stacked = len(job.adapters) > 1
    for i, ref in enumerate(job.adapters):
        src = sources.resolve(ref.adapter, "adapter", ref.revision, ref.subfolder, job.cache_dir)
        path, named = named_adapter(src.path)  # <dir>/<name>/: an adapter PEFT saved under its own name
        src = replace(src, path=path)
        adapter = load_adapter(src.path)
        part = Part(adapter, src, {f.name: publish.sha256_file(f) for f in adapter.files()}, ref.weight, ref.adapter)
        where = f"{part.label(i)}: " if stacked else ""
        nonfinite = check_finite(adapter)
        if nonfinite:
            raise BadInputError(f"{where}adapter tensor(s) hold NaN or infinite values: {', '.join(nonfinite[:10])}",
                                hint="the adapter is broken (diverged training?): use an earlier checkpoint")
        if named:
            warnings.append(JobWarning("named-adapter", where + named))
        parts.append(part)
    return parts, warnings


def plan_merge(parts: list[Part], base: Checkpoint, info: ModelInfo, base_dir: Path, job: MergeJob,
               warnings: list[JobWarning]) -> tuple[MergePlan, Adapter | StackedTensors]:
    """The merge plan, and the tensors it reads: one adapter's, or a stack's (each adapter planned on its own, its
    problems named by its place in the stack). Zero-delta warnings are added to ``warnings``."""
    one = len(parts) == 1 and not job.weighted
    plans, problems, hint = [], [], None
    for i, part in enumerate(parts):
        experts = (expert_plan(part.adapter, base, base_dir, job.trust_remote_code)
                   if part.adapter.config.get("target_parameters") else None)
        try:
            plan = build_plan(part.adapter, base, info, experts)
        except AdapterMismatchError as exc:
            if one:
                raise
            problems += [f"{part.label(i)}: {p}" for p in exc.problems]
            hint = exc.hint
            continue
        for w in zero_delta_warnings(part.adapter, plan):
            warnings.append(w if one else JobWarning(w.code, f"{part.label(i)}: {w.message}"))
        plans.append(plan if one else stack.rekeyed(plan, i))
    if problems:
        raise AdapterMismatchError(problems, hint=hint)
    if one:
        return plans[0], parts[0].adapter
    tensors = StackedTensors(parts)
    plan = stack.stack_plan(plans, parts, set(base.specs), tensors, job.weighted, output_dtype(job.dtype, base))
    return plan, tensors


def expert_plan(adapter: Adapter, base: Checkpoint, base_dir: Path, trust_remote_code: bool) -> ExpertPlan:
    """The adapter's LoRAs on ``target_parameters`` (fused MoE experts...) mapped onto the checkpoint's tensors."""
    model = meta_model(base_dir, trust_remote_code)
    if model is None:
        raise BadInputError(f"the adapter targets parameters ({', '.join(adapter.config['target_parameters'])}), "
                            "which are found through the base's model class, and transformers cannot build it",
                            hint="pass --trust-remote-code if the base ships its own code")
    cfg = adapter.config

    def scale_of(param: str) -> tuple[int, float]:
        r = pattern_value(cfg.get("rank_pattern"), param, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern"), param, cfg.get("lora_alpha", 8))
        return r, lora_scale(r, alpha, bool(cfg.get("use_rslora")))

    return plan_experts(model, {k: spec.shape for k, spec in base.specs.items()}, adapter, scale_of)


def _check_labels(job: MergeJob, plan: MergePlan | None) -> None:
    if not job.labels:
        return
    head = plan.head if plan else None
    if head is None:
        raise BadInputError(f"--label {' '.join(job.labels)}: labels name a task head's classes, and this adapter "
                            "trains no head", hint="drop the labels")
    if len(job.labels) != head.num_labels:
        raise BadInputError(f"{len(job.labels)} label(s) given, but the adapter's {head.class_name} head has "
                            f"{head.num_labels} outputs", hint=f"give {head.num_labels} labels, in order")


def _check_quantize(job: MergeJob, info: ModelInfo, tokenizer_dir: Path) -> None:
    if not job.quantize:
        return
    quantize.check_available(job.quantize)
    if not info.instantiable:
        raise BadInputError(f"--quantize {' '.join(str(q) for q in job.quantize)}: a quantized variant is loaded "
                            f"through transformers, which cannot build this model ({info.note})",
                            hint="drop --quantize for this base, or pass --trust-remote-code if it ships its code")
    quantize.check_layout(job.quantize, info, tokenizer_dir)


def fingerprint(job: MergeJob, base_src: Resolved, base: Checkpoint, parts: list[Part]) -> str:
    """The hash of what decides the output: options, engine version, base files, base config, adapter files (a
    stack's: every adapter's, in order, with its weight)."""
    config = base_src.path / "config.json"
    return publish.fingerprint({
        "engine_version": ENGINE_VERSION,
        "options": job.fingerprint_options(),
        # hub blobs never change under a commit sha; local files are known by size and modification time
        "base": ({"repo": base_src.repo, "sha": base_src.sha, "files": sorted(p.name for p in base.files)}
                 if base_src.is_hub else [publish.file_identity(p) for p in base.files]),
        "base_config": publish.sha256_file(config) if config.is_file() else None,
        "adapter": parts[0].hashes if len(parts) == 1 and parts[0].weight is None else
        [{"files": p.hashes, "weight": p.weight} for p in parts],
    })


def _base_mismatch(parts: list[Part], base: Resolved) -> str | None:
    """Why the base differs from the one an adapter records (the first found), or None."""
    for i, part in enumerate(parts):
        found = base_mismatch(part.adapter.config, base)
        if found:
            return found if len(parts) == 1 else f"{part.label(i)}: {found}"
    return None


def base_mismatch(adapter_config: dict, base: Resolved) -> str | None:
    """Why the base differs from the one the adapter records (revision, repo), or None."""
    recorded = adapter_config.get("revision")
    asked = [r for r in (base.revision, base.sha) if r]
    if recorded and asked and not any(r == recorded or (base.sha and base.sha.startswith(recorded)) for r in asked):
        shown = base.revision or base.sha
        if base.sha and base.sha != shown:
            shown += f" (commit {base.sha})"
        return (f"the adapter was trained on base revision {recorded} (adapter_config.json `revision`) but the base "
                f"is revision {shown}")
    name = adapter_config.get("base_model_name_or_path")
    if base.is_hub and name and sources.REPO_ID.match(str(name)) and name != base.repo:
        return (f"the adapter was trained on {name} (adapter_config.json `base_model_name_or_path`) but the base is "
                f"{base.repo}")
    return None


def output_dtype(requested: str, base: Checkpoint) -> torch.dtype:
    """The output dtype: the one asked for, or (auto) the dtype holding most of the base's floating-point bytes."""
    if requested != "auto":
        return DTYPES[requested]
    by_dtype: dict[torch.dtype, int] = {}
    for spec in base.specs.values():
        if spec.dtype.is_floating_point:
            by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
    return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32


def _unchecked_revision(adapter: Adapter, base: Resolved) -> list[JobWarning]:
    recorded = adapter.config.get("revision")
    if not recorded or base.revision or base.sha:
        return []
    return [JobWarning("unchecked-revision", f"the adapter records base revision {recorded} but the base's revision is "
                       "unknown (a local directory): not checked; pass --base-revision to check it")]


def zero_delta_warnings(adapter: Adapter, plan: MergePlan) -> list[JobWarning]:
    """Warnings for LoRA modules whose lora_B (or lora_A) is all zeros: all of them, or some."""
    zero = [m for m, op in plan.modules.items()
            if not bool(adapter.get(op.b_key).any()) or not bool(adapter.get(op.a_key).any())]
    others = [t for t in plan.tensors.values() if t.replace_key or t.rows_key or t.bias_key]
    if plan.modules and len(zero) == len(plan.modules) and not others:
        return [JobWarning("all-deltas-zero", f"the adapter changes nothing: lora_B (or lora_A) is all zeros in all "
                           f"{len(zero)} modules (an untrained adapter, or one saved before training)")]
    if zero:
        return [JobWarning("some-deltas-zero", f"{len(zero)} of {len(plan.modules)} LoRA modules have all-zero deltas: "
                           f"{', '.join(zero[:8])}")]
    return []
