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
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from converter.checkpoint import DTYPE_NAMES, Checkpoint
from converter.errors import BadInputError, MergeError, write_failure

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

    packed, state = F.quantize_4bit(weight.contiguous(), blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                                    quant_type=spec.method.removeprefix("bnb-"), quant_storage=torch.uint8)
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _int8_config(spec: "QuantSpec") -> dict:
    return {"load_in_8bit": True, "llm_int8_threshold": spec.threshold}


def _4bit_config(spec: "QuantSpec") -> dict:
    return {"load_in_4bit": True, "bnb_4bit_quant_type": spec.method.removeprefix("bnb-"),
            "bnb_4bit_use_double_quant": spec.double_quant, "bnb_4bit_compute_dtype": getattr(torch, spec.compute_dtype)}


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
    package: str = "bitsandbytes"


# Defaults are transformers' BitsAndBytesConfig defaults, so `bnb-nf4` is BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_type="nf4"). Default thresholds gate on mean KL and top-1 agreement only: they are meant to catch a
# broken variant (wrong scales, wrong layout), not to grade a good one, so tighten them for your models. max |Δlogit|
# is reported but bounded only when `max_logit_diff` is given: a maximum over every logit of random-token probes is
# dominated by outliers. Top-1 is lenient because random tokens give flat next-token distributions whose argmax flips
# at small changes.
METHODS: dict[str, Method] = {
    "bnb-int8": Method({"threshold": 6.0}, {"max_kl": 0.02, "min_top1": 0.8}, quantize_int8, _int8_config, _int8_size),
    "bnb-nf4": Method({"double_quant": False, "compute_dtype": "float32", "blocksize": 64},
                      {"max_kl": 0.1, "min_top1": 0.5}, quantize_4bit, _4bit_config, _4bit_size),
    "bnb-fp4": Method({"double_quant": False, "compute_dtype": "float32", "blocksize": 64},
                      {"max_kl": 0.15, "min_top1": 0.5}, quantize_4bit, _4bit_config, _4bit_size),
}


# ---------------------------------------------------------------------------------------------------------------------
# Options: `METHOD[:key=value,...]` on the command line and in manifests (or a mapping in Python).
# ---------------------------------------------------------------------------------------------------------------------

def parse_method_string(text: str) -> dict:
    """``"bnb-nf4:blocksize=128,skip=lm_head,skip=mlp.down_proj"`` -> ``{"method": ..., "blocksize": "128", "skip": [...]}``."""
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
            raise ValueError(f"{name} does not take option(s) {', '.join(wrong)}; it takes: {', '.join(sorted(allowed))}")
        for key, default in method.options.items():
            if value.get(key) is None:
                value[key] = default
        if isinstance(value.get("skip"), str):
            value["skip"] = [value["skip"]]
        return value

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.blocksize is not None and self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{self.method}: blocksize {self.blocksize} is not one of {', '.join(map(str, BLOCKSIZES))}")
        if self.compute_dtype is not None and self.compute_dtype not in QUANT_DTYPES:
            raise ValueError(f"{self.method}: compute_dtype {self.compute_dtype} is not one of {', '.join(QUANT_DTYPES)}")
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


def judge(figures: dict, thresholds: dict) -> list[str]:
    """What is over its threshold (KL and top-1 are None for models without logits: only max |Δ| applies)."""
    failures = []
    bound = thresholds["max_logit_diff"]
    if bound is not None and not figures["max_abs_diff"] <= bound:
        failures.append(f"max |Δlogit| {figures['max_abs_diff']:.3g} > {bound:g}")
    if figures["kl"] is not None and not figures["kl"] <= thresholds["max_kl"]:
        failures.append(f"mean KL {figures['kl']:.3g} > {thresholds['max_kl']:g}")
    if figures["top1"] is not None and not figures["top1"] >= thresholds["min_top1"]:
        failures.append(f"top-1 agreement {figures['top1']:.3f} < {thresholds['min_top1']:g}")
    return failures


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
        return "transformers" if self.fallback else "streaming"


def plan_variant(spec: QuantSpec, merged_dir: Path, model_cls, ckpt_keys: set[str], trust_remote_code: bool) -> VariantPlan:
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
        if not should_convert_module(name, not_convert) or not (isinstance(module, Conv1D) or type(module) is nn.Linear):
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
# Writing: a safetensors shard whose header is filled in last (a packed quant_state's length is known only after
# quantizing), in a space reserved up front and padded with spaces as safetensors allows.
# ---------------------------------------------------------------------------------------------------------------------

