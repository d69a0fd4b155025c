"""MoE bases through the streaming merge: LoRA on fused expert parameters (``target_parameters``, also what
PEFT makes of ``target_modules=["w1", "w2", "w3"]``) merged into the checkpoint's own per-expert or fused
tensors, one tensor at a time. The oracle: PEFT's ``merge_and_unload`` saved by transformers (the on-disk
layout), and the unmerged PeftModel's outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_experts import build as build_moe
from test_experts import read

from factories import forward_logits, probe_ids, receipt, run_converter

warnings.filterwarnings("ignore")

CASES = {  # family, dtype, LoraConfig keywords
    "mixtral-params": ("mixtral", torch.float32, dict(target_modules=["q_proj"],
                                                       target_parameters=["mlp.experts.gate_up_proj",
                                                                          "mlp.experts.down_proj"])),
    "mixtral-w123-bf16": ("mixtral", torch.bfloat16, dict(target_modules=["w1", "w2", "w3", "v_proj"])),
    "qwen3-params-bf16": ("qwen3_moe", torch.bfloat16, dict(target_modules=["o_proj"],
                                                            target_parameters=["gate_up_proj", "down_proj"],
                                                            use_rslora=True)),
    "qwen3-gate-up": ("qwen3_moe", torch.float32, dict(target_modules=["gate_proj", "up_proj", "k_proj"],
                                                       rank_pattern={"up_proj": 2})),
    "gpt-oss-fused": ("gpt_oss", torch.float32, dict(target_parameters=["mlp.experts.gate_up_proj"])),
}


def make(tmp_path: Path, family: str, dtype, lora: dict) -> tuple[Path, Path]:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    build_moe(family, dtype).save_pretrained(base)
    torch.manual_seed(1)
    model = get_peft_model(build_moe(family, dtype), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(adapter)
    return base, adapter


@pytest.mark.parametrize("case", list(CASES))
def test_expert_lora_merges_as_peft(case, tmp_path):
    family, dtype, lora = CASES[case]
    base, adapter = make(tmp_path, family, dtype, lora)
    assert json.loads((adapter / "adapter_config.json").read_text()).get("target_parameters")
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out, "--verify", "full") == 0
    rec = receipt(out)
    assert rec["engine"] == "streaming" and rec["verification"]["level"] == "full"

    model_cls = type(build_moe(family, dtype))
    unmerged = PeftModel.from_pretrained(model_cls.from_pretrained(base, dtype=dtype), adapter).eval()
    ids = probe_ids(128)
    oracle_dir = tmp_path / "oracle"
    unmerged.merge_and_unload().save_pretrained(oracle_dir)
    ours, theirs, before = read(out / "model.safetensors"), read(oracle_dir / "model.safetensors"), read(
        base / "model.safetensors")
    assert set(ours) == set(theirs)
    changed = [k for k in theirs if not torch.equal(theirs[k], before[k])]
    assert sum("experts" in k for k in changed) >= 2, changed  # the adapter changes experts of both layers
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    # outputs in float32 (a bfloat16 forward's rounding flips expert routing): merged weights rounded to the dtype
    want = forward_logits(PeftModel.from_pretrained(model_cls.from_pretrained(base, dtype=torch.float32),
                                                    adapter).eval(), ids)
    got = forward_logits(model_cls.from_pretrained(out, dtype=torch.float32).eval(), ids)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < (5e-2 if dtype == torch.bfloat16 else 1e-5), rel


def legacy_adapter(path: Path, layers: int = 2, experts: int = 4) -> Path:
    """An adapter as PEFT saved it under transformers 4, when Mixtral's experts were modules: one LoRA per expert
    and projection (``block_sparse_moe.experts.E.w1``...). PEFT fuses it onto the experts' parameters on load."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["w1", "w2", "w3"],
                                                          "task_type": "CAUSAL_LM"}))
    torch.manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for e in range(experts):
            for w, (rows, cols) in {"w1": (128, 64), "w3": (128, 64), "w2": (64, 128)}.items():
                stem = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                tensors[f"{stem}.lora_A.weight"] = torch.randn(4, cols) * 0.1
                tensors[f"{stem}.lora_B.weight"] = torch.randn(rows, 4) * 0.1
    save_file(tensors, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_expert_adapter_of_transformers_4_merges_as_peft(dtype, tmp_path):
    base, adapter = tmp_path / "base", legacy_adapter(tmp_path / "adapter")
    model = build_moe("mixtral", dtype)
    model.save_pretrained(base)
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out, "--verify", "full") == 0
    assert receipt(out)["counts"]["merged"] == 24
    oracle_dir = tmp_path / "oracle"
    PeftModel.from_pretrained(type(model).from_pretrained(base, dtype=dtype), adapter).merge_and_unload(
    ).save_pretrained(oracle_dir)
    ours, theirs = read(out / "model.safetensors"), read(oracle_dir / "model.safetensors")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def test_expert_factors_that_do_not_fit_are_refused(tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    base, adapter = make(tmp_path, "mixtral", torch.float32, dict(target_parameters=["mlp.experts.down_proj"]))
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    state[key] = state[key][:-4]  # one expert's rank short
    save_file(state, adapter / "adapter_model.safetensors")
    capfd.readouterr()
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out) == 2
    err = capfd.readouterr().err
    assert key in err and "does not fit model.layers.1.mlp.experts.down_proj" in err and "Fix:" in err
    assert not out.exists()


def test_fp8_moe_base_with_expert_lora(tmp_path):
    """A quantized MoE (Qwen3-MoE with FP8 experts, the Qwen3-30B-A3B-FP8 layout): decoded per expert tensor, the
    experts' LoRA merged into them; PEFT's merge on the base as transformers dequantizes it is the oracle."""
    from transformers import FineGrainedFP8Config

    from factories import fp8_block_scaled

    dense, adapter = make(tmp_path, "qwen3_moe", torch.bfloat16, dict(target_parameters=["gate_up_proj", "down_proj"],
                                                                      target_modules=["q_proj"]))
    base = fp8_block_scaled(dense, tmp_path / "fp8", block=(16, 16))
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out, "--verify", "full") == 0
    rec = receipt(out)
    assert rec["base"]["format"]["decoded"] > 16 and rec["verification"]["level"] == "full"
    model_cls = type(build_moe("qwen3_moe"))
    q = FineGrainedFP8Config(dequantize=True, weight_block_size=[16, 16])
    ref = model_cls.from_pretrained(base, quantization_config=q, dtype=torch.bfloat16)
    PeftModel.from_pretrained(ref, adapter).merge_and_unload().save_pretrained(tmp_path / "oracle")
    ours, theirs = read(out / "model.safetensors"), read(tmp_path / "oracle" / "model.safetensors")
    assert set(ours) == set(theirs) and not any(k.endswith("_scale_inv") for k in ours)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def test_inspect_maps_expert_lora_onto_the_checkpoint(tmp_path, capfd):
    base, adapter = make(tmp_path, "mixtral", torch.float32, dict(target_parameters=["mlp.experts.gate_up_proj"]))
    capfd.readouterr()
    assert run_converter("inspect", adapter, "--base", base) == 0
    out = capfd.readouterr().out
    assert "fits: 16 tensors merged" in out, out  # w1 and w3 of 4 experts in 2 layers
    assert "merge    model.layers.1.block_sparse_moe.experts.3.w3.weight" in out
