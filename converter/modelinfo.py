"""What we learn about a base's architecture without loading its weights.

The model class is instantiated on the ``meta`` device (no memory) when transformers
knows it: that gives module types (GPT-2's Conv1D), the embeddings and whether they
are tied, and transformers' own checkpoint-key conversions (e.g. Llava checkpoints are
saved as ``language_model.model.*`` while its modules are ``model.language_model.*``).
The merge itself never needs any of this when the names match.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter import cache
from converter.checkpoint import read_json_object
from converter.publish import fingerprint

CACHE_SCHEMA = 1


@dataclass
class ModelInfo:
    config: dict
    cls_path: str | None = None  # "module:QualName" of the transformers class
    note: str | None = None  # why the class is unavailable
    base_model_prefix: str | None = None
    model_to_ckpt: dict[str, str] = field(default_factory=dict)
    converted: set[str] = field(default_factory=set)  # ckpt keys of non-1:1 conversions
    module_types: dict[str, str] = field(default_factory=dict)  # module name -> class name
    input_embedding: str | None = None  # model-side parameter names
    output_embedding: str | None = None
    tied: bool = False

    _cls: type | None = None

    @property
    def instantiable(self) -> bool:
        """Whether transformers can build this model class."""
        return self.cls_path is not None

    @property
    def model_cls(self) -> type | None:
        """The class, imported when first asked for (verification, quantization): a cached
        description lets a merge run without importing transformers at all."""
        if self._cls is None and self.cls_path is not None:
            self._cls = import_class(self.cls_path)
        return self._cls

    def to_cache(self) -> dict:
        """The description as a JSON-able dict for converter.cache."""
        return {"schema": CACHE_SCHEMA, "cls_path": self.cls_path, "note": self.note,
                "base_model_prefix": self.base_model_prefix, "model_to_ckpt": self.model_to_ckpt,
                "converted": sorted(self.converted), "module_types": self.module_types,
                "input_embedding": self.input_embedding, "output_embedding": self.output_embedding,
                "tied": self.tied}

    @classmethod
    def from_cache(cls, config: dict, data: dict) -> "ModelInfo":
        """A description read back from converter.cache."""
        return cls(config=config, cls_path=data["cls_path"], note=data["note"],
                   base_model_prefix=data["base_model_prefix"], model_to_ckpt=data["model_to_ckpt"],
                   converted=set(data["converted"]), module_types=data["module_types"],
                   input_embedding=data["input_embedding"], output_embedding=data["output_embedding"],
                   tied=data["tied"])


def import_class(cls_path: str) -> type:
    """The class a ``"module:QualName"`` path names, imported."""
    import importlib

    module, _, qualname = cls_path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def config_scopes(config: dict) -> tuple[dict, dict]:
    """A config and its ``text_config`` (a VLM's language model; ``{}`` when it has none), where settings live."""
    text = config.get("text_config")
    return config, text if isinstance(text, dict) else {}


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def tie_flag(config: dict) -> bool:
    """Whether the config ties input and output embeddings (transformers' default: yes)."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config") or {}
    return bool(text.get("tie_word_embeddings", True))


def base_config(base_dir: Path) -> dict:
    """The base's config.json as a dict ({} when it has none); a malformed one is bad input."""
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        return {}
    return read_json_object(path, "base config", "restore the model's config.json (re-download the base)")


def resolve_model_class(base_dir: Path, trust_remote_code: bool):
    """(hf_config, model class) or (None, reason)."""
    import transformers
    from transformers import AutoConfig

    raw = base_config(base_dir)
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
    """The base's description; from converter.cache when this config and these tensor names were seen
    with this transformers version (remote-code classes are never cached: their code may change)."""
    config = base_config(Path(base_dir))
    raw = json.dumps(config, sort_keys=True).encode()
    key = fingerprint(["modelinfo", CACHE_SCHEMA, hashlib.sha256(raw).hexdigest(), sorted(ckpt_names),
                       bool(trust_remote_code), _transformers_version()])
    hit = cache.load("modelinfo", key)
    if hit and hit.get("schema") == CACHE_SCHEMA:
        return ModelInfo.from_cache(config, hit)
    info = _describe(base_dir, config, ckpt_names, trust_remote_code)
    if info.cls_path is None or not info.cls_path.startswith("transformers_modules"):
        cache.store("modelinfo", key, info.to_cache())
    return info


def _transformers_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def _describe(base_dir: Path, config: dict, ckpt_names: list[str], trust_remote_code: bool) -> ModelInfo:
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
    info.cls_path = f"{cls_or_reason.__module__}:{cls_or_reason.__qualname__}"
    info._cls = cls_or_reason
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
