"""The ``gguf-*`` variants (converter.gguf_variant): one GGUF file from a merged checkpoint.

The checks are independent of the writer: transformers' own GGUF loader (which dequantizes with gguf and undoes
llama.cpp's q/k permutation and Gemma's norm offset) gives the merged model's logits back within each type's
precision; every tensor of the file equals ``gguf.quants.quantize`` of the merged weight, permuted here by index
for Llama; gguf's GGUFReader finds the tokenizer's vocabulary by id, its merges or scores, special ids and chat
template, and transformers' GGUF tokenizer encodes text as the original does. The tokenizers are real ones,
trained on the fly (tests/bpe_tokenizer.py), and every 1-D weight is perturbed so that norms and biases count."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GemmaConfig, GemmaForCausalLM, GPT2Config,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from bpe_tokenizer import CHAT_TEMPLATE, corpus, train_bpe, train_sentencepiece
from factories import build, forward_logits, probe_ids, read_output, save_base

gguf = pytest.importorskip("gguf")
from converter import gguf_variant  # noqa: E402
from converter.errors import BadInputError, MergeError  # noqa: E402
from converter.gguf_variant import GGUF_TYPES, unsupported, write_gguf  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, initializer_range=0.1)  # 80: ffn_down rows stay F16
FAMILIES = {  # model_type: (config class, model class, tokenizer, settings of its own)
    "llama": (LlamaConfig, LlamaForCausalLM, "bpe", dict(tie_word_embeddings=False)),
    "mistral": (MistralConfig, MistralForCausalLM, "bpe", dict(tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "bpe", dict(tie_word_embeddings=True)),  # biases, tied like Qwen2-0.5B
    "gemma": (GemmaConfig, GemmaForCausalLM, "spm", dict(tie_word_embeddings=True)),
}
# (largest KL of the merged model's next-token distribution from the GGUF's, smallest top-1 agreement)
BOUNDS = {"q8_0": (1e-2, 0.9), "q5_1": (2e-2, 0.7), "q5_0": (2e-2, 0.7), "q4_1": (0.1, 0.5), "q4_0": (0.1, 0.5)}
EXACT = ("f16", "bf16")  # the merged weights are bfloat16: F16 holds them (at this scale), BF16 exactly


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tokenizers")
    train_bpe(d / "bpe")
    train_sentencepiece(d / "spm")
    return {"bpe": d / "bpe", "spm": d / "spm"}


def make_model(path: Path, model_type: str, tokenizers: dict[str, Path], extra_rows: int = 0, **overrides) -> Path:
    """A tiny model of the family in bfloat16 with its tokenizer's files, every 1-D weight (norms, biases)
    perturbed: Gemma's norms start at zero and Llama's at one, which would hide an offset or a lost bias."""
    config_cls, model_cls, tokenizer, own = FAMILIES[model_type]
    shutil.copytree(tokenizers[tokenizer], path)
    vocab = len(AutoTokenizer.from_pretrained(path)) + extra_rows
    model = build(config_cls(vocab_size=vocab, **{**SHAPE, **own, **overrides}), model_cls, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    save_base(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizers) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    made = {t: make_model(d / t, t, tokenizers) for t in FAMILIES}
    made["resized"] = make_model(d / "resized", "llama", tokenizers, extra_rows=2)
    return made


@pytest.fixture
def gemma_loader(monkeypatch):
    """transformers' GGUF loader reads Gemma 2 and 3 files but not Gemma (1), which llama.cpp writes with the same
    keys and the same norm offset: register it with Gemma 2's entries (less its sliding window) for the test."""
    import transformers.modeling_gguf_pytorch_utils as loader

    keys = {k: v for k, v in loader.GGUF_TO_TRANSFORMERS_MAPPING["config"]["gemma2"].items() if "sliding" not in k}
    monkeypatch.setitem(loader.GGUF_TO_TRANSFORMERS_MAPPING["config"], "gemma", keys)
    monkeypatch.setattr(loader, "GGUF_SUPPORTED_ARCHITECTURES", [*loader.GGUF_SUPPORTED_ARCHITECTURES, "gemma"])
    monkeypatch.setitem(loader.TENSOR_PROCESSORS, "gemma", loader.Gemma2TensorProcessor)


