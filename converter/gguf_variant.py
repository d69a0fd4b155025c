"""The ``gguf-*`` variants: the merged model as one GGUF file, what llama.cpp, Ollama and LM Studio load.

Written with the ``gguf`` package (llama.cpp's own Python writer), the way llama.cpp's ``convert_hf_to_gguf.py``
writes these families, without its code: hyperparameters from config.json; tensors renamed by gguf's
``TensorNameMap`` and changed where llama.cpp's kernels want them otherwise (``FAMILIES`` says how per family:
Llama's rope rows interleaved per head, Gemma's norms stored as ``1 + w``); the tokenizer as metadata (tokens by
id, their types, merges or scores, special ids, chat template), one token per embedding row.

The file is written as it is read: every tensor's name, shape, type and size is known from the safetensors
headers, so the header and the tensor infos go first, then each tensor is read from the merged shards,
quantized by ``gguf.quants.quantize`` and written before the next is read. Peak memory is about one tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, TokenType

from converter.checkpoint import Checkpoint, read_json_object, row_bands
from converter.errors import BadInputError, MergeError, write_failure
from converter.writer import start_writeback

# Method suffix (``--quantize gguf-q8_0``) -> tensor type. Only types gguf.quants can quantize, that llama.cpp
# runs for any model and that transformers' GGUF loader reads back (tests/test_gguf_variant.py checks each).
# Left out: the k-quants and i-quants (gguf.quants only dequantizes them), TQ1_0/TQ2_0 (ternary, for BitNet
# weights only) and MXFP4 (llama.cpp uses it for gpt-oss experts only).
GGUF_TYPES: dict[str, GGMLQuantizationType] = {
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q4_0": GGMLQuantizationType.Q4_0,
}

F32, F16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16
WORKERS = os.cpu_count() or 1  # gguf's quantize runs a band of rows on each
SKIPPED = (".rotary_emb.inv_freq",)  # buffers some old checkpoints store; llama.cpp computes them
HPARAMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
           "rms_norm_eps")  # config.json numbers every family's GGUF needs
EMBEDDING = "model.embed_tokens.weight"
OUTPUT = "lm_head.weight"


class TokenizerTooLargeError(BadInputError):
    """The tokenizer has more tokens than the embedding has rows: the GGUF token list would not fit the model."""


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter writes one model family (its model class in ``convert_hf_to_gguf.py``)."""

    arch: gguf.MODEL_ARCH
    rope_permute: bool = False  # LlamaModel.permute: q/k rows of each head reordered for llama.cpp's rope
    norm_offset: float = 0.0  # GemmaModel: HF computes x * (1 + w), llama.cpp x * w
    activations: tuple[str, ...] = ("silu",)  # what the arch hard-codes
    own_output: bool = True  # False: the arch always reads token_embd as the output (tied embeddings only)
    space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix forced for a SentencePiece vocabulary


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, rope_permute=True),  # llama.cpp runs Mistral as Llama
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "gemma": Family(gguf.MODEL_ARCH.GEMMA, norm_offset=1.0, activations=("gelu", "gelu_pytorch_tanh"),
                    own_output=False, space_prefix=False),
}


@dataclass(frozen=True)
class TensorJob:
    """One tensor of the file: where it comes from, what it becomes."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # rows first, as torch holds it
    qtype: GGMLQuantizationType
    source: str | None = None  # checkpoint key; None: ``value`` is made here (rope_freqs)
    heads: int | None = None  # rope permutation over this many heads (q/k of rope_permute families)
    offset: float = 0.0  # added to the values (norm_offset)
    value: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes in the file, before alignment padding."""
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


