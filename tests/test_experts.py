"""converter.experts: LoRA on fused MoE expert parameters, merged one checkpoint tensor at a time.

The oracle is PEFT itself: ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``
saved with ``save_pretrained`` (which writes transformers' on-disk layout back). Adapters
have a nonzero ``lora_B`` (``init_lora_weights=False``), so a merge that adds nothing, or
adds the wrong expert's or the wrong projection's delta, fails.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from converter.experts import (
    ExpertLora,
    ExpertSlice,
    UnsupportedExpertLayoutError,
    expert_slices,
    key_delta,
    merge_tensor,
    wrapped_params,
)

warnings.filterwarnings("ignore")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM,
                dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                  dict(intermediate_size=96, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                       head_dim=16)),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_experts=4, num_experts_per_tok=2)),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM,
                    dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1)),
    "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM,
                dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                     layer_types=["full_attention", "full_attention"])),
}
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny model of the family with random weights (every fused expert param random too)."""
    config_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **kw)).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name:
                param.copy_(torch.randn_like(param, dtype=torch.float32).to(dtype) * 0.05)
    return model


def meta_model(directory: Path):
    """The model of a saved checkpoint, on the meta device, as the planner builds it."""
    config = T.AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        return getattr(T, config.architectures[0])._from_config(config)


def read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def model_part(param: torch.Tensor, where: ExpertSlice) -> torch.Tensor:
    """The part of a fused model param a checkpoint key holds, oriented as that key."""
    part = param if where.expert is None else param[where.expert]
    lead = part.dim() - 2
    if where.span is not None:
        part = part.narrow(lead + where.dim, where.span.start, where.span.stop - where.span.start)
    return part.transpose(-2, -1) if where.transpose else part


# --- the layout: checkpoint keys -> parts of fused params -------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_slices_rebuild_every_fused_param(family, tmp_path):
    """Each expert key on disk (as save_pretrained writes it) is exactly its slice of the model's param,
    and the slices of a param cover it once."""
    model = build(family)
    model.save_pretrained(tmp_path)
    disk = read(tmp_path / "model.safetensors")
    slices = expert_slices(meta_model(tmp_path), shapes(disk))
    fused = {n: p.detach() for n, p in model.named_parameters() if p.dim() == 3}
    assert fused and set(fused) == {s.param for s in slices.values()}
    covered = dict.fromkeys(fused, 0)
    for key, where in slices.items():
        assert torch.equal(disk[key], model_part(fused[where.param], where)), key
        covered[where.param] += disk[key].numel()
    assert covered == {n: p.numel() for n, p in fused.items()}


def test_mixtral_layout_facts(tmp_path):
    build("mixtral").save_pretrained(tmp_path)
    disk = read(tmp_path / "model.safetensors")
    slices = expert_slices(meta_model(tmp_path), shapes(disk))
    pre = "model.layers.1.block_sparse_moe.experts.2"
    fused = "model.layers.1.mlp.experts"
    assert slices[f"{pre}.w1.weight"] == ExpertSlice(f"{fused}.gate_up_proj", 2, 0, slice(0, 128), False)
    assert slices[f"{pre}.w3.weight"] == ExpertSlice(f"{fused}.gate_up_proj", 2, 0, slice(128, 256), False)
    assert slices[f"{pre}.w2.weight"] == ExpertSlice(f"{fused}.down_proj", 2, 0, None, False)
    assert len(slices) == 2 * 4 * 3  # layers x experts x (w1, w2, w3); the router is 2-D, left out
    router = "model.layers.0.block_sparse_moe.gate.weight"
    only_router = expert_slices(meta_model(tmp_path), shapes(disk), params={"model.layers.0.mlp.gate.weight"})
    assert only_router == {router: ExpertSlice("model.layers.0.mlp.gate.weight", None)}


def _patch_rules(monkeypatch, *converters):
    monkeypatch.setattr("converter.experts._conversion_rules", lambda model: ([], list(converters)))


def test_unsupported_operation_names_the_converter(monkeypatch, tmp_path):
    from transformers.core_model_loading import Interleave, WeightConverter

    build("gpt_oss").save_pretrained(tmp_path)
    disk = read(tmp_path / "model.safetensors")
    _patch_rules(monkeypatch, WeightConverter("mlp.experts.w13_weight", "mlp.experts.gate_up_proj",
                                              operations=[Interleave(dim=1)]))
    fake = {k.replace("gate_up_proj", "w13_weight"): v for k, v in shapes(disk).items()}
    with pytest.raises(UnsupportedExpertLayoutError, match=r"Interleave.*w13_weight"):
        expert_slices(meta_model(tmp_path), fake)


