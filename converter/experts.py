"""Merging LoRA adapters on fused MoE expert parameters, one checkpoint tensor at a time.

Transformers 5 holds the experts of a MoE layer as fused 3-D parameters of the model,
while checkpoints on disk usually keep one 2-D tensor per expert and projection. This
module finds, for each checkpoint tensor, the part of a fused parameter it becomes
(:func:`expert_slices`, read from transformers' own conversion rules), and computes the
LoRA delta of exactly that part (:func:`key_delta`), so that a merge never builds the
fused tensor of a whole layer: the peak is one expert's 2-D tensor.

Facts (transformers 5.24, peft 0.21.2)
--------------------------------------
Model side. ``MixtralExperts``, ``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ``OlmoeExperts``,
``DeepseekV3Experts``...: ``experts.gate_up_proj`` is (E, 2I, H) and ``experts.down_proj``
(E, H, I); each ``param[e]`` is (out, in) like an ``nn.Linear`` weight and the gate rows
come before the up rows. ``GptOssExperts`` (``is_transposed=True``): ``gate_up_proj`` is
(E, H, 2I), gate/up *interleaved* along the last dim, ``down_proj`` (E, I, H): (in, out).

Disk side (what ``save_pretrained`` writes, i.e. the reverse of the loading rules):

- mixtral (also minimax, phimoe): ``model.layers.N.block_sparse_moe.experts.E.w1.weight``
  (gate, (I, H)), ``.w3.weight`` (up, (I, H)), ``.w2.weight`` (down, (H, I)); rules
  ``WeightRenaming(".block_sparse_moe." -> ".mlp.")`` then ``MergeModulelist(0)`` +
  ``Concatenate(1)`` for [w1, w3] -> ``gate_up_proj`` and ``MergeModulelist(0)`` for w2.
- qwen2_moe (and every type mapped onto it: qwen3_moe, olmoe, deepseek_v2/v3, glm4_moe,
  hunyuan_v1_moe, qwen3_next, flex_olmo, ...): ``model.layers.N.mlp.experts.E.gate_proj.weight``,
  ``up_proj``, ``down_proj``; the same two converters without the renaming.
- gpt_oss, llama4, dbrx: no rules; the checkpoint holds the fused 3-D tensors themselves.
- qwen3_vl_moe: fused on disk, ``Transpose(1, 2, check_dims=True)``; step3p7: fused
  gate/up per projection joined by ``Concatenate(1)`` with no ``MergeModulelist``.

Handled operations: renaming only, ``MergeModulelist(dim=0)``, ``Concatenate(dim>=1)``
(after ``MergeModulelist`` or on 3-D sources) and ``Transpose`` of the two matrix dims.
Anything else (``Interleave``, ``Chunk``, ``Split``, the Ernie/Inkling expert ops,
quantizer ops) raises :class:`UnsupportedExpertLayoutError` naming the converter.

PEFT side (``peft/tuners/lora/layer.py``, ``ParamWrapper``), ``target_parameters``:

- For a 3-D param (E, d1, d2): ``in, out = d2, d1`` unless the experts module has
  ``is_transposed`` (then ``in, out = d1, d2``). ``lora_A.weight`` is (r*E, in), grouped by
  expert: rows ``e*r:(e+1)*r`` are expert e's A. ``lora_B.weight`` is (out, r*E), reshaped
  (out, r, E): expert e's B is the *strided* column set ``e::E``. Delta:
  ``einsum("o r e, e r i -> e o i", B, A) * scaling`` (``"e i o"`` when transposed), in the
  adapter weights' dtype: fp32, since ``PeftModel.from_pretrained`` upcasts bf16/fp16
  adapter weights (``autocast_adapter_dtype=True``).
- A 2-D param (e.g. the router ``gate.weight``) is ``num_experts=1``: ``(B @ A) * scaling``.
- ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); ``rank_pattern``/``alpha_pattern``
  match the unwrapped name ``"<module>.<param>"``, e.g. ``model.layers.0.mlp.experts.gate_up_proj``.
- Merge (``ParamWrapper.merge``, ``safe_merge=False``): ``param.data += delta.to(param.dtype)``:
  the delta is rounded to the param dtype first, then added in that dtype (two roundings
  for bf16/fp16 bases; exact fp32 for fp32 bases). :func:`merge_tensor` does the same.
- Saved adapter keys name the *module*, not the parameter:
  ``base_model.model.model.layers.0.mlp.experts.lora_A.weight``. Several targeted parameters
  of one module are nested wrappers, in the order the module registers its parameters
  (``named_parameters(recurse=False)``; the PEFT sort of ``target_parameters`` does not
  matter): the first is innermost. With gate_up_proj and down_proj both targeted:
  ``experts.base_layer.lora_A.weight`` is gate_up_proj, ``experts.lora_A.weight`` is
  down_proj. :func:`wrapped_params` reproduces this.
- ``target_modules=["w1", "w3"]`` (or ``gate_proj``/``up_proj`` on qwen2_moe-like types) on a
  transformers-5 model is rewritten by PEFT (``utils/transformers_weight_conversion.py``)
  into ``target_parameters=["gate_up_proj"]`` with ``rank_pattern``/``alpha_pattern`` 2r / 2*alpha
  (same scaling); ``["w2"]`` -> ``down_proj``; ``["gate"]`` -> ``gate.weight``; ``["w1"]`` alone
  raises ``ValueError: Cannot convert PEFT target(s) w1 without also targeting w3``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from converter.errors import UnsupportedBaseError

PEFT_PREFIX = "base_model.model."


class UnsupportedExpertLayoutError(UnsupportedBaseError):
    """A conversion rule from checkpoint keys to a fused parameter that we cannot invert slice by slice."""


@dataclass(frozen=True)
class ExpertSlice:
    """Where one checkpoint tensor lands in a model-side parameter.

    ``param[expert]`` (or the whole ``param`` when ``expert`` is None: the checkpoint tensor
    holds every expert, or the param is 2-D) is cut along ``dim`` (of the per-expert matrix,
    in the param's own orientation) to ``span`` (None: all of it); the checkpoint tensor is
    that part, transposed when ``transpose``.
    """

    param: str
    expert: int | None
    dim: int = 0
    span: slice | None = None
    transpose: bool = False

    @property
    def rows(self) -> slice | None:
        """The span when it cuts rows (dim 0), None when it covers every row."""
        return self.span if self.dim == 0 else None


@dataclass
class _Trace:
    """How one source tensor travels through a converter's operations (internal)."""

    key: str
    pattern: str
    shape: tuple[int, ...]  # the current tensor, its own or the stack / concatenation it joined
    expert: int | None = None
    stacked: bool = False  # the current tensor has a leading expert dim (3-D on disk, or after MergeModulelist)
    dim: int = 0
    span: slice | None = None
    transpose: bool = False


@dataclass(frozen=True)
class _Group:
    """The checkpoint keys that one converter turns into one model parameter (internal)."""

    param: str
    param_shape: tuple[int, ...]
    converter: object | None  # transformers WeightConverter, None for a plain renaming
    keys: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> keys, load order


def _conversion_rules(model):
    """Transformers' loading rules for ``model`` (renamings, converters), as ``from_pretrained`` uses them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    rules = get_model_conversion_mapping(model)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    return renamings, converters


def _model_name(key: str, renamings, converters, model, meta_shapes: Mapping[str, torch.Size]):
    """``(model-side name, matching source pattern or None)`` of a checkpoint key, as transformers loads it."""
    from transformers.core_model_loading import rename_source_key

    prefix = model.base_model_prefix
    name, pattern = rename_source_key(key, renamings, converters, prefix, meta_shapes)
    if name not in meta_shapes and key in meta_shapes:
        name, pattern = rename_source_key(key, [], [], prefix, meta_shapes)
    return name, pattern


def _is_wanted(name: str, meta_shapes: Mapping[str, torch.Size], params: Collection[str] | None) -> bool:
    if name not in meta_shapes:
        return False
    return name in params if params is not None else len(meta_shapes[name]) == 3


def _groups(model, keys: Iterable[str], params: Collection[str] | None) -> list[_Group]:
    """Checkpoint keys grouped by the parameter they build, in transformers' load order."""
    from transformers.core_model_loading import dot_natural_key

    renamings, converters = _conversion_rules(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_shapes = {n: p.shape for n, p in model.state_dict(keep_vars=True).items()}
    groups: dict[str, _Group] = {}
    for key in sorted(keys, key=dot_natural_key):
        name, pattern = _model_name(key, renamings, converters, model, meta_shapes)
        if not _is_wanted(name, meta_shapes, params):
            continue
        converter = by_pattern.get(pattern) if pattern is not None else None
        group = groups.setdefault(name, _Group(name, tuple(meta_shapes[name]), converter))
        group.keys.setdefault(pattern or key, []).append(key)
    return list(groups.values())


def _unsupported(group: _Group, what: str) -> UnsupportedExpertLayoutError:
    conv = group.converter
    return UnsupportedExpertLayoutError(
        f"cannot map checkpoint tensors onto {group.param}: {what} in the transformers converter "
        f"{conv.source_patterns} -> {conv.target_patterns} (operations {conv.operations}); "
        "handled: renaming, MergeModulelist(dim=0), Concatenate(dim>=1), Transpose of the matrix dims",
        hint="this layout needs PEFT's in-memory merge, or support for the operation in converter/experts.py",
    )


def _mismatch(group: _Group, what: str) -> UnsupportedExpertLayoutError:
    return UnsupportedExpertLayoutError(
        f"cannot build {group.param} {group.param_shape} from the checkpoint: {what}; "
        "the checkpoint does not match the model config"
    )


def _merge_modulelist(op, traces: list[_Trace], group: _Group) -> None:
    """``MergeModulelist(dim=0)``: each pattern's keys stack, expert = position in load order."""
    if op.dim != 0 or any(t.stacked for t in traces):
        raise _unsupported(group, f"MergeModulelist(dim={op.dim}) (only dim=0 on unstacked tensors is handled)")
    for pattern, keys in group.keys.items():
        members = [t for t in traces if t.pattern == pattern]
        if len({t.shape for t in members}) > 1:
            raise _mismatch(group, f"the tensors {keys} differ in shape ({sorted({t.shape for t in members})})")
        position = {key: i for i, key in enumerate(keys)}
        for trace in members:
            trace.expert, trace.stacked = position[trace.key], True
            trace.shape = (len(keys), *trace.shape)


def _concatenate(op, traces: list[_Trace], group: _Group) -> None:
    """``Concatenate(dim)``: the patterns' tensors join along ``dim`` in ``source_patterns`` order."""
    stacked = {t.stacked for t in traces}
    if stacked != {True} or op.dim < 1 or any(t.span is not None for t in traces):
        raise _unsupported(group, f"Concatenate(dim={op.dim}) not on expert stacks, or twice")
    order = [p for p in group.converter.source_patterns if p in group.keys]
    sizes = {t.pattern: t.shape[op.dim] for t in traces}
    offsets = dict(zip(order, [sum(sizes[p] for p in order[:i]) for i in range(len(order))]))
    total = sum(sizes.values())
    for trace in traces:
        start = offsets[trace.pattern]
        trace.dim, trace.span = op.dim - 1, slice(start, start + sizes[trace.pattern])
        trace.shape = (*trace.shape[: op.dim], total, *trace.shape[op.dim + 1 :])


def _transpose(op, traces: list[_Trace], group: _Group) -> None:
    """``Transpose`` of the two matrix dims (with ``check_dims``: only when the shape differs from the param's)."""
    for trace in traces:
        lead = 1 if trace.stacked else 0
        dims = {d % len(trace.shape) for d in (op.dim0, op.dim1)}
        if dims != {lead, lead + 1} or len(trace.shape) != lead + 2:
            raise _unsupported(group, f"Transpose({op.dim0}, {op.dim1}) of other than the matrix dims")
        if op.check_dims and trace.shape == group.param_shape:
            continue
        trace.shape = (*trace.shape[:lead], trace.shape[lead + 1], trace.shape[lead])
        trace.transpose = not trace.transpose
        if trace.span is not None:  # the span's dim, in the tensor's new orientation
            trace.dim = 1 - trace.dim


def _apply(op, traces: list[_Trace], group: _Group) -> None:
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    steps = {MergeModulelist: _merge_modulelist, Concatenate: _concatenate, Transpose: _transpose}
    step = steps.get(type(op))
    if step is None:
        raise _unsupported(group, type(op).__name__)
    step(op, traces, group)


def _group_slices(group: _Group, shapes: Mapping[str, Sequence[int]]) -> dict[str, ExpertSlice]:
    """Run the group's converter symbolically; check that the result has the param's shape."""
    traces = [_Trace(k, p, tuple(shapes[k]), stacked=len(shapes[k]) == 3)
              for p, keys in group.keys.items() for k in keys]
    if group.converter is not None:
        for op in group.converter.operations:
            _apply(op, traces, group)
    for trace in traces:
        if trace.shape != group.param_shape:
            raise _mismatch(group, f"{trace.key} {tuple(shapes[trace.key])} builds a tensor of shape {trace.shape}")
    return {t.key: ExpertSlice(group.param, t.expert, t.dim, t.span, t.transpose) for t in traces}


def expert_slices(model, ckpt_shapes: Mapping[str, Sequence[int]],
                  params: Collection[str] | None = None) -> dict[str, ExpertSlice]:
    """Checkpoint key -> the part of a model parameter it becomes, from transformers' loading rules.

    ``model``: the model on the meta device (``with torch.device("meta"): cls._from_config(config)``).
    ``ckpt_shapes``: every checkpoint key with its shape (from the safetensors headers: shapes
    give the concatenation offsets and ``Transpose(check_dims=True)``'s choice).
    ``params``: the model-side parameters to resolve (e.g. those an adapter targets); by
    default every 3-D parameter. Keys building other parameters are left out. Raises
    :class:`UnsupportedExpertLayoutError` for rules it cannot invert slice by slice.
    """
    slices: dict[str, ExpertSlice] = {}
    for group in _groups(model, ckpt_shapes.keys(), params):
        slices.update(_group_slices(group, ckpt_shapes))
    return slices


@dataclass(frozen=True)
class WrappedParam:
    """One parameter wrapped by PEFT's ``ParamWrapper`` and where its LoRA factors are saved.

    ``stem`` + ``.lora_A.weight`` / ``.lora_B.weight`` are the adapter file's keys;
    ``transposed``: the param stores each expert as (in, out) (``is_transposed`` experts).
    """

    param: str
    stem: str
    num_experts: int
    transposed: bool

    @property
    def lora_a_key(self) -> str:
        """The adapter file's key of this param's ``lora_A`` weight, (r * num_experts, in)."""
        return f"{self.stem}.lora_A.weight"

    @property
    def lora_b_key(self) -> str:
        """The adapter file's key of this param's ``lora_B`` weight, (out, r * num_experts)."""
        return f"{self.stem}.lora_B.weight"


def _targets(name: str, target_parameters: Collection[str]) -> bool:
    """PEFT's match of a ``target_parameters`` entry against ``"<module>.<param>"``."""
    return name in target_parameters or any(name.endswith(f".{t}") for t in target_parameters)


def _wrapped_on(module_name: str, module, target_parameters: Collection[str]) -> list[WrappedParam]:
    """The params of one module that PEFT wraps, innermost wrapper first."""
    names = [n for n, _ in module.named_parameters(recurse=False) if _targets(f"{module_name}.{n}", target_parameters)]
    wrapped = []
    for depth, name in enumerate(names):
        param = getattr(module, name)
        stem = PEFT_PREFIX + module_name + ".base_layer" * (len(names) - 1 - depth)
        is_3d = param.dim() == 3
        wrapped.append(WrappedParam(f"{module_name}.{name}", stem, param.shape[0] if is_3d else 1,
                                    is_3d and bool(getattr(module, "is_transposed", False))))
    return wrapped


def wrapped_params(model, target_parameters: Iterable[str]) -> dict[str, WrappedParam]:
    """Model param name -> how PEFT wraps it for a LoRA with these ``target_parameters``.

    ``model``: the base model (meta device is fine). Mirrors
    ``BaseTuner._inject_parameters``: a param ``"<module>.<name>"`` is targeted when it equals
    an entry or ends with ``"." + entry``; wrappers nest in parameter registration order.
    Covers adapters whose config lists ``target_parameters`` (including those PEFT rewrote
    from v4 ``target_modules`` like ``w1``/``w3`` and saved).
    """
    targets = set(target_parameters)
    found: dict[str, WrappedParam] = {}
    for module_name, module in model.named_modules():
        if module_name:
            found.update((w.param, w) for w in _wrapped_on(module_name, module, targets))
    return found


@dataclass(frozen=True)
class ExpertLora:
    """The LoRA factors of one wrapped parameter, as saved: A (r*E, in), B (out, r*E)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    num_experts: int
    transposed: bool = False

    @property
    def rank(self) -> int:
        """The LoRA rank r per expert."""
        return self.lora_a.shape[0] // self.num_experts


def expert_delta(lora: ExpertLora, expert: int) -> torch.Tensor:
    """One expert's LoRA delta, fp32, in the fused param's orientation (``param[expert]``'s shape).

    ``ParamWrapper.get_delta_weight`` restricted to one expert: the same einsum on that
    expert's A rows and (strided) B columns, then ``* scaling``; bit-equal to PEFT's slice in fp32.
    """
    a = lora.lora_a.reshape(lora.num_experts, lora.rank, -1)[expert : expert + 1].float()
    b = lora.lora_b.reshape(lora.lora_b.shape[0], lora.rank, lora.num_experts)[:, :, expert : expert + 1].float()
    if lora.num_experts == 1:  # PEFT: Linear.get_delta_weight
        delta = (b[:, :, 0] @ a[0]) * lora.scale
        return delta.T if lora.transposed else delta
    equation = "o r e, e r i -> e i o" if lora.transposed else "o r e, e r i -> e o i"
    return torch.einsum(equation, b, a)[0] * lora.scale


def _part(delta: torch.Tensor, where: ExpertSlice) -> torch.Tensor:
    """The span of a per-expert (or whole) delta, oriented as the checkpoint tensor."""
    lead = delta.dim() - 2
    if where.span is not None:
        delta = delta.narrow(lead + where.dim, where.span.start, where.span.stop - where.span.start)
    return delta.transpose(-2, -1) if where.transpose else delta


def key_delta(where: ExpertSlice, lora: ExpertLora) -> torch.Tensor:
    """The fp32 delta of one checkpoint tensor, in its own shape and orientation.

    For a per-expert key this is one expert's delta (cut and transposed as needed). For a
    key holding every expert (``expert is None``, a 3-D tensor) it stacks all experts' deltas:
    prefer :func:`merge_tensor`, which adds them one expert at a time.
    """
    if where.expert is not None or lora.num_experts == 1:
        return _part(expert_delta(lora, where.expert or 0), where)
    return torch.stack([_part(expert_delta(lora, e), where) for e in range(lora.num_experts)])


def merge_tensor(base: torch.Tensor, where: ExpertSlice, lora: ExpertLora) -> torch.Tensor:
    """``base`` (a checkpoint tensor) with its delta merged as PEFT does: ``base += delta.to(base.dtype)``.

    Works on a copy, one expert at a time for keys holding every expert, so the extra
    memory is one expert's delta.
    """
    merged = base.clone()
    if where.expert is not None or lora.num_experts == 1:
        merged += key_delta(where, lora).to(base.dtype)
        return merged
    for e in range(lora.num_experts):
        merged[e] += _part(expert_delta(lora, e), where).to(base.dtype)
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# Planning: an adapter's ``target_parameters`` onto the checkpoint's own tensors.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertOp:
    """A LoRA on a (fused expert) parameter, as it lands on one checkpoint tensor: where, and its saved factors."""

    where: ExpertSlice
    a_key: str
    b_key: str
    scale: float
    num_experts: int
    transposed: bool

    @property
    def by_rows(self) -> bool:
        """Whether this tensor is one expert's (or a 2-D parameter's) rows, oriented as the parameter: its delta is
        then ``B_part @ A_e * scale`` and it merges in row chunks like a linear LoRA."""
        return (self.where.expert is not None or self.num_experts == 1) and not self.where.transpose \
            and not self.transposed and (self.where.span is None or self.where.dim == 0)

    @property
    def label(self) -> str:
        """How probes name it: the parameter, and the expert."""
        return self.where.param + (f"[{self.where.expert}]" if self.where.expert is not None else "")

    def row_factors(self, adapter, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e (r, in), B_e of this tensor's rows (rows, r)) in fp32, for a ``by_rows`` tensor."""
        a, b = adapter.get(self.a_key), adapter.get(self.b_key)
        r = a.shape[0] // self.num_experts
        expert = self.where.expert or 0
        a = a.reshape(self.num_experts, r, -1)[expert]
        b = b.reshape(b.shape[0], r, self.num_experts)[:, :, expert]
        if self.where.span is not None:
            b = b[self.where.span]
        return (a.to(device=device, dtype=torch.float32).contiguous(),
                b.to(device=device, dtype=torch.float32).contiguous())

    def lora(self, adapter, device=None) -> ExpertLora:
        """The factors, read from the adapter (onto ``device``)."""
        return ExpertLora(adapter.get(self.a_key).to(device), adapter.get(self.b_key).to(device), self.scale,
                          self.num_experts, self.transposed)


@dataclass
class ExpertPlan:
    """Checkpoint key -> its ExpertOp; the adapter keys it accounts for; what does not fit."""

    ops: dict[str, ExpertOp] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def meta_model(base_dir, trust_remote_code: bool = False):
    """The base's model class built on the meta device (no memory), or None when transformers cannot build it."""
    from converter.modelinfo import resolve_model_class

    hf_config, cls = resolve_model_class(base_dir, trust_remote_code)
    if hf_config is None:
        return None
    with torch.device("meta"):
        return cls._from_config(hf_config)


def plan_experts(model, ckpt_shapes: Mapping[str, Sequence[int]], adapter, scale_of) -> ExpertPlan:
    """Every LoRA on a ``target_parameters`` parameter mapped onto the checkpoint tensors it is stored in.

    ``adapter``: keys (with PEFT's prefix), ``shape(key)``; ``scale_of(param) -> (r, scale)``
    (rank and alpha patterns resolved by the caller).
    """
    plan = ExpertPlan()
    keys = {k.removeprefix(PEFT_PREFIX): k for k in adapter.keys()}
    wrapped = {p: w for p, w in wrapped_params(model, adapter.config.get("target_parameters") or []).items()
               if w.lora_a_key.removeprefix(PEFT_PREFIX) in keys}
    factors: dict[str, tuple[str, str]] = {}
    for param, w in wrapped.items():
        a_key, b_key = keys[w.lora_a_key.removeprefix(PEFT_PREFIX)], keys.get(w.lora_b_key.removeprefix(PEFT_PREFIX))
        plan.claimed |= {a_key, b_key} - {None}
        problem = _factor_misfit(model, param, w, adapter.shape(a_key), adapter.shape(b_key) if b_key else None,
                                 scale_of(param)[0])
        if problem:
            plan.problems.append(f"{a_key}: {problem}")
        else:
            factors[param] = (a_key, b_key)
    slices = expert_slices(model, ckpt_shapes, params=set(factors))
    for key, where in slices.items():
        w, (a_key, b_key) = wrapped[where.param], factors[where.param]
        plan.ops[key] = ExpertOp(where, a_key, b_key, scale_of(where.param)[1], w.num_experts, w.transposed)
    landed = {where.param for where in slices.values()}
    plan.problems += [f"{factors[p][0]}: no checkpoint tensor builds {p}" for p in factors if p not in landed]
    return plan


def _factor_misfit(model, param: str, w: WrappedParam, a_shape, b_shape, r: int) -> str | None:
    """Why saved factors do not fit the wrapped parameter, or None."""
    if b_shape is None:
        return "has lora_A but not its lora_B"
    shape = model.get_parameter(param).shape
    out_dim, in_dim = (shape[-1], shape[-2]) if w.transposed else (shape[-2], shape[-1])
    want_a, want_b = (r * w.num_experts, in_dim), (out_dim, r * w.num_experts)
    if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
        return (f"LoRA of shape A{tuple(a_shape)} B{tuple(b_shape)} does not fit {param} {tuple(shape)} "
                f"(expected A{want_a} B{want_b} for r={r} per expert)")
    return None