def export(model_dir: Path, qtype: str) -> tuple[Path, dict[str, int]]:
    out = model_dir / f"model-{qtype}.gguf"
    return out, write_gguf(model_dir, out, qtype)


def logits_both(model_dir: Path, gguf_file: Path, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged model's logits and the GGUF's (loaded by transformers, dequantized), both in float32."""
    ids = probe_ids(vocab, batch=4, length=16)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file.name, dtype=torch.float32)
    assert type(loaded).__name__ == type(merged).__name__ or model_dir.name == "mistral"  # as Llama
    return forward_logits(merged, ids), forward_logits(loaded, ids)


def assert_close(merged: torch.Tensor, loaded: torch.Tensor, qtype: str) -> None:
    if qtype in EXACT:
        rel = float((loaded - merged).abs().max() / merged.abs().max())
        assert rel < 1e-3, f"{qtype}: relative max difference {rel:.2e}"
        return
    kl = float((merged.log_softmax(-1).exp() * (merged.log_softmax(-1) - loaded.log_softmax(-1))).sum(-1).mean())
    top1 = float((merged.argmax(-1) == loaded.argmax(-1)).float().mean())
    max_kl, min_top1 = BOUNDS[qtype]
    assert kl < max_kl and top1 >= min_top1, f"{qtype}: KL {kl:.2e}, top-1 agreement {top1:.2f}"


def llama_cpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows in llama.cpp's rope order, by index: within each head, rows j and j + d/2 become 2j and 2j + 1."""
    d = w.shape[0] // heads
    order = [h * d + half * d // 2 + j for h in range(heads) for j in range(d // 2) for half in (0, 1)]
    return w[order]


def expected_tensors(model_dir: Path, qtype: str) -> dict[str, tuple[object, object]]:
    """GGUF name -> (type, bytes) that llama.cpp's converter would write for each merged tensor."""
    config = json.loads((model_dir / "config.json").read_text())
    family = config["model_type"]
    names = gguf.get_tensor_name_map(gguf_variant.FAMILIES[family].arch, config["num_hidden_layers"])
    out = {}
    for key, w in read_output(model_dir).items():
        w = w.float()
        if family in ("llama", "mistral") and ".q_proj." in key:
            w = llama_cpp_rows(w, config["num_attention_heads"])
        if family in ("llama", "mistral") and ".k_proj." in key:
            w = llama_cpp_rows(w, config["num_key_value_heads"])
        if family == "gemma" and key.endswith("norm.weight"):
            w = w + 1
        kind = GGUF_TYPES[qtype] if w.ndim == 2 else gguf.GGMLQuantizationType.F32
        if w.ndim == 2 and w.shape[1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None:  # Gemma's lm_head: llama.cpp's Gemma has no output tensor
            out[name] = (kind, gguf.quants.quantize(w.numpy(), kind).tobytes())
    return out


def assert_tensors(gguf_file: Path, model_dir: Path, qtype: str, counts: dict[str, int]) -> None:
    """Every tensor of the file is gguf's own quantization of the merged weight; the counts say how many are in
    ``qtype`` and how many were kept in F32/F16."""
    expected = expected_tensors(model_dir, qtype)
    found = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in gguf.GGUFReader(gguf_file).tensors}
    assert sorted(found) == sorted(expected)
    wrong = [name for name in expected if found[name] != expected[name]]
    assert not wrong, f"not gguf's {qtype} of the merged weights: {wrong}"
    quantized = sum(kind == GGUF_TYPES[qtype] for kind, _ in expected.values())
    assert counts == {"quantized": quantized, "kept": len(expected) - quantized} and quantized


def field(reader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


# ---------------------------------------------------------------------------------------------------------------------
# Every type, every family: loads back in transformers, tensors are gguf's own quantization.
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(GGUF_TYPES))
def test_llama_every_type_loads_back_and_holds_the_merged_weights(models, qtype):
    gguf_file, counts = export(models["llama"], qtype)
    assert_tensors(gguf_file, models["llama"], qtype, counts)
    assert counts["kept"] == 5 + (0 if qtype in EXACT else 2)  # 5 norms; ffn_down's 80 columns: no block of 32
    assert_close(*logits_both(models["llama"], gguf_file, 301), qtype)


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
def test_other_families_load_back(models, family, qtype, gemma_loader):
    gguf_file, counts = export(models[family], qtype)
    assert_tensors(gguf_file, models[family], qtype, counts)
    vocab = json.loads((models[family] / "config.json").read_text())["vocab_size"]
    assert_close(*logits_both(models[family], gguf_file, vocab), qtype)


def test_without_the_family_changes_the_logits_differ(models, gemma_loader, monkeypatch):
    """The checks above can fail: without Llama's q/k permutation, or Gemma's norm offset, the GGUF is another
    model."""
    for family, change in (("llama", dict(rope_permute=False)), ("gemma", dict(norm_offset=0.0))):
        monkeypatch.setitem(gguf_variant.FAMILIES, family, dataclasses.replace(gguf_variant.FAMILIES[family], **change))
        gguf_file, _ = export(models[family], "f16")
        vocab = json.loads((models[family] / "config.json").read_text())["vocab_size"]
        with pytest.raises(AssertionError):
            assert_close(*logits_both(models[family], gguf_file, vocab), "f16")


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------------------------------

def test_byte_level_bpe_vocabulary(models):
    gguf_file, _ = export(models["llama"], "q8_0")
    reader = gguf.GGUFReader(gguf_file)
    tok = AutoTokenizer.from_pretrained(models["llama"])
    tj = json.loads((models["llama"] / "tokenizer.json").read_text())
    assert field(reader, "general.name") == "model-q8_0"  # the file's
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(len(tok))))
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    think = tok.convert_tokens_to_ids("<think>")
    assert field(reader, "tokenizer.ggml.token_type") == [
        3 if i in special else 4 if i == think else 1 for i in range(len(tok))]  # CONTROL, USER_DEFINED, NORMAL
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in tj["model"]["merges"]]
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.padding_token_id")) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    # transformers' GGUF tokenizer, built from the tokens and merges alone, splits text as the original does
    again = AutoTokenizer.from_pretrained(models["llama"], gguf_file=gguf_file.name)
    for text in corpus(30, seed=7) + ["<think> naïve 3.14 </s>"]:
        assert again(text)["input_ids"] == tok(text)["input_ids"], text


