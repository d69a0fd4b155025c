"""The ``fp8`` variant: compressed-tensors' FP8_DYNAMIC (and FP8_BLOCK with ``block=N``) from the merged shards.

The checks are independent of the writer: codes times scales give the merged weights back within FP8's
precision, each scale is the absolute maximum of its row (or block) over FP8's largest value, the config is
what compressed-tensors reads, and transformers loads the directory with compressed-tensors and gives the
merged model's outputs within the method's thresholds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from factories import (build, forward_logits, gpt2_pair, make_adapter, probe_ids, read_output, receipt, run_converter, save_base,
                       tiny_llama_config)

pytest.importorskip("compressed_tensors")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fp8")
    config = tiny_llama_config(hidden_size=128, intermediate_size=192)  # 192: not a multiple of 128
    save_base(build(config, dtype=torch.bfloat16), d / "base")
    make_adapter(build(config), LORA, d / "adapter")
    return d


def merge(d: Path, out: str, *extra) -> int:
    return run_converter("merge", "--base", d / "base", "--adapter", d / "adapter", "--output", d / out, *extra)


def dequantized(codes: torch.Tensor, scale: torch.Tensor, block: int | None) -> torch.Tensor:
    if block is not None:
        scale = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[: codes.shape[0], : codes.shape[1]]
    return codes.float() * scale.float()


@pytest.mark.parametrize("block", [None, 64, 128])
def test_fp8_variant_holds_the_merged_weights(pair, block):
    """Per channel, and per block: with 128, the weights with a side that is not a multiple of 128 are left as
    they are (listed in ``ignore``), as compressed-tensors cannot load blocks that do not divide a weight."""
    out = f"out-{block}"
    spec = "fp8" if block is None else f"fp8:block={block}"
    assert merge(pair, out, "--quantize", spec) == 0
    variant = pair / f"{out}-fp8"
    merged, q = read_output(pair / out), read_output(variant)
    weights = [k for k in merged if k.endswith("_proj.weight")]
    kept = [k for k in weights if block and any(side % block for side in merged[k].shape)]
    assert bool(kept) == (block == 128)  # the MLP's, and k/v (64 rows)
    assert all(torch.equal(q[k], merged[k]) and k.replace(".weight", ".weight_scale") not in q for k in kept)
    weights = [k for k in weights if k not in kept]
    assert weights and all(q[k].dtype == torch.float8_e4m3fn for k in weights)
    assert q["lm_head.weight"].dtype == torch.bfloat16 and torch.equal(q["lm_head.weight"], merged["lm_head.weight"])
    for k in weights:
        w, codes, scale = merged[k].float(), q[k], q[k.replace(".weight", ".weight_scale")]
        rows, cols = w.shape
        if block is None:
            assert scale.shape == (rows, 1) and scale.dtype == torch.bfloat16
            expect = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        else:
            assert scale.shape == (-(-rows // block), -(-cols // block))
            padded = torch.zeros(scale.shape[0] * block, scale.shape[1] * block)
            padded[:rows, :cols] = w.abs()
            expect = padded.view(scale.shape[0], block, scale.shape[1], block).amax(dim=(1, 3)) / FP8_MAX
        assert torch.allclose(scale.float(), expect, rtol=1e-2), k  # stored in bf16
        err = (dequantized(codes, scale, block) - w).abs() / w.abs().amax()
        assert float(err.max()) < 0.07, k  # e4m3: 3 mantissa bits
    config = json.loads((variant / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"
    weights_args = config["config_groups"]["group_0"]["weights"]
    assert weights_args["strategy"] == ("channel" if block is None else "block")
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    assert "lm_head" in config["ignore"] and all(k.removesuffix(".weight") in config["ignore"] for k in kept)
    assert receipt(pair / out)["quantization"][0]["passed"]


def test_fp8_variant_loads_and_matches_the_merged_model(pair):
    assert merge(pair, "out", "--quantize", "fp8") == 0
    ids = probe_ids(128)
    ref = forward_logits(AutoModelForCausalLM.from_pretrained(pair / "out", dtype=torch.float32), ids)
    got = forward_logits(AutoModelForCausalLM.from_pretrained(pair / "out-fp8", dtype=torch.float32), ids)
    variant, = receipt(pair / "out")["quantization"]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    assert float(kl.sum(-1).mean()) < variant["thresholds"]["max_kl"]  # the method's own bound, measured here
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= variant["thresholds"]["min_top1"]
    assert variant["method"] == "fp8" and variant["passed"] and variant["library"].startswith("compressed-tensors ")
    assert variant["figures"]["kl"] < variant["thresholds"]["max_kl"]
    assert variant["size_ratio"] < 0.75
    card = (pair / "out-fp8" / "README.md").read_text()
    assert "base_model_relation: quantized" in card and "compressed-tensors" in card and "vLLM" in card


@pytest.mark.parametrize("value,message", [("fp8:blocksize=64", "fp8 does not take option(s) blocksize"),
                                           ("fp8:block=100", "block 100 is not one of")])
def test_bad_fp8_options(pair, value, message, capsys):
    assert merge(pair, "bad", "--quantize", value) == 2
    assert message in capsys.readouterr().err
    assert not (pair / "bad").exists()


def test_fp8_of_a_model_without_linear_layers_is_refused(tmp_path, capsys):
    gpt2_pair(tmp_path)
    assert run_converter("merge", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--output",
                         tmp_path / "out", "--quantize", "fp8") == 2
    assert "no nn.Linear layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fp8_without_compressed_tensors_is_refused(pair, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    assert merge(pair, "nopkg", "--quantize", "fp8") == 2
    err = capsys.readouterr().err
    assert "needs the compressed-tensors package" in err and "converter[export]" in err
    assert not (pair / "nopkg").exists()


@pytest.mark.parametrize("spec", ["fp8", "fp8:block=64"])
def test_fp8_band_by_band_equals_whole(pair, spec, monkeypatch):
    """Weights quantized (and kept tensors copied) a band of rows at a time give the same files as whole."""
    from converter import checkpoint

    tag = spec.replace(":", "-").replace("=", "")
    assert merge(pair, f"whole-{tag}", "--quantize", spec, "--verify", "none") == 0
    monkeypatch.setattr(checkpoint, "BAND_BYTES", 1)  # one row (or one block of rows) a band
    assert merge(pair, f"bands-{tag}", "--quantize", spec, "--verify", "none") == 0
    whole, bands = read_output(pair / f"whole-{tag}-fp8"), read_output(pair / f"bands-{tag}-fp8")
    assert whole.keys() == bands.keys()
    assert all(torch.equal(whole[k].view(torch.uint8) if whole[k].dtype == torch.float8_e4m3fn else whole[k],
                           bands[k].view(torch.uint8) if bands[k].dtype == torch.float8_e4m3fn else bands[k])
               for k in whole)
