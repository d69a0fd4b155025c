"""Post-merge quantization: bitsandbytes variants, written tensor by tensor from the merged shards.

A variant is what ``from_pretrained(merged, quantization_config=BitsAndBytesConfig(...))``
followed by ``save_pretrained`` would write (same tensor names, dtypes and
``quantization_config``), made without loading the model: each linear weight is read from
the merged output, quantized with bitsandbytes' functional API and written straight into
its shard, so peak memory is about one tensor. Where checkpoint keys are not the module
names (transformers' key conversions), the transformers path is used instead and the
receipt says so. Quality figures always come from the variant reloaded from disk.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from converter import publish
from converter.checkpoint import Checkpoint
from converter.errors import BadInputError, MergeError, VerificationError
from converter.receipt import Variant
from converter.resources import peak_rss_bytes, reset_peak_rss, resolve_device
from converter.verify import judge_variant, variant_figures
from converter.writer import AppendingShard, write_index

log = logging.getLogger("converter")

QUANT_DTYPES = ("float32", "bfloat16", "float16")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
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


def _int8_config(spec: "QuantSpec") -> dict:
    return {"load_in_8bit": True, "llm_int8_threshold": spec.threshold}


def _4bit_config(spec: "QuantSpec") -> dict:
    return {"load_in_4bit": True, "bnb_4bit_quant_type": METHODS[spec.method].quant_type,
            "bnb_4bit_use_double_quant": spec.double_quant,
            "bnb_4bit_compute_dtype": getattr(torch, spec.compute_dtype)}


def _int8_names(spec: "QuantSpec") -> list[str]:
    return ["weight", "SCB", "weight_format"]


def _4bit_names(spec: "QuantSpec") -> list[str]:
    quant_type = METHODS[spec.method].quant_type
    names = ["weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"]
    return names + (["weight.nested_absmax", "weight.nested_quant_map"] if spec.double_quant else [])


def _int8_size(numel: int, spec: "QuantSpec") -> int:
    return numel + numel // 16 + 1  # int8 weight, float32 scale per row (rows unknown here: bounded)


def _4bit_size(numel: int, spec: "QuantSpec") -> int:
    blocks = -(-numel // spec.blocksize)
    return (numel + 1) // 2 + blocks * (1 if spec.double_quant else 4) + 64 + 1024 + 256


@dataclass(frozen=True)
class Method:
    """One quantization method: its options (with defaults), default thresholds, math and config."""

    options: dict  # option -> default (the canonical, resolved value)
    thresholds: dict  # default max_kl and min_top1 of the variant against the merged model
    quantize: Callable[[torch.Tensor, "QuantSpec"], dict[str, torch.Tensor]]
    bnb_config: Callable[["QuantSpec"], dict]  # BitsAndBytesConfig keyword arguments
    size: Callable[[int, "QuantSpec"], int]  # bytes written for one weight (shard planning)
    names: Callable[["QuantSpec"], list[str]]  # every tensor a quantized weight may become (suffixes of the module)
    tag: str  # the model card's tag, and bitsandbytes' quant_type for 4-bit methods
    quant_type: str | None = None
    package: str = "bitsandbytes"


# Defaults are transformers' BitsAndBytesConfig defaults, so `bnb-nf4` is BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_type="nf4"). Default thresholds gate on mean KL and top-1 agreement only: they are meant to catch a
# broken variant (wrong scales, wrong layout), not to grade a good one, so tighten them for your models. max |Δlogit|
# is reported but bounded only when `max_logit_diff` is given: a maximum over every logit of random-token probes is
# dominated by outliers. Top-1 is lenient because random tokens give flat next-token distributions whose argmax flips
# at small changes.
METHODS: dict[str, Method] = {
    "bnb-int8": Method({"threshold": 6.0}, {"max_kl": 0.02, "min_top1": 0.8}, quantize_int8, _int8_config, _int8_size,
                       _int8_names, tag="int8"),
    "bnb-nf4": Method({"double_quant": False, "compute_dtype": "float32", "blocksize": 64},
                      {"max_kl": 0.1, "min_top1": 0.5}, quantize_4bit, _4bit_config, _4bit_size, _4bit_names,
                      tag="nf4", quant_type="nf4"),
    "bnb-fp4": Method({"double_quant": False, "compute_dtype": "float32", "blocksize": 64},
                      {"max_kl": 0.15, "min_top1": 0.5}, quantize_4bit, _4bit_config, _4bit_size, _4bit_names,
                      tag="fp4", quant_type="fp4"),
}


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
        allowed = set(method.options) | set(COMMON_OPTIONS)
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
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in keep}

    def thresholds(self) -> dict:
        """max_logit_diff (None: not bounded), max_kl, min_top1: the method's defaults unless given."""
        given = {k: getattr(self, k) for k in THRESHOLD_OPTIONS if getattr(self, k) is not None}
        return {"max_logit_diff": None, **METHODS[self.method].thresholds, **given}


