"""Adapters PEFT saved under their own name (``<dir>/<name>/``): one is used, saying so; several are refused,
naming the ``--adapter`` to pass for each. The same in merge, inspect and validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from factories import (assert_state_dicts_match, build, peft_oracle, read_output, receipt, run_converter, save_base,
                       tiny_llama_config)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture
def base(tmp_path) -> Path:
    return save_base(build(tiny_llama_config()), tmp_path / "base")


def named(path: Path, names: list[str]) -> Path:
    """``save_pretrained`` of a PeftModel holding adapters with these names (none called "default")."""
    model = get_peft_model(build(tiny_llama_config()), LoraConfig(**LORA), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**LORA))
    model.save_pretrained(path)
    assert not (path / "adapter_config.json").exists() and all((path / n / "adapter_config.json").is_file()
                                                               for n in names)
    return path


def test_one_named_adapter_is_used_and_said(base, tmp_path, capfd):
    adapter = named(tmp_path / "adapter", ["sft"])
    out = tmp_path / "out"
    capfd.readouterr()
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out, "--verify", "modules") == 0
    said = f"using {adapter / 'sft'}, the adapter PEFT saved under the name 'sft'"
    assert said in capfd.readouterr().err
    assert any(said in w for w in receipt(out)["warnings"])
    _, _, oracle = peft_oracle(base, adapter / "sft")
    assert_state_dicts_match(read_output(out), oracle)
    assert run_converter("inspect", adapter, "--base", base) == 0
    assert said in capfd.readouterr().out


def test_several_named_adapters_are_refused_naming_each(base, tmp_path, capfd):
    adapter = named(tmp_path / "adapter", ["sft", "dpo"])
    out = tmp_path / "out"
    capfd.readouterr()
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out) == 2
    err = capfd.readouterr().err
    assert "2 named ones" in err and f"--adapter {adapter / 'dpo'}" in err and f"--adapter {adapter / 'sft'}" in err
    assert not out.exists()
    assert run_converter("inspect", adapter) == 2
    assert f"--adapter {adapter / 'dpo'}" in capfd.readouterr().err
    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps({"output_root": str(tmp_path / "o"), "jobs": [
        {"id": "j", "base": {"path": str(base)}, "adapter": {"path": str(adapter)}, "output": "j"}]}))
    assert run_converter("validate", manifest) == 2
    assert f"--adapter {adapter / 'sft'}" in capfd.readouterr().err
