"""The receipt of a conversion (``conversion.json``) as typed values, and the model cards that show it.

Every part is built by the step that knows it (the merge engine's counts, verification's
figures, each variant's record); ``convert`` puts them together once, and every reader (the
CLI summary, the model cards, the Ray ledger) uses these fields. The JSON layout is the one
``conversion.json`` has always had.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from converter.engines import Merged
    from converter.errors import JobWarning
    from converter.inputs import Inputs
    from converter.options import MergeJob
    from converter.sources import Resolved
    from converter.stack import Part

RECEIPT = "conversion.json"
SCHEMA = 1


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Counts(_Part):
    """Tensors of the output by what happened to them; ``changed``: those whose bytes differ from the base's."""

    merged: int
    replaced: int
    copied: int
    added: int
    changed: int


class Requantization(_Part):
    """Weights re-encoded in the base's format (--keep-quantization), against the dense merge they came from."""

    tensors: int
    max_rel_err: float  # max over weights (and row blocks) of max |decode(encode(W')) − W'| / max |W'|


class BaseFormat(_Part):
    """A quantized base: the codec that decoded it, what the merge targeted and what the output is."""

    quant_method: str
    codec: str
    decoded: int  # weights stored quantized, decoded by the codec
    merge_target: str = "the dequantized weights (what the adapter saw in training), never the codes"
    output: str  # "dense" (in the output dtype, no quantization_config) | "kept" (the base's own format)
    requantized: Requantization | None = None


class Source(_Part):
    """Where a base or an adapter came from, and the sha256 of each of its weight files."""

    source: str
    repo: str | None = None
    revision: str | None = None
    sha: str | None = None
    path: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
    format: BaseFormat | None = None  # a base stored quantized


class AdapterSource(Source):
    recorded_base_revision: str | None = None
    peft_type: str
    options: dict = Field(default_factory=dict)
    weight: float | None = None  # its weight in a weighted mix


class Figures(_Part):
    """One model's outputs against another's on the same probe inputs (KL and top-1 only for logits)."""

    max_abs_diff: float
    max_rel_diff: float | None = None
    kl: float | None = None
    top1: float | None = None


class FullCheck(Figures):
    tolerance: dict
    how: str = "in memory"  # "in memory" (both models loaded whole) | "streamed" (block by block from disk)
    seconds: float | None = None
    peak_rss_bytes: int | None = None  # this process's peak while the check ran


class ModuleCheck(_Part):
    checked: int
    max_rel_err: float
    tolerance: float


class Verification(_Part):
    """What verification was asked for, what ran (``level``), and its figures."""

    requested: str
    level: str = "none"
    passed: bool = True
    note: str | None = None
    modules: ModuleCheck | None = None
    full: FullCheck | None = None


class Variant(_Part):
    """One quantized variant: how it was made, its size and its figures against the merged model."""

    method: str
    spec: str
    options: dict
    engine: str
    engine_reason: str | None = None
    path: str
    quantization_config: dict
    tensors: dict[str, int]
    size_bytes: int
    merged_size_bytes: int
    size_ratio: float | None = None
    figures: Figures | None = None
    thresholds: dict
    passed: bool = True
    note: str | None = None
    library: str | None = None  # what wrote it, with its version ("compressed-tensors 0.20.0")
    bitsandbytes: str | None = None  # bitsandbytes' version, for its methods
    timings: dict[str, float] = Field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = Field(default_factory=dict)


