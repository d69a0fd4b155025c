"""Adapter stacks: several adapters merged into one base in the same pass.

In order (no weights), as PEFT's ``merge_and_unload(adapter_names=[...])``: each adapter is
merged into the weight the previous one left, rounded to the base dtype in between (DoRA's
norm sees that weight, so order matters). Weighted, as PEFT's ``add_weighted_adapter(...,
combination_type="cat")`` merged: one LoRA whose factors are every adapter's, A scaled by its
weight and scaling, concatenated along the rank and zero-padded to PEFT's rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from converter.adapter import Adapter
from converter.errors import AdapterMismatchError, BadInputError
from converter.plan import LoraOp, MergePlan, TensorPlan, needs_peft_engine
from converter.sources import REPO_ID, Resolved

WEIGHTED_FIX = "merge the stack without --adapter-weight (in order), or merge that adapter on its own"


@dataclass
class Part:
    """One adapter of a job: read, resolved, hashed, with its weight in a weighted mix."""

    adapter: Adapter
    src: Resolved
    hashes: dict[str, str]  # sha256 of every adapter file
    weight: float | None = None
    given: str = ""  # as the job names it

    def label(self, index: int) -> str:
        """How messages name it: its place in the stack and its source."""
        return f"adapter {index + 1} ({self.given or self.src.path})"


class StackedTensors:
    """The tensors of a stack as the merge reads them: ``<i>:<key>`` is adapter i's ``key``; ``mix:<name>:A`` and
    ``mix:<name>:B`` the weighted mix's factors for output tensor ``name``, made when read."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        # output tensor -> ([(A key, B key, weight, scaling)], the mix's rank, the dtype PEFT makes the mix in)
        self.mixes: dict[str, tuple[list[tuple[str, str, float, float]], int, torch.dtype]] = {}

    def get(self, key: str) -> torch.Tensor:
        """A tensor of one adapter, or a factor of the weighted mix."""
        where, _, rest = key.partition(":")
        if where != "mix":
            return self.parts[int(where)].adapter.get(rest)
        name, _, factor = rest.rpartition(":")
        return self._mixed(name, factor)

    def _mixed(self, name: str, factor: str) -> torch.Tensor:
        """PEFT's cat: A_i * weight_i * scaling_i stacked along the rank, B_i beside each other, zeros up to the
        mix's rank (the sum of every adapter's largest rank), stored in the dtype PEFT makes the mix in."""
        members, rank, dtype = self.mixes[name]
        if factor == "A":
            a = torch.cat([self.get(a_key).float() * w * s for a_key, _, w, s in members], dim=0)
            return torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0).to(dtype)
        b = torch.cat([self.get(b_key).float() for _, b_key, _, _ in members], dim=1)
        return torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1).to(dtype)


def check_stack(parts: list[Part], weighted: bool, allow_base_mismatch: bool) -> None:
    """A stack's (or a weighted adapter's) adapters must be LoRAs our engine merges, trained on the same base
    (recorded name, revision)."""
    if len(parts) == 1 and not weighted:
        return
    for i, part in enumerate(parts):
        reason = needs_peft_engine(part.adapter)
        if reason:
            raise BadInputError(f"{part.label(i)}: {reason}; a stack (or a weighted adapter) is merged by our "
                                "streaming engine, which merges LoRA adapters", hint="merge that adapter on its own, "
                                "without --adapter-weight")
        if weighted and part.adapter.config.get("target_parameters"):
            raise BadInputError(f"{part.label(i)} targets parameters (MoE experts): a weighted mix combines LoRAs "
                                "on modules only, as PEFT's add_weighted_adapter", hint=WEIGHTED_FIX)
    if allow_base_mismatch:
        return
    for key, what in (("base_model_name_or_path", "base"), ("revision", "base revision")):
        recorded = [(i, p.adapter.config.get(key)) for i, p in enumerate(parts)]
        if key == "base_model_name_or_path":  # local paths name the same model in many ways: hub ids only
            recorded = [(i, v) for i, v in recorded if v and REPO_ID.match(str(v))]
        recorded = [(i, v) for i, v in recorded if v]
        for (i, first), (j, other) in zip(recorded, recorded[1:]):
            if other != first:
                raise AdapterMismatchError(
                    f"the stack's adapters were trained on different bases: {parts[i].label(i)} records {what} "
                    f"{first} but {parts[j].label(j)} records {other} (adapter_config.json `{key}`)",
                    hint="stack adapters trained on the same base, or set allow_base_mismatch "
                         "(--allow-base-mismatch) if you know they match")


def rekeyed(plan: MergePlan, index: int) -> MergePlan:
    """The plan with every adapter key prefixed ``<index>:``, as StackedTensors names them."""
    def key(k: str | None) -> str | None:
        return None if k is None else f"{index}:{k}"

    def tensor(tp: TensorPlan) -> TensorPlan:
        lora = tp.lora and replace(tp.lora, a_key=key(tp.lora.a_key), b_key=key(tp.lora.b_key),
                                   magnitude_key=key(tp.lora.magnitude_key))
        expert = tp.expert and replace(tp.expert, a_key=key(tp.expert.a_key), b_key=key(tp.expert.b_key))
        return replace(tp, replace_key=key(tp.replace_key), bias_key=key(tp.bias_key), rows_key=key(tp.rows_key),
                       lora=lora, expert=expert)

    return replace(plan, tensors={n: tensor(t) for n, t in plan.tensors.items()})


