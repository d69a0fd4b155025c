"""Verification: figures, tolerances, failures that publish nothing, and graceful degrading."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig

import converter.lora_math
import converter.verify
from factories import (build, make_adapter, peft_oracle, read_output, receipt, run_converter, same_as_peft, save_base,
                       tiny_llama_config)


@pytest.fixture()
def pair(tmp_path):
    cfg = tiny_llama_config()
    save_base(build(cfg), tmp_path / "base")
    make_adapter(build(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                 tmp_path / "adapter")
    return tmp_path


def _merge(pair, *extra):
    return run_converter("merge", "--base", pair / "base", "--adapter", pair / "adapter", "--output", pair / "out",
                         *extra)


def _nothing_published(pair):
    return not (pair / "out").exists() and not (pair / "out.partial").exists()


def test_over_tolerance_fails_and_publishes_nothing(pair, capsys):
    # bf16 output of an fp32 base cannot be within 0 of the unmerged model's logits
    assert _merge(pair, "--dtype", "bfloat16", "--max-logit-diff", "0") == 1
    err = capsys.readouterr().err
    assert "differ from the unmerged adapter's" in err and "max |Δ|" in err
    assert _nothing_published(pair)


def test_top1_bound_is_enforced(pair, capsys):
    assert _merge(pair, "--min-top1", "1.01") == 1
    assert "top-1 agreement" in capsys.readouterr().err
    assert _nothing_published(pair)


def test_module_probes_catch_wrong_math(pair, monkeypatch, capsys):
    """A merge with the wrong scale is caught by the probes before anything is published."""
    real = converter.lora_math.merge_linear
    monkeypatch.setattr(converter.lora_math, "merge_linear", lambda w, a, b, s, f, **k: real(w, a, b, 2 * s, f, **k))
    assert _merge(pair, "--verify", "modules") == 1
    err = capsys.readouterr().err
    assert "module probes over tolerance" in err and "self_attn.q_proj" in err
    assert _nothing_published(pair)


def test_bf16_figures_within_default_tolerance(pair):
    assert _merge(pair, "--dtype", "bfloat16") == 0
    full = receipt(pair / "out")["verification"]["full"]
    assert 0 < full["max_abs_diff"] and full["kl"] < full["tolerance"]["max_kl"]
    assert full["top1"] >= full["tolerance"]["min_top1"]


def test_unknown_architecture_degrades_to_modules(pair):
    """A config transformers does not know: the merge needs no model class; verification says why."""
    cfg_path = pair / "base" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type="acme-lm", architectures=["AcmeForCausalLM"])
    cfg_path.write_text(json.dumps(cfg))
    assert _merge(pair) == 0
    r = receipt(pair / "out")
    assert r["verification"]["requested"] == "full" and r["verification"]["level"] == "modules"
    assert "cannot read this config" in r["verification"]["note"]
    assert r["verification"]["modules"]["checked"] == 4
    # the weights are still PEFT's merge (compared on a copy of the base with the original config)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    cfg_path.write_text(json.dumps(cfg))
    _, _, oracle = peft_oracle(pair / "base", pair / "adapter")
    ours = read_output(pair / "out")
    for k, v in oracle.items():
        if k in ours:
            assert same_as_peft(ours[k], v), k


def test_too_large_for_memory_is_verified_streamed(pair, monkeypatch):
    """A model that does not fit the worker: end-to-end figures all the same, block by block from disk."""
    monkeypatch.setattr("converter.convert.fits_in_memory", lambda n: False)
    assert _merge(pair) == 0
    v = receipt(pair / "out")["verification"]
    assert v["level"] == "full" and v["full"]["how"] == "streamed" and v["note"] is None
    assert v["full"]["kl"] < v["full"]["tolerance"]["max_kl"] and v["full"]["seconds"] > 0
