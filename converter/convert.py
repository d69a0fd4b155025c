"""``convert(job) -> JobResult``: check, merge (streaming), verify, publish. One pair."""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter import cache, guard, publish, sources, quantize
from converter.adapter import Adapter, check_finite, load_adapter
from converter.checkpoint import Checkpoint, quantization_format
from converter.errors import (AdapterMismatchError, BadInputError, ConverterError, MergeError, UnsupportedBaseError,
                              VerificationError, read_failure, write_failure)
from converter.merge import PROBE_TOLERANCE, Member, output_specs, stream_merge_many
from converter.modelinfo import ModelInfo, base_config, describe
from converter.options import DTYPES, MergeJob
from converter.plan import MergePlan, build_plan, needs_peft_engine
from converter.sources import Resolved
from converter.resources import peak_rss_bytes, reset_peak_rss, versions
from converter.verify import Tolerance, fits_in_memory, full_verification, judge
from converter.writer import ShardedWriter

log = logging.getLogger("converter")
ENGINE_VERSION = 1


@dataclass
class JobResult:
    job_id: str
    status: str  # "succeeded" | "skipped" | "failed"
    output: Path
    receipt: dict | None = None
    error: str | None = None
    exit_code: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    """Everything learnt before any work starts."""

    adapter: Adapter
    base: Checkpoint
    info: ModelInfo
    plan: MergePlan | None
    engine: str
    engine_reason: str | None
    out_dtype: torch.dtype
    fingerprint: str
    warnings: list[str]
    base_src: Resolved
    adapter_src: Resolved
    adapter_hashes: dict[str, str]  # sha256 of every adapter file
    mismatch: str | None = None  # a base mismatch the job allowed (allow_base_mismatch)


def convert(job: MergeJob) -> JobResult:
    """Convert one (base, adapter) pair; raises ConverterError subclasses on failure."""
    outcome = convert_many([job])[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


@dataclass
class _Ready:
    """A job that passed every check and has work to do."""

    index: int
    job: MergeJob
    inputs: Inputs
    variants: list
    timings: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def partial(self) -> Path:
        return publish.partial_dir(self.job.output)

    def own_seconds(self, finish_started: float) -> float:
        """This job's own time: its inspection, its share of the merge pass, its verify/quantize/publish."""
        share = self.timings.get("merge_share_s", 0.0)
        return round(self.timings["inspect_s"] + share + time.perf_counter() - finish_started, 3)


@dataclass(frozen=True)
class Outcome:
    """What became of one job: its JobResult or the exception that failed it, and its own seconds."""

    index: int
    result: JobResult | Exception
    seconds: float


def convert_many(jobs: list[MergeJob]) -> list[JobResult | Exception]:
    """Convert several jobs (see ``iter_convert``); one outcome per job, in order: its JobResult,
    or the exception that failed it."""
    outcomes: list[JobResult | Exception | None] = [None] * len(jobs)
    for done in iter_convert(jobs):
        outcomes[done.index] = done.result
    return outcomes


def iter_convert(jobs: list[MergeJob]) -> Iterator[Outcome]:
    """Convert several jobs, yielding each one's outcome as soon as it is known. Jobs that share a
    base, output dtype, device and verification level are merged in one pass (each base tensor read
    once, one output per adapter). A job's failure never stops the others; each output is published
    (or not) on its own. Each output is locked against other writers until the last job is done."""
    groups: dict[tuple, list[_Ready]] = {}
    with ExitStack() as locks:
        for i, job in enumerate(jobs):
            t0 = time.perf_counter()
            try:
                ready = _prepare(i, job, locks)
            except Exception as exc:  # noqa: BLE001 - the job's outcome
                yield Outcome(i, exc, round(time.perf_counter() - t0, 3))
                continue
            if isinstance(ready, JobResult):
                yield Outcome(i, ready, round(time.perf_counter() - t0, 3))
                continue
            inp = ready.inputs
            key = ((str(inp.base_src.path.resolve()), inp.out_dtype, job.device, job.verify != "none")
                   if inp.plan is not None else ("alone", i))
            groups.setdefault(key, []).append(ready)
        for members in groups.values():
            yield from _run_group(members)


def _prepare(index: int, job: MergeJob, locks: ExitStack) -> "_Ready | JobResult":
    """Every check before any work; the output is locked for this process from here on."""
    t0 = time.perf_counter()
    guard.check_inputs_untouched(job, guard.given_inputs(job))  # before resolving (or fetching) anything
    try:
        inputs = inspect_job(job)
    except OSError as exc:
        raise read_failure(exc, "the inputs") from None
    guard.check_inputs_untouched(job, guard.resolved_inputs(inputs.base_src.path, inputs.adapter_src.path))
    if inputs.plan is not None and job.strict and inputs.warnings:
        raise BadInputError(inputs.warnings, hint="--strict turns these warnings into errors")
    out = job.output
    locks.enter_context(publish.output_lock(out))
    timings = {"inspect_s": round(time.perf_counter() - t0, 3)}
    variants = [(spec, quantize.variant_dir(out, spec)) for spec in job.quantize]
    for path in [out] + [vdir for _, vdir in variants]:
        publish.remove_leftovers(path)  # of a run that crashed or was interrupted: never taken as done
    existing = publish.read_receipt(out)
    if existing and existing["fingerprint"] == inputs.fingerprint and existing.get("status") == "succeeded":
        return JobResult(job.id, "skipped", out, existing)
    if out.exists():
        guard.check_replaceable(out, job.force, inputs.fingerprint)
    for spec, vdir in variants:
        if vdir.exists():
            guard.check_replaceable(vdir, job.force, inputs.fingerprint, what=f"quantized variant ({spec.method})")
    return _Ready(index, job, inputs, variants, timings)


def _failure(exc: Exception) -> Exception:
    """An OSError while working (full disk, permissions) as the job's failure, named for the user."""
    return write_failure(exc, "writing the output") if isinstance(exc, OSError) else exc


def _run_group(members: list[_Ready]) -> Iterator[Outcome]:
    """Merge the members (one pass), then verify, quantize and publish each on its own."""
    started: list[_Ready] = []
    for r in members:
        try:
            publish.fresh_dir(r.partial)
            started.append(r)
        except Exception as exc:  # noqa: BLE001
            yield Outcome(r.index, _failure(exc), r.timings["inspect_s"])
    if not started:
        return
    base = started[0].inputs.base
    hasher = ThreadPoolExecutor(min(4, len(base.files)))  # hashlib releases the GIL: shards hash in parallel
    hashes = {p.name: hasher.submit(cache.sha256_file, p) for p in base.files}
    try:
        merged = _merge(started)
        for r in started:
            finish_started = time.perf_counter()
            outcome = merged[r.index]
            if not isinstance(outcome, Exception):
                outcome = _finish(r, outcome, hashes, finish_started)
            if isinstance(outcome, Exception):
                _discard(r)
            yield Outcome(r.index, _failure(outcome) if isinstance(outcome, Exception) else outcome,
                          r.own_seconds(finish_started))
    except BaseException:
        for r in started:
            _discard(r)
        raise
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)
        base.close()


