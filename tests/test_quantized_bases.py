"""Quantized bases through their codecs: bitsandbytes 4-bit (nf4, fp4, double quantization) and 8-bit, FP8
block-scaled (whole and partial blocks) and per-tensor.

Each format is built on the fly (bitsandbytes through transformers' own quantized ``save_pretrained``;
FP8 through a small writer of the DeepSeek layout in factories.py). The oracles: transformers' own
dequantization for the codecs; PEFT's ``merge_and_unload`` on that dequantized base for the merged tensors;
the unmerged PeftModel for outputs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel

from factories import (
    AutoModelForCausalLM,
    assert_state_dicts_match,
    bnb_quantized,
    build,
    forward_logits,
    fp8_block_scaled,
    make_adapter,
    probe_ids,
    read_output,
    receipt,
    run_converter,
    save_base,
    tiny_llama_config,
)
from test_inputs_sacred import digest

pytest.importorskip("bitsandbytes")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
FORMATS = {  # name -> how the quantized base is made from the bf16 one
    "fp8": lambda src, dst: fp8_block_scaled(src, dst, block=(16, 16)),
    "fp8-partial": lambda src, dst: fp8_block_scaled(src, dst, block=(24, 20)),
    "fp8-per-tensor": lambda src, dst: fp8_block_scaled(src, dst, block=None),
    "nf4": lambda src, dst: bnb_quantized(src, dst, 4, "nf4"),
    "nf4-double": lambda src, dst: bnb_quantized(src, dst, 4, "nf4", double_quant=True),
    "fp4": lambda src, dst: bnb_quantized(src, dst, 4, "fp4"),
    "int8": lambda src, dst: bnb_quantized(src, dst, 8),
}
SCALE_SUFFIXES = ("_scale_inv", ".absmax", ".quant_map", "quant_state.bitsandbytes__nf4", ".SCB", ".weight_format")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qpair")
    cfg = tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    save_base(build(cfg, dtype=torch.bfloat16), d / "base")
    make_adapter(build(cfg), LoraConfig(**LORA), d / "adapter")
    return d


@pytest.fixture(scope="module")
def bases(pair):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = FORMATS[kind](pair / "base", pair / kind)
        return made[kind]
    return get


def transformers_dequantized(base: Path):
    """The quantized base as transformers loads and dequantizes it itself, in bfloat16."""
    from transformers import FineGrainedFP8Config

    config = json.loads((base / "config.json").read_text())["quantization_config"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config["quant_method"] == "fp8" and kind_of(base) == "fp8-partial":
            return fp8_partial_dequantized(base, config["weight_block_size"])
        if config["quant_method"] == "fp8":
            q = FineGrainedFP8Config(dequantize=True, weight_block_size=config["weight_block_size"])
            return AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.bfloat16).eval()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        return model.dequantize().to(torch.bfloat16).eval()


def kind_of(base: Path) -> str:
    return base.name


def fp8_partial_dequantized(base: Path, block):
    """transformers' FP8 loader infers the block from the scale grid and cannot read partial blocks; its FP8 linear
    (``_dequantize_fp8_weight``) reads them by the configured block size: the dense model from that."""
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    raw = load_file(base / "model.safetensors")
    state = {}
    for name, value in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            value = _dequantize_fp8_weight(value, raw[name + "_scale_inv"], block, torch.float32)
        state[name] = value.to(torch.bfloat16)
    config = AutoConfig.from_pretrained(base)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, strict=True)
    return model.eval()


# -- each codec decodes as the library does -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", [k for k in FORMATS if k != "fp8-partial"])
def test_decode_equals_transformers_dequantization(bases, kind):
    from converter.checkpoint import Checkpoint
    from converter.codecs import DecodedCheckpoint, decoded

    base = bases(kind)
    ours = decoded(Checkpoint(base), json.loads((base / "config.json").read_text()), "base")
    assert isinstance(ours, DecodedCheckpoint) and len(ours.stored) == 2 * 7  # every linear of both layers
    theirs = transformers_dequantized(base).state_dict()
    for name in ours.stored:
        mine = ours.get(name)
        assert mine.shape == theirs[name].shape, name
        assert torch.equal(mine.to(torch.bfloat16), theirs[name]), name
        assert mine.abs().max() > 0.01  # a weight, not codes read as one
    assert not any(n.endswith(SCALE_SUFFIXES) for n in ours.specs)


def test_fp8_partial_blocks_decode_as_the_block_size_says(bases):
    """Blocks that do not divide the weight: the last ones are partial, as DeepSeek's kernels and transformers'
    FP8 linear (``_dequantize_fp8_weight``) read them."""
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from converter.checkpoint import Checkpoint
    from converter.codecs import decoded

    base = bases("fp8-partial")
    ours = decoded(Checkpoint(base), json.loads((base / "config.json").read_text()), "base")
    raw = load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"  # (64, 128): 3 x 7 blocks of 24 x 20, the last ones partial
    assert raw[name.replace(".weight", ".weight_scale_inv")].shape == (3, 7)
    theirs = _dequantize_fp8_weight(raw[name], raw[name + "_scale_inv"], [24, 20], torch.float32)
    assert torch.equal(ours.get(name), theirs)


def test_4bit_decode_of_rows_that_are_not_whole_blocks(tmp_path):
    """A (64, 96) weight in blocks of 64: decoded as bitsandbytes' blocks run (over the flattened weight), so it is
    close to the weight that was quantized (bitsandbytes 0.50's CPU dequantize_4bit misplaces blocks here)."""
    from converter.checkpoint import Checkpoint
    from converter.codecs import decoded

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=96)
    dense = save_base(build(cfg, dtype=torch.bfloat16), tmp_path / "base")
    base = bnb_quantized(dense, tmp_path / "nf4", 4, "nf4")
    ours = decoded(Checkpoint(base), json.loads((base / "config.json").read_text()), "base")
    original = Checkpoint(dense)
    for name in ours.stored:
        w = original.get(name).float()
        blocks = w.reshape(-1, 64).abs().amax(1, keepdim=True)
        err = ((ours.get(name).float() - w).reshape(-1, 64).abs() / blocks).max()
        assert err <= 0.16, (name, float(err))  # half the widest nf4 step, 0.3 of the block's max


