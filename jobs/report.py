"""What a run shows and keeps: a line per finished job, a progress bar on a terminal, the summary
table, and the ledger (``<output_root>/runs/<timestamp>.jsonl``, one record per job, each written,
flushed and fsynced as that job finishes)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from converter.manifest import LEDGERS
from jobs.tasks import JobRecord

ERROR_CHARS = 300  # of a failed job's error, in its progress line


class Ledger:
    """Append-only JSON lines, durable record by record."""

    def __init__(self, output_root: Path):
        runs = output_root / LEDGERS
        runs.mkdir(parents=True, exist_ok=True)
        self.path = runs / f"{dt.datetime.now().strftime('%Y%m%dT%H%M%S.%f')}.jsonl"
        self._file = open(self.path, "a")

    def write(self, record: JobRecord) -> None:
        self._file.write(json.dumps({**record.to_json(), "finished_at": dt.datetime.now().isoformat()}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class RunReport:
    """Progress as jobs finish, then the summary. On a terminal: a live bar with the job lines above it;
    elsewhere (a file, CI, ``ray job submit`` logs): the same lines, plain, flushed as they happen."""

    def __init__(self, output_root: Path, total: int):
        self.tty = sys.stdout.isatty()
        self.console = Console(highlight=False)  # on a terminal only; elsewhere lines are printed plain
        self.output_root, self.total = output_root, total
        self.records: list[JobRecord] = []
        self.t0 = time.perf_counter()
        self._progress = None
        self._bar = None

    def __enter__(self) -> "RunReport":
        if self.tty:
            self._progress = Progress(TextColumn("[bold]converting"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.__enter__()
            self._bar = self._progress.add_task("converting", total=self.total, status="")
        self.say(f"converting {self.total} jobs into {self.output_root}")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def say(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def finished(self, record: JobRecord, running: int) -> None:
        self.records.append(record)
        self.say(self.job_line(record))
        if self._progress is not None:
            self._progress.update(self._bar, completed=len(self.records), status=self.counts_text(running))

    def counts(self) -> dict[str, int]:
        counts = {"succeeded": 0, "skipped": 0, "failed": 0}
        for r in self.records:
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    def counts_text(self, running: int | None = None) -> str:
        c = self.counts()
        text = f"ok {c['succeeded']}, skipped {c['skipped']}, failed {c['failed']}"
        return text + (f", running {running}" if running is not None else "")

    def job_line(self, r: JobRecord) -> str:
        done = len(self.records)
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        eta = (self.total - done) * elapsed / done if done else 0.0
        head = f"[{done}/{self.total}] {r.job_id}: {r.status} in {r.seconds:.1f}s"
        if r.status == "failed":
            head += f": {(r.error or '').splitlines()[0][:ERROR_CHARS] if r.error else 'unknown error'}"
        else:
            head += f" ({figures_text(r)})"
        return f"{head} | {self.counts_text()} | {rate:.1f} jobs/min, ETA {_duration(eta)}"

    def summary(self, ledger: Path, interrupted: str | None = None) -> None:
        wall = time.perf_counter() - self.t0
        title = f"converter run: {len(self.records)} of {self.total} jobs in {wall:.1f}s"
        if interrupted:
            title += f", interrupted ({interrupted}): unfinished jobs removed"
        rows = [(r.job_id, r.status, r.verification.level or "-", _fmt(r.verification.max_abs_diff, ".3g"),
                 _fmt(r.verification.kl, ".2g"), _fmt(r.verification.top1, ".3f"), _variants(r.verification.variants),
                 f"{r.seconds:.1f}", _short(r.output, self.output_root) if r.status != "failed" else (r.error or ""))
                for r in sorted(self.records, key=lambda r: r.job_id)]
        header = ("job", "status", "verify", "max |Δ|", "KL", "top-1", "variants", "time s", "output / reason")
        if self.tty:
            table = Table(title=title)
            for col in header:
                table.add_column(col, overflow="fold")
            for row in rows:
                style = {"failed": "red", "skipped": "dim"}.get(row[1], "green")
                table.add_row(*row[:1], f"[{style}]{row[1]}", *row[2:])
            self.console.print(table)
        else:
            print(title)
            print(plain_table(header, rows), flush=True)
        self.say(f"{self.counts_text()}; outputs in {self.output_root}")
        self.say(f"ledger: {ledger}")


def figures_text(r: JobRecord) -> str:
    v = r.verification
    if v.level == "full":
        text = f"full: max |Δ| {_fmt(v.max_abs_diff, '.3g')}, KL {_fmt(v.kl, '.2g')}, top-1 {_fmt(v.top1, '.3f')}"
    elif v.level == "modules":
        text = f"modules: max rel err {_fmt(v.modules_max_rel_err, '.2g')}"
    else:
        text = f"verify {v.level or 'none'}"
    if v.variants:
        text += f"; variants {_variants(v.variants)}"
    return text


def plain_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell: nothing cut, no terminal codes."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _variants(variants) -> str:
    return ", ".join(f"{q.method} (KL {_fmt(q.kl, '.2g')}, size {_fmt(q.size_ratio, '.2f')}x)"
                     for q in variants or []) or "-"


def _short(output: str, root: Path) -> str:
    path = Path(output)
    return str(path.relative_to(root)) if root in path.parents else output


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