def _merge(members: list[_Ready]) -> dict[int, dict | Exception]:
    """The merge of every member, as a dict of what its receipt needs, or the exception that failed it."""
    first = members[0]
    device = resolve_device(first.job.device)
    for r in members:
        r.warnings = list(r.inputs.warnings)
        for w in r.warnings:
            log.warning(w)
    reset_peak_rss()
    t = time.perf_counter()
    results: dict[int, dict | Exception] = {}
    if first.inputs.plan is None:  # PEFT's engine: always a group of one
        from converter.fallback import peft_merge

        try:
            counts, vocab_size, untie = peft_merge(first.job, first.inputs, first.partial, device)
            results[first.index] = {"counts": counts, "vocab_size": vocab_size, "untie": untie, "stats": None}
        except Exception as exc:  # noqa: BLE001
            results[first.index] = exc
    else:
        writers = {}
        try:
            run = []
            for r in members:
                writers[r.index] = ShardedWriter(r.partial, output_specs(r.inputs.plan, r.inputs.out_dtype),
                                                 r.job.max_shard_size)
                run.append(Member(r.inputs.plan, r.inputs.adapter, writers[r.index]))
            stream_merge_many(first.inputs.base, run, first.inputs.out_dtype, device,
                              probe=first.job.verify != "none")
            for r, m in zip(members, run):
                try:
                    if m.error is not None:
                        raise m.error
                    m.writer.finalize()
                    results[r.index] = _streamed(r, m.stats)
                except Exception as exc:  # noqa: BLE001
                    results[r.index] = exc
        finally:
            for w in writers.values():
                w.abort()
    seconds = round(time.perf_counter() - t, 3)
    for r in members:
        r.timings["merge_s"] = seconds
        r.timings["merge_share_s"] = round(seconds / len(members), 3)
        if len(members) > 1:
            r.timings["merge_pass_adapters"] = len(members)
        if not isinstance(results[r.index], Exception):
            results[r.index]["merge_peak"] = peak_rss_bytes()
    return results


