"""The command line: inspect, python -m converter, and the package layout rules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from factories import (assert_state_dicts_match, build, forward_logits, make_adapter, peft_oracle, probe_ids, same_as_peft,
                       read_output, receipt, run_converter, save_base, tiny_llama_config)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    cfg = tiny_llama_config()
    save_base(build(cfg), d / "base")
    make_adapter(build(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        rank_pattern={"v_proj": 2}, init_lora_weights=False), d / "adapter")
    return d


def test_inspect_lists_modules_and_changes(pair, capsys):
    assert run_converter("inspect", pair / "adapter", "--base", pair / "base") == 0
    out = capsys.readouterr().out
    assert "LORA" in out and "model.layers.1.self_attn.v_proj: linear r=2 alpha=8 scale=4" in out
    assert "fits: 4 tensors merged" in out
    assert "merge    model.layers.0.self_attn.q_proj.weight" in out


def test_inspect_json_reports_problems(pair, tmp_path, capsys):
    cfg = tiny_llama_config(hidden_size=64, intermediate_size=128)
    make_adapter(build(cfg), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), tmp_path / "big")
    assert run_converter("inspect", tmp_path / "big", "--base", pair / "base", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fits"] is False
    assert any("does not fit base tensor model.layers.0.self_attn.q_proj.weight" in p for p in summary["problems"])


def test_python_dash_m_merges(pair, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "converter", "merge", "--base", str(pair / "base"), "--adapter",
                           str(pair / "adapter"), "--output", str(out), "--verify", "modules"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "module probes: 4 modules" in proc.stdout
    _, _, oracle = peft_oracle(pair / "base", pair / "adapter")
    assert_state_dicts_match(read_output(out), oracle, atol=0.0)
    assert receipt(out)["verification"]["level"] == "modules"


def test_dora_embedding_and_fp16_output(tmp_path):
    """DoRA on an embedding, written as float16: PEFT's merge in float16 is the oracle."""
    cfg = tiny_llama_config()
    save_base(build(cfg), tmp_path / "base")
    make_adapter(build(cfg), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True,
                                        init_lora_weights=False), tmp_path / "adapter")
    assert run_converter("merge", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter",
                         "--output", tmp_path / "out", "--dtype", "float16") == 0
    unmerged, _, oracle = peft_oracle(tmp_path / "base", tmp_path / "adapter", dtype=torch.float16)
    ours = read_output(tmp_path / "out")
    assert ours["model.embed_tokens.weight"].dtype == torch.float16
    # bitwise for Linear DoRA; the fp16 embedding DoRA differs from PEFT by at most 1 ulp in a few elements
    ulp = 2.0**-10 * float(oracle["model.embed_tokens.weight"].float().abs().max())
    assert_state_dicts_match(ours, oracle, atol=2 * ulp)
    assert same_as_peft(ours["model.layers.0.self_attn.q_proj.weight"], oracle["model.layers.0.self_attn.q_proj.weight"])
    changed = (ours["model.embed_tokens.weight"].float() - build(cfg).model.embed_tokens.weight.half().float())
    assert changed.abs().max() > 1e-2  # the DoRA embedding merge did something
    r = receipt(tmp_path / "out")
    assert r["dtype"] == "float16" and r["verification"]["level"] == "full"
    assert r["verification"]["full"]["top1"] >= 0.9


def test_converter_package_never_imports_ray():
    for path in (REPO / "converter").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path} imports ray"


def test_unmerged_and_merged_logits_agree_on_cli_output(pair, tmp_path):
    assert run_converter("merge", "--base", pair / "base", "--adapter", pair / "adapter", "--output",
                         tmp_path / "m") == 0
    from transformers import AutoModelForCausalLM

    unmerged, _, _ = peft_oracle(pair / "base", pair / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = probe_ids(128)
    torch.testing.assert_close(forward_logits(merged, ids), forward_logits(unmerged, ids), rtol=1e-5, atol=1e-5)


def test_every_option_has_help_and_help_lists_exit_codes(capsys):
    import click

    from converter.cli import cli

    missing = [f"{name} {p.opts[0]}" for name, cmd in cli.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert not missing, f"options without help text: {missing}"
    for args in (["--help"], *([name, "--help"] for name in cli.commands)):
        assert run_converter(*args) == 0
        out = capsys.readouterr().out
        for code in ("0 ", "1 ", "2 ", "130", "143"):
            assert f"  {code}" in out, (args, code, out)
    assert run_converter("--version") == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"converter {version('converter')}"