@pytest.mark.parametrize("kind", ["fp8", "fp8-partial", "nf4-double", "int8"])
def test_encode_round_trips(bases, kind):
    """Encoding a decoded weight gives back codes that decode to it (what --keep-quantization relies on)."""
    from converter.checkpoint import Checkpoint
    from converter.codecs import decoded

    base = bases(kind)
    ours = decoded(Checkpoint(base), json.loads((base / "config.json").read_text()), "base")
    for name, stored in list(ours.stored.items())[:4]:
        weight = ours.get(name).float()
        parts = {role: None for role in stored.parts}
        encoded = ours.codec.encode(stored, weight)
        for role, spec in stored.parts.items():
            parts[role] = encoded[spec.name]
        again = ours.codec.decode(stored, parts).float()
        err = float((again - weight).abs().max() / weight.abs().max())
        assert err < (0.02 if kind == "int8" else 1e-6 if kind.startswith("fp8") else 2e-2), (name, err)


# -- the merge: PEFT's on the dequantized base, a dense output that loads without any quantization library --------

@pytest.mark.parametrize("kind", list(FORMATS))
def test_merge_into_quantized_base_equals_peft_on_dequantized_base(pair, bases, kind, tmp_path):
    base = bases(kind)
    before = digest(base)
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base, "--adapter", pair / "adapter", "--output", out,
                         "--dtype", "bfloat16", "--verify", "modules") == 0
    ref = transformers_dequantized(base)
    unmerged = PeftModel.from_pretrained(ref, pair / "adapter").eval()
    ids = probe_ids(128)
    want = forward_logits(unmerged, ids).float()
    oracle = {k: v.detach().clone() for k, v in unmerged.merge_and_unload().state_dict().items()}
    tensors = read_output(out)
    assert_state_dicts_match(tensors, oracle)
    assert set(tensors) == set(oracle)  # no scales, absmax or quant state
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = AutoModelForCausalLM.from_pretrained(out).eval()  # stock: no quantization library involved
    assert not hasattr(merged, "hf_quantizer") or merged.hf_quantizer is None
    got = forward_logits(merged, ids).float()
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    rec = receipt(out)
    assert rec["base"]["format"]["decoded"] == 14 and rec["base"]["format"]["output"] == "dense"
    assert "merged into its dequantized weights; this checkpoint is dense" in (out / "README.md").read_text()
    assert rec["counts"]["merged"] == 6 and rec["counts"]["changed"] == 6
    assert digest(base) == before