@dataclass(frozen=True)
class Vocab:
    """The tokenizer as GGUF metadata: one token per embedding row."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre: how text is split before BPE
    tokens: list[str]
    types: list[int]  # gguf.TokenType
    scores: list[float] | None = None  # SentencePiece only
    space_prefix: bool | None = None  # SentencePiece only


@dataclass(frozen=True)
class Rope:
    """How the config's rope scaling is written: metadata and/or llama.cpp's per-frequency divisors."""

    scaling: gguf.RopeScalingType | None = None
    factor: float | None = None
    freq_factors: torch.Tensor | None = None  # rope_freqs: llama.cpp divides each frequency by these


# ---------------------------------------------------------------------------------------------------------------------
# The math: pure functions on tensors.
# ---------------------------------------------------------------------------------------------------------------------

def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or biases) as llama.cpp's rope wants them: HF rotates the halves (i, i + d/2) of each head,
    llama.cpp adjacent pairs (2i, 2i + 1); per head, row j of each half becomes row 2j (+1 for the second half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def storage_type(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a tensor is stored in: 1-D tensors (norms, biases) in F32, rows that are no multiple of the
    type's block in F16, everything else in ``qtype`` (convert_hf_to_gguf's rules)."""
    if len(shape) < 2:
        return F32
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else F16


# Plain float types: torch rounds to them as numpy (and gguf.quants) does, to nearest even, on every core
TORCH_FLOATS = {F32: torch.float32, F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}


def q8_0(values: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks of each row (a float16 scale, then 32 int8 values) as bytes: gguf's ``Q8_0.quantize_blocks`` (the
    reference of ggml-quants.c) operation for operation in torch, to run where the values are (a GPU); the tests
    check its bytes against gguf's own."""
    blocks = values.to(torch.float32).reshape(-1, 32)
    peak = blocks.abs().amax(dim=1, keepdim=True)
    d = peak / torch.full_like(peak, 127)  # a true division: by a Python number, CUDA multiplies by 1/127
    scaled = blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    magnitude = scaled.abs()
    floored = magnitude.floor()
    q = torch.sign(scaled) * (floored + (2 * (magnitude - floored)).floor())  # gguf's np_roundf: half away from 0
    out = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
    return out.reshape(*values.shape[:-1], -1)


def encode(values: torch.Tensor, qtype: GGMLQuantizationType, pool: ThreadPoolExecutor | None = None,
           device: torch.device | None = None) -> np.ndarray:
    """The tensor's bytes in the file: cast for a plain float type; Q8_0 on a CUDA ``device`` by ``q8_0``; else
    quantized by gguf's own ``quantize`` (on ``pool``'s threads, a band of rows each: blocks never span rows, so the
    bytes are the same)."""
    if qtype == GGMLQuantizationType.Q8_0 and device is not None and device.type == "cuda":
        return q8_0(values.to(device)).cpu().numpy()
    if qtype in TORCH_FLOATS:
        flat = values.to(TORCH_FLOATS[qtype]).contiguous()
        return flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).numpy().view(
            np.float16 if qtype == F16 else np.uint16 if flat.element_size() == 2 else np.float32)
    data = values.to(torch.float32).contiguous().numpy()
    if pool is None or data.ndim < 2 or data.shape[0] < 2 * WORKERS:
        return gguf.quants.quantize(data, qtype)
    bands = np.array_split(data, WORKERS)
    return np.concatenate(list(pool.map(lambda band: gguf.quants.quantize(band, qtype), bands)))


def llama3_freq_factors(params: dict, dim: int, old: float) -> torch.Tensor:
    """Llama 3.1's rope scaling as llama.cpp's per-frequency divisors: 1 for wavelengths shorter than the
    original context ``old`` over ``high_freq_factor``, ``factor`` for those longer than it over
    ``low_freq_factor``, a smooth blend between (transformers' ``_compute_llama3_parameters``, as ratios)."""
    base, factor = float(params["rope_theta"]), float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    blended = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = torch.where(wavelen < old / high, torch.ones_like(wavelen), blended)
    return torch.where(wavelen > old / low, torch.full_like(wavelen, factor), out).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# What the config says.
# ---------------------------------------------------------------------------------------------------------------------

