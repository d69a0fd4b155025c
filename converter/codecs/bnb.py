"""bitsandbytes bases (``quant_method: bitsandbytes``), as transformers' ``save_pretrained`` writes them.

4-bit (QLoRA's nf4 / fp4, with or without double quantization): ``<m>.weight`` holds the
packed codes (uint8, two per byte, shape ``(n/2, 1)``), beside ``<m>.weight.absmax``,
``.quant_map``, ``.nested_absmax`` / ``.nested_quant_map`` (double quantization) and
``.quant_state.bitsandbytes__<type>`` (JSON packed in a uint8 tensor: shape, dtype, block size).
8-bit (LLM.int8()): ``<m>.weight`` int8 codes with ``<m>.SCB`` (one float32 scale per row) and
``<m>.weight_format``. Decoding is bitsandbytes' own functional API, as PEFT dequantizes these
weights when it merges into them.
"""

from __future__ import annotations

import torch

from converter.checkpoint import TensorSpec
from converter.codecs import Codec, Stored, model_dtype
from converter.errors import BadInputError, UnsupportedBaseError

QUANT_STATE = ".quant_state.bitsandbytes__"
STATE_ROOM = 64  # bytes a re-encoded quant state (JSON) may grow by: its nested_offset has other digits
FIX = "re-save the base with transformers (save_pretrained of the quantized model), or use its unquantized release"


def codec_for(quant_config: dict, config: dict) -> Codec:
    """The 4-bit or 8-bit codec the config names."""
    if quant_config.get("load_in_4bit"):
        return Bnb4bit(quant_config, config)
    if quant_config.get("load_in_8bit"):
        return Bnb8bit(quant_config, config)
    raise UnsupportedBaseError("the base's quantization_config says bitsandbytes but neither load_in_4bit nor "
                               "load_in_8bit", hint=FIX)