def _streamed(r: _Ready, stats) -> dict:
    plan, job = r.inputs.plan, r.job
    counts = {"merged": plan.count("merge"), "replaced": plan.count("replace"), "copied": plan.count("copy"),
              "added": plan.count("add"), "changed": stats.changed}
    if stats.changed == 0:
        msg = "the merged weights equal the base's: the adapter changes nothing at this output dtype"
        if job.strict:
            raise MergeError(msg + " (--strict)")
        if not any("changes nothing" in w for w in r.warnings):
            r.warnings.append(msg)
            log.warning(msg)
    return {"counts": counts, "vocab_size": plan.vocab_size, "untie": plan.untie, "stats": stats}


def _finish(r: _Ready, merged: dict, hashes: dict[str, Future], started: float) -> JobResult | Exception:
    """``hashes``: the sha256 of each base weight file, being computed beside the merge."""
    job, inputs, partial = r.job, r.inputs, r.partial
    published: list[Path] = []
    try:
        receipt = _receipt(r, merged)
        receipt["base"]["files"] = {name: f.result() for name, f in hashes.items()}
        receipt["quantization"] = _quantize(job, inputs, partial, r.variants, r.timings)
        receipt["timings"] = {**r.timings, "total_s": r.own_seconds(started)}
        _write_receipt(partial, receipt, job)
        for spec, vdir in r.variants:  # before the main output: its receipt is the "done" marker of the whole job
            _write_variant_receipt(publish.partial_dir(vdir), receipt, spec, job.output)
            publish.swap_in(publish.partial_dir(vdir), vdir)
            published.append(vdir)
        publish.swap_in(partial, job.output)
    except Exception as exc:  # noqa: BLE001
        for vdir in published:  # a variant never outlives a failed job
            shutil.rmtree(vdir, ignore_errors=True)
        return exc
    return JobResult(job.id, "succeeded", job.output, receipt, warnings=receipt["warnings"])


def _discard(r: _Ready) -> None:
    shutil.rmtree(r.partial, ignore_errors=True)
    for _, vdir in r.variants:
        shutil.rmtree(publish.partial_dir(vdir), ignore_errors=True)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for but torch sees no CUDA device",
                            hint="use --device cpu or auto, or install a CUDA build of torch")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inspect_job(job: MergeJob, metadata_only: bool = False) -> Inputs:
    """Everything that can be checked without writing: all problems at once where possible.

    ``metadata_only`` (validate, inspect): a hub base is read through its safetensors headers
    alone when the hub can be reached, without downloading its weights.
    """
    base_src, base = sources.open_base(job.base, job.base_revision, job.base_subfolder, job.cache_dir,
                                       job.trust_remote_code, metadata_only)
    quantized = quantization_format(base_config(base_src.path), base.specs)
    if quantized:
        raise UnsupportedBaseError(
            f"base {job.base} is stored quantized ({quantized}): its tensors are quantization codes and scales, "
            "not weights, and converter cannot decode this format yet",
            hint="merge into the unquantized release of this base (the bfloat16/float16 checkpoint it was "
                 "quantized from); a QLoRA adapter merges into it as it is")
    adapter_src = sources.resolve(job.adapter, "adapter", job.adapter_revision, job.adapter_subfolder, job.cache_dir)
    base_dir, adapter_dir = base_src.path, adapter_src.path
    adapter = load_adapter(adapter_dir)
    mismatch = base_mismatch(adapter.config, base_src)
    unchecked = []
    if adapter.config.get("revision") and not (base_src.revision or base_src.sha):
        unchecked = [f"the adapter records base revision {adapter.config['revision']} but the base's revision is "
                     "unknown (a local directory): not checked; pass --base-revision to check it"]
    if mismatch and not job.allow_base_mismatch:
        raise AdapterMismatchError(mismatch, hint="merge into the base the adapter was trained on, or set "
                                   "allow_base_mismatch (--allow-base-mismatch) if you know they match")
    info = describe(base_dir, list(base.specs), job.trust_remote_code)
    nonfinite = check_finite(adapter)
    if nonfinite:
        raise BadInputError(f"adapter tensor(s) hold NaN or infinite values: {', '.join(nonfinite[:10])}",
                            hint="the adapter is broken (diverged training?): use an earlier checkpoint")
    engine_reason = needs_peft_engine(adapter)
    plan = None if engine_reason else build_plan(adapter, base, info)
    warnings = unchecked + (_zero_delta_warnings(adapter, plan) if plan is not None else [])
    out_dtype = _output_dtype(job.dtype, base)
    resolve_device(job.device)
    if job.quantize:
        quantize.check_available(job.quantize)
        if not info.instantiable:
            raise BadInputError(f"--quantize {' '.join(str(q) for q in job.quantize)}: a quantized variant is loaded "
                                f"through transformers, which cannot build this model ({info.note})",
                                hint="drop --quantize for this base, or pass --trust-remote-code if it ships its code")
    adapter_hashes = {p.name: publish.sha256_file(p) for p in adapter.files()}
    parts = {
        "engine_version": ENGINE_VERSION,
        "options": job.fingerprint_options(),
        # hub blobs never change under a commit sha; local files are known by size and modification time
        "base": ({"repo": base_src.repo, "sha": base_src.sha, "files": sorted(p.name for p in base.files)}
                 if base_src.is_hub else [publish.file_identity(p) for p in base.files]),
        "base_config": publish.sha256_file(base_dir / "config.json") if (base_dir / "config.json").is_file() else None,
        "adapter": adapter_hashes,
    }
    return Inputs(adapter, base, info, plan, "peft" if engine_reason else "streaming", engine_reason, out_dtype,
                  publish.fingerprint(parts), warnings, base_src, adapter_src, adapter_hashes,
                  mismatch if job.allow_base_mismatch else None)


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
        return f"the adapter was trained on {name} (adapter_config.json `base_model_name_or_path`) but the base is {base.repo}"
    return None