_ENTRY_BOUND = 160  # bytes of header JSON per tensor beyond its quoted name (dtype, shape, offsets up to 10^15)


class _ShardFile:
    def __init__(self, path: Path, names: list[str]):
        self.path = path
        bound = 64 + sum(len(json.dumps(n)) + _ENTRY_BOUND for n in names)
        self.reserved = bound + (-(bound + 8) % 8)
        self.entries: dict = {}
        self.offset = 0
        try:
            self.file = open(path, "wb")
            self.file.write(b"\0" * (8 + self.reserved))
        except OSError as exc:
            raise write_failure(exc, "writing", path) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        self.entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + tensor.numel() * tensor.element_size()]}
        self.offset += tensor.numel() * tensor.element_size()
        try:
            self.file.write(memoryview(data))
        except OSError as exc:
            raise write_failure(exc, "writing", self.path) from None

    def close(self) -> None:
        raw = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(raw) > self.reserved:
            raise MergeError(f"internal: safetensors header of {self.path.name} outgrew its reserved space")
        raw += b" " * (self.reserved - len(raw))
        try:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", len(raw)) + raw)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise write_failure(exc, "writing", self.path) from None
        finally:
            self.file.close()


def write_streaming(spec: QuantSpec, plan: VariantPlan, merged: Checkpoint, out_dir: Path, dtype: torch.dtype,
                    device: torch.device, max_shard_size: str) -> dict:
    """Quantize the planned weights of ``merged`` one at a time into ``out_dir``; other tensors are carried over."""
    from huggingface_hub import split_state_dict_into_shards_factory

    method = METHODS[spec.method]
    sizes = {}
    for name, s in merged.specs.items():
        sizes[name] = method.size(s.numel, spec) if name in plan.quantized else \
            s.numel * (dtype.itemsize if s.dtype.is_floating_point else s.dtype.itemsize)
    split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n, max_shard_size=max_shard_size,
                                                 filename_pattern="model{suffix}.safetensors")
    weight_map, total, counts = {}, 0, {"quantized": 0, "kept": 0}
    for fname, sources in split.filename_to_tensors.items():
        names = [f"{n.removesuffix('.weight')}.{k}" for n in sources if n in plan.quantized for k in _suffixes(spec)]
        names += [n for n in sources if n not in plan.quantized]
        shard = _ShardFile(out_dir / fname, names)
        try:
            for name in sources:
                tensor = merged.get(name)
                if name in plan.quantized:
                    w = tensor.to(device=device, dtype=dtype)
                    out = method.quantize(w.T if plan.quantized[name] else w, spec)  # Conv1D is stored (in, out)
                    prefix = name.removesuffix(".weight")
                    for k, v in out.items():
                        shard.write(f"{prefix}.{k}", v)
                    counts["quantized"] += 1
                else:
                    shard.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                    counts["kept"] += 1
                del tensor
        finally:
            shard.close()
        total += shard.offset
        weight_map.update(dict.fromkeys(shard.entries, fname))
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return counts


def _suffixes(spec: QuantSpec) -> list[str]:
    """Every tensor name a quantized weight may produce (an upper bound for the header)."""
    if spec.method == "bnb-int8":
        return ["weight", "SCB", "weight_format"]
    names = ["weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{spec.method[4:]}"]
    return names + (["weight.nested_absmax", "weight.nested_quant_map"] if spec.double_quant else [])


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

    return BitsAndBytesConfig(**METHODS[spec.method].bnb_config(spec), llm_int8_skip_modules=plan.skip_modules).to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# Figures: the variant reloaded from disk against the merged model, on the same probe inputs.
# ---------------------------------------------------------------------------------------------------------------------

