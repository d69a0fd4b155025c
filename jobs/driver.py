"""The Ray driver for ``converter run``: plan, submit, watch, summarise.

One task per job. Each declares what it needs (CPUs, a GPU for CUDA jobs, memory
estimated from the largest tensor, the adapter and, for full verification, the model),
so Ray never packs more jobs onto a node than fit. A worker that dies is retried by
Ray (``max_retries``); a job that fails validation or verification returns a failed
result and is not retried. Workers are long-lived processes that Ray reuses between
tasks, so torch, transformers and peft are imported once per worker.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from converter import sources  # noqa: E402
from converter.convert import partial_dir  # noqa: E402
from converter.errors import BadInputError  # noqa: E402
from converter.manifest import Manifest, load_manifest  # noqa: E402
from converter.options import MergeJob  # noqa: E402

MAX_RETRIES = 2  # attempts after a worker dies (killed, OOM)
RUNTIME_BYTES = 1 << 30  # python + torch + transformers in a worker
GROUP_SIZE = 8  # adapters merged in one pass over their base, at most
CHUNK_BUFFER_BYTES = 64 << 20  # a few row chunks in flight per extra adapter of a pass
FAULT_ENV = "CONVERTER_TEST_FAULT"  # test-only: "kill:<job id>:<marker file>"


class RunLockedError(BadInputError):
    """Another ``converter run`` holds the output root."""


@ray.remote(max_retries=MAX_RETRIES)
def convert_task(jobs_data: list[dict], fault: str | None) -> list[dict]:
    """One task per group of jobs that share a base: one merge pass for all of them."""
    from jobs.tasks import run_group

    return run_group(jobs_data, fault, ray.get_runtime_context().get_node_id())


def group_jobs(jobs: list[MergeJob], group_size: int) -> list[list[MergeJob]]:
    """Jobs on the same base (and revision, output dtype, device, verification), up to ``group_size``
    per group, in manifest order; each group is one task and one pass over the base."""
    groups: dict[tuple, list[list[MergeJob]]] = {}
    order: list[list[MergeJob]] = []
    for job in jobs:
        key = (str(job.base), job.base_revision, job.base_subfolder, str(job.cache_dir), job.dtype, job.device,
               job.verify != "none")
        chunks = groups.setdefault(key, [])
        if not chunks or len(chunks[-1]) >= group_size:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(job)
    return order


@contextmanager
def output_lock(root: Path):
    """One run at a time per output root; a second one is refused clearly (the lock dies with its process)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".converter-run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text().strip() or "another process"
        raise RunLockedError(f"output root {root} is being written by another `converter run` ({holder})",
                             hint="wait for it to finish, or use another output_root") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def memory_estimate(job: MergeJob, max_node_memory: float | None) -> int:
    """Bytes a job needs: the streaming merge, plus the model twice over for full verification when that fits."""
    sizes = _base_sizes(job.base, job.base_revision, job.base_subfolder, job.cache_dir)
    if sizes is None:  # unknown until the worker fetches it: a conservative guess
        return 4 * RUNTIME_BYTES
    largest_fp32, model_fp32 = sizes
    adapter_bytes = _adapter_bytes(job)
    stream = RUNTIME_BYTES + 4 * largest_fp32 + 2 * adapter_bytes
    if job.verify == "full":
        full = stream + int(2.5 * model_fp32)
        if max_node_memory is None or full <= max_node_memory:
            return full
    return stream


def _adapter_bytes(job: MergeJob) -> int:
    return sum(p.stat().st_size for p in Path(job.adapter).glob("adapter_model.*"))


@functools.lru_cache(maxsize=256)
def _base_sizes(base: Path, revision, subfolder, cache_dir) -> tuple[int, int] | None:
    """(largest tensor, whole model) in fp32 bytes, from the headers alone; once per base, not per job."""
    try:
        _, ckpt = sources.open_base(base, revision, subfolder, cache_dir, metadata_only=True)
    except BadInputError:
        return None
    return 4 * max(s.numel for s in ckpt.specs.values()), ckpt.fp32_bytes()


def start_ray(address: str | None) -> bool:
    """Connect to ADDRESS or RAY_ADDRESS; with neither, start a local Ray on 127.0.0.1. True if we started it."""
    if ray.is_initialized():  # an embedding program (or a test) already connected this process
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, object_store_memory=256 * 1024 * 1024)
    return True


def _ledger(root: Path) -> Path:
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return runs / f"{dt.datetime.now().strftime('%Y%m%dT%H%M%S.%f')}.jsonl"


def _clean_partials(manifest: Manifest, console: Console) -> None:
    for job in manifest.jobs:
        partial = partial_dir(job.output)
        if partial.exists():
            console.print(f"[yellow]removing leftover {partial} (an earlier run did not finish it)")
            shutil.rmtree(partial)


def _cluster_limits() -> tuple[bool, float | None]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    has_gpu = any(n["Resources"].get("GPU", 0) > 0 for n in nodes)
    max_mem = max((n["Resources"].get("memory", 0) for n in nodes), default=0) or None
    return has_gpu, max_mem


