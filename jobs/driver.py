"""The Ray driver for ``converter run``: plan, submit, watch, record, summarise.

Jobs that share a base go in groups; each group is one task, which declares what it needs (CPUs;
a GPU only for jobs that will use one: ``--device cuda``, or ``auto`` with full verification's
forward passes or a quantized base to decode; memory estimated from the largest tensor, the
adapters and, for full verification, one block of the model at a time, or both models for a
small one) so Ray never packs more jobs onto a node than fit. A task is a Ray
generator: it reports each job's record as that job finishes, and the driver writes it to the
ledger at once. A worker that dies is retried by Ray (``max_retries``; records already reported
are not reported again); a job that fails its checks or its verification is recorded as failed
and not retried. Workers are long-lived processes that Ray reuses between tasks, so torch,
transformers and peft are imported once per worker.

Ctrl-C (SIGINT) or SIGTERM: running tasks are cancelled (their jobs remove their own staging
directories), anything a job left unfinished is removed, the summary of what finished is printed,
and the run exits 130 or 143.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if not (sys.stdout.isatty() and sys.stderr.isatty()):
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's own log lines, plain in files and CI logs

import ray  # noqa: E402

from converter import codecs, publish, sources, verify  # noqa: E402
from converter.errors import (  # noqa: E402
    EXIT_SIGINT,
    BadInputError,
    Interrupted,
    OutputLockedError,
    interrupts_deferred,
    signals_ignored,
    sigterm_interrupts,
)
from converter.grouping import group_jobs  # noqa: E402
from converter.manifest import RUN_LOCK, Manifest, load_manifest  # noqa: E402
from converter.modelinfo import base_config  # noqa: E402
from converter.options import MergeJob  # noqa: E402
from converter.quantize import variant_dir  # noqa: E402
from converter.receipt import RECEIPT, Receipt  # noqa: E402
from converter.resources import uses_gpu  # noqa: E402
from jobs.report import Ledger, RunReport  # noqa: E402
from jobs.tasks import JobRecord  # noqa: E402

MAX_RETRIES = 2  # attempts after a worker dies (killed, OOM)
RUNTIME_BYTES = 1 << 30  # python + torch + transformers in a worker
GROUP_SIZE = 8  # adapters merged in one pass over their base, at most
CHUNK_BUFFER_BYTES = 64 << 20  # a few row chunks in flight per extra adapter of a pass
FAULT_ENV = "CONVERTER_TEST_FAULT"  # test-only: "kill:<job id>:<marker file>"
CANCEL_GRACE_S = 20.0  # after an interrupt: how long cancelled jobs get to clean up after themselves
LOCK_WAIT_S = 10.0  # after an interrupt: how long to wait for a job's lock before removing what it left


class RunLockedError(BadInputError):
    """Another ``converter run`` holds the output root."""


@ray.remote(max_retries=MAX_RETRIES)
def convert_task(jobs_data: list[dict], fault: str | None):
    """One task per group of jobs that share a base: one merge pass, a record per job as it finishes."""
    from jobs.tasks import run_group

    yield from run_group(jobs_data, fault, ray.get_runtime_context().get_node_id())


def output_lock(root: Path):
    """One run at a time per output root; a second one is refused clearly (the lock dies with its process)."""
    return publish.exclusive(root / RUN_LOCK, lambda holder: RunLockedError(
        f"output root {root} is being written by another `converter run` ({holder})",
        hint="wait for it to finish, or use another output_root"))


def memory_estimate(job: MergeJob, max_node_memory: float | None) -> int:
    """Bytes a job needs: the streaming merge, plus full verification (both models for a small one, else one
    block at a time: ``verify.check_memory``), so large jobs schedule on ordinary workers."""
    facts = _base_facts(job.base, job.base_revision, job.base_subfolder, job.cache_dir)
    if facts is None:  # unknown until the worker fetches it: a conservative guess
        return 4 * RUNTIME_BYTES
    stream = RUNTIME_BYTES + 4 * facts.largest_fp32 + 2 * _adapter_bytes(job)
    if job.verify != "full":
        return stream
    check, how = facts.check
    if how == "in memory" and max_node_memory is not None and stream + check > max_node_memory:
        check = facts.streamed_check  # the worker streams what does not fit
    return stream + check


def _adapter_bytes(job: MergeJob) -> int:
    return sum(p.stat().st_size for a in job.adapters for p in Path(a.adapter).glob("adapter_model.*"))


@dataclass(frozen=True)
class BaseFacts:
    """What scheduling needs of a base, from its headers and config alone."""

    largest_fp32: int  # its largest tensor, in float32 bytes
    check: tuple[int, str]  # (bytes, how) of full verification
    streamed_check: int  # bytes of full verification streamed
    quantized: bool


@functools.lru_cache(maxsize=256)
def _base_facts(base: Path, revision, subfolder, cache_dir) -> BaseFacts | None:
    """Once per base, not per job."""
    try:
        src, ckpt = sources.open_base(base, revision, subfolder, cache_dir, metadata_only=True)
        quantized = codecs.quant_config_of(base_config(src.path)) is not None
    except BadInputError:
        return None
    specs = ckpt.specs
    return BaseFacts(4 * max(s.numel for s in specs.values()), verify.check_memory(specs),
                     verify.check_memory(specs, streamed=True)[0], quantized)


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


def _cluster_limits() -> tuple[bool, float | None]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    has_gpu = any(n["Resources"].get("GPU", 0) > 0 for n in nodes)
    max_mem = max((n["Resources"].get("memory", 0) for n in nodes), default=0) or None
    return has_gpu, max_mem


@dataclass
class _Task:
    """A submitted group and the jobs of it that have not reported yet."""

    group: list[MergeJob]
    pending: dict[str, MergeJob] = field(init=False)

    def __post_init__(self):
        self.pending = {job.id: job for job in self.group}


def _submit(group: list[MergeJob], has_gpu: bool, max_mem, fault: str | None):
    job = group[0]
    facts = _base_facts(job.base, job.base_revision, job.base_subfolder, job.cache_dir)
    quantized = facts is None or facts.quantized
    gpu = any(uses_gpu(j.device, j.verify, quantized, has_gpu) for j in group)  # claimed only if used
    # the pass holds a few row chunks per adapter; verification and quantization run one job at a time
    extra = sum(2 * _adapter_bytes(j) + CHUNK_BUFFER_BYTES for j in group[1:])
    opts = {"num_cpus": 1, "num_gpus": 1 if gpu else 0,
            "memory": max(memory_estimate(j, max_mem) for j in group) + extra}
    return convert_task.options(**opts).remote([j.model_dump(mode="json") for j in group], fault)


def run_manifest(path: str | Path, ray_address: str | None = None, max_concurrent: int | None = None,
                 force: bool = False, group_size: int = GROUP_SIZE) -> int:
    """Run every job of a manifest; 0 when all succeeded or were already done, 1 when any failed,
    130 / 143 when interrupted by SIGINT / SIGTERM."""
    manifest = load_manifest(path)  # every problem at once, before anything runs
    jobs = [j.model_copy(update={"force": True}) if force else j for j in manifest.jobs]
    with output_lock(manifest.output_root):
        started_here = start_ray(ray_address)
        run = _Run(jobs, manifest, max_concurrent, group_size)
        interrupted = None
        try:
            with sigterm_interrupts(), run.report:  # after ray.init, whose own SIGTERM handler exits 1
                run.execute()
        except (KeyboardInterrupt, Interrupted) as exc:
            interrupted = exc if isinstance(exc, Interrupted) else Interrupted(EXIT_SIGINT)
        with signals_ignored():  # the clean-up below is bounded
            try:
                if interrupted is not None:
                    run.cancel()
            finally:
                if started_here:
                    ray.shutdown()
            if interrupted is not None:
                run.clean_up_unfinished()
            run.report.summary(run.ledger.path, interrupted=str(interrupted) if interrupted else None)
            run.ledger.close()
        if interrupted is not None:
            return interrupted.exit_code
        return 1 if run.report.counts()["failed"] else 0


class _Run:
    """One pass over a manifest's jobs: submit groups, record each job as it finishes."""

    def __init__(self, jobs: list[MergeJob], manifest: Manifest, max_concurrent: int | None, group_size: int):
        self.jobs = jobs
        self.queue = group_jobs(jobs, group_size)
        self.limit = max_concurrent or len(self.queue)
        self.running: dict = {}  # ObjectRefGenerator -> _Task
        self.recorded: set[str] = set()
        self.ledger = Ledger(manifest.output_root)
        self.report = RunReport(manifest.output_root, len(jobs))
        self.started_at = time.time()

    def execute(self) -> None:
        has_gpu, max_mem = _cluster_limits()
        fault = os.environ.get(FAULT_ENV)
        while self.queue or self.running:
            while self.queue and len(self.running) < self.limit:
                group = self.queue.pop(0)
                self.running[_submit(group, has_gpu, max_mem, fault)] = _Task(group)
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
            for gen in ready:
                self._collect(gen)

    def _collect(self, gen) -> None:
        """The next record of a task (or, when it failed as a whole, a failed record for each job it still owed)."""
        task = self.running[gen]
        try:
            ref = next(gen)
        except StopIteration:
            del self.running[gen]
            for job in list(task.pending.values()):  # a task that ended owing records: never expected
                self._record(task, JobRecord.failed(job, "the task ended without reporting this job", "Lost"))
            return
        try:
            self._record(task, ray.get(ref))
        except ray.exceptions.RayTaskError as exc:  # the task itself raised (a bug): its remaining jobs failed
            self._fail_pending(gen, f"the task failed: {str(exc).strip().splitlines()[-1][:500]}", type(exc).__name__)
        except ray.exceptions.RayError as exc:  # retries used up: the worker kept dying
            self._fail_pending(gen, f"the worker died {MAX_RETRIES + 1} times ({type(exc).__name__}); check the "
                               "node's memory and logs", type(exc).__name__)

    def _fail_pending(self, gen, error: str, error_type: str) -> None:
        task = self.running.pop(gen)
        for job in list(task.pending.values()):
            self._record(task, JobRecord.failed(job, error, error_type))

    def _record(self, task: _Task | None, record: JobRecord) -> None:
        if task is not None:
            task.pending.pop(record.job_id, None)
        if record.job_id in self.recorded:
            return
        with interrupts_deferred():  # the ledger line and the progress line, both or neither
            self.recorded.add(record.job_id)
            self.ledger.write(record)
            self.report.finished(record, len(self.running))

    def cancel(self) -> None:
        """Cancel what runs (a KeyboardInterrupt in each task, so its jobs remove their own staging), keep the
        records that still arrive, and stop the tasks that do not end in time."""
        for gen in self.running:
            ray.cancel(gen, force=False)
        deadline = time.monotonic() + CANCEL_GRACE_S
        while self.running and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5)
            for gen in ready:
                task = self.running[gen]
                try:
                    record = ray.get(next(gen))
                except StopIteration:
                    del self.running[gen]
                    continue
                except ray.exceptions.RayError:  # the cancellation itself, or a death: nothing more from it
                    del self.running[gen]
                    continue
                self._record(task, record)
        for gen in self.running:
            ray.cancel(gen, force=True)

    def clean_up_unfinished(self) -> None:
        """After an interrupt: a job published before it could report is recorded from its receipt; what any
        other job left behind (staging, a half-replaced output) is removed under that job's lock."""
        for job in self.jobs:
            if job.id in self.recorded:
                continue
            receipt = Receipt.read(job.output)
            mtime = (job.output / RECEIPT).stat().st_mtime if receipt else 0.0
            if receipt is not None and receipt.status == "succeeded" and mtime >= self.started_at:
                self._record(None, JobRecord.from_receipt(job, receipt))
                continue
            self._remove_leftovers(job)

    def _remove_leftovers(self, job: MergeJob) -> None:
        """What the job left of its output and its variants, under the job's own output lock (as the job
        itself removes them)."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                with publish.output_lock(job.output):
                    removed = [p for out in [job.output] + [variant_dir(job.output, spec) for spec in job.quantize]
                               for p in publish.remove_leftovers(out)]
                for path in removed:
                    self.report.say(f"removed unfinished {path}")
                return
            except OutputLockedError:
                if time.monotonic() >= deadline:
                    self.report.say(f"left what job {job.id} did not finish: it still holds the lock on "
                                    f"{job.output}; a re-run removes it")
                    return
                time.sleep(0.2)
