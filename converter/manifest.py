"""Manifests: many (base, adapter) jobs in one YAML or JSONL file, checked all at once.

YAML::

    defaults: {dtype: bfloat16, verify: full}
    output_root: out/
    jobs:
      - id: support-bot-v3
        base: {path: models/llama-base}
        adapter: {path: adapters/support-bot-v3}
        output: support-bot-v3
      - id: sft-then-dpo                       # a stack: merged in order (with `weight`s: a weighted mix)
        base: {path: models/llama-base}
        adapters: [{path: adapters/sft}, {path: adapters/dpo}]
        output: sft-then-dpo

JSONL: one job a line; a first line holding only ``defaults`` and/or ``output_root``
sets those. Relative paths resolve against the manifest's directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from converter import guard
from converter.errors import BadInputError, read_failure
from converter.guard import Place
from converter.options import MergeJob, StackedAdapter
from converter.sources import REPO_ID

LEDGERS = "runs"  # <output_root>/runs/<timestamp>.jsonl: the run ledgers
RUN_LOCK = ".converter-run.lock"  # <output_root>/.converter-run.lock: one `converter run` at a time


class Source(BaseModel):
    """Where a base or an adapter comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str | None = None
    repo: str | None = None
    revision: str | None = None
    subfolder: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Source":
        if (self.path is None) == (self.repo is None):
            raise ValueError("give exactly one of `path` or `repo`")
        return self


class StackSource(Source):
    """An adapter of a stack (``adapters:``), with its weight in a weighted mix."""

    weight: float | None = None


class JobOptions(BaseModel):
    """Per-job options; also the shape of ``defaults``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    max_shard_size: str | None = None
    verify: Literal["none", "modules", "full"] | None = None
    quantize: tuple[str, ...] | None = None
    trust_remote_code: bool | None = None
    allow_base_mismatch: bool | None = None
    strict: bool | None = None
    keep_quantization: bool | None = None
    labels: tuple[str, ...] | None = None
    max_logit_diff: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    cache_dir: str | None = None  # hub cache for repo sources


class JobSpec(JobOptions):
    id: str
    base: Source
    adapter: Source | None = None
    adapters: tuple[StackSource, ...] | None = None  # a stack, merged in order (or mixed, with weights)
    output: str

    @model_validator(mode="after")
    def _one_adapter_field(self) -> "JobSpec":
        if (self.adapter is None) == (self.adapters is None):
            raise ValueError("give exactly one of `adapter` or `adapters` (a stack)")
        if self.adapters is not None and not self.adapters:
            raise ValueError("`adapters` lists no adapter")
        return self

    @property
    def adapter_sources(self) -> tuple[StackSource, ...]:
        """Every adapter of the job, in order."""
        return self.adapters or (StackSource(**self.adapter.model_dump()),)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not value.strip() or "/" in value or value.startswith("."):
            raise ValueError("a job id is a plain non-empty name (no '/', not starting with '.')")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    output_root: Path
    defaults: JobOptions
    jobs: tuple[MergeJob, ...]


def _read(path: Path) -> tuple[dict, list[tuple[str, object]]]:
    """(header with defaults/output_root, [(where, raw job)])."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInputError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    if path.suffix == ".jsonl":
        header: dict = {}
        jobs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if n == 1 and isinstance(row, dict) and row and set(row) <= {"defaults", "output_root"}:
                header = row
                continue
            jobs.append((f"line {n}", row))
        return header, jobs
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise BadInputError(f"{path}: a manifest is a mapping with a `jobs` list",
                            hint="see configs/demo.yaml for the layout")
    unknown = set(data) - {"defaults", "output_root", "jobs"}
    if unknown:
        raise BadInputError(f"{path}: unknown top-level field(s) {', '.join(sorted(unknown))}",
                            hint="the top level holds only defaults, output_root and jobs")
    return data, [(f"jobs[{i}]", job) for i, job in enumerate(data["jobs"])]


