"""What one Ray task does: convert a group of jobs with its own I/O, and report each job's small
record as soon as that job is done."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from converter.convert import JobResult, iter_convert
from converter.errors import ConverterError
from converter.options import MergeJob
from converter.publish import partial_dir
from converter.receipt import Receipt


@dataclass(frozen=True)
class VariantFigures:
    """One quantized variant, as the summary and the ledger show it."""

    method: str
    path: str
    kl: float | None
    top1: float | None
    size_ratio: float | None


@dataclass(frozen=True)
class Figures:
    """The verification and quantization figures of a job, as the summary and the ledger show them."""

    level: str | None = None
    max_abs_diff: float | None = None
    kl: float | None = None
    top1: float | None = None
    modules_max_rel_err: float | None = None
    note: str | None = None
    variants: tuple[VariantFigures, ...] = ()

    @classmethod
    def from_receipt(cls, receipt: Receipt | None) -> "Figures":
        if receipt is None:
            return cls()
        v = receipt.verification
        variants = tuple(VariantFigures(q.method, q.path, q.figures.kl if q.figures else None,
                                        q.figures.top1 if q.figures else None, q.size_ratio)
                         for q in receipt.quantization)
        return cls(v.level, v.full.max_abs_diff if v.full else None, v.full.kl if v.full else None,
                   v.full.top1 if v.full else None, v.modules.max_rel_err if v.modules else None, v.note, variants)


@dataclass(frozen=True)
class JobRecord:
    """One job's line in the run ledger, and what the driver shows of it."""

    job_id: str
    output: str
    status: str  # "succeeded" | "skipped" | "failed"
    seconds: float  # this job's own time (its share of a pass shared with other jobs)
    exit_code: int = 0
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    fingerprint: str | None = None
    verification: Figures = field(default_factory=Figures)
    warnings: tuple[str, ...] = ()
    node_id: str | None = None
    pid: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def failed(cls, job: MergeJob, error: str, error_type: str, seconds: float = 0.0) -> "JobRecord":
        return cls(job.id, str(job.output), "failed", seconds, exit_code=1, error=error, error_type=error_type)

    @classmethod
    def from_receipt(cls, job: MergeJob, receipt: Receipt) -> "JobRecord":
        """A job whose output was published although its own record never arrived (an interrupted run)."""
        return cls(job.id, str(job.output), "succeeded", receipt.timings.get("total_s", 0.0),
                   fingerprint=receipt.fingerprint, verification=Figures.from_receipt(receipt),
                   warnings=tuple(receipt.warnings))


def run_group(jobs_data: list[dict], fault: str | None = None, node_id: str | None = None) -> Iterator[JobRecord]:
    """Convert jobs that share a base in one pass (``iter_convert``), yielding each job's record as it
    finishes. Never raises for the jobs' own failures (those are not retried)."""
    jobs = [MergeJob(**d) for d in jobs_data]
    for job in jobs:
        _arm_fault(job, fault)
    for done in iter_convert(jobs):
        yield _record(jobs[done.index], done.result, done.seconds, node_id)


def _record(job: MergeJob, outcome: JobResult | Exception, seconds: float, node_id: str | None) -> JobRecord:
    where = {"node_id": node_id, "pid": os.getpid()}
    if isinstance(outcome, ConverterError):
        return JobRecord(job.id, str(job.output), "failed", seconds, exit_code=outcome.exit_code, error=str(outcome),
                         error_type=type(outcome).__name__, **where)
    if isinstance(outcome, Exception):  # an unexpected bug fails this job, not the run
        return JobRecord(job.id, str(job.output), "failed", seconds, exit_code=1,
                         error=f"{type(outcome).__name__}: {outcome}", error_type=type(outcome).__name__,
                         traceback="".join(traceback.format_exception(outcome, limit=8)), **where)
    receipt = outcome.record
    return JobRecord(job.id, str(job.output), outcome.status, seconds,
                     fingerprint=receipt.fingerprint if receipt else None, verification=Figures.from_receipt(receipt),
                     warnings=tuple(outcome.warnings), **where)


def _arm_fault(job: MergeJob, fault: str | None) -> None:
    """Test-only fault hook: ``kill:<job id>:<marker file>`` makes the first attempt of that job
    kill its own worker process (SIGKILL) once its ``.partial`` directory exists."""
    if not fault:
        return
    kind, job_id, marker = fault.split(":", 2)
    if kind != "kill" or job_id != job.id or Path(marker).exists():
        return
    Path(marker).write_text(f"killed first attempt in pid {os.getpid()}\n")

    def _kill_when_started():
        partial = partial_dir(job.output)
        for _ in range(6000):
            if partial.exists():
                break
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=_kill_when_started, daemon=True).start()
