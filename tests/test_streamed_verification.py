"""End-to-end verification streamed block by block (converter.streamed): the same figures as with both models in
memory, for every kind of model we merge, one block's weights held at a time, and a wrong output still caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import converter.convert
import converter.verify
from factories import (build, make_adapter, receipt, run_converter, save_base, tiny_llama_config)
from test_families import FAMILIES

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def figures(base: Path, adapter: Path, out: Path, monkeypatch, streamed: bool, *extra) -> dict:
    monkeypatch.setattr(converter.verify, "STREAM_ABOVE_BYTES", 0 if streamed else 1 << 40)
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out, *extra) == 0
    full = receipt(out)["verification"]["full"]
    assert full is not None and full["how"] == ("streamed" if streamed else "in memory")
    return full


def assert_same_figures(base: Path, adapter: Path, tmp_path: Path, monkeypatch, *extra) -> dict:
    whole = figures(base, adapter, tmp_path / "whole", monkeypatch, False, *extra)
    streamed = figures(base, adapter, tmp_path / "streamed", monkeypatch, True, *extra)
    for key in ("max_abs_diff", "kl", "top1"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-7), key
    return streamed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_equals_in_memory_for_each_family(family, tmp_path, monkeypatch):
    """Decoder (tied GPT-2 Conv1D, Qwen2), encoder-decoder (T5, shared embeddings), VLM (Llava)."""
    make, _, lora_cfg, *_ = FAMILIES[family]
    base = save_base(make(), tmp_path / "base")
    adapter = make_adapter(make(), lora_cfg, tmp_path / "adapter")
    assert_same_figures(base, adapter, tmp_path, monkeypatch)


@pytest.mark.parametrize("feature", ["dora", "modules_to_save-resized-vocab", "tied-untied", "bf16"])
def test_streamed_equals_in_memory_for_adapter_features(feature, tmp_path, monkeypatch):
    cfg = tiny_llama_config(tie_word_embeddings=feature == "tied-untied")
    model = build(cfg)
    lora = dict(LORA)
    extra: tuple = ()
    if feature == "dora":
        lora["use_dora"] = True
    if feature == "tied-untied":
        lora["target_modules"] = ["q_proj", "embed_tokens"]
    if feature == "bf16":
        extra = ("--dtype", "bfloat16")
    base = save_base(model, tmp_path / "base")
    adapter_model = build(cfg)
    if feature == "modules_to_save-resized-vocab":
        adapter_model.resize_token_embeddings(136)
        lora["modules_to_save"] = ["embed_tokens", "lm_head"]
    adapter = make_adapter(adapter_model, LoraConfig(**lora), tmp_path / "adapter")
    assert_same_figures(base, adapter, tmp_path, monkeypatch, *extra)


def test_streamed_moe_and_quantized_bases(tmp_path, monkeypatch):
    """A Mixtral with fused-expert LoRA (per-expert tensors assembled as transformers' rules say), on an FP8 base."""
    from test_moe import make as make_moe

    from factories import fp8_block_scaled

    dense, adapter = make_moe(tmp_path, "mixtral", torch.float32,
                              dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]))
    assert_same_figures(dense, adapter, tmp_path / "dense", monkeypatch)
    base = fp8_block_scaled(dense, tmp_path / "fp8", block=(16, 16), names="q_proj.weight")
    assert_same_figures(base, adapter, tmp_path / "fp8-out", monkeypatch)


def test_partial_fp8_blocks_are_verified_streamed(tmp_path):
    """transformers cannot load FP8 scales of partial blocks on CPU: the check runs streamed, through our codec."""
    from factories import fp8_block_scaled

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=128)
    dense = save_base(build(cfg, dtype=torch.bfloat16), tmp_path / "base")
    adapter = make_adapter(build(cfg), LoraConfig(**LORA), tmp_path / "adapter")
    base = fp8_block_scaled(dense, tmp_path / "fp8", block=(24, 20))
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out") == 0
    v = receipt(tmp_path / "out")["verification"]
    assert v["level"] == "full" and v["full"]["how"] == "streamed"