def _errors(exc: ValidationError) -> list[str]:
    out = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def load_manifest(path: str | Path, check_inputs: bool = True) -> Manifest:
    """The manifest's jobs, parsed and checked; one BadInputError lists every problem (job id and field)."""
    path = Path(path)
    here = path.resolve().parent
    ray_copy = ray_working_dir_copy(here)
    header, raw_jobs = _read(path)
    problems: list[str] = []
    try:
        defaults = JobOptions(**(header.get("defaults") or {}))
    except (ValidationError, TypeError) as exc:
        defaults = JobOptions()
        problems += [f"defaults.{e}" for e in (_errors(exc) if isinstance(exc, ValidationError) else [str(exc)])]
    output_root = (here / str(header.get("output_root") or ".")).resolve()
    specs = _job_specs(raw_jobs, problems)
    jobs = _merge_jobs(specs, defaults, here, output_root, ray_copy, problems)
    if ray_copy is not None and not Path(str(header.get("output_root") or ".")).is_absolute():
        problems.append(f"output_root {header.get('output_root') or '.'!r} is relative, and this manifest lies in "
                        f"Ray's temporary copy of the working directory ({ray_copy}): outputs would be written "
                        "there and lost. Give an absolute output_root on storage every node mounts")
    reserved = [Place("the run ledgers (reserved)", output_root / LEDGERS),
                Place("the run lock (reserved)", output_root / RUN_LOCK)]
    inputs = [place for job in jobs for place in guard.given_inputs(job)]
    if check_inputs:  # every job that parsed gets the engine's own checks, whatever the others have
        found, resolved = _inspect_all(jobs)
        problems += found
        inputs += resolved
    problems += guard.manifest_problems(jobs, inputs, reserved)
    if problems:
        raise BadInputError(problems, hint=f"fix {path} and run `converter validate {path}` again")
    return Manifest(path=path, output_root=output_root, defaults=defaults, jobs=tuple(jobs))


def _job_specs(raw_jobs: list[tuple[str, object]], problems: list[str]) -> list[JobSpec]:
    """The jobs that parse; the others' problems are added to ``problems``."""
    specs = []
    for where, raw in raw_jobs:
        if not isinstance(raw, dict):
            problems.append(f"{where}: a job is a mapping, got {type(raw).__name__}")
            continue
        try:
            specs.append(JobSpec(**raw))
        except ValidationError as exc:
            problems += [f"job {raw.get('id', where)}: {e}" for e in _errors(exc)]
    if not raw_jobs:
        problems.append("the manifest has no jobs")
    return specs


def _merge_jobs(specs: list[JobSpec], defaults: JobOptions, here: Path, output_root: Path, ray_copy: Path | None,
                problems: list[str]) -> list[MergeJob]:
    """Each spec with the defaults applied and its paths resolved; duplicate ids, shared or escaping outputs
    and bad values are added to ``problems``."""
    seen_ids: dict[str, int] = {}
    seen_outputs: dict[Path, str] = {}
    jobs: list[MergeJob] = []
    for spec in specs:
        seen_ids[spec.id] = seen_ids.get(spec.id, 0) + 1
        if seen_ids[spec.id] == 2:
            problems.append(f"job {spec.id}: duplicate id")
        out = _output_path(output_root, spec.output)
        if out is None:
            problems.append(f"job {spec.id}: output {spec.output!r} escapes output_root {output_root}")
            continue
        if out in seen_outputs:
            problems.append(f"job {spec.id}: output {out} is also written by job {seen_outputs[out]}")
            continue
        seen_outputs[out] = spec.id
        job_problems, job = _to_merge_job(spec, defaults, here, out, ray_copy)
        problems += [f"job {spec.id}: {p}" for p in job_problems]
        if job is not None:
            jobs.append(job)
    return jobs


def _output_path(root: Path, output: str) -> Path | None:
    """The output directory, or None when it would land outside the root (.., absolute, symlinks)."""
    candidate = Path(output)
    candidate = candidate if candidate.is_absolute() else root / candidate
    resolved = candidate.resolve()  # follows symlinks of existing parents
    if resolved == root or root not in resolved.parents:
        return None
    return resolved


def ray_working_dir_copy(directory: Path) -> Path | None:
    """The root of Ray's uploaded copy of a job's working directory (``ray job submit --working-dir``)
    when ``directory`` lies inside one, else None."""
    for candidate in [directory, *directory.parents]:
        if candidate.name.startswith("_ray_pkg_") and candidate.parent.name == "working_dir_files":
            return candidate
    return None