def test_shape_mismatch_is_an_error(tmp_path):
    build("qwen3_moe").save_pretrained(tmp_path)
    disk = shapes(read(tmp_path / "model.safetensors"))
    disk["model.layers.0.mlp.experts.1.up_proj.weight"] = (47, 64)
    with pytest.raises(UnsupportedExpertLayoutError, match="does not match the model config"):
        expert_slices(meta_model(tmp_path), disk)


# --- PEFT key naming ------------------------------------------------------------------------------------


def lora_config(**kw) -> LoraConfig:
    kw = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERT_PARAMS, init_lora_weights=False) | kw
    return LoraConfig(**kw)


@pytest.mark.parametrize("targets", [EXPERT_PARAMS, EXPERT_PARAMS[::-1], ["gate_up_proj"], ["down_proj"]])
def test_wrapped_params_match_saved_adapter_keys(targets, tmp_path):
    model = build("mixtral")
    get_peft_model(model, lora_config(target_parameters=targets)).save_pretrained(tmp_path)
    saved = shapes(read(tmp_path / "adapter_model.safetensors"))
    with torch.device("meta"):
        meta = T.MixtralForCausalLM._from_config(model.config)
    wrapped = wrapped_params(meta, targets)
    assert {k for w in wrapped.values() for k in (w.lora_a_key, w.lora_b_key)} == set(saved)
    gate_up = wrapped.get("model.layers.0.mlp.experts.gate_up_proj")
    if gate_up is not None:  # (E, 2I, H): in = H = 64, out = 2I = 256, r * E = 16
        assert (saved[gate_up.lora_a_key], saved[gate_up.lora_b_key]) == ((16, 64), (256, 16))
        nested = len(targets) == 2
        assert gate_up.stem.endswith("experts.base_layer" if nested else "experts")


# --- the merge against PEFT's merge_and_unload ------------------------------------------------------------


