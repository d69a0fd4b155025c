"""Post-merge quantization: bitsandbytes and FP8 (compressed-tensors) variants, written tensor by tensor from
the merged shards.

A bitsandbytes variant is what ``from_pretrained(merged, quantization_config=BitsAndBytesConfig(...))``
followed by ``save_pretrained`` would write (same tensor names, dtypes and
``quantization_config``); an ``fp8`` variant is what llm-compressor writes for FP8_DYNAMIC
(``converter.fp8_variant``). Both are made without loading the model: each linear weight is
read from the merged output, quantized with the method's own library and written straight
into its shard, so peak memory is about one tensor. Where checkpoint keys are not the module
names (transformers' key conversions), bitsandbytes variants go through transformers instead
and the receipt says so. Quality figures always come from the variant reloaded from disk.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from converter import publish
from converter.checkpoint import Checkpoint, row_bands
from converter.errors import BadInputError, MergeError, VerificationError
from converter.receipt import Variant
from converter.resources import peak_rss_bytes, reset_peak_rss, resolve_device
from converter.verify import judge_variant, variant_figures
from converter.writer import AppendingShard, write_index

log = logging.getLogger("converter")

QUANT_DTYPES = ("float32", "bfloat16", "float16")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FP8_BLOCKS = (32, 64, 128, 256)
THRESHOLD_OPTIONS = ("max_logit_diff", "max_kl", "min_top1")
COMMON_OPTIONS = ("skip",) + THRESHOLD_OPTIONS


# ---------------------------------------------------------------------------------------------------------------------
# The math: one pure function per method, tensor in, the tensors transformers saves for that layer out.
# ---------------------------------------------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor, spec: "QuantSpec") -> dict[str, torch.Tensor]:
    """LLM.int8() row-wise absmax, as ``bnb.nn.Int8Params._quantize`` (via float16) and ``Linear8bitLt`` saves it."""
    import bitsandbytes.functional as F

    cb, scb, _ = F.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return {"weight": cb, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}


def quantize_4bit(weight: torch.Tensor, spec: "QuantSpec") -> dict[str, torch.Tensor]:
    """Blockwise 4-bit, as ``bnb.nn.Params4bit._quantize`` and ``Linear4bit._save_to_state_dict``."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.contiguous(), blocksize=spec.blocksize,
                                    compress_statistics=spec.double_quant, quant_type=METHODS[spec.method].quant_type,
                                    quant_storage=torch.uint8)
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def quantize_fp8(weight: torch.Tensor, spec: "QuantSpec") -> dict[str, torch.Tensor]:
    """compressed-tensors FP8: codes and a scale per output channel (or per ``block``)."""
    from converter import fp8_variant

    return fp8_variant.quantize_fp8(weight, spec.block)


def _bnb_config(kwargs: Callable[["QuantSpec"], dict]) -> Callable[["QuantSpec", "VariantPlan"], dict]:
    """config.json's ``quantization_config`` of a bitsandbytes method: BitsAndBytesConfig.to_dict(), as
    save_pretrained writes it."""
    def config(spec: "QuantSpec", plan: "VariantPlan") -> dict:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**kwargs(spec), llm_int8_skip_modules=plan.skip_modules).to_dict()

    return config


def _int8_config(spec: "QuantSpec") -> dict:
    return {"load_in_8bit": True, "llm_int8_threshold": spec.threshold}


def _4bit_config(spec: "QuantSpec") -> dict:
    return {"load_in_4bit": True, "bnb_4bit_quant_type": METHODS[spec.method].quant_type,
            "bnb_4bit_use_double_quant": spec.double_quant,
            "bnb_4bit_compute_dtype": getattr(torch, spec.compute_dtype)}


def _fp8_config(spec: "QuantSpec", plan: "VariantPlan") -> dict:
    from converter import fp8_variant

    return fp8_variant.quantization_config(spec.block, plan.ignored)


def _int8_names(spec: "QuantSpec") -> list[str]:
    return ["weight", "SCB", "weight_format"]


def _gguf_config(spec: "QuantSpec", plan: "VariantPlan") -> dict:
    return {"format": "gguf", "file": gguf_file_name(spec), "tensor_type": spec.method.removeprefix("gguf-")}


def gguf_file_name(spec: "QuantSpec") -> str:
    """The variant's one file: ``model-<type>.gguf``."""
    return f"model-{spec.method.removeprefix('gguf-')}.gguf"


