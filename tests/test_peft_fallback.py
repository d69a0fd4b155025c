"""Adapter types the streaming engine does not handle natively go through PEFT's own merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    VeraConfig,
)

from factories import (
    AutoModelForCausalLM,
    assert_state_dicts_match,
    build,
    forward_logits,
    make_adapter,
    peft_oracle,
    probe_ids,
    read_output,
    receipt,
    run_converter,
    save_base,
    tiny_llama_config,
)

QV = ["q_proj", "v_proj"]
FALLBACK = {
    "LOHA": LoHaConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
    "LOKR": LoKrConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
    "IA3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "VERA": VeraConfig(r=8, target_modules=QV),
    "ADALORA": AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=QV),
}


@pytest.fixture
def base_dir(tmp_path):
    return save_base(build(tiny_llama_config()), tmp_path / "base")


@pytest.mark.parametrize("peft_type", list(FALLBACK))
def test_fallback_merge_matches_peft(peft_type, base_dir, tmp_path):
    adapter = make_adapter(build(tiny_llama_config()), FALLBACK[peft_type], tmp_path / "adapter")
    unmerged, _, oracle = peft_oracle(base_dir, adapter, AutoModelForCausalLM)
    base_sd = read_output(base_dir)
    assert any(not torch.equal(base_sd[k], oracle[k]) for k in base_sd), "adapter changes nothing"

    out = tmp_path / "out"
    assert run_converter("merge", "--base", base_dir, "--adapter", adapter, "--output", out) == 0
    assert not Path(f"{out}.partial").exists()
    r = receipt(out)
    assert r["status"] == "succeeded"
    assert r["engine"] == "peft"
    assert r["adapter"]["peft_type"] == peft_type

    ours = read_output(out)
    assert not [k for k in ours if "base_layer" in k or k.startswith("base_model.") or "lora_" in k]
    assert_state_dicts_match(ours, oracle, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = probe_ids(128)
    torch.testing.assert_close(forward_logits(merged, ids), forward_logits(unmerged, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "cfg, word",
    [
        (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prompt"),
        (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefix"),
    ],
    ids=["prompt_tuning", "prefix_tuning"],
)
def test_unmergeable_adapter_refused(cfg, word, base_dir, tmp_path, capfd):
    adapter = make_adapter(build(tiny_llama_config()), cfg, tmp_path / "adapter")
    out = tmp_path / "out"
    capfd.readouterr()
    assert run_converter("merge", "--base", base_dir, "--adapter", adapter, "--output", out) == 2
    msg = capfd.readouterr().err.lower()
    assert word in msg and "merge" in msg and "weight" in msg, msg
    assert not out.exists() and not Path(f"{out}.partial").exists()
