"""``convert(job) -> JobResult``: one (base, adapter) pair, from its inputs to a published, verified output.

A job, step by step: check (inputs inspected, nothing written; the output locked) → skip it when
its output is already done → stage ``<output>.partial`` → merge (the job's engine) → companions
(config.json, tokenizer and other files) → verify → quantize → receipt → publish (renamed into
place last). Jobs that share a base share the merge pass (``convert_many``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from converter import cache, guard, publish, quantize
from converter.engines import Merged, Outcomes, run_engine
from converter.errors import BadInputError, read_failure, write_failure
from converter.grouping import group_key
from converter.inputs import Ready, inspect_job
from converter.options import MergeJob
from converter.receipt import Receipt, build_receipt, dtype_name
from converter.resources import merge_device
from converter.verify import fits_in_memory, import_in_background, verify_job

log = logging.getLogger("converter")


@dataclass
class JobResult:
    job_id: str
    status: str  # "succeeded" | "skipped"
    output: Path
    record: Receipt | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def receipt(self) -> dict | None:
        """The receipt as ``conversion.json`` holds it."""
        return self.record.to_json() if self.record else None


@dataclass(frozen=True)
class Outcome:
    """What became of one job: its JobResult or the exception that failed it, and its own seconds."""

    index: int
    result: JobResult | Exception
    seconds: float


def convert(job: MergeJob) -> JobResult:
    """Convert one (base, adapter) pair; raises ConverterError subclasses on failure."""
    outcome = convert_many([job])[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def convert_many(jobs: list[MergeJob]) -> list[JobResult | Exception]:
    """Convert several jobs (``iter_convert``); one outcome per job, in order: its JobResult or its exception."""
    outcomes: list[JobResult | Exception | None] = [None] * len(jobs)
    for done in iter_convert(jobs):
        outcomes[done.index] = done.result
    return outcomes


def iter_convert(jobs: list[MergeJob]) -> Iterator[Outcome]:
    """Convert several jobs, yielding each one's outcome as soon as it is known. Jobs with the same
    ``group_key`` are merged in one pass (each base tensor read once, one output per adapter); each is
    then verified, quantized and published on its own, and a job's failure never stops the others.
    Each output stays locked against other writers until the last job is done."""
    groups: dict[tuple, list[Ready]] = {}
    with ExitStack() as locks:
        for i, job in enumerate(jobs):
            t0 = time.perf_counter()
            try:
                ready = _check(i, job, locks)
            except Exception as exc:  # noqa: BLE001 - the job's outcome
                yield Outcome(i, exc, _since(t0))
                continue
            if isinstance(ready, JobResult):
                yield Outcome(i, ready, _since(t0))
                continue
            key = group_key(job) if ready.inputs.engine == "streaming" else ("alone", i)
            groups.setdefault(key, []).append(ready)
        for members in groups.values():
            yield from _convert_group(members)


def _check(index: int, job: MergeJob, locks: ExitStack) -> Ready | JobResult:
    """Every check before any work; from here on the output is locked for this process."""
    t0 = time.perf_counter()
    guard.check_inputs_untouched(job, guard.given_inputs(job))  # before resolving (or fetching) anything
    try:
        inputs = inspect_job(job)
    except OSError as exc:
        raise read_failure(exc, "the inputs") from None
    guard.check_inputs_untouched(job, guard.resolved_inputs(inputs.base_src.path, inputs.adapter_dirs))
    if inputs.plan is not None and job.strict and inputs.warnings:
        raise BadInputError([str(w) for w in inputs.warnings], hint="--strict turns these warnings into errors")
    out = job.output
    locks.enter_context(publish.output_lock(out))
    variants = [(spec, quantize.variant_dir(out, spec)) for spec in job.quantize]
    for path in [out] + [vdir for _, vdir in variants]:
        publish.remove_leftovers(path)  # of a run that crashed or was interrupted: never taken as done
    if publish.is_done(out, inputs.fingerprint):
        return JobResult(job.id, "skipped", out, Receipt.read(out))
    for spec, vdir in [(None, out)] + variants:
        if vdir.exists():
            guard.check_replaceable(vdir, job.force, inputs.fingerprint,
                                    what=f"quantized variant ({spec.method})" if spec else "output")
    return Ready(index, job, inputs, variants, {"inspect_s": _since(t0)})


def _convert_group(members: list[Ready]) -> Iterator[Outcome]:
    """Stage every member, merge them in one pass, then finish each on its own."""
    staged = []
    for r in members:
        try:
            publish.fresh_dir(r.partial)
            staged.append(r)
        except Exception as exc:  # noqa: BLE001
            yield Outcome(r.index, _failure(exc), r.timings["inspect_s"])
    if not staged:
        return
    with cache.hashing(staged[0].inputs.base.files) as base_hashes:  # for the receipts, beside the merge
        try:
            merged = _merge(staged)
            for r in staged:
                started = time.perf_counter()
                result = merged[r.index]
                if not isinstance(result, Exception):
                    result = _finish(r, result, base_hashes, started)
                if isinstance(result, Exception):
                    _discard(r)
                yield Outcome(r.index, _failure(result), r.own_seconds(started))
        except BaseException:
            for r in staged:
                _discard(r)
            raise


def _merge(members: list[Ready]) -> Outcomes:
    import_in_background(members)  # what verification needs, while the merge runs
    t = time.perf_counter()
    outcomes = run_engine(members, merge_device(members[0].job.device, members[0].inputs.codec is not None))
    seconds = _since(t)
    for r in members:
        r.timings.update(merge_s=seconds, merge_share_s=round(seconds / len(members), 3))
        if len(members) > 1:
            r.timings["merge_pass_adapters"] = len(members)
    return outcomes


def _finish(r: Ready, merged: Merged, base_hashes: dict[str, Future], started: float) -> JobResult | Exception:
    """The rest of one job, after the merge: companions, verification, variants, receipt, publish."""
    job, inputs, partial = r.job, r.inputs, r.partial
    warnings = inputs.warnings + merged.warnings
    for w in warnings:
        log.warning(w)
    try:
        kept = publish.copy_non_weight_files(inputs.base_src.path, inputs.adapter_dirs, partial)
        if inputs.plan is not None or not (partial / "config.json").is_file():
            publish.write_config(inputs.info.config, partial, dtype_name(inputs.out_dtype), merged.vocab_size,
                                 merged.untie, merged.quantization_config, merged.task_config)
        model_fits = fits_in_memory(inputs.base.fp32_bytes())  # room for whole models, for full checks
        verification = verify_job(job, inputs, partial, merged.probes, merged.vocab_size, model_fits, r.timings)
        variants = quantize.produce_variants(job, inputs, partial, model_fits, r.timings)
        r.timings["total_s"] = r.own_seconds(started)
        receipt = build_receipt(job, inputs, merged, verification, variants, kept, warnings, r.timings,
                                {name: f.result() for name, f in base_hashes.items()})
        publish.publish_job(receipt, partial, job.output, [(v, vdir, quantize.card_words(spec))
                                                           for v, (spec, vdir) in zip(variants, r.variants)])
    except Exception as exc:  # noqa: BLE001 - the job's outcome
        return exc
    return JobResult(job.id, "succeeded", job.output, receipt, warnings=receipt.warnings)


def _discard(r: Ready) -> None:
    shutil.rmtree(r.partial, ignore_errors=True)
    for _, vdir in r.variants:
        shutil.rmtree(publish.partial_dir(vdir), ignore_errors=True)


def _failure(result: JobResult | Exception) -> JobResult | Exception:
    """An OSError while working (full disk, permissions) as the job's failure, named for the user."""
    return write_failure(result, "writing the output") if isinstance(result, OSError) else result


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)
