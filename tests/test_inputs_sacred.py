"""Inputs are never written: outputs into, over or around an input, a cache or a reserved path are
refused (exit 2) with or without --force; --force replaces only earlier outputs of converter and
empty directories; one writer per output. Every input file's sha256 is compared before and after."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig

from factories import build, make_adapter, receipt, run_converter, save_base, tiny_llama_config
from test_sources import SHA_A, add_snapshot

REPO = Path(__file__).resolve().parents[1]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("template")
    cfg = tiny_llama_config()
    save_base(build(cfg), d / "models" / "base")
    make_adapter(build(cfg), LoraConfig(**LORA), d / "models" / "adapter-a", seed=1)
    make_adapter(build(cfg), LoraConfig(**LORA), d / "models" / "adapter-b", seed=2)
    return d


@pytest.fixture
def ws(template, tmp_path):
    """A workspace: models/{base,adapter-a,adapter-b}; a fresh copy per test."""
    return Path(shutil.copytree(template, tmp_path / "ws"))


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (and the set of files itself)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def merge(ws: Path, output, *extra) -> int:
    return run_converter("merge", "--base", ws / "models" / "base", "--adapter", ws / "models" / "adapter-a",
                         "--output", output, "--verify", "modules", *extra)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("where, relation", [
    ("models/base", "is the base"),
    ("models/adapter-a", "is the adapter"),
    ("models", "contains the base"),
    ("models/base/merged", "lies inside the base"),
    ("models/adapter-a/sub/merged", "lies inside the adapter"),
])
def test_merge_never_writes_an_input(ws, where, relation, force, capfd):
    before = digest(ws)
    capfd.readouterr()
    assert merge(ws, ws / where, *(["--force"] if force else [])) == 2
    err = capfd.readouterr().err
    assert relation in err and str(ws / where) in err and "Traceback" not in err, err
    assert digest(ws) == before
    assert not list(ws.rglob("*.partial")) and not list(ws.rglob("*converter-lock"))


def test_staging_next_to_an_input_is_refused(ws, capfd):
    """`<out>.partial` is removed by every run: it may not be an input either."""
    shutil.copytree(ws / "models" / "base", ws / "merged.partial")
    before = digest(ws)
    assert run_converter("merge", "--base", ws / "merged.partial", "--adapter", ws / "models" / "adapter-a",
                         "--output", ws / "merged", "--force") == 2
    assert "merged.partial is the base" in capfd.readouterr().err
    assert digest(ws) == before


def test_variant_directory_that_is_an_input_is_refused(ws, capfd):
    before = digest(ws)
    assert merge(ws, ws / "models" / "adapter-a", "--quantize", "bnb-int8") == 2  # the output itself is an input
    capfd.readouterr()
    # the variant <out>-bnb-int8 would be the adapter
    shutil.move(ws / "models" / "adapter-a", ws / "models" / "out-bnb-int8")
    before = digest(ws)
    assert run_converter("merge", "--base", ws / "models" / "base", "--adapter", ws / "models" / "out-bnb-int8",
                         "--output", ws / "models" / "out", "--quantize", "bnb-int8", "--force") == 2
    assert "out-bnb-int8 is the adapter" in capfd.readouterr().err
    assert digest(ws) == before and not (ws / "models" / "out").exists()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_force_never_replaces_a_directory_converter_did_not_write(ws, force, capfd):
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("keep me")
    before = digest(ws)
    assert merge(ws, ws / "mine", *(["--force"] if force else [])) == 2
    err = capfd.readouterr().err
    assert "not an output of converter" in err and "notes.txt" in err
    assert digest(ws) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-fallback"])
def test_force_replaces_earlier_outputs_and_empty_directories(ws, exchange, monkeypatch, capfd):
    import converter.publish as publish

    if not exchange:  # a file system without RENAME_EXCHANGE: move aside, rename, remove
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    (ws / "empty").mkdir()
    assert merge(ws, ws / "empty") == 0  # an empty directory: nothing to lose
    assert receipt(ws / "empty")["status"] == "succeeded"
    inputs = digest(ws / "models")
    first = receipt(ws / "empty")["fingerprint"]
    assert merge(ws, ws / "empty", "--dtype", "bfloat16") == 2  # ours, other options: only with --force
    assert merge(ws, ws / "empty", "--dtype", "bfloat16", "--force") == 0
    assert receipt(ws / "empty")["fingerprint"] != first
    assert digest(ws / "models") == inputs
    assert sorted(p.name for p in ws.iterdir()) == ["empty", "models"]  # no .old, .partial or lock left


def test_output_in_the_hub_cache_is_refused(ws, tmp_path, capfd):
    cache = tmp_path / "hub"
    snap = add_snapshot(cache, "org/base", SHA_A, ws / "models" / "base", refs=("main",))
    before = digest(cache, ws)
    for output, needle in ((snap / "merged", "lies inside the hub cache"), (cache, "is the hub cache"),
                           (cache / "models--org--base" / "merged", "lies inside the hub cache"),
                           (tmp_path, "contains the")):
        for force in ([], ["--force"]):
            capfd.readouterr()
            rc = run_converter("merge", "--base", "org/base", "--adapter", ws / "models" / "adapter-a", "--output",
                               output, "--cache-dir", cache, "--verify", "modules", *force)
            err = capfd.readouterr().err
            assert rc == 2 and needle in err, (output, err)
    assert digest(cache, ws) == before


def test_output_in_the_converter_cache_is_refused(ws, capfd):
    converter_cache = Path(os.environ["CONVERTER_CACHE_DIR"])
    before = digest(ws)
    assert merge(ws, converter_cache / "merged", "--force") == 2
    assert "the converter cache" in capfd.readouterr().err
    assert digest(ws) == before and not (converter_cache / "merged").exists()


# -- manifests: validate and run ------------------------------------------------------------------------------


def manifest(ws: Path, jobs: list[dict], output_root: str = "out") -> Path:
    path = ws / "m.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"verify": "modules"}, "output_root": output_root, "jobs": jobs}))
    return path


def job(name: str, output: str, adapter: str = "adapter-a", **extra) -> dict:
    return {"id": name, "base": {"path": "models/base"}, "adapter": {"path": f"models/{adapter}"}, "output": output,
            **extra}


@pytest.mark.parametrize("jobs, output_root, needles", [
    ([job("a", "base")], "models", ["job a: output", "is the base"]),
    ([job("a", "adapter-b", adapter="adapter-a"), job("b", "x", adapter="adapter-b")], "models",
     ["job a: output", "is the adapter"]),  # another job's input
    ([job("a", "runs")], "out", ["job a: output", "is the run ledgers (reserved)"]),
    ([job("a", "runs/deeper")], "out", ["lies inside the run ledgers"]),
    ([job("a", "x"), job("b", "x/inner", adapter="adapter-b")], "out", ["job b: output", "lies inside what job a writes"]),
    ([job("a", "x", quantize=["bnb-int8"]), job("b", "x-bnb-int8", adapter="adapter-b")], "out",
     ["job b: output", "is what job a writes"]),
    ([job("a", "ws-out")], ".", []),  # control: a fine manifest in the same workspace
])
def test_manifest_outputs_never_touch_inputs(ws, jobs, output_root, needles, capfd):
    path = manifest(ws, jobs, output_root)
    before = digest(ws / "models")
    verbs = [("validate",), ("run",), ("run", "--force")] if needles else [("validate",)]
    for verb in verbs:
        capfd.readouterr()
        rc = run_converter(*verb, path)
        err = capfd.readouterr().err
        assert rc == (2 if needles else 0), (verb, err)
        assert all(n in err for n in needles), (verb, needles, err)
    assert digest(ws / "models") == before
    assert not (ws / "out").exists() or not any((ws / "out").iterdir())


def test_manifest_output_not_ours_is_refused_even_with_force(ws, capfd):
    (ws / "out" / "a").mkdir(parents=True)
    (ws / "out" / "a" / "weights.bin").write_bytes(b"precious")
    path = manifest(ws, [job("a", "a")])
    for verb in (("validate",), ("run", "--force")):
        capfd.readouterr()
        assert run_converter(*verb, path) == 2
        assert "not an output of converter" in capfd.readouterr().err
    assert (ws / "out" / "a" / "weights.bin").read_bytes() == b"precious"


def test_ray_working_dir_copy_with_relative_paths_is_explained(ws, tmp_path, capfd):
    """`ray job submit --working-dir .` runs the driver in an uploaded copy where relative paths point
    into the copy: the manifest says so instead of failing every job."""
    pkg = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd" / "configs"
    pkg.mkdir(parents=True)
    relative = pkg / "m.yaml"
    relative.write_text(yaml.safe_dump({"output_root": "../out", "jobs": [
        {"id": "a", "base": {"path": "../models/base"}, "adapter": {"path": "../models/adapter-a"}, "output": "a"}]}))
    assert run_converter("validate", relative) == 2
    err = capfd.readouterr().err
    assert "Ray's temporary copy of the working directory" in err and "absolute" in err
    assert "output_root '../out' is relative" in err
    absolute = pkg / "abs.yaml"
    absolute.write_text(yaml.safe_dump({"output_root": str(ws / "out"), "jobs": [
        {"id": "a", "base": {"path": str(ws / "models/base")}, "adapter": {"path": str(ws / "models/adapter-a")},
         "output": "a"}]}))
    assert run_converter("validate", absolute) == 0


# -- one writer per output; SIGTERM and SIGINT during a merge ---------------------------------------------------

BLOCKING_MERGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import converter.convert as convert

    marker = Path(sys.argv[1])
    def blocked(*args, **kwargs):  # the merge is written; hold here until a signal comes
        marker.write_text("merging")
        time.sleep(120)
    convert.verify_job = blocked
    from converter.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def start_blocking_merge(ws: Path, out: Path, marker: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_MERGE, str(marker), "merge", "--base",
                             str(ws / "models" / "base"), "--adapter", str(ws / "models" / "adapter-a"), "--output",
                             str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_second_writer_refused_and_interrupt_leaves_nothing(ws, tmp_path, sig, code, capfd):
    out = ws / "merged"
    inputs = digest(ws / "models")
    first = start_blocking_merge(ws, out, tmp_path / "marker")
    assert Path(f"{out}.partial").is_dir()

    capfd.readouterr()
    assert merge(ws, out) == 2  # a second writer of the same output, while the first holds it
    err = capfd.readouterr().err
    assert "being written by another converter process" in err and f"pid {first.pid}" in err, err
    assert Path(f"{out}.partial").is_dir()  # the first one's staging is untouched

    first.send_signal(sig)
    stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == code, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in ws.iterdir()) == ["models"]  # no output, .partial or lock file left
    assert digest(ws / "models") == inputs

    assert merge(ws, out) == 0  # the output is free again
    assert receipt(out)["status"] == "succeeded"


def test_lock_is_released_and_its_file_removed(ws):
    from converter import publish

    out = ws / "merged"
    with publish.output_lock(out):
        assert publish.lock_path(out).is_file()
        with pytest.raises(Exception, match="being written by another converter process"):
            with publish.output_lock(out):
                pass
    assert not publish.lock_path(out).exists()
    assert merge(ws, out) == 0
    assert json.loads((out / "conversion.json").read_text())["status"] == "succeeded"