def make_adapter(family: str, dtype: torch.dtype, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base dir, adapter dir, PEFT-merged dir), all saved with save_pretrained."""
    base_dir, adapter_dir, oracle_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    build(family, dtype).save_pretrained(base_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(build(family, dtype), lora_config())
    with torch.no_grad():  # init_lora_weights=False already gives a nonzero B; make it larger than rounding
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(adapter_dir)
    base = getattr(T, FAMILIES[family][1].__name__).from_pretrained(base_dir, dtype=dtype)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(oracle_dir)
    return base_dir, adapter_dir, oracle_dir


def our_merge(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Every expert checkpoint tensor merged on its own, from the base's disk layout and the adapter file."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    factors = read(adapter_dir / "adapter_model.safetensors")
    base = read(base_dir / "model.safetensors")
    meta = meta_model(base_dir)
    wrapped = wrapped_params(meta, config["target_parameters"])
    merged = {}
    for key, where in expert_slices(meta, shapes(base), params=set(wrapped)).items():
        w = wrapped[where.param]
        lora = ExpertLora(factors[w.lora_a_key], factors[w.lora_b_key], scale, w.num_experts, w.transposed)
        merged[key] = merge_tensor(base[key], where, lora)
    return merged


@pytest.mark.parametrize("family,dtype", [
    ("mixtral", torch.float32), ("qwen3_moe", torch.float32), ("gpt_oss", torch.float32),
    ("mixtral", torch.bfloat16), ("qwen3_moe", torch.bfloat16),
])
def test_merge_equals_peft_merge_and_unload(family, dtype, tmp_path):
    base_dir, adapter_dir, oracle_dir = make_adapter(family, dtype, tmp_path)
    base, oracle = read(base_dir / "model.safetensors"), read(oracle_dir / "model.safetensors")
    assert set(oracle) == set(base), "PEFT's merged save has another layout than the base"
    ours = our_merge(base_dir, adapter_dir)
    per_expert = family != "gpt_oss"
    assert len(ours) == (2 * 4 * 3 if per_expert else 2 * 2)
    for key, tensor in ours.items():
        assert tensor.dtype == base[key].dtype == dtype
        assert not torch.equal(oracle[key], base[key]), f"{key}: the adapter changes nothing, the test proves nothing"
        assert torch.equal(tensor, oracle[key]), f"{key}: max diff {(tensor.float() - oracle[key].float()).abs().max()}"
    untouched = set(base) - set(ours)
    assert all(torch.equal(base[k], oracle[k]) for k in untouched)


def test_key_delta_is_one_expert_slice(tmp_path):
    """key_delta of a per-expert key is 2-D and as small as the key; a wrong expert gives another delta."""
    base_dir, adapter_dir, _ = make_adapter("mixtral", torch.float32, tmp_path)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    factors = read(adapter_dir / "adapter_model.safetensors")
    meta = meta_model(base_dir)
    w = wrapped_params(meta, config["target_parameters"])["model.layers.0.mlp.experts.gate_up_proj"]
    lora = ExpertLora(factors[w.lora_a_key], factors[w.lora_b_key], 2.0, w.num_experts)
    slices = expert_slices(meta, shapes(read(base_dir / "model.safetensors")))
    up1 = slices["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    delta = key_delta(up1, lora)
    assert delta.shape == (128, 64) and delta.dtype == torch.float32
    other = ExpertSlice(up1.param, 2, up1.dim, up1.span, up1.transpose)
    assert not torch.allclose(delta, key_delta(other, lora))
    gate1 = slices["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    assert not torch.allclose(delta, key_delta(gate1, lora))


# --- fused-on-disk layouts (qwen3_vl_moe's Transpose, step3p7's Concatenate without MergeModulelist) -------


def test_fused_on_disk_layouts_follow_peft_delta(monkeypatch, tmp_path):
    from transformers.core_model_loading import Concatenate, Transpose, WeightConverter

    model = build("qwen3_moe")
    model.save_pretrained(tmp_path)
    peft_model = get_peft_model(build("qwen3_moe"), lora_config())
    layer = peft_model.base_model.model.model.layers[0].mlp.experts
    gate_up_wrapper = layer.base_layer  # the inner ParamWrapper: gate_up_proj
    full = gate_up_wrapper.get_delta_weight("default")  # PEFT's (E, 2I, H)
    down_full = layer.get_delta_weight("default")  # (E, H, I)
    lora = ExpertLora(gate_up_wrapper.lora_A["default"].weight.detach(),
                      gate_up_wrapper.lora_B["default"].weight.detach(), gate_up_wrapper.scaling["default"], 4)
    down_lora = ExpertLora(layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
                           layer.scaling["default"], 4)
    _patch_rules(monkeypatch,
                 WeightConverter(["mlp.experts.gate_proj", "mlp.experts.up_proj"], "mlp.experts.gate_up_proj",
                                 operations=[Concatenate(dim=1)]),
                 WeightConverter("mlp.experts.down_proj", "mlp.experts.down_proj",
                                 operations=[Transpose(1, 2, check_dims=True)]))
    pre = "model.layers.0.mlp.experts"
    disk = {f"{pre}.gate_proj": (4, 48, 64), f"{pre}.up_proj": (4, 48, 64), f"{pre}.down_proj": (4, 48, 64)}
    slices = expert_slices(meta_model(tmp_path), disk)
    assert slices[f"{pre}.up_proj"] == ExpertSlice(f"{pre}.gate_up_proj", None, 0, slice(48, 96), False)
    assert slices[f"{pre}.down_proj"] == ExpertSlice(f"{pre}.down_proj", None, 0, None, True)
    assert torch.equal(key_delta(slices[f"{pre}.gate_proj"], lora), full[:, :48])
    assert torch.equal(key_delta(slices[f"{pre}.up_proj"], lora), full[:, 48:])
    assert torch.equal(key_delta(slices[f"{pre}.down_proj"], down_lora), down_full.transpose(1, 2))
    base = torch.randn(4, 48, 64)
    assert torch.equal(merge_tensor(base, slices[f"{pre}.up_proj"], lora), base + full[:, 48:])
    # the same shape as the param: Transpose(check_dims=True) keeps it as it is
    same = expert_slices(meta_model(tmp_path), {f"{pre}.down_proj": (4, 64, 48)})
    assert same[f"{pre}.down_proj"].transpose is False


# --- PEFT with v4-style target_modules on a transformers-5 MoE ----------------------------------------------


def test_peft_rewrites_per_expert_target_modules():
    cases = {("w1",): None, ("w1", "w3"): {"gate_up_proj"}, ("w2",): {"down_proj"}}
    for targets, expected in cases.items():
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
        if expected is None:
            with pytest.raises(ValueError, match="without also targeting w3"):
                get_peft_model(build("mixtral"), config)
            continue
        peft_config = get_peft_model(build("mixtral"), config).peft_config["default"]
        assert set(peft_config.target_parameters) == expected and not peft_config.target_modules