def _transformers_reads(config: dict) -> bool:
    from converter import gguf_variant

    return gguf_variant.transformers_reads(config)


def _write_gguf(spec: "QuantSpec", merged_dir: Path, out_dir: Path, device: torch.device) -> dict:
    from converter import gguf_variant

    return gguf_variant.write_gguf(merged_dir, out_dir / gguf_file_name(spec), spec.method.removeprefix("gguf-"),
                                   device=device)


def _gguf_check(spec: "QuantSpec", info, tokenizer_dir: Path) -> None:
    """A model or tokenizer the GGUF exporter cannot express."""
    from converter import gguf_variant

    reason = gguf_variant.unsupported(info.config, tokenizer_dir)
    if reason:
        raise BadInputError(f"--quantize {spec.method}: {reason}", hint=f"drop --quantize {spec.method} for this model")


def _by_module_name_check(spec: "QuantSpec", info, tokenizer_dir: Path) -> None:
    """A method written by module name alone (no transformers path): a model without plain linear layers, or whose
    checkpoint keys transformers converts, cannot have it."""
    linear = [f"{name}.weight" for name, kind in info.module_types.items()
              if kind == "Linear" and f"{name}.weight" != info.output_embedding]  # lm_head stays as it is
    renamed = sorted(info.converted) + [k for k in linear if info.model_to_ckpt.get(k, k) != k]
    if not linear:
        raise BadInputError(f"--quantize {spec.method}: this model has no nn.Linear layers to quantize (GPT-2's "
                            "Conv1D layers are not in the format)", hint=f"drop --quantize {spec.method} for this "
                            "model, or use a bitsandbytes method")
    if renamed:
        raise BadInputError(f"--quantize {spec.method}: the variant is written from the merged checkpoint by module "
                            f"name, and transformers converts this model's checkpoint keys ({renamed[0]})",
                            hint=f"drop --quantize {spec.method} for this model, or use a bitsandbytes method")


def _fp8_names(spec: "QuantSpec") -> list[str]:
    return ["weight", "weight_scale"]


def _4bit_names(spec: "QuantSpec") -> list[str]:
    quant_type = METHODS[spec.method].quant_type
    names = ["weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"]
    return names + (["weight.nested_absmax", "weight.nested_quant_map"] if spec.double_quant else [])


def _int8_size(numel: int, spec: "QuantSpec") -> int:
    return numel + numel // 16 + 1  # int8 weight, float32 scale per row (rows unknown here: bounded)


def _fp8_size(numel: int, spec: "QuantSpec") -> int:
    return numel + numel // 4 + 64  # codes, a scale per row or block (rows unknown here: bounded)