def _to_merge_job(spec: JobSpec, defaults: JobOptions, here: Path, out: Path,
                  ray_copy: Path | None = None) -> tuple[list[str], MergeJob | None]:
    problems = []
    base = _source_path("base", spec.base, here, ray_copy, problems)
    stacked = spec.adapters is not None
    adapters = [_source_path(f"adapters[{i}]" if stacked else "adapter", src, here, ray_copy, problems)
                for i, src in enumerate(spec.adapter_sources)]
    if problems:
        return problems, None
    options = {k: v for k, v in defaults.model_dump().items() if v is not None}
    options.update({k: v for k, v in spec.model_dump(include=set(JobOptions.model_fields)).items() if v is not None})
    if options.get("cache_dir") and not Path(options["cache_dir"]).is_absolute():
        options["cache_dir"] = str(here / options["cache_dir"])
    first, *rest = spec.adapter_sources
    try:
        job = MergeJob(job_id=spec.id, base=base, adapter=adapters[0], output=out,
                       base_revision=spec.base.revision, base_subfolder=spec.base.subfolder,
                       adapter_revision=first.revision, adapter_subfolder=first.subfolder, adapter_weight=first.weight,
                       stack=[StackedAdapter(adapter=path, revision=src.revision, subfolder=src.subfolder,
                                             weight=src.weight) for path, src in zip(adapters[1:], rest)],
                       **options)
    except ValidationError as exc:
        return _errors(exc), None
    return [], job


def _source_path(field: str, src: Source, here: Path, ray_copy: Path | None, problems: list[str]) -> Path:
    """Where a base or adapter source is: a hub repo id (resolved when the job is inspected) or a directory that
    must exist (relative to the manifest); what is wrong is added to ``problems``."""
    if src.repo is not None:
        if not REPO_ID.match(src.repo):
            problems.append(f"{field}: repo {src.repo!r} is not a hub repo id (org/name)")
        return Path(src.repo)
    p = Path(src.path).expanduser()
    p = p if p.is_absolute() else here / p
    if not (p / src.subfolder if src.subfolder else p).is_dir():
        missing = f"{field}: path {p / src.subfolder if src.subfolder else p} does not exist"
        if ray_copy is not None and not Path(src.path).is_absolute():
            missing += (f" (a relative path resolves inside Ray's temporary copy of the working directory, "
                        f"{ray_copy}: give absolute paths on storage every node mounts, or hub repos)")
        problems.append(missing)
    return p


def _inspect_all(jobs: list[MergeJob]) -> tuple[list[str], list[Place]]:
    """The merge engine's own checks on every job (adapter fits base, revisions, files); also the
    directories the sources resolved to (hub snapshots), which no output may touch."""
    from converter.inputs import inspect_job

    problems, resolved = [], []
    for job in jobs:
        try:
            inputs = inspect_job(job, metadata_only=True)
        except BadInputError as exc:
            found = [f"job {job.id}: {p}" for p in exc.problems]
            if exc.hint:
                found[-1] += f" (fix: {exc.hint})"
            problems += found
            continue
        except OSError as exc:
            problems += [f"job {job.id}: {read_failure(exc, 'its inputs')}"]
            continue
        resolved += guard.resolved_inputs(inputs.base_src.path, inputs.adapter_dirs)
    return problems, resolved


def lock_manifest(path: str | Path) -> list[str]:
    """Write back the commit sha every hub source resolves to; returns what changed.

    A locked manifest converts exactly the same inputs however its branches and tags move.
    (YAML comments are not kept: the file is rewritten from its data.)
    """
    from converter.sources import resolve_sha

    path = Path(path)
    load_manifest(path, check_inputs=False)  # refuse to rewrite a manifest that has problems
    header, raw_jobs = _read(path)
    cache_root = (header.get("defaults") or {}).get("cache_dir")
    changes = []
    for _, raw in raw_jobs:
        for field, src in [("base", raw.get("base")), ("adapter", raw.get("adapter")),
                           *(("adapter", a) for a in raw.get("adapters") or ())]:
            if not (src or {}).get("repo"):
                continue
            cache = raw.get("cache_dir", cache_root)
            cache = str(path.resolve().parent / cache) if cache and not Path(cache).is_absolute() else cache
            sha = resolve_sha(src["repo"], field, src.get("revision"), cache)
            if src.get("revision") != sha:
                changes.append(f"job {raw['id']}: {field} {src['repo']} {src.get('revision') or 'main'} -> {sha}")
                src["revision"] = sha
    if changes:
        if path.suffix == ".jsonl":
            lines = ([json.dumps(header)] if header else []) + [json.dumps(raw) for _, raw in raw_jobs]
            text = "\n".join(lines) + "\n"
        else:
            text = yaml.safe_dump({**header, "jobs": [raw for _, raw in raw_jobs]}, sort_keys=False)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return changes
