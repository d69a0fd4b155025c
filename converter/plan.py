"""Map every adapter tensor to the base tensor it changes: the merge plan.

Every adapter key must land somewhere; anything that maps to nothing, a shape that
does not fit or a rank that disagrees with the config is collected, and all of them are
reported at once before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from converter.adapter import Adapter, strip_prefix
from converter.checkpoint import Checkpoint
from converter.errors import AdapterMismatchError
from converter.experts import ExpertOp, ExpertPlan
from converter.heads import Head, find_head
from converter.lora_math import lora_scale
from converter.modelinfo import ModelInfo

# LoRA options whose math our engine does not implement: PEFT merges those in memory.
PEFT_ONLY_OPTIONS = ("use_qalora", "arrow_config", "use_bdlora", "alora_invocation_tokens", "velora_config",
                     "monteclora_config", "mica", "kasa_config", "layer_replication")
SUFFIXES = (
    ("lora_A.weight", "A"), ("lora_B.weight", "B"), ("lora_B.bias", "B_bias"),
    ("lora_embedding_A", "emb_A"), ("lora_embedding_B", "emb_B"),
    ("lora_magnitude_vector", "magnitude"), ("lora_magnitude_vector.weight", "magnitude"),
    ("token_adapter.trainable_tokens_delta", "tokens"),
    ("base_layer.weight", "replace_weight"), ("base_layer.bias", "replace_bias"),
)


@dataclass
class LoraOp:
    module: str
    kind: str  # "linear" | "embedding"
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude_key: str | None = None
    # PEFT rounds the delta to the dtype, then adds it: a per-expert tensor it merges as part of a fused parameter
    # (ParamWrapper), or a weighted mix (its adapter is made in the base's dtype)
    rounds_delta: bool = False


@dataclass
class TensorPlan:
    name: str  # name in the output checkpoint
    source: str | None  # base checkpoint tensor it starts from
    shape: tuple[int, ...]
    dtype: torch.dtype  # base dtype of the source
    replace_key: str | None = None  # adapter tensor that replaces the base value
    lora: LoraOp | None = None
    bias_key: str | None = None  # lora_B.bias added to this bias
    bias_scale: float = 1.0
    rows_key: str | None = None  # trainable token rows
    rows: list[int] = field(default_factory=list)
    added: bool = False  # not in the base checkpoint (an untied output embedding)
    expert: ExpertOp | None = None  # a LoRA on a fused (expert) parameter this tensor is part of
    head: bool = False  # a task head's tensor the adapter adds (the base has none)
    # a stack: the same tensor as the next adapters change it, each merged into the weight the one before left
    then: tuple["TensorPlan", ...] = ()


    @property
    def action(self) -> str:
        """What the output tensor is: merge, replace, add or copy."""
        if self.lora is not None or self.expert is not None or self.bias_key or self.rows_key:
            return "merge"
        if self.replace_key:
            return "add" if self.head else "replace"
        return "add" if self.added else "copy"


@dataclass
class MergePlan:
    tensors: dict[str, TensorPlan]
    untie: bool = False
    vocab_size: int | None = None  # new vocabulary size when the adapter resized it
    engine: str = "streaming"
    engine_reason: str | None = None
    modules: dict[str, LoraOp] = field(default_factory=dict)
    head: Head | None = None  # a task head the adapter adds: the output is a checkpoint of its task class

    def count(self, action: str) -> int:
        """How many output tensors have ``action``."""
        return sum(1 for t in self.tensors.values() if t.action == action)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def split_key(key: str) -> tuple[str, str]:
    """(module path, role) of an adapter key, role "full" for a whole-tensor replacement."""
    name = strip_prefix(key)
    for suffix, role in SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], role
    return name, "full"


class Resolver:
    """Model-side names (what PEFT saw) to base checkpoint keys."""

    def __init__(self, names, info: ModelInfo):
        self.names, self.info = names, info

    def __call__(self, name: str) -> str | None:
        """The checkpoint key of a model-side name, or None when the base has no such tensor."""
        candidates = [name]
        prefix = self.info.base_model_prefix
        if prefix:
            if name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1:])
            candidates.append(f"{prefix}.{name}")
        for cand in candidates:
            if cand in self.info.model_to_ckpt:
                return self.info.model_to_ckpt[cand]
            if cand in self.names:
                return cand
        return None


def needs_peft_engine(adapter: Adapter) -> str | None:
    """Why PEFT's in-memory merge must do this adapter, or None when we merge it natively."""
    if adapter.peft_type != "LORA":
        return f"{adapter.peft_type} adapters are merged by PEFT's own code"
    for opt in PEFT_ONLY_OPTIONS:
        if adapter.config.get(opt):
            return f"LoRA option {opt} is merged by PEFT's own code"
    return None


