"""Reading an adapter directory: its config and, lazily, its tensors."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from converter.checkpoint import load_bin, read_json_object, safetensors_specs
from converter.errors import BadInputError, UnsupportedAdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

# PEFT types whose adapters live in extra input tokens or activations, not in weights.
NOT_MERGEABLE = {
    "PROMPT_TUNING": "prompt tuning learns virtual input tokens",
    "MULTITASK_PROMPT_TUNING": "prompt tuning learns virtual input tokens",
    "P_TUNING": "p-tuning learns virtual input tokens",
    "PREFIX_TUNING": "prefix tuning learns per-layer key/value prefixes",
    "ADAPTION_PROMPT": "adaption prompts add gated attention prompts",
    "CPT": "context-aware prompt tuning learns virtual input tokens",
}


@functools.lru_cache(maxsize=1)
def known_peft_types() -> list[str]:
    """PEFT's own ``PeftType`` values, read from its ``peft/utils/peft_types.py`` alone: importing
    the ``peft`` package takes seconds (it pulls in transformers and bitsandbytes)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("peft is not installed: pip install peft")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "peft_types.py"
    module_spec = importlib.util.spec_from_file_location("_converter_peft_types", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return sorted(t.value for t in module.PeftType)


@dataclass
class Adapter:
    directory: Path
    config: dict
    weights_file: Path
    _tensors: dict[str, torch.Tensor] | None = None
    _specs: dict[str, tuple] = field(default_factory=dict)  # key -> (dtype, shape)

    @property
    def peft_type(self) -> str:
        """PEFT's adapter type, upper case (``LORA``, ``LOHA``...)."""
        return str(self.config.get("peft_type", "")).upper()

    def keys(self) -> list[str]:
        """The names of the adapter's tensors."""
        return list(self._specs)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (nothing read)."""
        return self._specs[key][1]

    def get(self, key: str) -> torch.Tensor:
        """A tensor of the adapter (the file is read on first use)."""
        if self._tensors is None:
            from safetensors.torch import load_file

            self._tensors = load_file(self.weights_file)  # adapters are small next to their base
        return self._tensors[key]

    def files(self) -> list[Path]:
        """Every file of the adapter directory, sorted."""
        return sorted(p for p in self.directory.iterdir() if p.is_file())


def _checkpoints_hint(directory: Path) -> str | None:
    found = sorted(
        (p for p in directory.glob("checkpoint-*") if (p / ADAPTER_CONFIG).is_file()),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    if not found:
        return None
    names = ", ".join(p.name for p in found)
    return (f"{directory} holds no adapter itself, only training checkpoints: {names}. "
            f"Pass one of them, e.g. --adapter {found[-1]} (the latest)")


def named_adapter(directory: Path) -> tuple[Path, str | None]:
    """The adapter directory to read: ``directory`` itself, or else the one subfolder holding an adapter (PEFT saves
    an adapter named other than "default" under ``<dir>/<name>/``), with a line saying so. Several such subfolders:
    a BadInputError listing the ``--adapter`` to pass for each."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / ADAPTER_CONFIG).is_file():
        return directory, None
    named = sorted(p for p in directory.iterdir()
                   if p.is_dir() and not p.name.startswith("checkpoint-") and (p / ADAPTER_CONFIG).is_file())
    if len(named) > 1:
        raise BadInputError(f"{directory} holds no adapter itself but {len(named)} named ones (PEFT saves an adapter "
                            f"named other than 'default' in a subfolder): {', '.join(p.name for p in named)}",
                            hint="pass one of them: " + "; ".join(f"--adapter {p}" for p in named))
    if named:
        return named[0], (f"{directory} holds no adapter itself: using {named[0]}, the adapter PEFT saved under the "
                          f"name {named[0].name!r}")
    return directory, None


def looks_like_adapter(directory: Path) -> bool:
    """Whether the directory holds an adapter_config.json."""
    return (directory / ADAPTER_CONFIG).is_file()


def looks_like_model(directory: Path) -> bool:
    """Whether the directory holds a config.json and model weights."""
    from converter.checkpoint import WEIGHT_INDEXES, WEIGHT_SINGLES

    weights = any((directory / n).is_file() for n in WEIGHT_INDEXES + WEIGHT_SINGLES)
    return (directory / "config.json").is_file() and weights


def load_adapter(directory: Path) -> Adapter:
    """Read and check an adapter directory; every problem is a BadInputError naming the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInputError(f"adapter directory {directory} does not exist", hint="check the --adapter path")
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        hint = _checkpoints_hint(directory)
        if hint:
            raise BadInputError(hint)
        if looks_like_model(directory):
            raise BadInputError(f"{directory} is a full model (config.json and weights), not an adapter",
                                hint="pass it as --base, and the adapter directory (with adapter_config.json) as "
                                     "--adapter")
        raise BadInputError(f"{directory} has no {ADAPTER_CONFIG}",
                            hint="point --adapter at the directory PEFT's save_pretrained wrote")
    config = read_json_object(config_path, "adapter config", "restore the adapter_config.json PEFT wrote")
    config_problems = check_config(config)
    if config_problems:
        raise BadInputError([f"{config_path}: {p}" for p in config_problems],
                            hint="restore the adapter_config.json PEFT wrote (or fix these fields)")
    peft_type = str(config.get("peft_type", "")).upper()
    known = known_peft_types()
    if peft_type not in known:
        raise UnsupportedAdapterError(
            f"{config_path}: unknown peft_type {config.get('peft_type')!r}",
            hint=f"this installation of PEFT knows: {', '.join(known)}; fix the adapter config or upgrade peft",
        )
    if peft_type in NOT_MERGEABLE:
        raise UnsupportedAdapterError(
            f"{directory}: a {peft_type} adapter cannot be merged into weights ({NOT_MERGEABLE[peft_type]})",
            hint="serve it with PEFT as an adapter; only weight adapters (LoRA, DoRA, LoHa, IA3...) can be merged",
        )
    weights = next((directory / n for n in ADAPTER_WEIGHTS if (directory / n).is_file()), None)
    if weights is None:
        raise BadInputError(f"{directory} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}",
                            hint="copy the adapter weights next to its config")
    adapter = Adapter(directory, config, weights)
    if weights.suffix == ".safetensors":
        adapter._specs = {s.name: (s.dtype, s.shape) for s in safetensors_specs(weights)}
    else:
        adapter._tensors = load_bin(weights)
        adapter._specs = {k: (v.dtype, tuple(v.shape)) for k, v in adapter._tensors.items()}
    if not adapter._specs:
        raise BadInputError(f"{weights} holds no tensors", hint="re-save the adapter")
    return adapter


class _AnyConfig(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    peft_type: str


class _LoraConfig(_AnyConfig):
    """The types of the LoRA config fields our engine reads; other fields pass through (PEFT's own
    engine reads the other adapter types)."""

    r: int | None = Field(default=None, gt=0)
    lora_alpha: float | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None
    fan_in_fan_out: bool | None = None
    lora_bias: bool | None = None
    bias: str | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    target_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None

    @field_validator("lora_alpha", mode="before")
    @classmethod
    def _number(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("alpha_pattern", mode="before")
    @classmethod
    def _numbers(cls, value):
        if isinstance(value, dict):
            return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in value.items()}
        return value


def check_config(config: dict) -> list[str]:
    """What is wrong with the types of an adapter config's fields (empty when nothing)."""
    try:
        fields = _LoraConfig if str(config.get("peft_type", "")).upper() == "LORA" else _AnyConfig
        fields(**config)
    except ValidationError as exc:
        by_field: dict[str, list[dict]] = {}
        for e in exc.errors():
            by_field.setdefault(str(e["loc"][0]), []).append(e)
        problems = []
        for name, errors in by_field.items():
            if errors[0]["type"] == "missing":
                problems.append(f"`{name}` is missing")
                continue
            msg = errors[0]["msg"] if len(errors) == 1 else "has a type PEFT never writes there"
            problems.append(f"`{name}`: {msg} (got {config.get(name)!r:.60})")
        return problems
    except TypeError as exc:  # keys that are not strings
        return [str(exc)]
    return []


def check_finite(adapter: Adapter) -> list[str]:
    """Names of adapter tensors holding NaN or infinite values."""
    bad = []
    for key in adapter.keys():
        t = adapter.get(key)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(key)
    return bad


def strip_prefix(key: str) -> str:
    """The key without PEFT's ``base_model.model.`` prefix."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def is_base_checkpoint_dir(directory: Path) -> None:
    """Refuse an adapter passed as --base."""
    if looks_like_adapter(directory) and not looks_like_model(directory):
        raise BadInputError(f"{directory} is an adapter (it has {ADAPTER_CONFIG}), not a base model",
                            hint="pass it as --adapter, and the model it was trained on as --base")
    if not directory.is_dir():
        raise BadInputError(f"base directory {directory} does not exist", hint="check the --base path")
    hint = _checkpoints_hint(directory) if not looks_like_model(directory) else None
    if hint and not (directory / "config.json").is_file():
        raise BadInputError(f"{directory} looks like a training output directory, not a base model",
                            hint="pass the model the adapter was trained on as --base")