def check_available(specs) -> None:
    """Bad input, before any work: a requested method whose package is missing or broken."""
    problems = []
    for spec in specs:
        package = METHODS[spec.method].package
        try:
            __import__(package)
        except Exception as exc:  # noqa: BLE001 - missing, or a broken native library
            problems.append(f"--quantize {spec.method} needs the {package} package, which cannot be imported here "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if problems:
        raise BadInputError(problems, hint="pip install 'converter[quantize]' (bitsandbytes), or drop --quantize")


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

    @property
    def engine(self) -> str:
        """How the variant is written: streaming, or transformers where checkpoint keys are not module names."""
        return "transformers" if self.fallback else "streaming"


def plan_variant(spec: QuantSpec, merged_dir: Path, model_cls, ckpt_keys: set[str],
                 trust_remote_code: bool) -> VariantPlan:
    """Which weights transformers would quantize (its own rules, on a meta-device model)."""
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
    quantized, missing = {}, []
    for name, module in model.named_modules():
        linear = isinstance(module, Conv1D) or type(module) is nn.Linear
        if not linear or not should_convert_module(name, not_convert):
            continue
        key = f"{name}.weight"
        if key in ckpt_keys:
            quantized[key] = isinstance(module, Conv1D)
        else:
            missing.append(key)
    fallback = None
    if missing:
        fallback = (f"checkpoint keys differ from module names ({missing[0]} is not a key of the merged checkpoint): "
                    "transformers' own loader maps them")
    elif not quantized:
        raise MergeError(f"--quantize {spec.method}: the model has no linear layers to quantize")
    return VariantPlan(quantized, skip_modules, fallback)


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
                _write_one(shard, name, merged.get(name), spec, plan, dtype, device, counts)
        finally:
            shard.close()
        total += shard.offset
        weight_map.update(dict.fromkeys(shard.entries, fname))
    if split.is_sharded:
        write_index(out_dir, dict(sorted(weight_map.items())), total)
    return counts


def _write_one(shard: AppendingShard, name: str, tensor: torch.Tensor, spec: QuantSpec, plan: VariantPlan,
               dtype: torch.dtype, device: torch.device, counts: dict) -> None:
    if name not in plan.quantized:
        shard.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        counts["kept"] += 1
        return
    w = tensor.to(device=device, dtype=dtype)
    out = METHODS[spec.method].quantize(w.T if plan.quantized[name] else w, spec)  # Conv1D is stored (in, out)
    prefix = name.removesuffix(".weight")
    for k, v in out.items():
        shard.write(f"{prefix}.{k}", v)
    counts["quantized"] += 1


def write_with_transformers(spec: QuantSpec, plan: VariantPlan, model_cls, merged_dir: Path, out_dir: Path,
                            dtype: torch.dtype, max_shard_size: str, trust_remote_code: bool) -> dict:
    """The fallback: transformers loads the whole merged model quantized and saves it (no forward before the save)."""
    from transformers import BitsAndBytesConfig

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
    """config.json's ``quantization_config``: BitsAndBytesConfig.to_dict(), as save_pretrained writes it."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(**METHODS[spec.method].bnb_config(spec), llm_int8_skip_modules=plan.skip_modules)
    return config.to_dict()


def weights_size(directory: Path) -> int:
    """Bytes of a checkpoint directory's weight files and index."""
    return sum(p.stat().st_size for p in Path(directory).iterdir()
               if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json")


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
        out_dir = publish.fresh_dir(publish.partial_dir(variant_dir(job.output, spec)))
        variant = produce_variant(spec, merged_dir, out_dir, model_cls=inputs.info.model_cls, dtype=inputs.out_dtype,
                                  device=resolve_device(job.device), max_shard_size=job.max_shard_size,
                                  trust_remote_code=job.trust_remote_code, measure=measure)
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
    publish.copy_companions(merged_dir, out_dir, skip_existing=True)
    size, merged_size = weights_size(out_dir), weights_size(merged_dir)
    variant = Variant(
        method=spec.method, spec=str(spec), options=spec.options(), engine=plan.engine, engine_reason=plan.fallback,
        path=str(out_dir.with_name(out_dir.name.removesuffix(publish.PARTIAL_SUFFIX))),
        quantization_config=quantization_config(spec, plan), tensors=counts, size_bytes=size,
        merged_size_bytes=merged_size, size_ratio=round(size / merged_size, 4) if merged_size else None,
        thresholds=spec.thresholds(), bitsandbytes=metadata.version("bitsandbytes"),
        timings={"write_s": round(time.perf_counter() - t0, 3)}, peak_rss_bytes={"write": write_peak})
    if measure is not True:
        return variant.model_copy(update={"note": f"quality figures not measured: {measure}"})
    t = time.perf_counter()
    figures = variant_figures(model_cls, merged_dir, out_dir, trust_remote_code)
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
    merged = Checkpoint(merged_dir)
    plan = plan_variant(spec, merged_dir, model_cls, set(merged.specs), trust_remote_code)
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