def quality_figures(model_cls, merged_dir: Path, variant: Path, trust_remote_code: bool = False) -> dict:
    from converter.verify import _outputs, compare, probe_inputs

    # Both in the checkpoint's own dtype, as they would be served: what serving the variant instead costs. (A bnb
    # checkpoint loaded in another dtype can come out with mixed dtypes: GPT-2's LayerNorms stay bfloat16.)
    kw = dict(dtype="auto", trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model_cls.from_pretrained(merged_dir, **kw).eval()
        inputs = probe_inputs(merged.config, batch=4, length=32)
        ref, is_logits = _outputs(merged, inputs)
        del merged
        gc.collect()
        model = model_cls.from_pretrained(variant, **kw).eval()  # a fresh load: judge the files, not a live layer
        device = next(model.parameters()).device
        got, _ = _outputs(model, {k: v.to(device) for k, v in inputs.items()})
        del model
        gc.collect()
    return compare(ref.float(), got.float().cpu(), is_logits)


def weights_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir()
               if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------------------
# One variant, start to finish: plan, write, config and companion files, figures from disk, judgement.
# ---------------------------------------------------------------------------------------------------------------------

def produce_variant(spec: QuantSpec, merged_dir: Path, out_dir: Path, *, model_cls, dtype: torch.dtype,
                    device: torch.device, max_shard_size: str, trust_remote_code: bool, measure: bool | str) -> dict:
    """Write the ``spec`` variant of the merged checkpoint ``merged_dir`` into ``out_dir``; returns its receipt entry.

    ``measure``: True to compute and judge the figures; a string (why not) to skip them.
    Raises VerificationError when the reloaded variant is over its thresholds.
    """
    import time
    from importlib import metadata

    from converter.resources import peak_rss_bytes, reset_peak_rss

    t0 = time.perf_counter()
    merged = Checkpoint(merged_dir)
    plan = plan_variant(spec, merged_dir, model_cls, set(merged.specs), trust_remote_code)
    reset_peak_rss()
    if plan.fallback is None:
        counts = write_streaming(spec, plan, merged, out_dir, dtype, device, max_shard_size)
        config = json.loads((merged_dir / "config.json").read_text())
        config["quantization_config"] = quantization_config(spec, plan)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        counts = write_with_transformers(spec, plan, model_cls, merged_dir, out_dir, dtype, max_shard_size,
                                         trust_remote_code)
    write_peak = peak_rss_bytes()
    _copy_companions(merged_dir, out_dir)
    t_write = time.perf_counter() - t0
    size, merged_size = weights_size(out_dir), weights_size(merged_dir)
    thresholds = spec.thresholds()
    entry = {
        "method": spec.method, "spec": str(spec), "options": spec.options(), "engine": plan.engine,
        "engine_reason": plan.fallback, "path": str(out_dir.with_name(out_dir.name.removesuffix(".partial"))),
        "quantization_config": quantization_config(spec, plan),
        "tensors": counts, "size_bytes": size, "merged_size_bytes": merged_size,
        "size_ratio": round(size / merged_size, 4) if merged_size else None,
        "figures": None, "thresholds": thresholds, "passed": True, "note": None,
        "bitsandbytes": metadata.version("bitsandbytes"),
        "timings": {"write_s": round(t_write, 3)}, "peak_rss_bytes": {"write": write_peak},
    }
    if measure is not True:
        entry["note"] = f"quality figures not measured: {measure}"
        return entry
    t = time.perf_counter()
    entry["figures"] = quality_figures(model_cls, merged_dir, out_dir, trust_remote_code)
    entry["timings"]["figures_s"] = round(time.perf_counter() - t, 3)
    failures = judge(entry["figures"], thresholds)
    if failures:
        from converter.errors import VerificationError

        entry["passed"] = False
        raise VerificationError(
            f"the {spec.method} variant, reloaded from disk, is too far from the merged model: {'; '.join(failures)}. "
            f"Nothing was published. Loosen its thresholds only if this is expected "
            f"(e.g. --quantize '{spec.method}:max_kl=0.2,min_top1=0.6'), or choose another method")
    return entry


def _copy_companions(merged_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config, templates...: everything of the merged output but weights and our own files."""
    import shutil

    from converter.publish import SKIP_BASE, WEIGHT_SUFFIXES

    for src in sorted(merged_dir.rglob("*")):
        rel = src.relative_to(merged_dir)
        if not src.is_file() or src.name.endswith(WEIGHT_SUFFIXES) or (len(rel.parts) == 1 and src.name in SKIP_BASE):
            continue
        dst = out_dir / rel
        if len(rel.parts) == 1 and dst.exists():  # written by save_pretrained (transformers path)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