def _output_dtype(requested: str, base: Checkpoint) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    by_dtype: dict[torch.dtype, int] = {}
    for spec in base.specs.values():
        if spec.dtype.is_floating_point:
            by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
    return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32


def _zero_delta_warnings(adapter: Adapter, plan: MergePlan) -> list[str]:
    zero = [m for m, op in plan.modules.items()
            if not bool(adapter.get(op.b_key).any()) or not bool(adapter.get(op.a_key).any())]
    others = [t for t in plan.tensors.values() if t.replace_key or t.rows_key or t.bias_key]
    if plan.modules and len(zero) == len(plan.modules) and not others:
        return [f"the adapter changes nothing: lora_B (or lora_A) is all zeros in all {len(zero)} modules "
                "(an untrained adapter, or one saved before training)"]
    if zero:
        return [f"{len(zero)} of {len(plan.modules)} LoRA modules have all-zero deltas: {', '.join(zero[:8])}"]
    return []


def _receipt(r: _Ready, merged: dict) -> dict:
    """Config, tokenizer and card files next to the merged weights; verification; the receipt."""
    job, inputs, partial, timings, warnings = r.job, r.inputs, r.partial, r.timings, r.warnings
    device = resolve_device(job.device)
    stats, counts, vocab_size, untie = merged["stats"], merged["counts"], merged["vocab_size"], merged["untie"]
    merge_peak = merged["merge_peak"]

    kept = publish.copy_non_weight_files(inputs.base_src.path, inputs.adapter_src.path, partial)
    dtype_name = str(inputs.out_dtype).removeprefix("torch.")
    if inputs.plan is not None or not (partial / "config.json").is_file():
        publish.write_config(inputs.info.config, partial, dtype_name, vocab_size, untie)

    verification = _verify(job, inputs, partial, stats, vocab_size, timings)
    return {
        "schema": 1,
        "job_id": job.id,
        "status": "succeeded",
        "fingerprint": inputs.fingerprint,
        "engine": inputs.engine,
        "engine_reason": inputs.engine_reason,
        "base": {**_source(inputs.base_src), "files": {}},
        "allow_base_mismatch": job.allow_base_mismatch,
        "base_mismatch": inputs.mismatch,
        "adapter": {**_source(inputs.adapter_src),
                    "recorded_base_revision": inputs.adapter.config.get("revision"),
                    "files": inputs.adapter_hashes,
                    "peft_type": inputs.adapter.peft_type, "options": _adapter_options(inputs.adapter.config)},
        "counts": counts,
        "dtype": dtype_name,
        "untied_embeddings": untie,
        "vocab_size": vocab_size,
        "kept_files": kept,
        "verification": verification,
        "quantization": [],
        "warnings": warnings,
        "versions": versions(),
        "host": {"hostname": socket.gethostname(), "device": str(device)},
        "peak_rss_bytes": {"merge": merge_peak, "total": peak_rss_bytes()},
    }


def _source(src: Resolved) -> dict:
    if src.is_hub:
        return {"source": f"{src.repo}@{src.sha}", "repo": src.repo, "revision": src.revision, "sha": src.sha,
                "path": str(src.path)}
    return {"source": str(src.path.resolve()), "repo": None, "revision": src.revision, "sha": None}