def head_dim(config: dict) -> int:
    """Width of one attention head."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_params(config: dict) -> dict:
    """The rope settings wherever this transformers version put them (``rope_parameters`` in 5.x, ``rope_scaling``
    and ``rope_theta`` before), with ``rope_type`` and ``rope_theta`` always set."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    params.setdefault("rope_theta", config.get("rope_theta") or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _rope_default(params: dict, config: dict) -> Rope:
    return Rope()


def _rope_linear(params: dict, config: dict) -> Rope:
    return Rope(scaling=gguf.RopeScalingType.LINEAR, factor=float(params["factor"]))


def _rope_llama3(params: dict, config: dict) -> Rope:
    old = params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings", 8192)
    return Rope(freq_factors=llama3_freq_factors(params, head_dim(config), float(old)))


ROPE_TYPES = {"default": _rope_default, "linear": _rope_linear, "llama3": _rope_llama3}


def tied(config: dict) -> bool:
    """Whether the output embedding is the input one (transformers' default: yes)."""
    return bool(config.get("tie_word_embeddings", True))


def activation(config: dict) -> str | None:
    """The MLP's activation (Gemma names it ``hidden_activation``)."""
    return config.get("hidden_activation") or config.get("hidden_act")


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    return read_json_object(path, "tokenizer file", "re-save the tokenizer with transformers' save_pretrained")


def _split_names() -> dict[str, str]:
    """Split regex of a byte-level pre-tokenizer -> llama.cpp's name for it (``tokenizer.ggml.pre``); the regexes
    are transformers' GGUF reader's, which rebuilds the split from the name."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
    except ImportError:  # pragma: no cover - an older transformers: GPT-2's split only
        return {}
    return {splits[name]: name for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o") if name in splits}


def _steps(pre_tokenizer: dict | None) -> list[dict]:
    return (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])


def bpe_pre(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.json's ``pre_tokenizer``), or None when it
    has none: GPT-2's ByteLevel split, or a known Split regex followed by ByteLevel without its own regex."""
    steps = _steps(pre_tokenizer)
    kinds = [step.get("type") for step in steps]
    if any(step.get("add_prefix_space") for step in steps):
        return None  # llama.cpp never adds a prefix space to a BPE vocabulary
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[0].get("invert"):
        if str(steps[0].get("behavior", "")).lower() == "isolated":
            return _split_names().get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _sentencepiece(path: Path):
    """The SentencePiece model at ``path`` (a SentencePieceProcessor), or None when there is none, it is not one
    (Llama 3 ships a tiktoken file by that name) or sentencepiece is not installed."""
    if not path.is_file():
        return None
    try:
        from sentencepiece import SentencePieceProcessor

        return SentencePieceProcessor(model_file=str(path))
    except Exception:  # noqa: BLE001 - ImportError, OSError, RuntimeError from the parser...
        return None


@dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer files of a directory, each read once."""

    directory: Path
    spm: object | None  # SentencePieceProcessor of tokenizer.model, where it loads
    tokenizer: dict | None  # tokenizer.json
    added: tuple[tuple[int, str, bool], ...]  # (id, text, special) of the added tokens

    @classmethod
    def read(cls, directory: Path) -> TokenizerFiles:
        """Read what ``directory`` holds. The added tokens come from tokenizer.json's ``added_tokens``, else
        tokenizer_config.json's ``added_tokens_decoder``, else added_tokens.json (not special)."""
        directory = Path(directory)
        tokenizer = _read_json(directory / "tokenizer.json") if (directory / "tokenizer.json").is_file() else None
        if tokenizer is not None:
            added = [(t["id"], t["content"], t.get("special")) for t in tokenizer.get("added_tokens") or []]
        elif (decoder := cls._config(directory).get("added_tokens_decoder")):
            added = [(i, t["content"], t.get("special")) for i, t in decoder.items()]
        elif (directory / "added_tokens.json").is_file():
            added = [(i, text, False) for text, i in _read_json(directory / "added_tokens.json").items()]
        else:
            added = []
        return cls(directory, _sentencepiece(directory / "tokenizer.model"), tokenizer,
                   tuple((int(i), text, bool(special)) for i, text, special in added))

    @staticmethod
    def _config(directory: Path) -> dict:
        path = directory / "tokenizer_config.json"
        return _read_json(path) if path.is_file() else {}

    def problem(self) -> str | None:
        """Why this tokenizer cannot be written as GGUF metadata, or None."""
        spm_file, tj_file = self.directory / "tokenizer.model", self.directory / "tokenizer.json"
        if self.spm is not None:
            return None
        if self.tokenizer is None:
            if spm_file.is_file():
                return f"{spm_file} is not a SentencePiece model that sentencepiece can load"
            return (f"{self.directory} holds no tokenizer.json and no tokenizer.model: a GGUF file carries its "
                    "tokenizer, and there is none to write")
        model = self.tokenizer.get("model") or {}
        if model.get("type") != "BPE":
            return (f"{tj_file}: a {model.get('type')} tokenizer; GGUF export writes byte-level BPE (GPT-2 style) "
                    "or SentencePiece tokenizers only")
        if model.get("byte_fallback"):
            return (f"{tj_file}: a SentencePiece-style BPE (byte_fallback) with no loadable tokenizer.model beside "
                    "it; its scores are only in tokenizer.model")
        if bpe_pre(pre := self.tokenizer.get("pre_tokenizer")) is None:
            described = ", ".join(json.dumps(step, sort_keys=True)[:160] for step in _steps(pre))
            return f"{tj_file}: a BPE pre-tokenizer that llama.cpp has no name for: [{described}]"
        return None

    def size(self) -> int:
        """How many token ids the tokenizer uses (its largest id + 1)."""
        ids = [i for i, _, _ in self.added]
        if self.spm is not None:
            ids.append(self.spm.vocab_size() - 1)
        elif self.tokenizer is not None:
            ids.extend((self.tokenizer.get("model") or {}).get("vocab", {}).values())
        return max(ids, default=-1) + 1


def _padded(tokens: dict[int, str], types: dict[int, int], rows: int, where: Path) -> tuple[list[str], list[int]]:
    """One token per embedding row: rows no token uses become unused ``[PAD{i}]`` tokens."""
    if tokens and max(tokens) >= rows:
        raise TokenizerTooLargeError(
            f"the tokenizer in {where} has {max(tokens) + 1} tokens but the model's embedding has {rows} rows",
            hint="ship the tokenizer that goes with these weights, or resize the embedding to the tokenizer "
            "(the adapter's trainable tokens, or model.resize_token_embeddings before training)")
    return ([tokens.get(i, f"[PAD{i}]") for i in range(rows)],
            [types.get(i, TokenType.UNUSED) for i in range(rows)])


def bpe_vocab(files: TokenizerFiles, rows: int, family: Family) -> Vocab:
    """A byte-level BPE vocabulary (convert_hf_to_gguf's ``_set_vocab_gpt2``): the model's tokens as tokenizer.json
    spells them, added tokens as their text (CONTROL when special, else USER_DEFINED)."""
    tokens = {int(i): t for t, i in files.tokenizer["model"]["vocab"].items()}
    types = dict.fromkeys(tokens, TokenType.NORMAL)
    for i, text, special in files.added:
        tokens[i], types[i] = text, TokenType.CONTROL if special else TokenType.USER_DEFINED
    listed, typed = _padded(tokens, types, rows, files.directory)
    return Vocab("gpt2", bpe_pre(files.tokenizer.get("pre_tokenizer")) or "default", listed, typed)


SPM_TYPES = (("IsUnknown", TokenType.UNKNOWN), ("IsControl", TokenType.CONTROL), ("IsUnused", TokenType.UNUSED),
             ("IsByte", TokenType.BYTE))