def _4bit_size(numel: int, spec: "QuantSpec") -> int:
    blocks = -(-numel // spec.blocksize)
    return (numel + 1) // 2 + blocks * (1 if spec.double_quant else 4) + 64 + 1024 + 256


@dataclass(frozen=True)
class Method:
    """One quantization method: its options (with defaults), default thresholds, math and config."""

    options: dict  # option -> default (the canonical, resolved value)
    thresholds: dict  # default max_kl and min_top1 of the variant against the merged model
    # the next three: for safetensors shards (None for a single-file format)
    quantize: Callable[[torch.Tensor, "QuantSpec"], dict[str, torch.Tensor]] | None
    config: Callable[["QuantSpec", "VariantPlan"], dict]  # config.json's quantization_config (a GGUF's: the receipt's)
    size: Callable[[int, "QuantSpec"], int] | None  # bytes written for one weight (shard planning)
    names: Callable[["QuantSpec"], list[str]] | None  # every tensor a quantized weight may become (module suffixes)
    tag: str  # the model card's tag, and bitsandbytes' quant_type for 4-bit methods
    quant_type: str | None = None
    package: str = "bitsandbytes"  # what is imported
    library: str = "bitsandbytes"  # its distribution (versions, install hints)
    conv1d: bool = True  # GPT-2's Conv1D weights are quantized too (bitsandbytes); else nn.Linear only
    loads_with: str = "bitsandbytes installed"  # what from_pretrained needs, for the card
    extra: str = "quantize"  # the converter extra that installs the library
    # a single-file format (GGUF): writes the whole variant from the merged directory into the variant's directory,
    # returns the tensor counts; None: safetensors shards, one quantized weight at a time (write_streaming)
    write_file: Callable[["QuantSpec", Path, Path, torch.device], dict] | None = None
    takes_skip: bool = True
    check: Callable[["QuantSpec", object, Path], None] | None = None  # what it cannot express of a model: refused
    by_rows: bool = False  # rows (or blocks of rows: ``block``) quantize on their own: a weight is done band by band


# Defaults are transformers' BitsAndBytesConfig defaults, so `bnb-nf4` is BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_type="nf4"). Default thresholds gate on mean KL and top-1 agreement only: they are meant to catch a
# broken variant (wrong scales, wrong layout), not to grade a good one, so tighten them for your models. max |Δlogit|
# is reported but bounded only when `max_logit_diff` is given: a maximum over every logit of random-token probes is
# dominated by outliers. Top-1 is lenient because random tokens give flat next-token distributions whose argmax flips
# at small changes.
METHODS: dict[str, Method] = {
    "bnb-int8": Method({"threshold": 6.0}, {"max_kl": 0.02, "min_top1": 0.8}, quantize_int8, _bnb_config(_int8_config),
                       _int8_size, _int8_names, tag="int8"),
    "bnb-nf4": Method({"double_quant": False, "compute_dtype": "float32", "blocksize": 64},
                      {"max_kl": 0.1, "min_top1": 0.5}, quantize_4bit, _bnb_config(_4bit_config), _4bit_size,
                      _4bit_names, tag="nf4", quant_type="nf4"),
    "bnb-fp4": Method({"double_quant": False, "compute_dtype": "float32", "blocksize": 64},
                      {"max_kl": 0.15, "min_top1": 0.5}, quantize_4bit, _bnb_config(_4bit_config), _4bit_size,
                      _4bit_names, tag="fp4", quant_type="fp4"),
    "fp8": Method({"block": None}, {"max_kl": 0.02, "min_top1": 0.8}, quantize_fp8, _fp8_config, _fp8_size,
                  _fp8_names, tag="fp8", package="compressed_tensors", library="compressed-tensors", conv1d=False,
                  loads_with="compressed-tensors installed; vLLM and SGLang serve it", extra="export", by_rows=True,
                  check=_by_module_name_check),
}
# GGUF: one file for llama.cpp, Ollama and LM Studio (transformers loads it with gguf_file=), in each tensor type of
# gguf_variant.GGUF_TYPES (kept equal by a test; gguf is only imported when a variant is made). f16 and bf16 keep the
# weights (near-exact); q8_0, q5_* and q4_* are llama.cpp's blocks of 32 values and a scale.
GGUF_THRESHOLDS = {"f16": {"max_kl": 1e-3, "min_top1": 0.95}, "bf16": {"max_kl": 1e-3, "min_top1": 0.95},
                   "q8_0": {"max_kl": 0.02, "min_top1": 0.8}, "q5_1": {"max_kl": 0.05, "min_top1": 0.6},
                   "q5_0": {"max_kl": 0.05, "min_top1": 0.6}, "q4_1": {"max_kl": 0.1, "min_top1": 0.5},
                   "q4_0": {"max_kl": 0.1, "min_top1": 0.5}}
METHODS.update({f"gguf-{t}": Method({}, thresholds, None, _gguf_config, None, None, tag=f"gguf-{t}", package="gguf",
                                    library="gguf", conv1d=False, loads_with="llama.cpp, Ollama and LM Studio load "
                                    "the .gguf file; transformers with gguf_file=", extra="export",
                                    write_file=_write_gguf, takes_skip=False, check=_gguf_check)
                for t, thresholds in GGUF_THRESHOLDS.items()})


# ---------------------------------------------------------------------------------------------------------------------
# Options: `METHOD[:key=value,...]` on the command line and in manifests (or a mapping in Python).
# ---------------------------------------------------------------------------------------------------------------------

def parse_method_string(text: str) -> dict:
    """``"bnb-nf4:blocksize=128,skip=lm_head,skip=mlp.down_proj"`` ->
    ``{"method": ..., "blocksize": "128", "skip": [...]}``."""
    method, _, rest = text.strip().partition(":")
    out: dict = {"method": method.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{text!r}: option {item!r} is not key=value (e.g. {method}:skip=lm_head)")
        if key == "skip":
            out.setdefault("skip", []).append(value.strip())
        elif key in out:
            raise ValueError(f"{text!r}: option {key} is given twice")
        else:
            out[key] = value.strip()
    return out


class QuantSpec(BaseModel):
    """One requested variant: the method and its resolved options (None: does not apply to this method)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    threshold: float | None = None  # bnb-int8: llm_int8_threshold (outlier threshold at inference)
    double_quant: bool | None = None  # 4-bit: bnb_4bit_use_double_quant
    compute_dtype: str | None = None  # 4-bit: bnb_4bit_compute_dtype
    blocksize: int | None = None  # 4-bit: quantization block size (recorded in each weight's quant_state)
    block: int | None = None  # fp8: block×block weight scales (the DeepSeek layout) instead of one per channel
    skip: tuple[str, ...] = ()  # modules kept unquantized, in addition to transformers' defaults (lm_head...)
    max_logit_diff: float | None = None  # thresholds; None: the method's default
    max_kl: float | None = None
    min_top1: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, value):
        if isinstance(value, str):
            value = parse_method_string(value)
        if not isinstance(value, dict):
            return value
        value = dict(value)
        name = value.get("method")
        if name not in METHODS:
            raise ValueError(f"unknown quantization method {name!r}; known methods: {', '.join(METHODS)}")
        method = METHODS[name]
        given = {k for k, v in value.items() if k != "method" and v is not None}
        allowed = set(method.options) | set(COMMON_OPTIONS if method.takes_skip else THRESHOLD_OPTIONS)
        wrong = sorted(given - allowed)
        if wrong:
            raise ValueError(f"{name} does not take option(s) {', '.join(wrong)}; "
                             f"it takes: {', '.join(sorted(allowed))}")
        for key, default in method.options.items():
            if value.get(key) is None:
                value[key] = default
        if isinstance(value.get("skip"), str):
            value["skip"] = [value["skip"]]
        return value

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.blocksize is not None and self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{self.method}: blocksize {self.blocksize} is not one of "
                             f"{', '.join(map(str, BLOCKSIZES))}")
        if self.block is not None and self.block not in FP8_BLOCKS:
            raise ValueError(f"{self.method}: block {self.block} is not one of {', '.join(map(str, FP8_BLOCKS))}")
        if self.compute_dtype is not None and self.compute_dtype not in QUANT_DTYPES:
            raise ValueError(f"{self.method}: compute_dtype {self.compute_dtype} is not one of "
                             f"{', '.join(QUANT_DTYPES)}")
        if any(not s for s in self.skip):
            raise ValueError(f"{self.method}: skip= needs a module name (e.g. skip=lm_head)")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ValueError(f"{self.method}: min_top1 {self.min_top1} is not within [0, 1]")
        return self

    def __str__(self) -> str:
        """The canonical ``METHOD:key=value,...`` form (parses back to an equal spec)."""
        opts = [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, value in self.options().items() for v in (value if isinstance(value, list) else [value])]
        return self.method + (":" + ",".join(opts) if opts else "")

    def options(self) -> dict:
        """The options that apply to this method (resolved), plus any set threshold."""
        d = self.model_dump(exclude={"method"})
        keep = set(METHODS[self.method].options) | {k for k in COMMON_OPTIONS if d.get(k)}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in keep and v is not None}

    def thresholds(self) -> dict:
        """max_logit_diff (None: not bounded), max_kl, min_top1: the method's defaults unless given."""
        given = {k: getattr(self, k) for k in THRESHOLD_OPTIONS if getattr(self, k) is not None}
        return {"max_logit_diff": None, **METHODS[self.method].thresholds, **given}


def check_available(specs) -> None:
    """Bad input, before any work: a requested method whose package is missing or broken."""
    problems, extras = [], set()
    for spec in specs:
        method = METHODS[spec.method]
        try:
            __import__(method.package)
        except Exception as exc:  # noqa: BLE001 - missing, or a broken native library
            problems.append(f"--quantize {spec.method} needs the {method.library} package, which cannot be imported "
                            f"here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            extras.add(method.extra)
    if problems:
        raise BadInputError(problems, hint=f"pip install 'converter[{','.join(sorted(extras))}]', or drop --quantize")


def check_layout(specs, info, tokenizer_dir: Path) -> None:
    """Bad input, before any work (``info``: modelinfo.ModelInfo; ``tokenizer_dir``: where the output's tokenizer
    comes from): what each requested method cannot express of this model."""
    for spec in specs:
        check = METHODS[spec.method].check
        if check is not None:
            check(spec, info, tokenizer_dir)


def card_words(spec: QuantSpec) -> tuple[str, str]:
    """(the model card's tag, what loading the variant needs) of a requested variant."""
    method = METHODS[spec.method]
    return method.tag, method.loads_with


def variant_dir(output: Path, spec: QuantSpec) -> Path:
    """``<output>-<method>``: where a quantized variant goes."""
    return output.with_name(f"{output.name}-{spec.method}")


# ---------------------------------------------------------------------------------------------------------------------
# What gets quantized: transformers' own rules, on a meta-device model (no memory).
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class VariantPlan:
    quantized: dict[str, bool]  # checkpoint key of a weight to quantize -> stored transposed (GPT-2 Conv1D)
    skip_modules: list[str] | None  # what goes in quantization_config.llm_int8_skip_modules
    fallback: str | None  # why the streaming path cannot be used (then transformers' path is)
    ignored: list[str] = field(default_factory=list)  # the linear modules left unquantized, by full name

    @property
    def engine(self) -> str:
        """How the variant is written: streaming, or transformers where checkpoint keys are not module names."""
        return "transformers" if self.fallback else "streaming"


def plan_variant(spec: QuantSpec, merged_dir: Path, model_cls, ckpt_shapes: dict[str, tuple[int, ...]],
                 trust_remote_code: bool) -> VariantPlan:
    """Which weights transformers would quantize (its own rules, on a meta-device model). With fp8 blocks, a
    weight whose sides are not multiples of the block is left as it is (compressed-tensors cannot load it)."""
    from torch import nn
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer, get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = model_cls._from_config(config)
    skip_modules = None
    if spec.skip:  # transformers replaces its defaults by a given list: write the union, so nothing is lost
        skip_modules = sorted(set(get_keys_to_not_convert(model)) | set(spec.skip))
    not_convert = HfQuantizer.get_modules_to_not_convert(model, skip_modules, model._keep_in_fp32_modules)
    quantized, missing, ignored = {}, [], []
    for name, module in model.named_modules():
        linear = (METHODS[spec.method].conv1d and isinstance(module, Conv1D)) or type(module) is nn.Linear
        if not linear:
            continue
        key = f"{name}.weight"
        if not should_convert_module(name, not_convert) or not _fits_blocks(ckpt_shapes.get(key), spec.block):
            ignored.append(name)
            continue
        if key in ckpt_shapes:
            quantized[key] = isinstance(module, Conv1D)
        else:
            missing.append(key)
    fallback = None
    if missing:
        fallback = (f"checkpoint keys differ from module names ({missing[0]} is not a key of the merged checkpoint): "
                    "transformers' own loader maps them")
    elif not quantized:
        raise MergeError(f"--quantize {spec.method}: the model has no linear layers to quantize")
    return VariantPlan(quantized, skip_modules, fallback, ignored)


def _fits_blocks(shape: tuple[int, ...] | None, block: int | None) -> bool:
    return block is None or shape is None or all(side % block == 0 for side in shape)


# ---------------------------------------------------------------------------------------------------------------------
# Writing: shard by shard, each weight quantized as it is read from the merged output.
# ---------------------------------------------------------------------------------------------------------------------

def write_streaming(spec: QuantSpec, plan: VariantPlan, merged: Checkpoint, out_dir: Path, dtype: torch.dtype,
                    device: torch.device, max_shard_size: str) -> dict:
    """Quantize the planned weights of ``merged`` one at a time into ``out_dir``; other tensors are carried over.
    Returns the count of weights quantized and of tensors kept."""
    from huggingface_hub import split_state_dict_into_shards_factory

    method = METHODS[spec.method]
    sizes = {name: method.size(s.numel, spec) if name in plan.quantized else
             s.numel * (dtype.itemsize if s.dtype.is_floating_point else s.dtype.itemsize)
             for name, s in merged.specs.items()}
    split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n, max_shard_size=max_shard_size,
                                                 filename_pattern="model{suffix}.safetensors")
    weight_map, total, counts = {}, 0, {"quantized": 0, "kept": 0}
    for fname, sources in split.filename_to_tensors.items():
        names = [f"{n.removesuffix('.weight')}.{k}" for n in sources if n in plan.quantized for k in method.names(spec)]
        shard = AppendingShard(out_dir / fname, names + [n for n in sources if n not in plan.quantized])
        try:
            for name in sources:
                _write_one(shard, name, merged, spec, plan, dtype, device, counts)
        finally:
            shard.close()
        total += shard.offset
        weight_map.update(dict.fromkeys(shard.entries, fname))
    if split.is_sharded:
        write_index(out_dir, dict(sorted(weight_map.items())), total)
    return counts


def _write_one(shard: AppendingShard, name: str, merged: Checkpoint, spec: QuantSpec, plan: VariantPlan,
               dtype: torch.dtype, device: torch.device, counts: dict) -> None:
    source = merged.specs[name]
    if name not in plan.quantized:  # carried over, band by band (checkpoint.row_bands)
        kept = dtype if source.dtype.is_floating_point else source.dtype
        shard.write_bands(name, kept, source.shape, (b.to(kept) for b in row_bands(source)))
        counts["kept"] += 1
        return
    method, prefix = METHODS[spec.method], name.removesuffix(".weight")
    if method.by_rows:  # fp8: codes band by band, the bands' scales after them
        scales = []

        def codes():
            for band in row_bands(source, spec.block or 1):
                out = method.quantize(band.to(device=device, dtype=dtype), spec)
                scales.append(out["weight_scale"].cpu())
                yield out["weight"]

        shard.write_bands(f"{prefix}.weight", torch.float8_e4m3fn, source.shape, codes())
        shard.write(f"{prefix}.weight_scale", torch.cat(scales))
    else:  # bitsandbytes: the whole weight (4-bit blocks run across rows; Conv1D is stored (in, out))
        w = merged.get(name).to(device=device, dtype=dtype)
        for k, v in method.quantize(w.T if plan.quantized[name] else w, spec).items():
            shard.write(f"{prefix}.{k}", v)
    counts["quantized"] += 1


def write_with_transformers(spec: QuantSpec, plan: VariantPlan, model_cls, merged_dir: Path, out_dir: Path,
                            dtype: torch.dtype, max_shard_size: str, trust_remote_code: bool) -> dict:
    """The fallback: transformers loads the whole merged model quantized and saves it (no forward before the save)."""
    from transformers import BitsAndBytesConfig

    if METHODS[spec.method].library != "bitsandbytes":  # refused before any work (_by_module_name_check)
        raise MergeError(f"--quantize {spec.method}: {plan.fallback}, and only bitsandbytes variants can be written "
                         "through transformers")
    qc = BitsAndBytesConfig.from_dict(quantization_config(spec, plan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls.from_pretrained(merged_dir, quantization_config=qc, dtype=dtype,
                                          trust_remote_code=trust_remote_code)
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    counts = {"quantized": sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))}
    del model
    gc.collect()
    return counts


def quantization_config(spec: QuantSpec, plan: VariantPlan) -> dict:
    """config.json's ``quantization_config``, as the method's own library writes it."""
    return METHODS[spec.method].config(spec, plan)


def weights_size(directory: Path) -> int:
    """Bytes of a checkpoint directory's weight files and index."""
    return sum(p.stat().st_size for p in Path(directory).iterdir()
               if p.name.endswith((".safetensors", ".gguf")) or p.name == "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------------------
# One variant, start to finish: plan, write, config and companion files, figures from disk, judgement.
# ---------------------------------------------------------------------------------------------------------------------

def produce_variants(job, inputs, merged_dir: Path, model_fits: bool, timings: dict) -> list[Variant]:
    """Each variant the job asks for, written into ``<output>-<method>.partial`` from the merged shards and
    measured against them; raises VerificationError for one over its thresholds."""
    if not job.quantize:
        return []
    t = time.perf_counter()
    measure = True if model_fits else "the model does not fit this worker's memory"
    if job.verify == "none":
        measure = "--verify none"
    variants = []
    for spec in job.quantize:
        unreadable = METHODS[spec.method].library == "gguf" and not _transformers_reads(inputs.info.config)
        why = f"transformers' GGUF loader does not read {inputs.info.config.get('model_type')} files back"
        out_dir = publish.fresh_dir(publish.partial_dir(variant_dir(job.output, spec)))
        variant = produce_variant(spec, merged_dir, out_dir, model_cls=inputs.info.model_cls, dtype=inputs.out_dtype,
                                  device=resolve_device(job.device), max_shard_size=job.max_shard_size,
                                  trust_remote_code=job.trust_remote_code,
                                  measure=why if unreadable and measure is True else measure)
        if variant.note:
            log.warning(variant.note)
        variants.append(variant)
    timings["quantize_s"] = round(time.perf_counter() - t, 3)
    return variants


def produce_variant(spec: QuantSpec, merged_dir: Path, out_dir: Path, *, model_cls, dtype: torch.dtype,
                    device: torch.device, max_shard_size: str, trust_remote_code: bool, measure: bool | str) -> Variant:
    """Write the ``spec`` variant of the merged checkpoint ``merged_dir`` into ``out_dir``; returns its record.

    ``measure``: True to compute and judge the figures; a string (why not) to skip them.
    Raises VerificationError when the reloaded variant is over its thresholds.
    """
    t0 = time.perf_counter()
    plan, counts, write_peak = _write_variant(spec, merged_dir, out_dir, model_cls, dtype, device, max_shard_size,
                                              trust_remote_code)
    single_file = METHODS[spec.method].write_file is not None
    if not single_file:
        publish.copy_companions(merged_dir, out_dir, skip_existing=True)
    size, merged_size = weights_size(out_dir), weights_size(merged_dir)
    variant = Variant(
        method=spec.method, spec=str(spec), options=spec.options(), engine=plan.engine, engine_reason=plan.fallback,
        path=str(out_dir.with_name(out_dir.name.removesuffix(publish.PARTIAL_SUFFIX))),
        quantization_config=quantization_config(spec, plan), tensors=counts, size_bytes=size,
        merged_size_bytes=merged_size, size_ratio=round(size / merged_size, 4) if merged_size else None,
        thresholds=spec.thresholds(), library=f"{METHODS[spec.method].library} "
        f"{metadata.version(METHODS[spec.method].library)}",
        bitsandbytes=metadata.version("bitsandbytes") if METHODS[spec.method].library == "bitsandbytes" else None,
        timings={"write_s": round(time.perf_counter() - t0, 3)}, peak_rss_bytes={"write": write_peak})
    if measure is not True:
        return variant.model_copy(update={"note": f"quality figures not measured: {measure}"})
    t = time.perf_counter()
    figures = variant_figures(model_cls, merged_dir, out_dir, trust_remote_code,
                              {"gguf_file": gguf_file_name(spec)} if single_file else None)
    timings = {**variant.timings, "figures_s": round(time.perf_counter() - t, 3)}
    variant = variant.model_copy(update={"figures": figures, "timings": timings})
    failures = judge_variant(figures, variant.thresholds)
    if failures:
        raise VerificationError(
            f"the {spec.method} variant, reloaded from disk, is too far from the merged model: {'; '.join(failures)}. "
            f"Nothing was published. Loosen its thresholds only if this is expected "
            f"(e.g. --quantize '{spec.method}:max_kl=0.2,min_top1=0.6'), or choose another method")
    return variant


def _write_variant(spec: QuantSpec, merged_dir: Path, out_dir: Path, model_cls, dtype: torch.dtype, device,
                   max_shard_size: str, trust_remote_code: bool) -> tuple[VariantPlan, dict, int]:
    """(plan, tensor counts, peak RSS while writing): streamed where checkpoint keys are module names,
    else through transformers."""
    write_file = METHODS[spec.method].write_file
    if write_file is not None:  # one file (GGUF), written from the merged directory tensor by tensor
        reset_peak_rss()
        return VariantPlan({}, None, None), write_file(spec, merged_dir, out_dir, device), peak_rss_bytes()
    merged = Checkpoint(merged_dir)
    plan = plan_variant(spec, merged_dir, model_cls, {k: s.shape for k, s in merged.specs.items()},
                        trust_remote_code)
    reset_peak_rss()
    if plan.fallback is not None:
        counts = write_with_transformers(spec, plan, model_cls, merged_dir, out_dir, dtype, max_shard_size,
                                         trust_remote_code)
        return plan, counts, peak_rss_bytes()
    counts = write_streaming(spec, plan, merged, out_dir, dtype, device, max_shard_size)
    config = json.loads((merged_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(spec, plan)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return plan, counts, peak_rss_bytes()