def test_sentencepiece_vocabulary(models):
    import sentencepiece

    gguf_file, _ = export(models["gemma"], "q8_0")
    reader = gguf.GGUFReader(gguf_file)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(models["gemma"] / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(models["gemma"])
    pieces = [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == pieces + ["<mask>"]  # GemmaTokenizer's added token
    # the added tokens (tokenizer.json's, as convert_hf_to_gguf reads added_tokens_decoder): score -1000, CONTROL
    added = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    assert sorted(added) == ["<bos>", "<eos>", "<mask>", "<pad>", "<unk>"]
    assert field(reader, "tokenizer.ggml.scores") == pytest.approx(
        [-1000.0 if i in added.values() else sp.GetScore(i) for i in range(len(pieces))] + [-1000.0])
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [3, 3, 3, 3] and types[-1] == 3
    assert types[4:260] == [6] * 256 and set(types[260:-1]) == {1}  # byte fallback pieces (BYTE), then NORMAL
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False  # Gemma's
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (
        tok.bos_token_id, tok.eos_token_id)
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_tied_embeddings_write_no_output_tensor(models):
    for family in ("qwen2", "gemma"):
        names = [t.name for t in gguf.GGUFReader(export(models[family], "q8_0")[0]).tensors]
        assert "token_embd.weight" in names and "output.weight" not in names
    assert "output.weight" in [t.name for t in gguf.GGUFReader(export(models["llama"], "q8_0")[0]).tensors]


def test_resized_vocabulary_pads_the_token_list(models):
    """Two embedding rows more than the tokenizer has tokens: two unused [PAD{i}] tokens, and the model loads."""
    gguf_file, counts = export(models["resized"], "f16")
    reader = gguf.GGUFReader(gguf_file)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == 303 == field(reader, "llama.vocab_size")
    assert tokens[-3:] == ["<think>", "[PAD301]", "[PAD302]"] and types[-2:] == [5, 5]  # UNUSED
    assert_tensors(gguf_file, models["resized"], "f16", counts)
    assert_close(*logits_both(models["resized"], gguf_file, 303), "f16")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tokenizers):
    model = make_model(tmp_path / "small", "llama", tokenizers, extra_rows=-5)
    config = json.loads((model / "config.json").read_text())
    assert "301 tokens" in unsupported(config, model) and "vocab_size is 296" in unsupported(config, model)
    with pytest.raises(BadInputError, match="301 tokens"):
        write_gguf(model, tmp_path / "small.gguf", "q8_0")
    with pytest.raises(gguf_variant.TokenizerTooLargeError, match="296 rows"):  # past the config check: the rows
        gguf_variant.read_vocab(model, 296, gguf_variant.FAMILIES["llama"])
    assert not (tmp_path / "small.gguf").exists()


# ---------------------------------------------------------------------------------------------------------------------
# What is refused, before any work.
# ---------------------------------------------------------------------------------------------------------------------

def test_unsupported_families_and_tokenizers(tmp_path, tokenizers, models):
    config = json.loads((models["llama"] / "config.json").read_text())
    assert unsupported(config, models["llama"]) is None
    assert unsupported(json.loads((models["gemma"] / "config.json").read_text()), models["gemma"]) is None
    gpt2 = GPT2Config(vocab_size=301).to_dict()
    assert "'gpt2'" in unsupported(gpt2, models["llama"])
    (tmp_path / "empty").mkdir()
    assert "no tokenizer.json and no tokenizer.model" in unsupported(config, tmp_path / "empty")
    from tokenizers import Tokenizer, models as tok_models

    (tmp_path / "wordpiece").mkdir()
    Tokenizer(tok_models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "wordpiece" / "tokenizer.json"))
    assert "WordPiece tokenizer" in unsupported(config, tmp_path / "wordpiece")
    assert "activation 'gelu'" in unsupported({**config, "hidden_act": "gelu"}, models["llama"])
    assert "no rms_norm_eps" in unsupported({**config, "rms_norm_eps": None}, models["llama"])
    assert "'yarn'" in unsupported({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
                                   models["llama"])
    gemma = json.loads((models["gemma"] / "config.json").read_text())
    assert "untied" in unsupported({**gemma, "tie_word_embeddings": False}, models["gemma"])
    with pytest.raises(BadInputError, match="gpt2"):
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps(gpt2))
        write_gguf(tmp_path / "gpt2", tmp_path / "gpt2.gguf", "q8_0", tokenizer_dir=models["llama"])
    with pytest.raises(BadInputError, match="q3_k"):
        write_gguf(models["llama"], tmp_path / "x.gguf", "q3_k")