def spm_vocab(files: TokenizerFiles, rows: int, family: Family) -> Vocab:
    """A SentencePiece vocabulary (convert_hf_to_gguf's ``_set_vocab_sentencepiece``): pieces, scores and types
    from tokenizer.model, then the added tokens over them (score -1000, CONTROL when special, else USER_DEFINED
    with SentencePiece's space mark as a space), and unused ``[PAD{i}]`` rows (score -10000)."""
    sp = files.spm
    tokens, types, scores = {}, {}, {}
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = next((t for test, t in SPM_TYPES if getattr(sp, test)(i)), TokenType.NORMAL)
    for i, text, special in files.added:
        tokens[i], scores[i] = (text if special else text.replace("\u2581", " ")), -1000.0
        types[i] = TokenType.CONTROL if special else TokenType.USER_DEFINED
    listed, typed = _padded(tokens, types, rows, files.directory)
    space_prefix = family.space_prefix
    if space_prefix is None:
        space_prefix = _spm_dummy_prefix(files.directory / "tokenizer.model")
    return Vocab("llama", "default", listed, typed, [scores.get(i, -10000.0) for i in range(rows)], space_prefix)


def _spm_dummy_prefix(path: Path) -> bool | None:
    """Whether the SentencePiece model adds a space before the text (``add_dummy_prefix``), None if unknown."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        return bool(proto.normalizer_spec.add_dummy_prefix)
    except Exception:  # noqa: BLE001 - protobuf missing or too old: leave llama.cpp's default
        return None


def read_vocab(tokenizer_dir: Path, rows: int, family: Family) -> Vocab:
    """The tokenizer of ``tokenizer_dir`` as GGUF metadata, ``rows`` tokens: SentencePiece where tokenizer.model
    loads (convert_hf_to_gguf tries it first), else tokenizer.json's byte-level BPE."""
    files = TokenizerFiles.read(tokenizer_dir)
    return (spm_vocab if files.spm is not None else bpe_vocab)(files, rows, family)


# ---------------------------------------------------------------------------------------------------------------------
# Checks, before any work.
# ---------------------------------------------------------------------------------------------------------------------

def unsupported(config: dict, tokenizer_dir: Path) -> str | None:
    """Why this model (its config.json as a dict, and the directory holding its tokenizer files) cannot be exported
    to GGUF, or None. Every problem found is named, joined by "; "."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        return (f"GGUF export does not support model_type {model_type!r}; it writes "
                f"{', '.join(sorted(FAMILIES))}")
    problems = []
    if missing := [key for key in HPARAMS if not isinstance(config.get(key), (int, float))]:
        problems.append(f"config.json has no {', '.join(missing)}")
    if activation(config) not in family.activations:
        problems.append(f"{model_type} with activation {activation(config)!r}: llama.cpp's "
                        f"{gguf.MODEL_ARCH_NAMES[family.arch]} computes {' / '.join(family.activations)}")
    rope_type = rope_params(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope scaling {rope_type!r} is not written to GGUF here (supported: "
                        f"{', '.join(ROPE_TYPES)})")
    if not family.own_output and not tied(config):
        problems.append(f"{model_type} with untied output embeddings (tie_word_embeddings false): llama.cpp's "
                        f"{gguf.MODEL_ARCH_NAMES[family.arch]} always uses the input embedding as the output")
    files = TokenizerFiles.read(tokenizer_dir)
    if (reason := files.problem()) is not None:
        problems.append(reason)
    elif isinstance(config.get("vocab_size"), int) and files.size() > config["vocab_size"]:
        problems.append(f"the tokenizer in {files.directory} has {files.size()} tokens but the model's vocab_size is "
                        f"{config['vocab_size']}")
    return "; ".join(problems) or None


def transformers_reads(config: dict) -> bool:
    """Whether transformers' GGUF loader reads this family's files back (it has no Gemma 1): the variant's quality
    figures need it."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    family = FAMILIES.get(config.get("model_type"))
    return family is not None and gguf.MODEL_ARCH_NAMES[family.arch] in GGUF_CONFIG_MAPPING


# ---------------------------------------------------------------------------------------------------------------------
# The plan: every tensor of the file, from the checkpoint's headers.
# ---------------------------------------------------------------------------------------------------------------------