def build_plan(adapter: Adapter, ckpt: Checkpoint, info: ModelInfo, experts: ExpertPlan | None = None) -> MergePlan:
    """Every adapter tensor mapped to the base tensor it changes; one AdapterMismatchError lists every problem.
    ``experts``: the LoRAs on ``target_parameters``, already mapped onto the checkpoint's tensors."""
    planner = _Planner(adapter, ckpt, info)
    modules: dict[str, dict[str, str]] = {}
    claimed = experts.claimed if experts else set()
    for key in adapter.keys():
        if key not in claimed:
            module, role = split_key(key)
            modules.setdefault(module, {})[role] = key
    for module, roles in modules.items():
        planner.add_module(module, roles)
    if experts:
        planner.problems += experts.problems
        for key, op in experts.ops.items():
            planner.tensors[key].expert = op
    head = planner.add_head(ckpt) if planner.unmatched else None
    planner.raise_problems()
    plan = MergePlan(planner.tensors, head=head)
    plan.modules = {t.lora.module: t.lora for t in planner.tensors.values() if t.lora is not None}
    _resolve_vocab_and_ties(plan, info, planner.resolve, ckpt)
    return plan


class _Planner:
    """The output's tensors as the adapter's modules are mapped onto them, and the problems found on the way."""

    def __init__(self, adapter: Adapter, ckpt: Checkpoint, info: ModelInfo):
        self.adapter, self.info = adapter, info
        self.tensors = {name: TensorPlan(name, name, spec.shape, spec.dtype) for name, spec in ckpt.specs.items()}
        self.resolve = Resolver(self.tensors, info)
        self.problems: list[str] = []
        self.unmatched: list[str] = []
        self.unmatched_names: dict[str, str] = {}  # model-side name -> adapter key, of what matched nothing
        in_ck = self.resolve(info.input_embedding) if info.tied and info.input_embedding else None
        if in_ck and info.output_embedding and self.resolve(info.output_embedding) is None:
            # a tied output embedding is not stored; it exists in the output only if we untie
            spec = ckpt.specs[in_ck]
            self.tensors[info.output_embedding] = TensorPlan(info.output_embedding, in_ck, spec.shape, spec.dtype,
                                                             added=True)

    def target(self, param: str, key: str) -> TensorPlan | None:
        """The output tensor a model-side parameter name lands on (None: a problem, noted)."""
        ck = self.resolve(param)
        if ck is None:
            self.unmatched.append(key)
            self.unmatched_names[param] = key
            return None
        if ck in self.info.converted and ck != param:  # (an adapter naming the checkpoint's own tensor fits it)
            self.problems.append(f"{key}: its base tensor {ck} is stored fused by transformers' conversion rules; "
                                 "this engine cannot merge into it")
            return None
        return self.tensors[ck]

    def add_module(self, module: str, roles: dict[str, str]) -> None:
        """One module's adapter tensors (by role) onto the output's tensors."""
        for role, param in (("full", module), ("replace_weight", f"{module}.weight"),
                            ("replace_bias", f"{module}.bias")):  # modules_to_save copies, trained biases
            tp = self.target(param, roles[role]) if role in roles else None
            if tp is not None:
                self._replacement(tp, roles[role])
        if "tokens" in roles:
            tp = self.target(f"{module}.weight", roles["tokens"])
            if tp is not None:
                self._tokens(tp, module, roles["tokens"])
        if {"A", "B", "emb_A", "emb_B"} & roles.keys():
            self._lora(module, roles)

    def add_head(self, ckpt: Checkpoint) -> Head | None:
        """The task head among the tensors that matched nothing (SEQ_CLS, TOKEN_CLS, QUESTION_ANS adapters):
        added to the output, and the base's tensors the task model has no place for left out."""
        head = find_head(self.adapter, ckpt.directory, list(ckpt.specs), self.unmatched_names)
        if head is None:
            return None
        for name, key in head.tensors.items():
            self.tensors[name] = TensorPlan(name, None, head.shapes[name], torch.float32, replace_key=key, head=True)
            self.unmatched.remove(key)
        for name in head.unused:
            del self.tensors[name]
        return head

    def _replacement(self, tp: TensorPlan, key: str) -> None:
        shape = self.adapter.shape(key)
        if shape != tp.shape:
            vocab_resize = len(shape) == 2 and len(tp.shape) == 2 and shape[1] == tp.shape[1]
            if not vocab_resize:
                self.problems.append(f"{key}: shape {shape} does not fit base tensor {tp.name} {tp.shape}")
                return
            tp.shape = shape  # a resized vocabulary; checked against the other embedding later
        tp.replace_key = key

    def _tokens(self, tp: TensorPlan, module: str, key: str) -> None:
        indices = _token_indices(self.adapter.config.get("trainable_token_indices"), module)
        rows = self.adapter.shape(key)
        if indices is None or len(indices) != rows[0]:
            self.problems.append(f"{key}: {rows[0]} trained token rows but trainable_token_indices gives {indices} "
                                 f"for {module}")
        elif rows[1:] != tp.shape[1:] or max(indices) >= tp.shape[0]:
            self.problems.append(f"{key}: rows of shape {rows} do not fit {tp.name} {tp.shape}")
        else:
            tp.rows_key, tp.rows = key, list(indices)

    def _lora(self, module: str, roles: dict[str, str]) -> None:
        """A LoRA module (linear or embedding, plain or DoRA) onto its weight, with its rank and shapes checked."""
        embedding = "emb_A" in roles or "emb_B" in roles
        a_key, b_key = roles.get("emb_A" if embedding else "A"), roles.get("emb_B" if embedding else "B")
        if a_key is None or b_key is None:
            self.problems.append(f"{module}: has {'lora_A' if a_key else 'lora_B'} but not its partner")
            return
        tp = self.target(f"{module}.weight", a_key)
        if tp is None:
            return
        cfg = self.adapter.config
        r = pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        a_shape, b_shape = self.adapter.shape(a_key), self.adapter.shape(b_key)
        fan_in_fan_out = not embedding and self._fan_in_fan_out(module, tp, a_shape, b_shape)
        problem = _lora_misfit(tp, a_key, a_shape, b_shape, r, module, embedding, fan_in_fan_out)
        op = LoraOp(module, "embedding" if embedding else "linear", a_key, b_key, r, alpha,
                    lora_scale(r, alpha, bool(cfg.get("use_rslora"))), fan_in_fan_out, roles.get("magnitude"))
        if problem is None and op.magnitude_key is not None:
            m_shape = self.adapter.shape(op.magnitude_key)
            if m_shape != (tp.shape[1] if (embedding or fan_in_fan_out) else tp.shape[0],):
                problem = f"{op.magnitude_key}: DoRA magnitude of shape {m_shape} does not fit {tp.name} {tp.shape}"
        if problem is not None:
            self.problems.append(problem)
            return
        op.rounds_delta = tp.name in self.info.converted  # a transformers-4 per-expert adapter: PEFT fuses it on load
        tp.lora = op
        bias = self.target(f"{module}.bias", roles["B_bias"]) if "B_bias" in roles else None
        if bias is not None:
            bias.bias_key, bias.bias_scale = roles["B_bias"], op.scale

    def _fan_in_fan_out(self, module: str, tp: TensorPlan, a_shape, b_shape) -> bool:
        """Whether the weight is stored (in, out), as GPT-2's Conv1D: from the module type, else from the shapes,
        else from the adapter's config."""
        out_in, in_out = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
        module_type = self.info.module_types.get(module)
        if module_type is not None:
            return module_type == "Conv1D"
        if out_in != in_out:
            return tp.shape == in_out and tp.shape != out_in
        return bool(self.adapter.config.get("fan_in_fan_out"))

    def raise_problems(self) -> None:
        problems = list(self.problems)
        if self.unmatched:
            problems.insert(0, f"{len(self.unmatched)} adapter tensor(s) match no tensor of the base: "
                            + ", ".join(self.unmatched[:12]) + (" ..." if len(self.unmatched) > 12 else ""))
        if problems:
            raise AdapterMismatchError(problems, hint="check that --base is the model this adapter was trained on "
                                       "(same architecture and size) and that the adapter files are intact")


