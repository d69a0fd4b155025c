"""A model run block by block, each block's weights read from disk as it runs: end-to-end figures at any size.

The model (or the unmerged PeftModel over it) is built by transformers from its config with
no weights in memory: every parameter of the base is a placeholder on the ``meta`` device, and
the buffers transformers computes itself (rotary frequencies...) are real. A forward pre-hook on
each block (every element of the model's ``ModuleList``s, and every other module that holds
parameters of its own) reads the block's tensors from the checkpoint (``Checkpoint.get``:
through a quantized base's codec, and fused MoE parameters assembled from per-expert tensors
as transformers' conversion rules say), casts them to float32 on the device and puts them in
place; a forward hook puts the placeholders back. The model's own forward runs unchanged, so
every architecture transformers can build works, and peak memory is one block's weights plus
the activations. A parameter used outside its block's forward stays a ``meta`` placeholder:
the run fails loudly instead of reading garbage.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from converter.checkpoint import Checkpoint, read_into
from converter.errors import VerificationError
from converter.experts import ExpertSlice, expert_slices
from converter.modelinfo import ModelInfo
from converter.plan import Resolver

READ_THREADS = min(4, os.cpu_count() or 1)
PIECE_BYTES = 32 << 20


@dataclass(eq=False)
class _Slot:
    """One parameter of the model: where it lives, what fills it, and its placeholder."""

    module: nn.Module
    name: str
    key: str | None  # the checkpoint tensor that fills it (None: assembled from ``parts``, or not in the checkpoint)
    placeholder: nn.Parameter
    parts: list[tuple[str, ExpertSlice]] = field(default_factory=list)  # (checkpoint key, where) of a fused param
    label: str = ""  # the parameter's name in the model


class BlockLoader:
    """Fills a model's base parameters block by block from a checkpoint, on ``device``, in float32.

    Made on the model as ``empty_model`` built it (its parameters are the base's); ``attach``
    after PEFT wrapped it (the adapter's own tensors stay in memory, loaded by PEFT)."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint, info: ModelInfo, device: torch.device,
                 provided: frozenset[str] = frozenset()):
        self.ckpt, self.device = ckpt, device
        self.slots = _slots(model, ckpt, Resolver(ckpt.specs, info), provided)
        self.missing = [s.label for ss in self.slots.values() for s in ss if s.key is None and not s.parts]
        self.hooks: list = []
        self.loaded_bytes = 0  # read from the checkpoint in all
        self.live_bytes = self.peak_live_bytes = 0  # held at once (one block's, between its hooks)
        self._pool: dict[tuple, list[torch.Tensor]] = {}  # float32 buffers freed by earlier blocks, by shape
        self._order: list[list[_Slot]] = []  # the blocks, in the order they are expected to run
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="read-block")
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read-piece")
        self._ahead: tuple[int, Future] | None = None  # the next block's bytes, being read while this one runs
        self._arenas = [torch.empty(0, dtype=torch.uint8)] * 2  # a block's stored bytes: block i's in arena i % 2

    def attach(self, root: nn.Module) -> None:
        """Put the placeholders in, and hook every block of ``root`` (the model, or the PeftModel around it)."""
        for slot in (s for ss in self.slots.values() for s in ss):
            slot.module._parameters[slot.name] = slot.placeholder
        for block in _blocks(root, self.slots):
            mine = [s for m in block.modules() for s in self.slots.get(id(m), [])]
            if mine:
                index = len(self._order)
                self._order.append(mine)
                self.hooks.append(block.register_forward_pre_hook(lambda mod, args, i=index: self._load(i)))
                self.hooks.append(block.register_forward_hook(lambda mod, args, out, slots=mine: self._free(slots)))

    def detach(self) -> None:
        """Remove the hooks; wait for a read still running."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self._take(-1)
        self._reader.shutdown()
        self._readers.shutdown()

    def _load(self, index: int) -> None:
        read = self._take(index)
        if index + 1 < len(self._order):  # the next block's bytes, read (into the other arena) while this one runs
            self._ahead = (index + 1, self._reader.submit(self._read_block, index + 1))
        for slot in self._order[index]:
            value = self._value(slot, read, index)
            self.loaded_bytes += value.numel() * value.element_size()
            self.live_bytes += value.numel() * value.element_size()
            slot.module._parameters[slot.name] = nn.Parameter(value, requires_grad=False)
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)

    def _take(self, index: int) -> dict[str, torch.Tensor]:
        """The bytes read ahead for block ``index`` (empty when another block was read ahead)."""
        if self._ahead is None:
            return {}
        ahead, future = self._ahead
        self._ahead = None
        read = future.result()
        return read if ahead == index else {}

    def _arena(self, index: int, nbytes: int) -> torch.Tensor:
        """Block ``index``'s arena, at least ``nbytes`` long (pinned for a GPU: faster copies)."""
        arena = self._arenas[index % 2]
        if arena.numel() < nbytes:
            arena = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._arenas[index % 2] = arena
        return arena

    def _read_block(self, index: int) -> dict[str, torch.Tensor]:
        """The stored bytes of a block's plain tensors, read into its arena (views of it, by key)."""
        specs = [rows.spec for rows in (self.ckpt.row_source(k) for k in _keys(self._order[index]))
                 if rows is not None and rows.decode is None]
        arena = self._arena(index, sum(spec.nbytes for spec in specs))
        read, at, pieces = {}, 0, []
        for spec in specs:
            view = arena[at: at + spec.nbytes]
            pieces += self._pieces(spec, view)
            read[spec.name] = view.view(spec.dtype).view(spec.shape)
            at += spec.nbytes
        for piece in pieces:
            piece.result()
        return read

    def _pieces(self, spec, view: torch.Tensor) -> list[Future]:
        """``spec``'s bytes read into ``view`` by several threads (copies out of the page cache scale with them)."""
        step = max(PIECE_BYTES, -(-spec.nbytes // READ_THREADS))
        return [self._readers.submit(read_into, spec, spec.start + at, view[at: at + step])
                for at in range(0, spec.nbytes, step)]

    def _free(self, slots: list[_Slot]) -> None:
        for slot in slots:
            value = slot.module._parameters[slot.name]
            if value is not slot.placeholder:
                self.live_bytes -= value.numel() * value.element_size()
                self._pool.setdefault(tuple(value.shape), []).append(value.data)  # the next block's, same shape
            slot.module._parameters[slot.name] = slot.placeholder

    def _value(self, slot: _Slot, read: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        """The slot's tensor in float32 on the device, in a buffer a block before it used (no fresh pages)."""
        shape = tuple(slot.placeholder.shape)
        free = self._pool.get(shape)
        value = free.pop() if free else torch.empty(shape, dtype=torch.float32, device=self.device)
        if slot.key is not None:
            stored = self._on_device(read[slot.key] if slot.key in read else self._stored(slot.key, index))
            if tuple(stored.shape) == shape:
                return value.copy_(stored)
            rows = min(shape[0], stored.shape[0])  # a vocabulary the adapter resized: the base's rows, zeros after
            value.zero_()[:rows].copy_(stored[:rows])
            return value
        for key, where in slot.parts:
            part = value if where.expert is None else value[where.expert]
            if where.span is not None:
                part = part.narrow(part.dim() - 2 + where.dim, where.span.start, where.span.stop - where.span.start)
            stored = self._on_device(read[key] if key in read else self._stored(key, index))
            part.copy_(stored.transpose(-2, -1) if where.transpose else stored)
        return value

    def _on_device(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored tensor on the device in its own dtype (the copy moves half the bytes of float32; the
        widening then runs on the device)."""
        return stored if stored.device == self.device else stored.to(self.device)

    def _stored(self, key: str, index: int) -> torch.Tensor:
        """A checkpoint tensor as stored (read into block ``index``'s arena where it is a plain byte range: nothing
        was read ahead for this block, so its arena is free), or decoded."""
        rows = self.ckpt.row_source(key)
        if rows is None or rows.decode is not None:
            return self.ckpt.get(key)
        spec = rows.spec
        arena = self._arena(index, spec.nbytes)
        for piece in self._pieces(spec, arena[: spec.nbytes]):
            piece.result()
        return arena[: spec.nbytes].view(spec.dtype).view(spec.shape)


def _keys(slots: list[_Slot]) -> list[str]:
    """The checkpoint tensors a block's slots are filled from."""
    return [k for s in slots for k in ([s.key] if s.key is not None else [key for key, _ in s.parts])]


def _slots(model: nn.Module, ckpt: Checkpoint, resolve: Resolver, provided: frozenset[str]) -> dict[int, list[_Slot]]:
    """Every parameter of ``model`` (by its module's id): the checkpoint key (or expert parts) that fills it;
    not those the adapter file holds whole (``provided``: PEFT loads them)."""
    aliases: dict[int, list[str]] = {}  # a parameter's names (tied ones have several)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    keys = {pid: next((k for k in map(resolve, names) if k), None) for pid, names in aliases.items()}
    fused = _fused_parts(model, ckpt, [names[0] for pid, names in aliases.items() if keys[pid] is None])
    slots: dict[int, list[_Slot]] = {}
    for module_name, module in model.named_modules():  # a module shared by two parents (T5's embeddings): once
        for name, param in list(module._parameters.items()):
            if param is None or provided.intersection(aliases[id(param)]):
                continue
            placeholder = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
            label = aliases[id(param)][0]
            slots.setdefault(id(module), []).append(_Slot(module, name, keys[id(param)], placeholder,
                                                          fused.get(label, []), label))
    return slots


def _fused_parts(model: nn.Module, ckpt: Checkpoint, unresolved: list[str]) -> dict[str, list]:
    """Parameters built from several checkpoint tensors (fused MoE experts), by transformers' conversion rules."""
    if not unresolved:
        return {}
    try:
        slices = expert_slices(model, {k: s.shape for k, s in ckpt.specs.items()}, params=set(unresolved))
    except Exception:  # noqa: BLE001 - a layout we cannot invert: those parameters stay missing (named)
        return {}
    parts: dict[str, list] = {}
    for key, where in slices.items():
        parts.setdefault(where.param, []).append((key, where))
    return parts


def _blocks(root: nn.Module, slots: dict[int, list[_Slot]]) -> list[nn.Module]:
    """The elements of every ModuleList (outermost), and every other module holding parameters outside them."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, module in root.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and any(slots.get(id(m)) for m in module.modules()):
            for child in module:
                blocks.append(child)
                inside.update(id(m) for m in child.modules())
            inside.add(id(module))
        elif slots.get(id(module)):  # with the modules inside it: one block
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def empty_model(model_cls, model_dir: Path, trust_remote_code: bool = False, real: tuple[str, ...] = (),
                overrides: dict | None = None) -> nn.Module:
    """The model transformers builds from ``model_dir``'s config, in float32, with no weights: each parameter a
    CPU tensor of one element seen at its shape (PEFT can wrap it: its layers are made where the base layer is),
    buffers computed on the CPU. Modules named by ``real`` (names or suffixes: PEFT's ``modules_to_save``, which it
    copies, and modules whose tensors the adapter file holds, which it loads) get uninitialised tensors of their own."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **(overrides or {}))
    for key in ("quantization_config", "compression_config"):
        if hasattr(config, key):
            delattr(config, key)  # the weights come decoded from the checkpoint, never as codes
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = model_cls._from_config(config, dtype=torch.float32)
    model.tie_weights()  # as from_pretrained does (outside accelerate's context, which would re-register it)
    made: dict[int, nn.Parameter] = {}  # by the original's id: tied parameters stay one
    for module_name, module in model.named_modules(remove_duplicate=False):
        own = any(module_name == r or module_name.endswith("." + r) for r in real)
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in made:
                value = torch.empty(param.shape) if own else torch.zeros((), dtype=param.dtype).expand(param.shape)
                made[id(param)] = nn.Parameter(value, requires_grad=False)
            module._parameters[name] = made[id(param)]
    return model.eval()


class StreamUnsupported(Exception):
    """The streamed run cannot be made for this model (parameters found nowhere, or used outside their block)."""


def streamed_outputs(model: nn.Module, loader: BlockLoader, root: nn.Module, inputs: dict, device: torch.device):
    """``model_outputs`` of ``root`` (the model, or the PeftModel around it) with ``loader`` filling its blocks."""
    from converter.verify import model_outputs

    loader.attach(root)
    _to_device(root, device)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a reference in float32, never TF32 on a GPU
    try:
        logits, is_logits = model_outputs(root, {k: v.to(device) for k, v in inputs.items()})
        return logits.cpu(), is_logits
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # a meta placeholder used outside its block
        raise StreamUnsupported(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from None
    finally:
        torch.set_float32_matmul_precision(precision)
        loader.detach()


def adapter_held(adapter) -> frozenset[str]:
    """The base's parameters the adapter file holds whole (an embedding saved beside its LoRA, a trained bias):
    PEFT loads them over the base's, so the streamed run leaves them to it."""
    from converter.plan import split_key

    held = set()
    for key in adapter.keys():
        module, role = split_key(key)
        if role in ("replace_weight", "replace_bias"):
            held.add(f"{module}.{role.removeprefix('replace_')}")
        elif role == "full" and ".modules_to_save." not in module:
            held.add(module)
    return frozenset(held)


def _to_device(root: nn.Module, device: torch.device) -> None:
    """Everything held in memory (buffers, the adapter's tensors) onto ``device``; placeholders stay on meta."""
    if device.type == "cpu":
        return
    for module in root.modules():
        for store in (module._parameters, module._buffers):
            for name, value in list(store.items()):
                if value is not None and value.device.type != "meta":
                    moved = value.to(device)
                    store[name] = nn.Parameter(moved, requires_grad=False) if store is module._parameters else moved


def streamed_figures(model_cls, base: Checkpoint, base_dir: Path, base_info: ModelInfo, parts: list, merged: Checkpoint,
                     merged_info: ModelInfo, vocab_size: int | None, device: torch.device,
                     trust_remote_code: bool = False, overrides: dict | None = None):
    """Figures of the merged checkpoint against the unmerged PeftModel (every adapter of ``parts``,
    converter.stack.Part, active), both run block by block from disk."""
    from converter.stack import reference_model
    from converter.verify import compare, probe_inputs

    provided = frozenset().union(*(adapter_held(p.adapter) for p in parts))
    real = tuple(m for p in parts for m in p.adapter.config.get("modules_to_save") or ()) + \
        tuple(p.rpartition(".")[0] for p in provided)
    model = empty_model(model_cls, base_dir, trust_remote_code, real, overrides)
    if vocab_size is not None and model.get_input_embeddings().weight.shape[0] != vocab_size:
        model.resize_token_embeddings(vocab_size)
    loader = BlockLoader(model, base, base_info, device, provided)
    if loader.missing:
        raise StreamUnsupported(f"no tensor of the base is found for {', '.join(loader.missing[:5])}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerged = reference_model(model, parts)
    inputs = probe_inputs(model.config)
    ref, is_logits = streamed_outputs(model, loader, unmerged, inputs, device)
    del unmerged, model, loader
    model = empty_model(model_cls, merged.directory, trust_remote_code, overrides=overrides)
    loader = BlockLoader(model, merged, merged_info, device)
    if loader.missing:
        raise VerificationError(f"the merged checkpoint has no tensor for {', '.join(loader.missing[:5])}: "
                                "the model it describes cannot be built from it. Nothing was published")
    got, _ = streamed_outputs(model, loader, model, inputs, device)
    return compare(ref, got, is_logits)
