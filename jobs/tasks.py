"""What one Ray task does: convert one job, with its own I/O, and return a small result."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from pathlib import Path

from converter.convert import convert_many, partial_dir
from converter.errors import ConverterError
from converter.options import MergeJob


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


def summarize(result_receipt: dict | None) -> dict:
    if not result_receipt:
        return {}
    v = result_receipt.get("verification") or {}
    full = v.get("full") or {}
    modules = v.get("modules") or {}
    variants = [{"method": q.get("method"), "path": q.get("path"), "kl": (q.get("figures") or {}).get("kl"),
                 "top1": (q.get("figures") or {}).get("top1"), "size_ratio": q.get("size_ratio")}
                for q in result_receipt.get("quantization") or []]
    return {"level": v.get("level"), "max_abs_diff": full.get("max_abs_diff"), "kl": full.get("kl"),
            "top1": full.get("top1"), "modules_max_rel_err": modules.get("max_rel_err"), "note": v.get("note"),
            "variants": variants}


def run_group(jobs_data: list[dict], fault: str | None = None, node_id: str | None = None) -> list[dict]:
    """Convert jobs that share a base in one pass (``convert_many``); one small result per job.
    Never raises for the jobs' own failures (those are not retried)."""
    jobs = [MergeJob(**d) for d in jobs_data]
    for job in jobs:
        _arm_fault(job, fault)
    started = time.time()
    outcomes = convert_many(jobs)
    seconds = round(time.time() - started, 3)
    return [_result(job, outcome, node_id, seconds) for job, outcome in zip(jobs, outcomes)]


def run_one(job_data: dict, fault: str | None = None, node_id: str | None = None) -> dict:
    return run_group([job_data], fault, node_id)[0]


def _result(job: MergeJob, outcome, node_id: str | None, seconds: float) -> dict:
    base = {"job_id": job.id, "output": str(job.output), "node_id": node_id, "pid": os.getpid(), "seconds": seconds}
    if isinstance(outcome, ConverterError):
        return {**base, "status": "failed", "exit_code": outcome.exit_code, "error": str(outcome),
                "error_type": type(outcome).__name__}
    if isinstance(outcome, Exception):  # an unexpected bug fails this job, not the run
        return {**base, "status": "failed", "exit_code": 1, "error": f"{type(outcome).__name__}: {outcome}",
                "error_type": type(outcome).__name__,
                "traceback": "".join(traceback.format_exception(outcome, limit=8))}
    receipt = outcome.receipt or {}
    return {**base, "status": outcome.status, "exit_code": 0, "error": None,
            "fingerprint": receipt.get("fingerprint"), "verification": summarize(receipt),
            "warnings": outcome.warnings, "convert_seconds": (receipt.get("timings") or {}).get("total_s")}
