"""What one Ray task does: convert one job, with its own I/O, and return a small result."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from pathlib import Path

from converter.convert import convert, partial_dir
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


def run_one(job_data: dict, fault: str | None = None, node_id: str | None = None) -> dict:
    """Convert one job; never raises for the job's own failures (those are not retried)."""
    job = MergeJob(**job_data)
    _arm_fault(job, fault)
    started = time.time()
    base = {"job_id": job.id, "output": str(job.output), "node_id": node_id, "pid": os.getpid()}
    try:
        result = convert(job)
    except ConverterError as exc:
        return {**base, "status": "failed", "exit_code": exc.exit_code, "error": str(exc),
                "error_type": type(exc).__name__, "seconds": round(time.time() - started, 3)}
    except Exception as exc:  # noqa: BLE001 - an unexpected bug fails this job, not the run
        return {**base, "status": "failed", "exit_code": 1, "error": f"{type(exc).__name__}: {exc}",
                "error_type": type(exc).__name__, "traceback": traceback.format_exc(limit=8),
                "seconds": round(time.time() - started, 3)}
    receipt = result.receipt or {}
    return {**base, "status": result.status, "exit_code": 0, "error": None,
            "fingerprint": receipt.get("fingerprint"), "verification": summarize(receipt),
            "warnings": result.warnings, "seconds": round(time.time() - started, 3),
            "convert_seconds": (receipt.get("timings") or {}).get("total_s")}
