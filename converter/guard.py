"""Inputs are never written: where an output may go, and what may be replaced there.

Every path a job writes or removes (its output, the ``.partial`` it is staged in, its quantized
variants and their stagings, its lock file) is checked against every input of every job (the
base and adapter directories as given and as resolved, the hub cache a hub source lives in,
the converter cache) and against reserved paths (a run's ledgers). Equal, inside or around:
refused before any work, whatever ``--force`` says. ``--force`` itself replaces only what this
tool wrote (a directory with a receipt) or an empty directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from converter import cache, publish, sources
from converter.errors import OutputExistsError, UnsafeOutputError
from converter.options import MergeJob
from converter.quantize import variant_dir

SHOWN_ENTRIES = 5


@dataclass(frozen=True)
class Place:
    """A path nothing may write into, over or around; ``what`` names it in messages."""

    what: str
    path: Path


def real(path: Path) -> Path:
    """The path with every existing symlink followed (``..`` and links cannot hide an overlap)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def given_inputs(job: MergeJob) -> list[Place]:
    """The job's inputs as given: local directories, and the caches its hub sources and merges read."""
    places = []
    hub = False
    for what, value in (("base", job.base), *(("adapter", a.adapter) for a in job.adapters)):
        if sources.looks_like_path(str(value)):
            places.append(Place(f"the {what}", Path(value)))
        else:
            hub = True
    if hub or job.cache_dir is not None:
        places.append(Place("the hub cache", Path(job.cache_dir) if job.cache_dir else _hub_cache()))
    converter_cache = cache.cache_dir()
    if converter_cache is not None:
        places.append(Place("the converter cache", converter_cache))
    return places


def resolved_inputs(base_dir: Path, adapter_dirs: list[Path]) -> list[Place]:
    """The directories the sources resolved to (a hub snapshot, a subfolder)."""
    return [Place("the base", base_dir), *(Place("the adapter", d) for d in adapter_dirs)]


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def written_paths(job: MergeJob) -> list[Path]:
    """Every path a job may create, replace or remove."""
    out = job.output
    paths = [out, *publish.staging_paths(out)]
    for spec in job.quantize:
        vdir = variant_dir(out, spec)
        paths += [vdir, *publish.staging_paths(vdir)]
    return paths


class PlaceIndex:
    """Places looked up by path: which one a path is, lies inside, or contains (a walk up the path's
    parents, not a scan of every place: manifests hold thousands of jobs)."""

    def __init__(self, places: list[Place]):
        self.exact: dict[Path, Place] = {}
        self.below: dict[Path, Place] = {}  # an ancestor of a place -> that place
        for place in places:
            p = real(place.path)
            self.exact.setdefault(p, place)
            for parent in p.parents:
                self.below.setdefault(parent, place)

    def conflict(self, path: Path, ignore=lambda place: False) -> tuple[str, Place] | None:
        """(relation, place) of the first place ``path`` is, lies inside or contains; None if none."""
        w = real(path)
        if w in self.exact and not ignore(self.exact[w]):
            return "is", self.exact[w]
        for parent in w.parents:
            if parent in self.exact and not ignore(self.exact[parent]):
                return "lies inside", self.exact[parent]
        if w in self.below and not ignore(self.below[w]):
            return "contains", self.below[w]
        return None


def overlap_problems(job: MergeJob, index: PlaceIndex, ignore=lambda place: False) -> list[str]:
    """Why the job's outputs would touch a place of ``index`` (empty when they would not)."""
    for written in written_paths(job):
        found = index.conflict(written, ignore)
        if found:
            relation, place = found
            what = "output" if written == job.output else "path it writes"
            return [f"{what} {written} {relation} {place.what} ({place.path})"]
    return []


def check_inputs_untouched(job: MergeJob, places: list[Place]) -> None:
    """Raise UnsafeOutputError when the job's outputs would touch one of ``places``."""
    problems = overlap_problems(job, PlaceIndex(places))
    if problems:
        raise UnsafeOutputError(problems, hint="choose an --output outside every input, cache and reserved path; "
                                "converter never writes into its inputs, with or without --force")


def manifest_problems(jobs: list[MergeJob], inputs: list[Place], reserved: list[Place]) -> list[str]:
    """Every job's outputs against every job's inputs, the reserved paths and the other jobs' outputs."""
    problems = []
    untouchable = PlaceIndex(inputs + reserved)
    others = PlaceIndex([Place(f"what job {job.id} writes", path) for job in jobs for path in written_paths(job)])
    for job in jobs:
        mine = f"what job {job.id} writes"
        found = (overlap_problems(job, untouchable) or overlap_problems(job, others, lambda p: p.what == mine)
                 or foreign_outputs(job))
        problems += [f"job {job.id}: {p}" for p in found]
    return problems


def foreign_outputs(job: MergeJob) -> list[str]:
    """Existing output or variant directories that no --force may replace (not ours, not empty)."""
    problems = []
    for path in [job.output] + [variant_dir(job.output, spec) for spec in job.quantize]:
        if path.exists():
            try:
                check_replaceable(path, True, "")
            except UnsafeOutputError as exc:
                problems += exc.problems
    return problems


def check_replaceable(directory: Path, force: bool, fingerprint: str, what: str = "output") -> None:
    """``directory`` exists and is about to be replaced. Allowed for an empty directory and for one of ours
    made from the same inputs and options; for one of ours made otherwise, only with --force; never for
    anything else."""
    if not directory.is_dir():
        raise UnsafeOutputError(f"{what} {directory} exists and is not a directory",
                                hint="choose another --output, or move that file away")
    receipt = publish.read_receipt(directory)
    entries = sorted(p.name for p in directory.iterdir())
    if receipt is None and entries:
        shown = ", ".join(entries[:SHOWN_ENTRIES]) + (f" and {len(entries) - SHOWN_ENTRIES} more"
                                                       if len(entries) > SHOWN_ENTRIES else "")
        raise UnsafeOutputError(f"{what} {directory} exists and is not an output of converter (no "
                                f"{publish.RECEIPT}); it holds {shown}",
                                hint="choose another --output, or move that directory away; --force replaces only "
                                "earlier outputs of converter and empty directories")
    if receipt is not None and receipt["fingerprint"] != fingerprint and not force:
        raise OutputExistsError(f"{what} {directory} already exists and its receipt has another fingerprint (it was "
                                "made from other inputs or options)",
                                hint="pass --force to replace it, or choose another --output")
