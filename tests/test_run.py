"""`converter run` / `validate` on a local Ray bound to 127.0.0.1 (one cluster for this module)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig

from factories import build, make_adapter, read_output, receipt, run_converter, save_base, tiny_llama_config

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
FEATURES = {  # six different adapters on one base
    "plain": dict(target_modules=["q_proj", "v_proj"]),
    "rslora": dict(target_modules=["q_proj", "k_proj"], use_rslora=True),
    "dora": dict(target_modules=["o_proj"], use_dora=True),
    "all-linear": dict(target_modules="all-linear"),
    "tokens": dict(target_modules=["v_proj"], trainable_token_indices=[1, 4]),
    "head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module, on loopback, stopped by its own handle."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=100 * 2**20, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    cfg = tiny_llama_config()
    save_base(build(cfg), d / "base")
    for seed, (name, kw) in enumerate(FEATURES.items(), start=1):
        make_adapter(build(cfg), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw), d / name, seed=seed)
    return d


def write_manifest(path: Path, inputs: Path, names, extra_jobs=(), **defaults) -> Path:
    jobs = [{"id": n, "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / n)}, "output": n}
            for n in names]
    doc = {"defaults": {"verify": "modules", **defaults}, "output_root": "out", "jobs": jobs + list(extra_jobs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ledger(root: Path) -> list[dict]:
    files = sorted((root / "runs").glob("*.jsonl"))
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


def test_six_jobs_equal_single_merges(cluster, inputs, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.yaml", inputs, FEATURES)
    assert run_converter("run", manifest) == 0
    out = capsys.readouterr().out
    assert "converter run: 6 of 6 jobs" in out and "ledger:" in out
    for name in FEATURES:  # the same pair through `converter merge`
        assert run_converter("merge", "--base", inputs / "base", "--adapter", inputs / name, "--output",
                             tmp_path / "single" / name, "--verify", "modules") == 0
        ours, single = read_output(tmp_path / "out" / name), read_output(tmp_path / "single" / name)
        assert ours.keys() == single.keys() and all(torch.equal(ours[k], single[k]) for k in ours), name
        assert receipt(tmp_path / "out" / name)["fingerprint"] == receipt(tmp_path / "single" / name)["fingerprint"]
    records = ledger(tmp_path / "out")
    assert sorted(r["job_id"] for r in records) == sorted(FEATURES)
    assert all(r["status"] == "succeeded" for r in records)
    # jobs on one base shared one merge pass (one task), and still equal their single merges above
    assert max(receipt(tmp_path / "out" / n)["timings"].get("merge_pass_adapters", 1) for n in FEATURES) >= 2

    # a re-run skips every job and leaves the receipts alone
    mtimes = {n: (tmp_path / "out" / n / "conversion.json").stat().st_mtime_ns for n in FEATURES}
    assert run_converter("run", manifest) == 0
    assert all(r["status"] == "skipped" for r in ledger(tmp_path / "out"))
    assert mtimes == {n: (tmp_path / "out" / n / "conversion.json").stat().st_mtime_ns for n in FEATURES}


def test_one_bad_job_among_good_ones(cluster, inputs, tmp_path, capsys):
    # a verification bound no merge can meet: found at run time, so the other jobs still run
    bad = {"id": "too-strict", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")},
           "output": "too-strict", "verify": "full", "min_top1": 1.5}
    manifest = write_manifest(tmp_path / "m.yaml", inputs, ["plain", "rslora"], extra_jobs=[bad])
    assert run_converter("run", manifest) == 1
    out = capsys.readouterr().out
    assert "too-strict" in out and "top-1 agreement" in out
    records = {r["job_id"]: r for r in ledger(tmp_path / "out")}
    assert records["too-strict"]["status"] == "failed" and "top-1" in records["too-strict"]["error"]
    assert records["plain"]["status"] == records["rslora"]["status"] == "succeeded"
    assert not (tmp_path / "out" / "too-strict").exists() and not (tmp_path / "out" / "too-strict.partial").exists()


def test_killed_worker_is_retried(cluster, inputs, tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("CONVERTER_TEST_FAULT", f"kill:dora:{marker}")
    manifest = write_manifest(tmp_path / "m.yaml", inputs, ["plain", "dora"])
    assert run_converter("run", manifest) == 0
    assert marker.exists()  # the first attempt of `dora` killed its own worker mid-job
    records = {r["job_id"]: r for r in ledger(tmp_path / "out")}
    assert records["dora"]["status"] == "succeeded"
    assert records["dora"]["pid"] != int(marker.read_text().split()[-1])
    assert run_converter("merge", "--base", inputs / "base", "--adapter", inputs / "dora", "--output",
                         tmp_path / "single", "--verify", "modules") == 0
    ours, single = read_output(tmp_path / "out" / "dora"), read_output(tmp_path / "single")
    assert all(torch.equal(ours[k], single[k]) for k in single)
    assert not (tmp_path / "out" / "dora.partial").exists()


def test_killed_driver_resumes(cluster, inputs, tmp_path):
    names = list(FEATURES)
    manifest = write_manifest(tmp_path / "m.yaml", inputs, names)
    cmd = [sys.executable, "-m", "converter", "run", str(manifest), "--ray-address", cluster, "--max-concurrent", "1",
           "--group-size", "1"]  # a task per job, so that the driver dies between jobs
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    out = tmp_path / "out"
    deadline = time.time() + 240
    while time.time() < deadline and sum((out / n / "conversion.json").exists() for n in names) < 2:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver's own process group, nothing else
    driver.wait()
    done = {n: (out / n / "conversion.json").stat().st_mtime_ns for n in names if (out / n / "conversion.json").exists()}
    assert 2 <= len(done) < len(names), "the driver was not killed mid-run"

    assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600).returncode == 0
    assert all((out / n / "conversion.json").exists() for n in names)
    assert done == {n: (out / n / "conversion.json").stat().st_mtime_ns for n in done}  # not redone
    assert not list(out.glob("*.partial"))
    statuses = {r["job_id"]: r["status"] for r in ledger(out)}
    assert all(statuses[n] == "skipped" for n in done)


def test_bad_manifest_reports_every_problem(inputs, tmp_path, capsys):
    jobs = [
        {"id": "a", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")}, "output": "a"},
        {"id": "a", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "dora")}, "output": "a2"},
        {"id": "b", "base": {"path": str(inputs / "nope")}, "adapter": {"path": str(inputs / "plain")}, "output": "b"},
        {"id": "c", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")},
         "output": "../escape"},
        {"id": "d", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")}, "output": "a"},
        {"id": "e", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")}, "output": "e",
         "dtype": "float8", "colour": "blue"},
        {"id": "f", "base": {"path": str(inputs / "plain")}, "adapter": {"path": str(inputs / "plain")}, "output": "f"},
    ]
    (tmp_path / "link").symlink_to(tmp_path.parent)
    jobs.append({"id": "g", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")},
                 "output": "link/outside"})
    jobs.append({"id": "h", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")},
                 "output": "/tmp/elsewhere"})
    jobs.append({"id": "i", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")},
                 "output": "i", "quantize": ["bnb-int3"]})
    jobs.append({"id": "j", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(inputs / "plain")},
                 "output": "j", "device": "tpu"})
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump({"output_root": ".", "jobs": jobs}))
    for verb in ("validate", "run"):
        assert run_converter(verb, manifest) == 2
        err = capsys.readouterr().err
        for needle in ("job a: duplicate id", "job b: base: path", "job c: output '../escape' escapes",
                       "job d: output", "also written by job a", "job e: dtype", "job e: colour: unknown field",
                       "job f:", "is an adapter", "job g: output 'link/outside' escapes",
                       "job h: output '/tmp/elsewhere' escapes", "job i: quantize.0", "unknown quantization method",
                       "job j: device"):
            assert needle in err, (verb, needle, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "link"]  # nothing written


def test_unfit_adapter_found_by_validate(inputs, tmp_path, capsys):
    cfg = tiny_llama_config(hidden_size=64, intermediate_size=128)
    make_adapter(build(cfg), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), tmp_path / "big")
    job = {"id": "big", "base": {"path": str(inputs / "base")}, "adapter": {"path": str(tmp_path / "big")},
           "output": "big"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"output_root": "out"}) + "\n" + json.dumps(job) + "\n")
    assert run_converter("validate", manifest) == 2
    assert "job big:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_second_run_on_same_root_is_refused(inputs, tmp_path, capsys):
    from jobs.driver import output_lock

    manifest = write_manifest(tmp_path / "m.yaml", inputs, ["plain"])
    with output_lock(tmp_path / "out"):
        assert run_converter("run", manifest) == 2
    assert "being written by another `converter run`" in capsys.readouterr().err
    assert not (tmp_path / "out" / "plain").exists()


@pytest.mark.parametrize("name", ["demo.yaml", "single-box.yaml", "cluster.yaml"])
def test_example_manifests_are_well_formed(name):
    """The shipped examples follow the manifest schema (their paths exist only on their machines)."""
    from converter.manifest import JobOptions, JobSpec

    doc = yaml.safe_load((REPO / "configs" / name).read_text())
    assert set(doc) <= {"defaults", "output_root", "jobs"}
    JobOptions(**doc.get("defaults", {}))
    ids = [JobSpec(**job).id for job in doc["jobs"]]
    assert len(ids) == len(set(ids)) >= 2


def start_run(manifest: Path, *extra: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "converter", "run", str(manifest), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=stdout,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def published(out: Path, names) -> set[str]:
    return {n for n in names if (out / n / "conversion.json").exists()}


@pytest.mark.parametrize("sig, code, own_ray", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["SIGINT-own-ray", "SIGTERM-cluster"])
def test_interrupted_run_keeps_finished_jobs_only(cluster, inputs, tmp_path, sig, code, own_ray):
    names = list(FEATURES)
    manifest = write_manifest(tmp_path / "m.yaml", inputs, names)
    out = tmp_path / "out"
    extra = ["--max-concurrent", "1", "--group-size", "1"] + ([] if own_ray else ["--ray-address", cluster])
    proc = start_run(manifest, *extra)
    wait_for(lambda: len(published(out, names)) >= 2, proc)
    proc.send_signal(sig)  # only the driver: Ray's own processes ignore a terminal's Ctrl-C
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"interrupted ({sig.name})" in stdout and "Traceback" not in stderr
    done = published(out, names)
    assert 2 <= len(done) < len(names), "the run was not interrupted mid-way"
    assert not list(out.glob("*.partial")) and not list(out.glob("*.partial.old")) and not list(out.glob(".*-lock"))
    records = ledger(out)
    assert {r["job_id"] for r in records} == done  # every finished job, and only those
    assert all(r["status"] == "succeeded" and r["seconds"] > 0 for r in records), records
    assert all(f"{n}: succeeded" in stdout for n in done), stdout

    rerun = subprocess.run([sys.executable, "-m", "converter", "run", str(manifest), "--ray-address", cluster],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    statuses = {r["job_id"]: r["status"] for r in ledger(out)}
    assert statuses == {n: "skipped" if n in done else "succeeded" for n in names}


def test_ledger_gets_each_job_of_a_group_as_it_finishes(cluster, inputs, tmp_path):
    """One task for six jobs: records reach the ledger while the task still runs."""
    names = list(FEATURES)
    manifest = write_manifest(tmp_path / "m.yaml", inputs, names, verify="full")  # ~0.5 s a job
    out = tmp_path / "out"
    proc = start_run(manifest, "--ray-address", cluster, "--group-size", "8", stdout=subprocess.DEVNULL)

    def two_records():
        files = list((out / "runs").glob("*.jsonl")) if (out / "runs").is_dir() else []
        return bool(files) and len(files[0].read_text().splitlines()) >= 2

    wait_for(two_records, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean-up at all: what is in the ledger was written as it happened
    proc.wait()
    records = ledger(out)
    assert len(records) >= 2 and len({r["seconds"] for r in records}) == len(records)  # each job's own time
    assert {r["job_id"] for r in records} <= published(out, names)
    assert len(published(out, names)) < len(names) or len(records) < len(names), "the group was already done"


def test_progress_lines_in_a_log_file(cluster, inputs, tmp_path):
    """stdout to a file (CI, Ray Job logs): a plain line per job as it finishes, then the summary."""
    names = ["plain", "rslora", "dora"]
    manifest = write_manifest(tmp_path / "m.yaml", inputs, names)
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = start_run(manifest, "--ray-address", cluster, "--group-size", "1", stdout=f)
        first_line_at_job = None
        while proc.poll() is None:
            if first_line_at_job is None and "[1/3]" in log.read_text():
                first_line_at_job = len(published(tmp_path / "out", names))
            time.sleep(0.02)
    text = log.read_text()
    assert proc.returncode == 0, proc.stderr.read()
    assert first_line_at_job is not None and first_line_at_job < len(names), "nothing was printed before the end"
    assert "\x1b[" not in text and "\x1b[" not in proc.stderr.read()
    lines = text.splitlines()
    summary_at = next(i for i, line in enumerate(lines) if line.startswith("converter run: 3 of 3 jobs"))
    job_lines = [i for i, line in enumerate(lines) if line.startswith("[") and "succeeded in" in line]
    assert len(job_lines) == 3 and max(job_lines) < summary_at
    assert all("jobs/min, ETA" in lines[i] and "max rel err" in lines[i] for i in job_lines)
    assert f"outputs in {tmp_path / 'out'}" in text
    for name in names:  # the summary names every job in full, with its own time
        assert any(line.startswith(name + " ") and "succeeded" in line for line in lines[summary_at:])