class Receipt(_Part):
    """``conversion.json``: the job's inputs, options, counts, figures, variants, versions and costs."""

    schema_version: int = Field(SCHEMA, alias="schema")
    job_id: str
    status: str
    fingerprint: str
    engine: str
    engine_reason: str | None = None
    base: Source
    allow_base_mismatch: bool = False
    base_mismatch: str | None = None
    adapter: AdapterSource  # the first adapter (a stack's: all of them in ``stack``)
    stack: list[AdapterSource] | None = None  # every adapter merged, in order, when more than one or weighted
    weighted: bool = False  # the stack was mixed by weight (PEFT's add_weighted_adapter "cat"), not merged in order
    counts: Counts
    dtype: str
    untied_embeddings: bool = False
    vocab_size: int | None = None
    kept_files: list[str] = Field(default_factory=list)
    verification: Verification
    quantization: list[Variant] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    host: dict[str, str] = Field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = Field(default_factory=dict)
    timings: dict[str, float | int] = Field(default_factory=dict)
    variant_of: str | None = None

    def to_json(self) -> dict:
        """The receipt as ``conversion.json`` holds it."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def read(cls, directory: Path) -> "Receipt | None":
        """The receipt of ``directory``, or None when it has none this version can read."""
        import json

        try:
            return cls.model_validate(json.loads((Path(directory) / RECEIPT).read_text()))
        except (OSError, ValueError, ValidationError):
            return None

    def for_variant(self, variant: Variant, merged_output: Path) -> "Receipt":
        """The receipt a variant directory carries: this job's, with its one variant and where it came from."""
        return self.model_copy(update={"variant_of": str(merged_output.resolve()), "quantization": [variant]})

    def base_name(self) -> str:
        """How cards name the base: its hub repo, else the name the adapter records, else its directory's."""
        recorded = self.adapter.options.get("base_model_name_or_path")
        return self.base.repo or recorded or Path(self.base.source).name

    def adapter_name(self, adapter: AdapterSource | None = None) -> str:
        """How cards name an adapter (default: the first): its hub repo, else its directory's name."""
        adapter = adapter or self.adapter
        return adapter.repo or Path(adapter.source).name

    def what_was_merged(self) -> str:
        """The card's words for the adapter, or the stack and how it was merged."""
        peft_type = self.adapter.peft_type
        if not self.stack:
            return f"the {peft_type} adapter `{self.adapter_name()}`"
        names = [f"`{self.adapter_name(a)}`" + (f" (weight {a.weight:g})" if self.weighted else "") for a in self.stack]
        if self.weighted:
            return f"a weighted mix of the {peft_type} adapters {', '.join(names)}"
        return f"the {peft_type} adapters {', '.join(names)}, merged in that order,"


ADAPTER_OPTIONS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "target_modules",
                   "modules_to_save", "trainable_token_indices", "bias", "lora_bias", "layers_to_transform",
                   "fan_in_fan_out", "task_type", "base_model_name_or_path", "revision")


def build_receipt(job: "MergeJob", inputs: "Inputs", merged: "Merged", verification: Verification,
                  variants: list[Variant], kept: list[str], warnings: list["JobWarning"], timings: dict,
                  base_files: dict[str, str]) -> Receipt:
    """The receipt of a finished job, from what each step produced."""
    from converter.resources import forward_device, merge_device, peak_rss_bytes, versions

    adapters = [_adapter_source(p) for p in inputs.parts]
    return Receipt(
        job_id=job.id, status="succeeded", fingerprint=inputs.fingerprint, engine=inputs.engine,
        engine_reason=inputs.engine_reason,
        base=Source(**_source(inputs.base_src), files=base_files, format=_base_format(inputs, merged)),
        allow_base_mismatch=job.allow_base_mismatch, base_mismatch=inputs.mismatch,
        adapter=adapters[0], stack=adapters if len(adapters) > 1 or job.weighted else None, weighted=job.weighted,
        counts=merged.counts, dtype=dtype_name(inputs.out_dtype), untied_embeddings=merged.untie,
        vocab_size=merged.vocab_size, kept_files=kept, verification=verification, quantization=variants,
        warnings=[str(w) for w in warnings], versions=versions(),
        host={"hostname": socket.gethostname(), "device": str(merge_device(job.device, inputs.codec is not None)),
              "forward_device": str(forward_device(job.device))},
        peak_rss_bytes={"merge": merged.peak_rss, "total": max(merged.peak_rss, peak_rss_bytes())}, timings=timings)


def _adapter_source(part: "Part") -> AdapterSource:
    config = part.adapter.config
    options = {k: config[k] for k in ADAPTER_OPTIONS if k in config}
    return AdapterSource(**_source(part.src), recorded_base_revision=config.get("revision"), files=part.hashes,
                         peft_type=part.adapter.peft_type, options=options, weight=part.weight)


