"""Which jobs share one pass over their base: the same base (and revision, subfolder, cache), output
dtype, device, and verification on or off. ``convert_many`` and the Ray driver both group by
``group_key``; the driver also bounds each group's size (one Ray task per group)."""

from __future__ import annotations

from pathlib import Path

from converter import sources
from converter.options import MergeJob


def group_key(job: MergeJob) -> tuple:
    """What jobs must share to be merged in one pass; a local base is known by its real path."""
    base = str(Path(job.base).resolve()) if sources.looks_like_path(job.base) else job.base
    return (base, job.base_revision, job.base_subfolder, str(job.cache_dir), job.dtype, job.device,
            job.verify != "none")


def group_jobs(jobs: list[MergeJob], group_size: int) -> list[list[MergeJob]]:
    """Jobs with the same ``group_key``, up to ``group_size`` per group, in manifest order."""
    chunks: dict[tuple, list[list[MergeJob]]] = {}
    order: list[list[MergeJob]] = []
    for job in jobs:
        groups = chunks.setdefault(group_key(job), [])
        if not groups or len(groups[-1]) >= group_size:
            groups.append([])
            order.append(groups[-1])
        groups[-1].append(job)
    return order
