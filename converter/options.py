"""Job options: frozen data, parsed once at the edge (CLI or manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from converter.quantize import QuantSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class StackedAdapter(BaseModel):
    """An adapter merged after the job's first one (a stack): where it is, and its weight in a weighted mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter: str  # a directory or a hub repo id, as given
    revision: str | None = None
    subfolder: str | None = None
    weight: float | None = None

    @field_validator("adapter", mode="before")
    @classmethod
    def _as_given(cls, value):
        return str(value) if isinstance(value, Path) else value


class MergeJob(BaseModel):
    """One base, the adapter (or stack of adapters) merged into it, and how to convert it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str | None = None
    base: str  # a directory or a hub repo id, as given (``./x`` stays a path even where no ``x`` exists)
    adapter: str
    output: Path
    base_revision: str | None = None
    adapter_revision: str | None = None
    base_subfolder: str | None = None
    adapter_subfolder: str | None = None
    adapter_weight: float | None = None  # the first adapter's weight in a weighted mix
    stack: tuple[StackedAdapter, ...] = ()  # adapters merged after the first, in order
    cache_dir: Path | None = None  # hub cache (default: huggingface_hub's, HF_HUB_CACHE / HF_HOME)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_shard_size: str = "5GB"
    verify: Literal["none", "modules", "full"] = "full"
    # `METHOD[:key=value,...]` strings, mappings or QuantSpecs; validated against converter.quantize.METHODS
    quantize: tuple[QuantSpec, ...] = ()
    force: bool = False
    strict: bool = False
    keep_quantization: bool = False  # a quantized base's output stays in its format (else: dense, in --dtype)
    labels: tuple[str, ...] | None = None  # a task head's labels, in order (config.json's id2label / label2id)
    trust_remote_code: bool = False
    allow_base_mismatch: bool = False
    max_logit_diff: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None

    @field_validator("base", "adapter", mode="before")
    @classmethod
    def _as_given(cls, value):
        return str(value) if isinstance(value, Path) else value

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize_list(cls, value):
        return (value,) if isinstance(value, (str, dict)) else value

    @field_validator("quantize")
    @classmethod
    def _one_variant_per_method(cls, value: tuple[QuantSpec, ...]) -> tuple[QuantSpec, ...]:
        methods = [q.method for q in value]
        twice = sorted({m for m in methods if methods.count(m) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} requested more than once; each method writes one variant "
                             "directory <output>-<method>")
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            if parse_size_to_int(value) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{value!r} is not a size like 5GB, 500MB or 200KB") from None
        return value

    @model_validator(mode="after")
    def _weights_for_all(self) -> "MergeJob":
        weights = [self.adapter_weight] + [a.weight for a in self.stack]
        if any(w is not None for w in weights) and None in weights:
            raise ValueError("a weighted mix needs a weight for every adapter of the stack (or none: merged in order)")
        return self

    @property
    def adapters(self) -> tuple[StackedAdapter, ...]:
        """Every adapter of the job, in merge order (one, unless a stack)."""
        first = StackedAdapter(adapter=self.adapter, revision=self.adapter_revision, subfolder=self.adapter_subfolder,
                               weight=self.adapter_weight)
        return (first, *self.stack)

    @property
    def weighted(self) -> bool:
        """Whether the adapters are mixed by weight (PEFT's add_weighted_adapter, "cat"), not merged in order."""
        return self.adapter_weight is not None

    @property
    def id(self) -> str:
        """The job's name: its ``job_id``, else its output directory's name."""
        return self.job_id or self.output.name

    def fingerprint_options(self) -> dict:
        """The options that change what is written (not --force, not where it goes)."""
        options = self.model_dump(mode="json", include={"dtype", "max_shard_size", "verify", "quantize", "strict",
                                                        "allow_base_mismatch", "max_logit_diff", "max_kl", "min_top1"})
        for spec in options["quantize"]:  # options added later enter only when set: earlier outputs stay done
            if spec.get("block") is None:
                spec.pop("block", None)
        if self.keep_quantization:  # only when set: outputs made before the option existed stay done
            options["keep_quantization"] = True
        if self.labels:
            options["labels"] = list(self.labels)
        return options