def _submit(group: list[MergeJob], has_gpu: bool, max_mem, fault: str | None):
    job = group[0]
    gpu = job.device == "cuda" or (job.device == "auto" and has_gpu)
    # the pass holds a few row chunks per adapter; verification and quantization run one job at a time
    extra = sum(2 * _adapter_bytes(j) + CHUNK_BUFFER_BYTES for j in group[1:])
    opts = {"num_cpus": 1, "num_gpus": 1 if gpu else 0,
            "memory": max(memory_estimate(j, max_mem) for j in group) + extra}
    return convert_task.options(**opts).remote([j.model_dump(mode="json") for j in group], fault)


def run_manifest(path: str | Path, ray_address: str | None = None, max_concurrent: int | None = None,
                 force: bool = False, console: Console | None = None, group_size: int = GROUP_SIZE) -> int:
    """Run every job of a manifest; 0 when all succeeded or were already done, 1 when any failed."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    manifest = load_manifest(path)  # every problem at once, before anything runs
    jobs = [j.model_copy(update={"force": True}) if force else j for j in manifest.jobs]
    with output_lock(manifest.output_root):
        _clean_partials(manifest, console)
        started_here = start_ray(ray_address)
        try:
            return _run(jobs, manifest, max_concurrent, console, group_size)
        finally:
            if started_here:
                ray.shutdown()


def _run(jobs: list[MergeJob], manifest: Manifest, max_concurrent: int | None, console: Console,
         group_size: int = GROUP_SIZE) -> int:
    has_gpu, max_mem = _cluster_limits()
    fault = os.environ.get(FAULT_ENV)
    ledger_path = _ledger(manifest.output_root)
    queue, running, results = group_jobs(jobs, group_size), {}, []
    limit = max_concurrent or len(queue)
    counts = {"succeeded": 0, "skipped": 0, "failed": 0}
    t0 = time.perf_counter()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with open(ledger_path, "a") as ledger, Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("converting", total=len(jobs), status="")
        while queue or running:
            while queue and len(running) < limit:
                group = queue.pop(0)
                running[_submit(group, has_gpu, max_mem, fault)] = group
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                group = running.pop(ref)
                for job, result in zip(group, _results(ref, group)):
                    results.append(result)
                    counts[result["status"]] = counts.get(result["status"], 0) + 1
                    ledger.write(json.dumps({**result, "finished_at": dt.datetime.now().isoformat()}) + "\n")
                    ledger.flush()
                    progress.advance(bar)
                    if result["status"] == "failed":
                        progress.console.print(f"[red]failed[/] {job.id}: {result['error']}")
            elapsed = time.perf_counter() - t0
            finished = sum(counts.values())
            rate = f"{finished / elapsed * 60:.1f} jobs/min" if finished else ""
            progress.update(bar, status=f"ok {counts['succeeded']} skipped {counts['skipped']} "
                                        f"failed {counts['failed']} running {len(running)} {rate}")
    _summary(console, results, ledger_path, time.perf_counter() - t0)
    return 1 if counts["failed"] else 0


def _results(ref, group: list[MergeJob]) -> list[dict]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the task itself raised (a bug): every job of it failed
        error = f"the task failed: {str(exc).strip().splitlines()[-1][:500]}"
        error_type = type(exc).__name__
    except ray.exceptions.RayError as exc:  # retries used up: the worker kept dying
        error = f"the worker died {MAX_RETRIES + 1} times ({type(exc).__name__}); check the node's memory and logs"
        error_type = type(exc).__name__
    return [{"job_id": job.id, "output": str(job.output), "status": "failed", "exit_code": 1, "error": error,
             "error_type": error_type} for job in group]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _variants(variants) -> str:
    return ", ".join(f"{q['method']} (KL {_fmt(q.get('kl'), '.2g')}, size {_fmt(q.get('size_ratio'), '.2f')}x)"
                     for q in variants or []) or "-"


def _short(output: str, root: Path) -> str:
    path = Path(output)
    return str(path.relative_to(root)) if root in path.parents else output


def _summary(console: Console, results: list[dict], ledger_path: Path, wall: float) -> None:
    root = ledger_path.parent.parent
    table = Table(title=f"converter run: {len(results)} jobs in {wall:.1f}s")
    for col in ("job", "status", "verify", "max |Δ|", "KL", "top-1", "variants", "time s", "output / reason"):
        table.add_column(col)
    for r in sorted(results, key=lambda r: r["job_id"]):
        v = r.get("verification") or {}
        style = {"failed": "red", "skipped": "dim"}.get(r["status"], "green")
        table.add_row(r["job_id"], f"[{style}]{r['status']}", v.get("level") or "-", _fmt(v.get("max_abs_diff"), ".3g"),
                      _fmt(v.get("kl"), ".2g"), _fmt(v.get("top1"), ".3f"), _variants(v.get("variants")),
                      _fmt(r.get("seconds"), ".1f"),
                      _short(r["output"], root) if r["status"] != "failed" else (r.get("error") or "")[:200])
    console.print(table)
    console.print(f"ledger: {ledger_path}")