def stack_plan(plans: list[MergePlan], parts: list[Part], base_names, tensors: StackedTensors,
               weighted: bool, dtype: torch.dtype) -> MergePlan:
    """One plan for the stack from each adapter's own (keys already ``rekeyed``): a tensor several adapters change
    is merged by each in turn (``TensorPlan.then``), or, weighted, by their mix (made in ``dtype``, the one the
    base is merged in, as PEFT makes it in the loaded base's)."""
    names = dict.fromkeys(n for p in plans for n in p.tensors)
    # a base tensor one adapter's task head leaves out (its task class has no place for it) stays out
    names = [n for n in names if not (n in base_names and any(n not in p.tensors for p in plans))]
    out, problems = {}, []
    for name in names:
        touched = [(i, p.tensors[name]) for i, p in enumerate(plans) if name in p.tensors and _changes(p.tensors[name])]
        if not touched:
            out[name] = next(p.tensors[name] for p in plans if name in p.tensors)
            continue
        replacing = [i for i, t in touched if t.replace_key]
        if replacing and len(touched) > 1:
            i, j = replacing[0], next(k for k, _ in touched if k != replacing[0])
            problems.append(f"{parts[i].label(i)} replaces {name} (modules_to_save or a task head) and "
                            f"{parts[j].label(j)} also changes it: one would undo the other")
            continue
        (_, first), *rest = touched
        out[name] = replace(first, then=tuple(t for _, t in rest))
    sizes = {p.vocab_size for p in plans if p.vocab_size is not None}
    if len(sizes) > 1:
        problems.append(f"the stack's adapters resize the vocabulary differently: {', '.join(map(str, sorted(sizes)))}")
    if problems:
        raise AdapterMismatchError(problems, hint="stack adapters that change different modules, or merge them "
                                   "one at a time")
    plan = MergePlan(out, untie=any(p.untie for p in plans), vocab_size=sizes.pop() if sizes else None,
                     head=next((p.head for p in plans if p.head is not None), None))
    if weighted:
        _mix(plan, parts, tensors, dtype)
    plan.modules = {t.lora.module: t.lora for t in plan.tensors.values() if t.lora is not None}
    return plan


def _index(key: str) -> int:
    """The stack position a ``rekeyed`` key belongs to."""
    return int(key.partition(":")[0])


def _changes(tp: TensorPlan) -> bool:
    return tp.action == "merge" or tp.replace_key is not None


def _mix(plan: MergePlan, parts: list[Part], tensors: StackedTensors, dtype: torch.dtype) -> None:
    """Each changed tensor's LoRAs as one (PEFT's add_weighted_adapter "cat", merged with scaling 1: its factors
    in ``dtype``, and so its delta, rounded before it is added); anything a weight cannot scale is refused."""
    rank = sum(_largest_rank(p.adapter.config) for p in parts)
    for name, tp in plan.tensors.items():
        links = (tp, *tp.then)
        if not _changes(tp):
            continue
        for link in links:
            what = _unweighable(link)
            if what:
                i = _index(link.replace_key or link.rows_key or link.bias_key or link.lora.a_key)
                raise BadInputError(f"{parts[i].label(i)} has {what} on {name}, which a weighted mix cannot scale "
                                    "(PEFT's add_weighted_adapter combines LoRA factors only)", hint=WEIGHTED_FIX)
        members = [(t.lora.a_key, t.lora.b_key, parts[_index(t.lora.a_key)].weight, t.lora.scale) for t in links]
        tensors.mixes[name] = (members, rank, dtype)
        mixed = LoraOp(tp.lora.module, tp.lora.kind, f"mix:{name}:A", f"mix:{name}:B", rank, rank, 1.0,
                       tp.lora.fan_in_fan_out, rounds_delta=True)
        plan.tensors[name] = replace(tp, lora=mixed, then=())


def _unweighable(tp: TensorPlan) -> str | None:
    if tp.replace_key:
        return "a replaced tensor (modules_to_save or a task head)"
    if tp.rows_key:
        return "trainable tokens"
    if tp.bias_key:
        return "a trained bias (lora_bias)"
    if tp.lora is None:
        return "an expert LoRA"
    if tp.lora.magnitude_key:
        return "DoRA magnitudes"
    return None


def _largest_rank(config: dict) -> int:
    """PEFT's rank for an adapter in a mix: r, or the largest of its rank_pattern."""
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def reference_model(model, parts: list[Part]):
    """What the merged model is compared with: the unmerged PeftModel with every adapter active at once, each
    LoRA's scaling times its weight in a weighted mix. (PEFT merges a DoRA adapter stacked after others with the
    norm of the weight without them, as its forward computes it: merged in order equals all active.)"""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if len(parts) == 1 and parts[0].weight is None:
        return PeftModel.from_pretrained(model, parts[0].src.path).eval()
    names = [f"stack_{i}" for i in range(len(parts))]
    peft_model = PeftModel.from_pretrained(model, parts[0].src.path, adapter_name=names[0])
    for name, part in zip(names[1:], parts[1:]):
        peft_model.load_adapter(part.src.path, adapter_name=name)
    peft_model.base_model.set_adapter(names)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, part in zip(names, parts):
                if part.weight is not None and name in module.scaling:
                    module.scaling[name] *= part.weight
    return peft_model.eval()