def test_one_block_of_weights_at_a_time(tmp_path):
    """The loader holds one block's weights at once: never more than the largest block."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from converter.checkpoint import Checkpoint
    from converter.modelinfo import describe
    from converter.streamed import BlockLoader, empty_model, streamed_outputs
    from converter.verify import probe_inputs

    cfg = tiny_llama_config(num_hidden_layers=4)
    base = save_base(build(cfg), tmp_path / "base")
    adapter = make_adapter(build(cfg), LoraConfig(**LORA), tmp_path / "adapter")
    ckpt = Checkpoint(base)
    model = empty_model(LlamaForCausalLM, base)
    loader = BlockLoader(model, ckpt, describe(base, list(ckpt.specs)), torch.device("cpu"))
    peft = PeftModel.from_pretrained(model, adapter).eval()
    streamed_outputs(model, loader, peft, probe_inputs(model.config), torch.device("cpu"))
    sizes = {n: 4 * s.numel for n, s in ckpt.specs.items()}
    layer = sum(v for n, v in sizes.items() if n.startswith("model.layers.0."))
    largest = max(layer, sizes["model.embed_tokens.weight"], sizes["lm_head.weight"])
    assert loader.loaded_bytes == sum(sizes.values())  # every weight read once
    assert 0 < loader.peak_live_bytes <= largest and loader.live_bytes == 0
    assert all(p.device.type == "meta" for n, p in peft.named_parameters() if "lora" not in n)


# -- a wrong output is still caught: exit 1, nothing published ---------------------------------------------------

def _scale_one_tensor(tensors: dict) -> None:
    tensors["model.layers.1.mlp.down_proj.weight"] *= 1.5


def _swap_two_blocks(tensors: dict) -> None:
    for name in [n for n in tensors if n.startswith("model.layers.0.")]:
        other = name.replace("layers.0.", "layers.1.")
        tensors[name], tensors[other] = tensors[other], tensors[name]


def _drop_a_norm(tensors: dict) -> None:
    del tensors["model.layers.0.post_attention_layernorm.weight"]


def merge_tampered(tmp_path: Path, monkeypatch, capfd, tamper) -> str:
    """A streamed-verified merge whose output is changed by ``tamper`` (on its tensors) before verification: exit 1,
    nothing published; returns the message."""
    cfg = tiny_llama_config()
    base = save_base(build(cfg), tmp_path / "base")
    adapter = make_adapter(build(cfg), LoraConfig(**LORA), tmp_path / "adapter")
    real = converter.convert.verify_job

    def tampered(job, inputs, merged_dir, *args, **kwargs):
        tensors = load_file(merged_dir / "model.safetensors")
        tamper(tensors)
        save_file(tensors, merged_dir / "model.safetensors", metadata={"format": "pt"})
        return real(job, inputs, merged_dir, *args, **kwargs)

    monkeypatch.setattr(converter.convert, "verify_job", tampered)
    monkeypatch.setattr(converter.verify, "STREAM_ABOVE_BYTES", 0)
    out = tmp_path / "out"
    capfd.readouterr()
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out, "--verify", "full") == 1
    assert not out.exists() and not Path(f"{out}.partial").exists()
    return capfd.readouterr().err


@pytest.mark.parametrize("tamper", [_scale_one_tensor, _swap_two_blocks], ids=["scaled", "swapped"])
def test_tampered_output_fails_streamed_verification(tamper, tmp_path, monkeypatch, capfd):
    err = merge_tampered(tmp_path, monkeypatch, capfd, tamper)
    assert "differ from the unmerged adapter's" in err and "Nothing was published" in err
    print(err.strip().splitlines()[0])  # the figures, for the record


def test_merged_checkpoint_missing_a_tensor_fails(tmp_path, monkeypatch, capfd):
    err = merge_tampered(tmp_path, monkeypatch, capfd, _drop_a_norm)
    assert "has no tensor for model.layers.0.post_attention_layernorm.weight" in err


# -- what a job claims: memory for one block at a time, a GPU only when it will use one ---------------------------

def test_check_memory_follows_the_streamed_check(tmp_path, monkeypatch):
    from converter.checkpoint import Checkpoint

    cfg = tiny_llama_config(num_hidden_layers=8)
    ckpt = Checkpoint(save_base(build(cfg), tmp_path / "base"))
    model = ckpt.fp32_bytes()
    assert converter.verify.check_memory(ckpt.specs) == (int(2.5 * model), "in memory")
    monkeypatch.setattr(converter.verify, "STREAM_ABOVE_BYTES", 0)
    streamed, how = converter.verify.check_memory(ckpt.specs)
    layer = sum(4 * s.numel for n, s in ckpt.specs.items() if n.startswith("model.layers.3."))
    largest = max(s.nbytes for s in ckpt.specs.values())
    assert how == "streamed" and streamed == 2 * max(layer, largest) + 2 * largest < model
    assert converter.verify.check_memory(ckpt.specs, streamed=True)[0] == streamed


@pytest.mark.parametrize("device, verify, quantized, has_gpu, merge, gpu", [
    ("auto", "full", False, True, "cpu", True),     # merge on the CPU (I/O-bound), forward passes on the GPU
    ("auto", "none", False, True, "cpu", False),    # nothing for a GPU to do: not claimed
    ("auto", "modules", True, True, "cuda", True),  # a quantized base's decoding runs on the GPU
    ("auto", "full", False, False, "cpu", False),
    ("cpu", "full", True, True, "cpu", False),
    ("cuda", "none", False, True, "cuda", True),
])
def test_device_placement(device, verify, quantized, has_gpu, merge, gpu, monkeypatch):
    from converter import resources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    assert resources.merge_device(device, quantized).type == merge
    assert resources.uses_gpu(device, verify, quantized, has_gpu) is gpu


@pytest.mark.parametrize("fits", [True, False], ids=["fits", "too-large"])
def test_a_model_the_streamed_run_cannot_take(fits, tmp_path, monkeypatch):
    """A model whose forward reads a parameter outside its block: checked whole when it fits, else modules only,
    saying why (never a failed job)."""
    from converter.streamed import StreamUnsupported

    def unsupported(*args, **kwargs):
        raise StreamUnsupported("RuntimeError: a parameter used outside its block")

    monkeypatch.setattr(converter.verify, "streamed_figures", unsupported)
    monkeypatch.setattr(converter.verify, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr("converter.convert.fits_in_memory", lambda n: fits)
    cfg = tiny_llama_config()
    base = save_base(build(cfg), tmp_path / "base")
    adapter = make_adapter(build(cfg), LoraConfig(**LORA), tmp_path / "adapter")
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out") == 0
    v = receipt(tmp_path / "out")["verification"]
    if fits:
        assert v["level"] == "full" and v["full"]["how"] == "in memory"
    else:
        assert v["level"] == "modules" and "a parameter used outside its block" in v["note"]