def _lora_misfit(tp: TensorPlan, a_key: str, a_shape, b_shape, r: int, module: str, embedding: bool,
                 fan_in_fan_out: bool) -> str | None:
    """Why a LoRA of these shapes and rank does not fit its base weight, or None."""
    if len(tp.shape) != 2:
        return (f"{a_key}: base tensor {tp.name} has shape {tp.shape}; only 2-D (Linear, Conv1D, Embedding) weights "
                "are merged natively")
    if a_shape[0] != r or b_shape[-1] != r:
        return f"{a_key}: rank {a_shape[0]} but adapter_config gives r={r} for {module}"
    if embedding:
        fits = (a_shape[1], b_shape[0]) == tp.shape
    else:
        fits = tp.shape == ((a_shape[1], b_shape[0]) if fan_in_fan_out else (b_shape[0], a_shape[1]))
    if fits:
        return None
    return f"{a_key}: LoRA of shape A{a_shape} B{b_shape} does not fit base tensor {tp.name} {tp.shape}"


def _token_indices(indices, module: str):
    if indices is None:
        return None
    if isinstance(indices, dict):
        for name, idx in indices.items():
            if module == name or module.endswith("." + name):
                return idx
        return None
    return indices  # a list applies to the input embedding


def _resolve_vocab_and_ties(plan: MergePlan, info: ModelInfo, resolve, ckpt: Checkpoint) -> None:
    """Resized vocabularies, and tied embeddings the adapter changes on one side only."""
    tensors = plan.tensors
    in_name = resolve(info.input_embedding) if info.input_embedding else None
    out_name = resolve(info.output_embedding) if info.output_embedding else None
    emb_in = tensors.get(in_name) if in_name else None
    emb_out = tensors.get(out_name) if out_name else None
    added = [n for n, t in tensors.items() if t.added]
    resized = [t for t in tensors.values() if t.replace_key and not (t.added or t.head)
               and t.shape != ckpt.specs[t.name].shape]
    for t in resized:
        if t is not emb_in and t is not emb_out:
            raise AdapterMismatchError(f"{t.replace_key}: shape {t.shape} does not fit base tensor {t.name} "
                                       f"{ckpt.specs[t.name].shape}", hint="use the base the adapter was trained on")
    if resized:
        plan.vocab_size = resized[0].shape[0]

    if not info.tied or emb_in is None or emb_out is None:
        if resized and emb_in is not None and emb_out is not None and emb_in.shape[0] != emb_out.shape[0]:
            small = emb_in if emb_in.shape[0] != plan.vocab_size else emb_out
            raise AdapterMismatchError(
                f"the adapter resizes the vocabulary to {plan.vocab_size} rows but {small.name} keeps "
                f"{small.shape[0]}", hint="save both embeddings in modules_to_save when resizing the vocabulary")
        return
    # Tied: PEFT applies LoRA and modules_to_save to one module only, so the unmerged model
    # has two different matrices; trainable tokens are applied to both sides by PEFT.
    out_changed = emb_out is not None and emb_out.action not in ("copy", "add")
    in_changed = emb_in.lora is not None or emb_in.replace_key is not None
    if not (in_changed or out_changed):
        for name in added:
            del tensors[name]
        return
    plan.untie = True
    if emb_in.rows_key and not emb_out.rows_key:
        emb_out.rows_key, emb_out.rows = emb_in.rows_key, emb_in.rows
    if plan.vocab_size and emb_out.shape[0] != plan.vocab_size and emb_out.replace_key is None:
        raise AdapterMismatchError(
            f"the adapter resizes {emb_in.name} to {plan.vocab_size} rows but the tied output embedding keeps "
            f"{emb_out.shape[0]}", hint="save both embeddings in modules_to_save when resizing the vocabulary")