def _base_format(inputs: "Inputs", merged: "Merged") -> BaseFormat | None:
    codec = inputs.codec
    if codec is None:
        return None
    kept = merged.requantized
    return BaseFormat(quant_method=codec.method, codec=codec.label, decoded=len(inputs.base.stored),
                      output="kept" if merged.quantization_config is not None else "dense",
                      requantized=Requantization(tensors=kept.tensors, max_rel_err=kept.max_rel_err) if kept else None)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _source(src: "Resolved") -> dict:
    if src.is_hub:
        return {"source": f"{src.repo}@{src.sha}", "repo": src.repo, "revision": src.revision, "sha": src.sha,
                "path": str(src.path)}
    return {"source": str(src.path.resolve()), "repo": None, "revision": src.revision, "sha": None}


def model_card(receipt: Receipt) -> str:
    """The README.md of a merged output: hub metadata, what was merged, and the verification figures."""
    v, c = receipt.verification, receipt.counts
    peft_type = receipt.adapter.peft_type
    lines = ["---", f"base_model: {receipt.base_name()}", "base_model_relation: finetune", "library_name: transformers",
             "tags:", "- merged-adapter", f"- {peft_type.lower()}", "---", "", f"# {receipt.job_id}", "",
             f"This checkpoint is `{receipt.base_name()}` with {receipt.what_was_merged()} merged into its weights; it "
             "loads with `from_pretrained` and needs no PEFT at inference.", "",
             f"- output dtype: {receipt.dtype}" + _format_line(receipt.base.format),
             f"- tensors merged / replaced / copied / added: {c.merged} / {c.replaced} / {c.copied} / {c.added}",
             f"- verification: {v.level} ({'passed' if v.passed else 'not passed'})"]
    if v.full:
        lines.append(f"  - merged vs unmerged outputs: max |Δ| {v.full.max_abs_diff:.3g}, KL {v.full.kl}, "
                     f"top-1 agreement {v.full.top1}")
    if v.modules:
        lines.append(f"  - module probes: {v.modules.checked} modules, max relative error {v.modules.max_rel_err:.3g}")
    return "\n".join(lines + ["", f"`{RECEIPT}` beside this card is the full receipt of the conversion.", ""])


def _format_line(fmt: BaseFormat | None) -> str:
    """How the card says the base was stored, and how this checkpoint is."""
    if fmt is None:
        return ""
    line = f"\n- base stored as {fmt.codec}: merged into its dequantized weights"
    if fmt.output == "kept" and fmt.requantized:
        line += (f"; this checkpoint keeps that format ({fmt.requantized.tensors} weights re-encoded, max relative "
                 f"error {fmt.requantized.max_rel_err:.3g} against the dense merge)")
    return line + ("" if fmt.output == "kept" else "; this checkpoint is dense")


def variant_card(receipt: Receipt, variant: Variant, merged_name: str, tag: str, loads_with: str) -> str:
    """The README.md of a quantized variant: a quantized derivative of the merged checkpoint, with its figures
    (``loads_with``: what ``from_pretrained`` needs, and who serves it)."""
    library = (variant.library or f"bitsandbytes {variant.bitsandbytes}").split()[0]
    lines = ["---", f"base_model: {merged_name}", "base_model_relation: quantized", "library_name: transformers",
             "tags:", "- merged-adapter", f"- {library}", f"- {tag}", "---", "",
             f"# {receipt.job_id} ({variant.method})", "",
             f"This checkpoint is `{merged_name}` (an adapter merged into its base) quantized with {library} "
             f"`{variant.spec}`. It loads with `from_pretrained` ({loads_with}); `config.json` holds its "
             "`quantization_config`.", "",
             f"- written by: {variant.engine} engine; {variant.tensors.get('quantized')} linear weights quantized",
             f"- size of the weights: {variant.size_bytes / 2**20:.1f} MiB, {variant.size_ratio:.2f}× the merged "
             "checkpoint's"]
    fig = variant.figures
    if fig:
        kl = "n/a" if fig.kl is None else f"{fig.kl:.3g}"
        top1 = "n/a" if fig.top1 is None else f"{fig.top1:.3f}"
        lines.append(f"- against the merged model (this variant reloaded from disk): max |Δ| {fig.max_abs_diff:.3g}, "
                     f"KL {kl}, top-1 agreement {top1}")
    else:
        lines.append(f"- quality: {variant.note}")
    return "\n".join(lines + ["", f"`{RECEIPT}` beside this card is the full receipt of the conversion.", ""])
