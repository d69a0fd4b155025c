"""What we learn about a base's architecture without loading its weights.

The model class is instantiated on the ``meta`` device (no memory) when transformers
knows it: that gives module types (GPT-2's Conv1D), the embeddings and whether they
are tied, and transformers' own checkpoint-key conversions (e.g. Llava checkpoints are
saved as ``language_model.model.*`` while its modules are ``model.language_model.*``).
The merge itself never needs any of this when the names match.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class ModelInfo:
    config: dict
    model_cls: type | None = None
    note: str | None = None  # why the class is unavailable
    base_model_prefix: str | None = None
    model_to_ckpt: dict[str, str] = field(default_factory=dict)
    converted: set[str] = field(default_factory=set)  # ckpt keys of non-1:1 conversions
    module_types: dict[str, str] = field(default_factory=dict)  # module name -> class name
    input_embedding: str | None = None  # model-side parameter names
    output_embedding: str | None = None
    tied: bool = False

    @property
    def instantiable(self) -> bool:
        return self.model_cls is not None


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def tie_flag(config: dict) -> bool:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config") or {}
    return bool(text.get("tie_word_embeddings", True))


def resolve_model_class(base_dir: Path, trust_remote_code: bool):
    """(hf_config, model class) or (None, reason)."""
    import transformers
    from transformers import AutoConfig

    raw = json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").is_file() else {}
    if raw.get("auto_map") and not trust_remote_code and not any(hasattr(transformers, a) for a in
                                                                 raw.get("architectures") or []):
        return None, ("the architecture needs its own code (auto_map in config.json) and trust_remote_code "
                      "was not given for this job")
    try:
        hf_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, remote code refused...
        reason = str(exc).splitlines()[0][:200]
        return None, f"transformers cannot read this config ({reason})"
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return hf_config, cls
    auto_map = getattr(hf_config, "auto_map", None) or {}
    if auto_map and trust_remote_code:
        from transformers import AutoModel, AutoModelForCausalLM

        for key, auto in (("AutoModelForCausalLM", AutoModelForCausalLM), ("AutoModel", AutoModel)):
            if key in auto_map:
                try:
                    from transformers.dynamic_module_utils import get_class_from_dynamic_module

                    return hf_config, get_class_from_dynamic_module(auto_map[key], str(base_dir))
                except Exception as exc:  # noqa: BLE001
                    return None, f"remote code for {auto_map[key]} failed to load ({exc})"
    if auto_map and not trust_remote_code:
        return None, "the architecture needs its own code (auto_map) and trust_remote_code was not given"
    return None, f"transformers has no class for architectures {archs or '(none listed)'}"


def _param_name(model, param) -> str | None:
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    return None


def describe(base_dir: Path, ckpt_names: list[str], trust_remote_code: bool = False) -> ModelInfo:
    config = json.loads((Path(base_dir) / "config.json").read_text()) if (Path(base_dir) / "config.json").is_file() else {}
    info = ModelInfo(config=config, tied=tie_flag(config))
    hf_config, cls_or_reason = resolve_model_class(Path(base_dir), trust_remote_code)
    if hf_config is None:
        info.note = cls_or_reason
        return info
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls_or_reason._from_config(hf_config)
    except Exception as exc:  # noqa: BLE001
        info.note = f"{cls_or_reason.__name__} could not be built from the config ({str(exc).splitlines()[0][:200]})"
        return info
    info.model_cls = cls_or_reason
    info.base_model_prefix = getattr(model, "base_model_prefix", None) or None
    info.module_types = {n: type(m).__name__ for n, m in model.named_modules()}
    try:
        emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        emb_in = emb_out = None
    if emb_in is not None and getattr(emb_in, "weight", None) is not None:
        info.input_embedding = _param_name(model, emb_in.weight)
    if emb_out is not None and getattr(emb_out, "weight", None) is not None:
        info.output_embedding = _param_name(model, emb_out.weight)
        if emb_in is not None and emb_out.weight is emb_in.weight:
            info.tied = True
            # the tied output's own name: the module's, not the shared parameter's first name
            for name, mod in model.named_modules():
                if mod is emb_out:
                    info.output_embedding = f"{name}.weight"
    _checkpoint_names(info, model, ckpt_names)
    return info


def _checkpoint_names(info: ModelInfo, model, ckpt_names: list[str]) -> None:
    """Map model-side names to checkpoint keys with transformers' own conversion rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # older transformers: checkpoint keys are the module names
        return
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001
        return
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = dict.fromkeys(model.state_dict().keys(), 0)
    for key in ckpt_names:
        try:
            renamed, converter = rename_source_key(key, renamings, converters, info.base_model_prefix, meta_sd)
        except Exception:  # noqa: BLE001
            continue
        if converter is not None:
            info.converted.add(key)
        else:
            info.model_to_ckpt.setdefault(renamed, key)