@pytest.mark.parametrize("kind", ["fp8", "nf4", "int8"])
def test_full_verification_reads_the_quantized_base(pair, bases, kind, tmp_path):
    """`full` builds the unmerged reference from the quantized base as transformers loads it."""
    out = tmp_path / "out"
    assert run_converter("merge", "--base", bases(kind), "--adapter", pair / "adapter", "--output", out,
                         "--verify", "full") == 0
    full = receipt(out)["verification"]["full"]
    assert full["kl"] < 1e-4 and full["top1"] == 1.0


def test_unmerged_peft_on_the_quantized_base_agrees(pair, bases, tmp_path):
    """The adapter as trained (QLoRA: PEFT's LoRA layers on bitsandbytes' Linear4bit) against our dense output."""
    base = bases("nf4")
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base, "--adapter", pair / "adapter", "--output", out,
                         "--dtype", "float32", "--verify", "modules") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qlora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          pair / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = probe_ids(128)
    want, got = forward_logits(qlora, ids).float(), forward_logits(merged, ids)
    # bitsandbytes runs the 4-bit layers in their compute dtype (bfloat16 here): agreement to its rounding
    assert float((got - want).abs().max()) < 3e-2 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.95


# -- --keep-quantization: the base's own format, re-encoded where the adapter changed it ---------------------------