def test_a_bpe_pre_tokenizer_llama_cpp_cannot_name_is_refused(tmp_path, tokenizers):
    d = shutil.copytree(tokenizers["bpe"], tmp_path / "tok")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    config = LlamaConfig(vocab_size=301).to_dict()
    assert "pre-tokenizer that llama.cpp has no name for" in unsupported(config, d)
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = GGUF_PRE_TOKENIZER_SPLITS["llama3"]  # Llama 3's
    (d / "tokenizer.json").write_text(json.dumps(tj))
    assert unsupported(config, d) is None
    assert gguf_variant.read_vocab(d, 301, gguf_variant.FAMILIES["llama"]).pre == "llama-bpe"
    tj["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True  # llama.cpp's BPE never adds one
    (d / "tokenizer.json").write_text(json.dumps(tj))
    assert "pre-tokenizer that llama.cpp has no name for" in unsupported(config, d)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming, shards, rope scaling, failures.
# ---------------------------------------------------------------------------------------------------------------------

def test_streams_one_tensor_at_a_time_from_sharded_checkpoints(tmp_path, tokenizers, models, monkeypatch):
    """Shards and their index are read; each tensor is read (whole, or band of rows by band) and written before
    the next is read."""
    sharded = tmp_path / "sharded"
    shutil.copytree(tokenizers["bpe"], sharded)
    AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.bfloat16).save_pretrained(
        sharded, max_shard_size="50KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    from converter import checkpoint

    monkeypatch.setattr(checkpoint, "BAND_BYTES", 4096)  # bands of 32 rows: the 256-row tensors take several
    reads = []  # every read of the checkpoint (a whole tensor's, or a band's)
    read_into = checkpoint.read_into
    monkeypatch.setattr(checkpoint, "read_into",
                        lambda spec, offset, buf: reads.append(spec.name) or read_into(spec, offset, buf))
    gguf_file, counts = export(sharded, "q8_0")
    runs = [name for i, name in enumerate(reads) if i == 0 or reads[i - 1] != name]
    assert len(runs) == len(set(runs)) == 21 and len(reads) > 21  # one tensor after another, some in bands
    assert_tensors(gguf_file, sharded, "q8_0", counts)
    single = {t.name: t.data.tobytes() for t in gguf.GGUFReader(export(models["llama"], "q8_0")[0]).tensors}
    assert {t.name: t.data.tobytes() for t in gguf.GGUFReader(gguf_file).tensors} == single


def test_llama3_rope_scaling_writes_transformers_frequencies(tmp_path, tokenizers):
    """Llama 3.1's rope scaling: llama.cpp divides each base frequency by rope_freqs; the result is the frequency
    transformers computes."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = make_model(tmp_path / "llama3", "llama", tokenizers, rope_parameters=rope)
    gguf_file, counts = export(model, "q8_0")
    freqs = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}["rope_freqs.weight"]
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32 and counts["kept"] == 8  # 5 norms, 2 ffn_down
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoModelForCausalLM.from_pretrained(model).config, "cpu")
    ours = base / torch.from_numpy(freqs.data.copy())
    assert torch.allclose(ours, theirs.float(), rtol=1e-5) and not torch.allclose(base, theirs.float(), rtol=1e-2)


def test_a_failed_write_leaves_no_file(models, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_variant, "encode", full)
    out = models["llama"] / "full.gguf"
    with pytest.raises(MergeError, match="no space left"):
        write_gguf(models["llama"], out, "q8_0")
    assert not out.exists()


def test_q8_0_in_torch_is_ggufs_own():
    """The torch Q8_0 (used on a GPU) gives gguf.quants' bytes: zero blocks, halves (rounded away from zero),
    extremes, and random rows."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 64).view(-1, 1)
    rows[0, :32] = 0  # a zero block: scale 0
    rows[1, :32] = torch.arange(32) - 15.5  # halves: with 127 in the block the scale is 1
    rows[1, 0] = 127.0
    rows[2, :32] = torch.tensor([127.0, -127.0] * 16)
    ours = gguf_variant.q8_0(rows).numpy()
    assert ours.tobytes() == gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType.Q8_0).tobytes()