def plan_tensors(ckpt: Checkpoint, config: dict, family: Family, qtype: GGMLQuantizationType,
                 rope: Rope) -> list[TensorJob]:
    """Every tensor of the file in checkpoint read order, with its GGUF name, shape and type; a checkpoint key
    that llama.cpp's tensor map does not know is an error, named."""
    names = gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    skip_output = tied(config) or not family.own_output
    jobs, unknown = [], []
    if rope.freq_factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        jobs.append(TensorJob(name, tuple(rope.freq_factors.shape), F32, value=rope.freq_factors))
    for key in sorted(ckpt.specs, key=ckpt.read_order):
        if key.endswith(SKIPPED) or (key == OUTPUT and skip_output):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
            continue
        shape = ckpt.specs[key].shape
        module = key.rsplit(".", 2)[-2]
        jobs.append(TensorJob(name, shape, storage_type(shape, qtype), source=key,
                              heads=heads.get(module) if family.rope_permute else None,
                              offset=family.norm_offset if key.endswith("norm.weight") else 0.0))
    if unknown:
        raise BadInputError(f"{ckpt.directory}: {len(unknown)} tensors have no GGUF name for "
                            f"{gguf.MODEL_ARCH_NAMES[family.arch]}: {', '.join(unknown[:8])}",
                            hint="export a plain checkpoint of this family; other tensors cannot be written to GGUF")
    if EMBEDDING not in ckpt.specs:
        raise BadInputError(f"{ckpt.directory}: no {EMBEDDING}", hint="point at a merged checkpoint of this family")
    if not skip_output and OUTPUT not in ckpt.specs:
        raise BadInputError(f"{ckpt.directory}: config.json says the embeddings are untied but there is no {OUTPUT}",
                            hint="re-run the merge; its output holds lm_head.weight when the embeddings are untied")
    return jobs


def tensor_values(job: TensorJob, ckpt: Checkpoint) -> torch.Tensor:
    """The tensor as llama.cpp wants it: read, rope rows permuted, offset added (in float32; else in its own dtype,
    which ``encode`` casts once)."""
    w = job.value if job.source is None else ckpt.get(job.source)
    if job.heads is not None:
        w = permute_rope(w, job.heads)
    return w.to(torch.float32) + job.offset if job.offset else w


# ---------------------------------------------------------------------------------------------------------------------
# Metadata.
# ---------------------------------------------------------------------------------------------------------------------

