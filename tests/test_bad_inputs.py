"""Bad inputs: a non-zero exit, a message naming the problem, and nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from factories import (
    build,
    make_adapter,
    read_output,
    receipt,
    run_converter,
    save_base,
    tiny_llama_config,
)

ADAPTER_FILE = "adapter_model.safetensors"
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def run(*args) -> int:
    try:
        return run_converter(*args)
    except SystemExit as exc:  # an argparse-style exit is an exit status too
        return exc.code if isinstance(exc.code, int) else 1


def no_output(out: Path) -> bool:
    return not Path(out).exists() and not Path(f"{out}.partial").exists()


def expect_failure(capfd, base, adapter, out, *extra, code=2, words=(), pattern=None) -> str:
    """Run a merge that must fail with ``code``; the stderr message holds ``words``; no output."""
    capfd.readouterr()
    rc = run("merge", "--base", base, "--adapter", adapter, "--output", out, *extra)
    err = capfd.readouterr().err
    assert rc == code if code is not None else rc != 0, f"exit {rc}\n{err}"
    for w in words:
        assert w.lower() in err.lower(), f"{w!r} not in message:\n{err}"
    if pattern:
        assert re.search(pattern, err, re.I), f"/{pattern}/ not in message:\n{err}"
    assert no_output(out), os.listdir(Path(out).parent)
    return err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(build(tiny_llama_config()), tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    return make_adapter(build(tiny_llama_config()), LoraConfig(init_lora_weights=False, **LORA), d)


@pytest.fixture
def adapter(adapter_template, tmp_path):
    """A fresh, writable copy of a good adapter."""
    return Path(shutil.copytree(adapter_template, tmp_path / "adapter"))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "merged"


def edit_tensors(adapter: Path, fn) -> None:
    path = adapter / ADAPTER_FILE
    tensors = load_file(path)
    save_file(fn(tensors), path)


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_good_adapter_merges(base, adapter, out):
    """Control: the fixtures themselves are fine."""
    assert run("merge", "--base", base, "--adapter", adapter, "--output", out) == 0
    assert receipt(out)["status"] == "succeeded"


def test_unmatched_adapter_keys_listed(base, adapter, out, capfd):
    edit_tensors(adapter, lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})
    expect_failure(capfd, base, adapter, out,
                   words=["layers.0.self_attn.qq_proj", "layers.1.self_attn.qq_proj"])


def test_zero_lora_b_warns_and_strict_fails(base, tmp_path, out, capfd):
    adapter = make_adapter(build(tiny_llama_config()), LoraConfig(**LORA), tmp_path / "zero", perturb=False)
    assert all(not v.any() for k, v in load_file(adapter / ADAPTER_FILE).items() if "lora_B" in k)
    expect_failure(capfd, base, adapter, tmp_path / "strict", "--strict", words=["lora_B"], pattern="zero")
    capfd.readouterr()
    assert run("merge", "--base", base, "--adapter", adapter, "--output", out) == 0
    assert re.search("zero", capfd.readouterr().err, re.I)
    assert [w for w in receipt(out)["warnings"] if "zero" in str(w).lower()]


def test_shape_mismatch(base, tmp_path, out, capfd):
    wide = tiny_llama_config(hidden_size=64, intermediate_size=128)
    adapter = make_adapter(build(wide), LoraConfig(init_lora_weights=False, **LORA), tmp_path / "wide")
    expect_failure(capfd, base, adapter, out, words=["self_attn.q_proj"], pattern="shape|size")


def test_base_revision_mismatch(base, adapter, tmp_path, out, capfd):
    edit_config(adapter, revision="abc")
    expect_failure(capfd, base, adapter, out, "--base-revision", "v2-other", words=["abc", "v2-other", "revision"])
    # control: the matching revision merges
    assert run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "ok", "--base-revision", "abc") == 0


def test_checkpoints_only_dir(base, adapter_template, tmp_path, out, capfd):
    runs = tmp_path / "training-output"
    for step in (10, 20):
        shutil.copytree(adapter_template, runs / f"checkpoint-{step}")
    expect_failure(capfd, base, runs, out, words=["checkpoint-10", "checkpoint-20", "--adapter"])


def test_adapter_passed_as_base(adapter, out, capfd):
    expect_failure(capfd, adapter, adapter, out, words=[adapter.name], pattern=r"is an adapter|not a (base )?model")


def test_base_passed_as_adapter(base, out, capfd):
    expect_failure(capfd, base, base, out, words=[base.name], pattern=r"full model|is a model|not an adapter")


def test_missing_adapter_config(base, adapter, out, capfd):
    (adapter / "adapter_config.json").unlink()
    expect_failure(capfd, base, adapter, out, words=["adapter_config.json"])


def test_unknown_peft_type(base, adapter, out, capfd):
    edit_config(adapter, peft_type="FOO")
    expect_failure(capfd, base, adapter, out, words=["FOO", "peft_type"])


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_length(path: Path):
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _bad_json(path: Path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"\x00\x01garbage!!\xfe\xff{{{"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _bad_length, _bad_json], ids=["truncated", "header-len", "header-json"])
@pytest.mark.parametrize("which", ["adapter", "base"])
def test_damaged_safetensors(damage, which, base, adapter, tmp_path, out, capfd):
    if which == "base":
        base = Path(shutil.copytree(base, tmp_path / "base"))
        target = base / "model.safetensors"
    else:
        target = adapter / ADAPTER_FILE
    damage(target)
    expect_failure(capfd, base, adapter, out, words=[target.name], pattern="truncat|corrupt|damaged|invalid")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_adapter_values(value, base, adapter, out, capfd):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value
        return t

    edit_tensors(adapter, poison)
    expect_failure(capfd, base, adapter, out, words=["layers.1.self_attn.v_proj"], pattern="nan|inf|finite")


def test_merged_overflow_in_float16(base, adapter, out, capfd):
    # finite in fp32, but the delta (2 * 4 * 100 * 100 = 8e4) exceeds float16's max (65504)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"

    def huge(t):
        for part in ("lora_A", "lora_B"):
            t[f"{prefix}.{part}.weight"] = torch.full_like(t[f"{prefix}.{part}.weight"], 100.0)
        return t

    edit_tensors(adapter, huge)
    expect_failure(capfd, base, adapter, out, "--dtype", "float16", code=None,
                   words=["layers.0.self_attn.q_proj"], pattern="inf|overflow|finite|float16")


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_that_runs_code_is_refused(base, adapter, tmp_path, out, capfd):
    # the payload is real: an unrestricted torch.load runs it (control)
    control, marker = tmp_path / "control-ran", tmp_path / "payload-ran"
    torch.save({"x": _Evil(control)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    (adapter / ADAPTER_FILE).unlink()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.save({key: torch.zeros(4, 32), "evil": _Evil(marker)}, adapter / "adapter_model.bin")
    expect_failure(capfd, base, adapter, out, words=["adapter_model.bin"])
    assert not marker.exists(), "the pickle's code ran"


def test_existing_output_fingerprint(base, adapter, out, capfd):
    assert run("merge", "--base", base, "--adapter", adapter, "--output", out) == 0
    first = (out / "conversion.json").read_bytes()
    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns

    # same inputs and options: skipped, untouched
    assert run("merge", "--base", base, "--adapter", adapter, "--output", out) == 0
    assert (out / "conversion.json").read_bytes() == first
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime

    # other options: refused without --force, the existing output left as it was
    capfd.readouterr()
    assert run("merge", "--base", base, "--adapter", adapter, "--output", out, "--dtype", "bfloat16") == 2
    assert "--force" in capfd.readouterr().err
    assert (out / "conversion.json").read_bytes() == first
    assert not Path(f"{out}.partial").exists()

    # --force rewrites it
    assert run("merge", "--base", base, "--adapter", adapter, "--output", out, "--dtype", "bfloat16", "--force") == 0
    assert "bfloat16" in str(receipt(out)["dtype"])
    assert {v.dtype for v in read_output(out).values()} == {torch.bfloat16}
    assert not Path(f"{out}.partial").exists()


def test_leftover_partial_is_not_taken_as_done(base, adapter, tmp_path, out):
    reference = tmp_path / "reference"
    assert run("merge", "--base", base, "--adapter", adapter, "--output", reference) == 0
    # a leftover .partial with a receipt of the same fingerprint but damaged weights
    partial = Path(f"{out}.partial")
    shutil.copytree(reference, partial)
    _truncate(partial / "model.safetensors")
    assert run("merge", "--base", base, "--adapter", adapter, "--output", out) == 0
    assert not partial.exists()
    ours, ref = read_output(out), read_output(reference)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output(where, base, adapter, tmp_path, capfd):
    if where == "under-a-file":
        blocker = tmp_path / "file.txt"
        blocker.write_text("not a directory")
        out = blocker / "out"
    else:
        out = Path(f"/proc/converter-test-{os.getpid()}/out")
    expect_failure(capfd, base, adapter, out, code=None, words=[str(out.parent)])
    if where == "under-a-file":
        assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("where", ["pwrite", "copy_file_range", "fsync"])
def test_disk_full(where, base, adapter, out, capfd, monkeypatch):
    calls: list[str] = []

    def enospc(*a, **k):
        calls.append(where)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, enospc)
    expect_failure(capfd, base, adapter, out, code=1, pattern="no space|disk|full")
    assert calls, f"the simulated failure at {where} was never reached: patch the place the writer uses"


@pytest.mark.parametrize("option, value", [("--dtype", "float8"), ("--verify", "everything")])
def test_bad_cli_values(option, value, base, adapter, out, capfd):
    expect_failure(capfd, base, adapter, out, option, value, words=[option.lstrip("-"), value])
