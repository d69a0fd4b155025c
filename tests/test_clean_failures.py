"""Every failure a one-screen message with the problem and the fix, and its documented exit code:
malformed configs, an unreachable hub, a missing local path, a full disk or a refused write at
each step, a bug. Never a traceback; nothing written; inputs unchanged."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig

from factories import build, make_adapter, run_converter, save_base, tiny_llama_config
from test_inputs_sacred import digest

REPO = Path(__file__).resolve().parents[1]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    cfg = tiny_llama_config()
    save_base(build(cfg), d / "base")
    make_adapter(build(cfg), LoraConfig(**LORA), d / "adapter")
    return d


@pytest.fixture
def pair(template, tmp_path):
    return Path(shutil.copytree(template, tmp_path / "pair"))


def failing(capfd, code: int, *args) -> str:
    """Run the CLI, expect ``code`` and a message without a traceback; return the message."""
    capfd.readouterr()
    rc = run_converter(*args)
    err = capfd.readouterr().err
    assert rc == code, f"exit {rc}\n{err}"
    assert "Traceback" not in err and err.strip(), err
    return err


def merge_args(pair: Path, out: Path, *extra) -> tuple:
    return ("merge", "--base", pair / "base", "--adapter", pair / "adapter", "--output", out, *extra)


def nothing_left(out: Path) -> bool:
    return not any(out.parent.glob(f"*{out.name}*"))


# -- malformed configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    (json.dumps(["peft_type", "LORA"]), "holds a JSON list, not an object"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"peft_type": "LORA", "r": "8", "lora_alpha": 16, "target_modules": ["q_proj"]}), "`r`"),
    (json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": 5}), "`target_modules`"),
    (json.dumps({"r": 4}), "`peft_type` is missing"),
], ids=["list", "not-json", "r-string", "target-int", "no-type"])
def test_malformed_adapter_config(pair, tmp_path, content, needle, capfd):
    (pair / "adapter" / "adapter_config.json").write_text(content)
    before = digest(pair)
    out = tmp_path / "out"
    err = failing(capfd, 2, *merge_args(pair, out))
    assert needle in err and "adapter_config.json" in err and "Fix:" in err
    assert nothing_left(out) and digest(pair) == before
    err = failing(capfd, 2, "inspect", pair / "adapter")
    assert needle in err
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"output_root": "o", "jobs": [
        {"id": "bad", "base": {"path": str(pair / "base")}, "adapter": {"path": str(pair / "adapter")},
         "output": "bad"}]}))
    err = failing(capfd, 2, "validate", manifest)
    assert "job bad:" in err and needle in err


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ("{\"model_type\": ", "is not valid JSON"),
], ids=["list", "truncated"])
def test_malformed_base_config(pair, tmp_path, content, needle, capfd):
    (pair / "base" / "config.json").write_text(content)
    out = tmp_path / "out"
    err = failing(capfd, 2, *merge_args(pair, out))
    assert needle in err and "base config" in err and "config.json" in err
    assert nothing_left(out)


def test_malformed_weight_index(pair, tmp_path, capfd):
    (pair / "base" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    err = failing(capfd, 2, *merge_args(pair, tmp_path / "out"))
    assert "weight_map" in err and "Fix:" in err


# -- sources: paths and the hub ---------------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once this socket is closed


def test_hub_unreachable_without_offline_mode(pair, tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    for args in (["merge", "--base", "org/base", "--adapter", str(pair / "adapter"), "--output", "out"],
                 ["inspect", "org/adapter"]):
        proc = run_cli(args, tmp_path, **env)
        assert proc.returncode == 2, proc.stderr
        assert "the hub cannot be reached" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"output_root": "o", "jobs": [
        {"id": "hub", "base": {"repo": "org/base"}, "adapter": {"path": str(pair / "adapter")}, "output": "hub"}]}))
    for verb in ("validate", "lock"):
        proc = run_cli([verb, str(manifest)], tmp_path, **env)
        assert proc.returncode == 2 and "HF_HUB_OFFLINE=1" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_missing_local_paths_are_missing_directories(pair, tmp_path):
    (tmp_path / "models").mkdir()
    adapter = str(pair / "adapter")
    for base in ("./models/llama-base", "models/llama-base", "models/llama/base", "/nowhere/llama-base"):
        proc = run_cli(["merge", "--base", base, "--adapter", adapter, "--output", "out"], tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"base directory {base} does not exist" in proc.stderr, proc.stderr
        assert "huggingface-cli download" not in proc.stderr
    shutil.rmtree(tmp_path / "models")  # no such first component: it may be a hub repo, and neither is there
    proc = run_cli(["merge", "--base", "models/llama-base", "--adapter", adapter, "--output", "out"], tmp_path)
    assert proc.returncode == 2 and "there is no local directory models/llama-base" in proc.stderr, proc.stderr


# -- writes that fail at each step ------------------------------------------------------------------------------


def _fail_when(monkeypatch, target, attr: str, matches, err: int):
    original = getattr(target, attr)
    hits = []

    def failing_call(*args, **kwargs):
        if matches(*args):
            hits.append(args)
            raise OSError(err, os.strerror(err), str(args[-1] if attr != "write_text" else args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attr, failing_call)
    return hits


STEPS = {  # where a write fails: (object, attribute, which call)
    "staging": (Path, "mkdir", lambda p, *a: p.name.endswith(".partial")),
    "companions": (shutil, "copy2", lambda src, dst, *a: ".partial" in str(dst)),
    "config": (Path, "write_text", lambda p, *a: p.name == "config.json" and p.parent.name.endswith(".partial")),
    "receipt": (Path, "write_text", lambda p, *a: p.name == "conversion.json"),
    "variant-config": (Path, "write_text", lambda p, *a: p.name == "config.json" and "bnb-int8" in p.parent.name),
    "publish": (os, "rename", lambda src, dst, *a: str(src).endswith(".partial")),
}


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied")],
                         ids=["disk-full", "permission"])
@pytest.mark.parametrize("step", list(STEPS))
def test_write_failure_at_each_step(pair, tmp_path, step, err, words, monkeypatch, capfd):
    out = tmp_path / "out"
    before = digest(pair)
    target, attr, matches = STEPS[step]
    if step == "publish":  # the exchange of a previous output and, where unsupported, the plain rename
        import converter.publish as publish

        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    hits = _fail_when(monkeypatch, target, attr, matches, err)
    extra = ["--quantize", "bnb-int8"] if step == "variant-config" else []
    msg = failing(capfd, 1, *merge_args(pair, out, "--verify", "modules", *extra))
    assert hits, f"the failure at {step} was never reached"
    assert words in msg and "Fix:" in msg and "Nothing was published" in msg, msg
    monkeypatch.undo()
    assert not out.exists() and not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*lock"))
    assert not Path(f"{out}-bnb-int8").exists()
    assert digest(pair) == before


def test_unexpected_error_is_one_screen(pair, tmp_path, monkeypatch, capfd):
    import converter.inputs as inputs

    def broken(*args, **kwargs):
        raise ValueError("a bug in the planner")

    monkeypatch.setattr(inputs, "build_plan", broken)
    err = failing(capfd, 1, *merge_args(pair, tmp_path / "out"))
    assert "unexpected ValueError: a bug in the planner" in err and "CONVERTER_DEBUG=1" in err
    assert len(err.strip().splitlines()) <= 3
    monkeypatch.setenv("CONVERTER_DEBUG", "1")
    with pytest.raises(ValueError, match="a bug in the planner"):
        run_converter(*merge_args(pair, tmp_path / "out"))


def test_run_without_ray_is_one_clean_message(pair, tmp_path, monkeypatch, capfd):
    """`converter run` where Ray is not installed (a GPU image without it, say): exit 2, naming the fix."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "jobs.driver", raising=False)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"output_root": "o", "jobs": [
        {"id": "a", "base": {"path": str(pair / "base")}, "adapter": {"path": str(pair / "adapter")}, "output": "a"}]}))
    err = failing(capfd, 2, "run", manifest)
    assert "Ray, which is not installed" in err and "pip install ray" in err
    assert not (tmp_path / "o").exists()
