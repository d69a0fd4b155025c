"""Serving exports through ``converter merge --quantize``: fp8 (compressed-tensors) and gguf-* variants made from the
merged shards, published with the job, judged from disk, each with its receipt and card; bad requests refused
before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from bpe_tokenizer import train_bpe
from factories import (build, forward_logits, gpt2_pair, make_adapter, probe_ids, receipt, run_converter, save_base,
                       tiny_llama_config)

pytest.importorskip("gguf")
pytest.importorskip("compressed_tensors")
from converter import gguf_variant, quantize  # noqa: E402

LORA = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """A tiny Llama with a real trained byte-level BPE tokenizer, and an adapter."""
    d = tmp_path_factory.mktemp("exports")
    train_bpe(d / "base")
    config = tiny_llama_config(vocab_size=len(AutoTokenizer.from_pretrained(d / "base")), hidden_size=64,
                               intermediate_size=128)
    save_base(build(config, dtype=torch.bfloat16), d / "base")
    make_adapter(build(config), LORA, d / "adapter")
    return d


def merge(d: Path, out: str, *extra) -> int:
    return run_converter("merge", "--base", d / "base", "--adapter", d / "adapter", "--output", d / out, *extra)


def test_one_job_writes_every_export(pair):
    assert merge(pair, "out", "--quantize", "fp8", "--quantize", "gguf-f16", "--quantize", "gguf-q8_0") == 0
    r = receipt(pair / "out")
    assert [v["method"] for v in r["quantization"]] == ["fp8", "gguf-f16", "gguf-q8_0"]
    assert all(v["passed"] and v["figures"] for v in r["quantization"])
    ids = probe_ids(len(AutoTokenizer.from_pretrained(pair / "out")))
    ref = forward_logits(AutoModelForCausalLM.from_pretrained(pair / "out", dtype=torch.float32), ids)
    for method, bound in (("gguf-f16", 1e-3), ("gguf-q8_0", 0.1)):
        variant = pair / f"out-{method}"
        name = f"model-{method.removeprefix('gguf-')}.gguf"
        assert sorted(p.name for p in variant.iterdir()) == ["README.md", "conversion.json", name]
        got = forward_logits(AutoModelForCausalLM.from_pretrained(variant, gguf_file=name, dtype=torch.float32), ids)
        assert float((got - ref).abs().max() / ref.abs().max()) < bound, method
        v = receipt(variant)["quantization"][0]
        assert v["quantization_config"] == {"format": "gguf", "file": name, "tensor_type": method[5:]}
        assert v["library"].startswith("gguf ") and receipt(variant)["variant_of"] == str((pair / "out").resolve())
        card = (variant / "README.md").read_text()
        assert "base_model_relation: quantized" in card and "llama.cpp" in card
    assert json.loads((pair / "out-fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"


def test_gguf_methods_are_the_exporters_types():
    assert {m.removeprefix("gguf-") for m in quantize.METHODS if m.startswith("gguf-")} == set(gguf_variant.GGUF_TYPES)


@pytest.mark.parametrize("value,message", [("gguf-q8_0:skip=lm_head", "gguf-q8_0 does not take option(s) skip"),
                                           ("gguf-q3_k", "unknown quantization method 'gguf-q3_k'")])
def test_bad_gguf_options(pair, value, message, capsys):
    assert merge(pair, "bad", "--quantize", value) == 2
    assert message in capsys.readouterr().err
    assert not (pair / "bad").exists()


def test_gguf_of_an_unsupported_family_is_refused_before_any_work(tmp_path, capsys):
    gpt2_pair(tmp_path)
    assert run_converter("merge", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--output",
                         tmp_path / "out", "--quantize", "gguf-q8_0") == 2
    assert "GGUF export does not support model_type 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-gguf-q8_0").exists()


def test_gguf_without_a_tokenizer_is_refused(pair, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(pair / "base", bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert run_converter("merge", "--base", bare, "--adapter", pair / "adapter", "--output", tmp_path / "out",
                         "--quantize", "gguf-f16") == 2
    assert "--quantize gguf-f16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gguf_without_the_gguf_package_is_refused(pair, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    assert merge(pair, "nopkg", "--quantize", "gguf-q8_0") == 2
    err = capsys.readouterr().err
    assert "needs the gguf package" in err and "converter[export]" in err
    assert not (pair / "nopkg").exists()