class Bnb4bit(Codec):
    method = "bitsandbytes"
    package = "bitsandbytes"
    kept_tolerance = {"max_rel_diff": 0.5, "max_kl": 0.1, "min_top1": 0.5}  # as the bnb-nf4 variant's

    def __init__(self, quant_config: dict, config: dict):
        super().__init__(quant_config, config)
        self.label = f"bitsandbytes 4-bit {quant_config.get('bnb_4bit_quant_type', 'fp4')}"

    def find(self, specs: dict[str, TensorSpec], read) -> dict[str, Stored]:
        """Every weight with a packed quant state; its absmax and quant map must be there and fit."""
        found: dict[str, Stored] = {}
        for name in specs:
            if QUANT_STATE in name:
                weight = name[: name.index(QUANT_STATE)]
                found[weight] = self._stored(weight, name, specs, read)
        _orphans(specs, found, (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"))
        return found

    def _stored(self, weight: str, state_key: str, specs: dict[str, TensorSpec], read) -> Stored:
        parts = {"codes": _required(specs, weight, state_key), state_key[len(weight) + 1:]: specs[state_key]}
        for role in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            if f"{weight}.{role}" in specs:
                parts[role] = specs[f"{weight}.{role}"]
        for role in ("absmax", "quant_map"):
            _required(specs, f"{weight}.{role}", state_key)
        state = _unpack_state(read(state_key), state_key)
        shape, blocksize = tuple(state["shape"]), int(state["blocksize"])
        numel = _numel(shape)
        codes = parts["codes"]
        if codes.nbytes * 2 != numel + numel % 2:
            raise BadInputError(f"{weight}: {codes.nbytes} bytes of 4-bit codes cannot hold a weight of shape {shape} "
                                f"(from {state_key})", hint=FIX)
        if parts["absmax"].numel != -(-numel // blocksize):
            raise BadInputError(f"{weight}.absmax: {parts['absmax'].numel} scales for {-(-numel // blocksize)} blocks "
                                f"of {blocksize} (shape {shape})", hint=FIX)
        if ("nested_absmax" in parts) != ("nested_blocksize" in state):
            raise BadInputError(f"{weight}: double quantization is half there (nested_absmax vs {state_key})",
                                hint=FIX)
        return Stored(weight, parts, shape, getattr(torch, state["dtype"]), {"state": state})

    def decode(self, stored: Stored, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``bitsandbytes.functional.dequantize_4bit`` with the stored quant state, over the flattened weight (the
        blocks run over the flattened weight; bitsandbytes 0.50's CPU kernel misplaces them for 2-D shapes whose rows
        are not a whole number of blocks, e.g. (64, 96) in blocks of 64), then shaped."""
        import bitsandbytes.functional as F

        codes = parts["codes"]
        state = F.QuantState.from_dict({k: v for k, v in parts.items() if k != "codes"}, device=codes.device)
        state.shape = torch.Size([_numel(stored.shape)])
        return F.dequantize_4bit(codes, state).reshape(stored.shape)

    def encode(self, stored: Stored, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """``bitsandbytes.functional.quantize_4bit`` with the base's settings, named as transformers saves it."""
        import bitsandbytes.functional as F

        state = stored.meta["state"]
        packed, qs = F.quantize_4bit(weight.to(stored.dtype).contiguous(), blocksize=int(state["blocksize"]),
                                     compress_statistics="nested_blocksize" in state,
                                     quant_type=state["quant_type"], quant_storage=stored.parts["codes"].dtype)
        encoded = {f"{stored.name}.{k}": v for k, v in qs.as_dict(packed=True).items()}
        for role, spec in stored.parts.items():
            if role.startswith("quant_state"):  # JSON: padded with spaces to the room planned for it
                state = encoded[spec.name]
                encoded[spec.name] = torch.cat([state, torch.full((self._state_bytes(spec) - len(state),), 32,
                                                                   dtype=torch.uint8)])
        return {stored.name: packed, **encoded}

    def encoded_specs(self, stored: Stored) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The base's own tensors, the quant state with room to grow."""
        return [(spec.name, spec.dtype, (self._state_bytes(spec),) if role.startswith("quant_state") else spec.shape)
                for role, spec in stored.parts.items()]

    @staticmethod
    def _state_bytes(spec: TensorSpec) -> int:
        return spec.shape[0] + STATE_ROOM


class Bnb8bit(Codec):
    method = "bitsandbytes"
    package = "bitsandbytes"
    label = "bitsandbytes 8-bit (LLM.int8)"

    def find(self, specs: dict[str, TensorSpec], read) -> dict[str, Stored]:
        """Every int8 weight with its row scales (SCB), which must fit its rows."""
        found: dict[str, Stored] = {}
        dtype = model_dtype(self.config, torch.float16)
        for name, spec in specs.items():
            if not name.endswith(".SCB"):
                continue
            module = name[: -len(".SCB")]
            codes = _required(specs, f"{module}.weight", name)
            if codes.dtype != torch.int8 or len(codes.shape) != 2 or spec.shape != (codes.shape[0],):
                raise BadInputError(f"{name}: scales of shape {spec.shape} do not fit the int8 weight "
                                    f"{codes.name} {codes.dtype} {codes.shape}", hint=FIX)
            parts = {"codes": codes, "SCB": spec}
            if f"{module}.weight_format" in specs:
                parts["weight_format"] = specs[f"{module}.weight_format"]
            found[codes.name] = Stored(codes.name, parts, codes.shape, dtype)
        int8 = [n for n, s in specs.items() if s.dtype == torch.int8 and n not in found]
        if int8:
            raise BadInputError(f"{int8[0]}: int8 codes without their row scales ({int8[0].rsplit('.', 1)[0]}.SCB)",
                                hint=FIX)
        return found

    def decode(self, stored: Stored, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``bitsandbytes.functional.int8_vectorwise_dequant``: codes × row scale / 127, in float32."""
        import bitsandbytes.functional as F

        return F.int8_vectorwise_dequant(parts["codes"], parts["SCB"])

    def encode(self, stored: Stored, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """LLM.int8() row-wise absmax (via float16, as ``Int8Params`` quantizes), named as transformers saves it."""
        import bitsandbytes.functional as F

        codes, scb, _ = F.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        module = stored.name.removesuffix(".weight")
        return {stored.name: codes, f"{module}.SCB": scb, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}


def _required(specs: dict[str, TensorSpec], name: str, needed_by: str) -> TensorSpec:
    if name not in specs:
        raise BadInputError(f"{name} is missing: {needed_by} needs it", hint=FIX)
    return specs[name]


def _orphans(specs: dict[str, TensorSpec], found: dict[str, Stored], suffixes: tuple[str, ...]) -> None:
    """Quant-state tensors that belong to no weight: a damaged or mixed checkpoint."""
    owned = {spec.name for s in found.values() for spec in s.parts.values()}
    for name in specs:
        if name.endswith(suffixes) and name not in owned:
            raise BadInputError(f"{name}: a 4-bit quant-state tensor without its weight's quant_state entry", hint=FIX)


def _unpack_state(tensor: torch.Tensor, name: str) -> dict:
    import json

    try:
        state = json.loads(bytes(tensor.to(torch.uint8).numpy()).decode())
        if not isinstance(state, dict) or not {"shape", "blocksize", "dtype", "quant_type"} <= state.keys():
            raise ValueError("missing fields")
        getattr(torch, state["dtype"])
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise BadInputError(f"{name}: not a bitsandbytes quant state ({exc})", hint=FIX) from None
    return state


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