def add_hparams(writer: gguf.GGUFWriter, config: dict, rows: int, qtype: GGMLQuantizationType, rope: Rope,
                name: str) -> None:
    """general.* (``name``: general.name, what llama.cpp and Ollama show) and the architecture's hyperparameters,
    from config.json."""
    heads = config["num_attention_heads"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype.name}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(rows)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope_params(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if rope.scaling is not None:
        writer.add_rope_scaling_type(rope.scaling)
        writer.add_rope_scaling_factor(rope.factor)


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab, tokenizer_dir: Path) -> None:
    """tokenizer.ggml.*: the token list and types (scores for SentencePiece), then what gguf's SpecialVocab reads
    from the tokenizer files: merges, special token ids, add_bos/add_eos and the chat template."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.space_prefix is not None:
        writer.add_add_space_prefix(vocab.space_prefix)
    gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens)).add_to_gguf(
        writer, quiet=True)


# ---------------------------------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------------------------------

def write_gguf(merged_dir: Path, out_file: Path, qtype: str, tokenizer_dir: Path | None = None,
               device: torch.device | None = None) -> dict[str, int]:
    """Write the merged checkpoint in ``merged_dir`` as one GGUF file ``out_file`` with tensors in ``qtype`` (a key
    of GGUF_TYPES), the tokenizer from ``tokenizer_dir`` (default: ``merged_dir``); Q8_0 is computed on ``device``
    when it is a GPU. Returns {"quantized": n, "kept": m}: tensors in ``qtype``, and tensors kept in F32/F16
    because the type does not apply to them.

    Raises BadInputError (TokenizerTooLargeError among them) before anything is written, MergeError when writing
    fails; a partly written ``out_file`` is removed."""
    merged_dir, out_file = Path(merged_dir), Path(out_file)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else merged_dir
    if qtype not in GGUF_TYPES:
        raise BadInputError(f"unknown GGUF type {qtype!r}", hint=f"use one of {', '.join(GGUF_TYPES)}")
    config = read_json_object(merged_dir / "config.json", "model config", "point at a merged model directory")
    if (reason := unsupported(config, tokenizer_dir)) is not None:
        raise BadInputError(f"cannot export {merged_dir} to GGUF: {reason}",
                            hint="drop the gguf variant for this model, or export it with llama.cpp's converter")
    family, target = FAMILIES[config["model_type"]], GGUF_TYPES[qtype]
    rope = ROPE_TYPES[rope_params(config)["rope_type"]](rope_params(config), config)
    ckpt = Checkpoint(merged_dir)
    try:
        jobs = plan_tensors(ckpt, config, family, target, rope)
        rows = ckpt.specs[EMBEDDING].shape[0]
        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[family.arch])
        add_hparams(writer, config, rows, target, rope, out_file.stem)
        add_vocab(writer, read_vocab(tokenizer_dir, rows, family), tokenizer_dir)
        for job in jobs:
            writer.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
        _write(writer, jobs, ckpt, out_file, device)
    finally:
        ckpt.close()
    quantized = sum(job.qtype == target for job in jobs)
    return {"quantized": quantized, "kept": len(jobs) - quantized}


@dataclass
class RowStream:
    """A tensor's bytes made and written band of rows by band of rows, never whole: what GGUFWriter's
    ``write_tensor_data`` takes of an array (its ``nbytes``, and ``tofile``)."""

    job: TensorJob
    ckpt: Checkpoint
    pool: ThreadPoolExecutor
    device: torch.device | None = None

    @property
    def nbytes(self) -> int:
        """The tensor's bytes in the file."""
        return self.job.nbytes

    def bands(self) -> Iterator[np.ndarray]:
        """The file's bytes of each band of rows (checkpoint.row_bands)."""
        for band in row_bands(self.ckpt.specs[self.job.source]):
            yield encode(band, self.job.qtype, self.pool, self.device)

    def tofile(self, fout) -> None:
        """Write every band, starting each one's writeback as it goes."""
        written = 0
        for data in self.bands():
            fout.write(memoryview(data).cast("B"))
            start_writeback(fout, data.nbytes)
            written += data.nbytes
        if written != self.nbytes:  # the plan and gguf disagree on the type's layout: a bug of ours
            raise MergeError(f"{self.job.name}: gguf wrote {written} bytes where {self.nbytes} were planned")


def streams_by_rows(job: TensorJob, ckpt: Checkpoint) -> bool:
    """Whether a tensor can be converted band by band: a stored 2-D tensor whose rows stay as they are."""
    spec = ckpt.specs.get(job.source) if job.source is not None else None
    return (spec is not None and spec.start is not None and len(spec.shape) == 2 and job.heads is None
            and not job.offset)


def _write(writer: gguf.GGUFWriter, jobs: list[TensorJob], ckpt: Checkpoint, out_file: Path,
           device: torch.device | None = None) -> None:
    """Header, metadata and tensor infos, then each tensor as it is read (a big one band of rows at a time); a
    failed write leaves no file."""
    try:
        writer.write_header_to_file(out_file)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ThreadPoolExecutor(WORKERS) as pool:
            for job in jobs:
                if streams_by_rows(job, ckpt):
                    writer.write_tensor_data(RowStream(job, ckpt, pool, device))
                    continue
                data = encode(tensor_values(job, ckpt), job.qtype, pool, device)
                if data.nbytes != job.nbytes:  # the plan and gguf disagree on the type's layout: a bug of ours
                    raise MergeError(f"{job.name}: gguf wrote {data.nbytes} bytes where {job.nbytes} were planned")
                writer.write_tensor_data(data)
                start_writeback(writer.fout[0], data.nbytes)
        writer.close()
    except BaseException as exc:
        writer.close()
        out_file.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failure(exc, "writing the GGUF file", out_file) from exc
        raise