def _adapter_options(config: dict) -> dict:
    keys = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "target_modules",
            "modules_to_save", "trainable_token_indices", "bias", "lora_bias", "layers_to_transform", "fan_in_fan_out",
            "task_type", "base_model_name_or_path", "revision")
    return {k: config[k] for k in keys if k in config}


def _verify(job: MergeJob, inputs: Inputs, partial: Path, stats, vocab_size, timings) -> dict:
    result: dict = {"requested": job.verify, "level": "none", "passed": True, "note": None, "modules": None,
                    "full": None}
    if job.verify == "none":
        return result
    if stats is not None:
        tol = PROBE_TOLERANCE.get(inputs.out_dtype, 1e-2)
        result["modules"] = {"checked": len(stats.probes), "max_rel_err": max(stats.probes.values(), default=0.0),
                             "tolerance": tol}
        result["level"] = "modules"
        if stats.failed_probes:
            raise VerificationError("module probes over tolerance: " + "; ".join(stats.failed_probes[:10]))
    if job.verify != "full":
        return result
    info = inputs.info
    if not info.instantiable:
        result["note"] = f"full verification skipped, modules only: {info.note}"
        log.warning(result["note"])
        return result
    if not fits_in_memory(inputs.base.fp32_bytes()):
        result["note"] = "full verification skipped, modules only: the model does not fit this worker's memory"
        log.warning(result["note"])
        return result
    t = time.perf_counter()
    figures = full_verification(info.model_cls, inputs.base_src.path, inputs.adapter_src.path, partial, vocab_size,
                                job.trust_remote_code)
    timings["verify_s"] = round(time.perf_counter() - t, 3)
    tol = Tolerance.for_dtype(inputs.out_dtype, job.max_logit_diff, job.max_kl, job.min_top1)
    result["full"] = {**figures, "tolerance": tol.__dict__}
    result["level"] = "full"
    failures = judge(figures, tol)
    if failures:
        raise VerificationError(f"the merged model's outputs differ from the unmerged adapter's: {'; '.join(failures)}. "
                                "Nothing was published. Loosen --max-logit-diff/--max-kl/--min-top1 only if this "
                                "is expected (e.g. a narrow --dtype)")
    return result


def _quantize(job: MergeJob, inputs: Inputs, partial: Path, variants: list, timings: dict) -> list[dict]:
    """Each requested variant, written into ``<output>-<method>.partial`` from the merged shards and measured."""
    if not variants:
        return []
    t = time.perf_counter()
    measure: bool | str = True
    if job.verify == "none":
        measure = "--verify none"
    elif not fits_in_memory(inputs.base.fp32_bytes()):
        measure = "the model does not fit this worker's memory"
    entries = []
    for spec, vdir in variants:
        vpartial = publish.fresh_dir(publish.partial_dir(vdir))
        entry = quantize.produce_variant(spec, partial, vpartial, model_cls=inputs.info.model_cls,
                                         dtype=inputs.out_dtype, device=resolve_device(job.device),
                                         max_shard_size=job.max_shard_size, trust_remote_code=job.trust_remote_code,
                                         measure=measure)
        if entry["note"]:
            log.warning(entry["note"])
        entries.append(entry)
    timings["quantize_s"] = round(time.perf_counter() - t, 3)
    return entries


def _write_variant_receipt(vpartial: Path, receipt: dict, spec, out: Path) -> None:
    entry = next(e for e in receipt["quantization"] if e["method"] == spec.method)
    variant = {**receipt, "variant_of": str(out.resolve()), "quantization": [entry]}
    _write_card_and_receipt(vpartial, publish.variant_card(variant, entry, out.name), variant)


def _write_receipt(partial: Path, receipt: dict, job: MergeJob) -> None:
    recorded = receipt["adapter"]["options"].get("base_model_name_or_path")
    base_name = receipt["base"].get("repo") or recorded or Path(job.base).resolve().name
    adapter_name = receipt["adapter"].get("repo") or Path(job.adapter).resolve().name
    _write_card_and_receipt(partial, publish.model_card(receipt, base_name, adapter_name), receipt)


def _write_card_and_receipt(directory: Path, card: str, receipt: dict) -> None:
    import json

    try:
        (directory / "README.md").write_text(card)
        (directory / publish.RECEIPT).write_text(json.dumps(receipt, indent=2, default=str) + "\n")
        publish.fsync_dir(directory)
    except OSError as exc:
        raise write_failure(exc, "writing the receipt") from None


__all__ = ["ConverterError", "JobResult", "convert", "inspect_job"]