@pytest.mark.parametrize("kind", ["fp8", "fp8-partial", "nf4-double", "int8"])
def test_keep_quantization_round_trip(pair, bases, kind, tmp_path):
    from safetensors import safe_open

    base = bases(kind)
    dense, kept = tmp_path / "dense", tmp_path / "kept"
    assert run_converter("merge", "--base", base, "--adapter", pair / "adapter", "--output", dense,
                         "--verify", "modules") == 0
    assert run_converter("merge", "--base", base, "--adapter", pair / "adapter", "--output", kept,
                         "--keep-quantization", "--verify", "full") == 0
    base_config = json.loads((base / "config.json").read_text())
    assert json.loads((kept / "config.json").read_text())["quantization_config"] == base_config["quantization_config"]
    changed = ("q_proj", "v_proj", "down_proj")
    with safe_open(base / "model.safetensors", "pt") as b, safe_open(kept / "model.safetensors", "pt") as k:
        assert set(b.keys()) == set(k.keys())
        for name in b.keys():
            mine, theirs = k.get_tensor(name), b.get_tensor(name)
            assert mine.dtype == theirs.dtype, name
            if "quant_state" in name:
                continue  # JSON, padded with spaces
            assert mine.shape == theirs.shape, name
            if not any(c in name for c in changed):  # left alone: the stored bytes, unchanged
                assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), name
            elif name.endswith(".weight") and mine.dtype != torch.bfloat16:
                assert not torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), name  # re-encoded
    rec = receipt(kept)
    assert "this checkpoint keeps that format (6 weights re-encoded" in (kept / "README.md").read_text()
    fmt = rec["base"]["format"]
    assert fmt["output"] == "kept" and fmt["requantized"]["tensors"] == 6
    assert 0 < fmt["requantized"]["max_rel_err"] < (0.2 if kind.startswith("nf4") else 0.05)
    if kind == "fp8-partial":  # transformers cannot load partial FP8 blocks on CPU: verified streamed, via our codec
        assert rec["verification"]["level"] == "full" and rec["verification"]["full"]["how"] == "streamed"
        return
    assert rec["verification"]["level"] == "full"
    # loads as a quantized model with transformers; outputs close to the dense merge's
    ids = probe_ids(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = forward_logits(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval(), ids)
    got = forward_logits(transformers_dequantized(kept), ids).float()
    logp, logq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert kl < (0.05 if kind.startswith("nf4") else 0.01), kl


def test_keep_quantization_of_a_plain_base_is_a_dense_merge(pair, tmp_path):
    out = tmp_path / "out"
    assert run_converter("merge", "--base", pair / "base", "--adapter", pair / "adapter", "--output", out,
                         "--keep-quantization", "--verify", "modules") == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert receipt(out)["base"]["format"] is None


# -- refusals: before any work, exit 2, nothing written, the base untouched ---------------------------------------

def refused(capfd, base: Path, adapter: Path, out: Path, *extra) -> str:
    capfd.readouterr()
    before = digest(base)
    rc = run_converter("merge", "--base", base, "--adapter", adapter, "--output", out, *extra)
    err = capfd.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "Fix:" in err, err
    assert not out.exists() and not any(out.parent.glob(f"{out.name}.*")) and digest(base) == before
    return err


def edited(base: Path, dst: Path, tensors=None, config=None) -> Path:
    """A copy of ``base`` with its tensors (a function of the dict) or its config (a dict update) changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dst)
    if tensors:
        state = load_file(dst / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq", "mxfp4", "compressed-tensors"])
def test_unsupported_quant_method_is_refused(pair, bases, method, tmp_path, capfd):
    base = edited(bases("int8"), tmp_path / "b", config={"quantization_config": {"quant_method": method, "bits": 4}})
    err = refused(capfd, base, pair / "adapter", tmp_path / "out")
    assert f"quant_method {method!r}" in err and "bitsandbytes" in err and "fp8" in err and "dequantized" in err
    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps({"output_root": str(tmp_path / "o"), "jobs": [
        {"id": "q", "base": {"path": str(base)}, "adapter": {"path": str(pair / "adapter")}, "output": "q"}]}))
    assert run_converter("validate", manifest) == 2
    assert f"quant_method {method!r}" in capfd.readouterr().err


def _drop(name):
    return lambda state: state.pop(name)


def _reshape(name, shape):
    return lambda state: state.__setitem__(name, torch.ones(shape))


@pytest.mark.parametrize("kind, change, needle", [
    ("fp8", _drop("model.layers.0.self_attn.q_proj.weight_scale_inv"),
     "model.layers.0.self_attn.q_proj.weight is stored in float8_e4m3fn but has no "
     "model.layers.0.self_attn.q_proj.weight_scale_inv"),
    ("fp8", _reshape("model.layers.1.mlp.up_proj.weight_scale_inv", (2, 2)),
     "model.layers.1.mlp.up_proj.weight_scale_inv: scales of shape (2, 2) do not fit"),
    ("nf4", _drop("model.layers.0.self_attn.v_proj.weight.absmax"), "model.layers.0.self_attn.v_proj.weight.absmax is missing"),
    ("nf4", _reshape("model.layers.0.self_attn.v_proj.weight.absmax", (3,)),
     "model.layers.0.self_attn.v_proj.weight.absmax: 3 scales for 32 blocks"),
    ("int8", _drop("model.layers.0.mlp.down_proj.SCB"), "model.layers.0.mlp.down_proj.weight: int8 codes without"),
    ("int8", _reshape("model.layers.0.mlp.down_proj.SCB", (5,)),
     "model.layers.0.mlp.down_proj.SCB: scales of shape (5,) do not fit"),
], ids=["fp8-no-scale", "fp8-scale-shape", "nf4-no-absmax", "nf4-absmax-shape", "int8-no-scb", "int8-scb-shape"])
def test_damaged_scales_are_refused_naming_the_tensor(pair, bases, kind, change, needle, tmp_path, capfd):
    base = edited(bases(kind), tmp_path / "b", tensors=change)
    err = refused(capfd, base, pair / "adapter", tmp_path / "out")
    assert needle in err, err


def test_quantized_tensors_without_a_quantization_config_are_refused(pair, tmp_path, capfd):
    base = fp8_block_scaled(pair / "base", tmp_path / "b", block=(16, 16), with_config=False)
    err = refused(capfd, base, pair / "adapter", tmp_path / "out")
    assert "no quantization_config" in err and "weight_scale_inv" in err


def test_adapter_types_merged_by_peft_are_refused_on_quantized_bases(pair, bases, tmp_path, capfd):
    from peft import LoHaConfig

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    loha = make_adapter(build(cfg), LoHaConfig(r=4, alpha=8, target_modules=["q_proj"], init_weights=False),
                        tmp_path / "loha")
    err = refused(capfd, bases("fp8"), loha, tmp_path / "out")
    assert "LOHA adapters are merged by PEFT's own code" in err and "fp8 block-scaled [16, 16]" in err


def test_keep_quantization_with_variants_is_refused(pair, bases, tmp_path, capfd):
    err = refused(capfd, bases("int8"), pair / "adapter", tmp_path / "out", "--keep-quantization",
                  "--quantize", "bnb-nf4")
    assert "--keep-quantization" in err and "--quantize" in err


def test_missing_bitsandbytes_is_named(pair, bases, tmp_path, capfd, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    err = refused(capfd, bases("nf4"), pair / "adapter", tmp_path / "out")
    assert "needs the bitsandbytes package" in err and "pip install bitsandbytes" in err


@pytest.mark.parametrize("kind", ["fp8", "fp8-partial"])
@pytest.mark.parametrize("keep", [False, True], ids=["dense", "kept"])
def test_fp8_rows_decoded_and_encoded_in_chunks_equal_whole_tensors(pair, bases, kind, keep, tmp_path, monkeypatch):
    """FP8 weights are read (and, kept, re-encoded) in chunks of row blocks: the same bytes as one chunk per tensor."""
    from converter import merge

    args = ["--adapter", pair / "adapter", "--verify", "modules"] + (["--keep-quantization"] if keep else [])
    assert run_converter("merge", "--base", bases(kind), "--output", tmp_path / "whole", *args) == 0
    monkeypatch.setattr(merge, "CHUNK_ELEMS", {"cpu": 1, "cuda": 1})  # 64 rows a chunk: 128-row weights in 2
    chunks = merge.row_chunks(128, 64, 1, 24)
    assert chunks == [(0, 72), (72, 128)]
    assert run_converter("merge", "--base", bases(kind), "--output", tmp_path / "chunked", *args) == 0
    whole, chunked = read_output(tmp_path / "whole"), read_output(tmp_path / "chunked")
    assert set(whole) == set(chunked)
    for name in whole:
        assert torch.equal(whole[name].view(torch.uint8), chunked[name].view(torch.uint8)), name
    if keep:
        assert receipt(tmp_path / "chunked")["base"]["format"]["requantized"]["tensors"] == 6


def test_inspect_and_validate_read_a_quantized_base(pair, bases, tmp_path, capfd):
    capfd.readouterr()
    assert run_converter("inspect", pair / "adapter", "--base", bases("nf4")) == 0
    out = capfd.readouterr().out
    assert "stored as bitsandbytes 4-bit nf4" in out and "fits: 6 tensors merged" in out, out
    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps({"output_root": str(tmp_path / "o"), "jobs": [
        {"id": "q", "base": {"path": str(bases("fp8"))}, "adapter": {"path": str(pair / "adapter")}, "output": "q",
         "keep_quantization": True}]}))
    assert run_converter("validate", manifest) == 0, capfd.readouterr().err
    assert not (tmp_path / "o").exists()
