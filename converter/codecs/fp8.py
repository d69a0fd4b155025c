"""FP8 bases (``quant_method: fp8``): the layout of DeepSeek-V3/R1 and the Qwen3 FP8 releases.

Each quantized linear stores ``<m>.weight`` as ``float8_e4m3fn`` codes and
``<m>.weight_scale_inv`` as float32 scales, one per ``weight_block_size`` block (e.g. 128×128,
the last block of a row or column possibly partial), or one for the whole tensor when the
config gives no block size. The weight is codes × scale. Decoding equals transformers' FP8
loader (``Fp8Dequantize``: float32 product, rounded once); encoding is its ``Fp8Quantize``
(scale = 448 / block max |w|, stored inverted, powers of two under ``scale_fmt: ue8m0``),
extended to partial blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from converter.checkpoint import TensorSpec
from converter.codecs import Codec, Stored, model_dtype
from converter.errors import BadInputError, UnsupportedBaseError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FIX = "re-download the base: its FP8 weights and their weight_scale_inv scales must come from the same release"


def codec_for(quant_config: dict, config: dict) -> Codec:
    """The FP8 codec (block-scaled or per-tensor) the config describes."""
    return Fp8(quant_config, config)


class Fp8(Codec):
    method = "fp8"

    def __init__(self, quant_config: dict, config: dict):
        super().__init__(quant_config, config)
        block = quant_config.get("weight_block_size")
        if block is not None and (not isinstance(block, list | tuple) or len(block) != 2
                                  or not all(isinstance(b, int) and b > 0 for b in block)):
            raise UnsupportedBaseError(f"quantization_config weight_block_size {block!r} is not two positive integers",
                                       hint="fix the base's config.json")
        self.block = tuple(block) if block else None
        self.ue8m0 = quant_config.get("scale_fmt") == "ue8m0"
        self.label = f"fp8 block-scaled {list(self.block)}" if self.block else "fp8 per-tensor"

    def find(self, specs: dict[str, TensorSpec], read) -> dict[str, Stored]:
        """Every float8 weight with its scales, whose grid must fit the weight and the block size."""
        found: dict[str, Stored] = {}
        dtype = model_dtype(self.config)
        for name, spec in specs.items():
            if spec.dtype not in FP8_DTYPES:
                continue
            if not name.endswith(".weight") or f"{name}_scale_inv" not in specs:
                raise BadInputError(f"{name} is stored in {str(spec.dtype).removeprefix('torch.')} but has no "
                                    f"{name}_scale_inv scales", hint=FIX)
            scale = specs[f"{name}_scale_inv"]
            expected = self.scale_shape(spec.shape)
            if scale.shape != expected and not (self.block is None and scale.numel == 1):
                raise BadInputError(f"{scale.name}: scales of shape {scale.shape} do not fit {name} {spec.shape} "
                                    f"with weight_block_size {list(self.block or ())} (expected {expected})", hint=FIX)
            found[name] = Stored(name, {"codes": spec, "scale": scale}, spec.shape, dtype)
        stray = [n for n in specs if n.endswith(".weight_scale_inv") and n.removesuffix("_scale_inv") not in found]
        if stray:
            raise BadInputError(f"{stray[0]}: scales of a weight that is not stored in float8", hint=FIX)
        return found

    def unloadable(self, stored: dict[str, Stored]) -> str | None:
        """transformers' FP8 loader (CPU, dequantize=True) infers the block from the scale grid: partial blocks fail."""
        if self.block is None:
            return None
        for s in stored.values():
            if s.shape[-2] % self.block[0] or s.shape[-1] % self.block[1]:
                return (f"transformers' FP8 loader cannot read {s.name} {s.shape}: its last blocks of "
                        f"{list(self.block)} are partial")
        return None

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The grid of scales a weight of ``shape`` has."""
        if self.block is None:
            return ()
        return (*shape[:-2], -(-shape[-2] // self.block[0]), -(-shape[-1] // self.block[1]))

    def decode(self, stored: Stored, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """codes × scale of their block, in float32."""
        return self.decode_rows(stored, parts["codes"], parts, 0, stored.shape[-2])

    def row_block(self, stored: Stored) -> int | None:
        """Rows decode by row blocks (any rows under one scale per tensor); 3-D weights only whole."""
        return (self.block[0] if self.block else 1) if len(stored.shape) == 2 else None

    def decode_rows(self, stored: Stored, codes: torch.Tensor, parts: dict[str, torch.Tensor], r0: int,
                    r1: int) -> torch.Tensor:
        """Rows r0:r1 (r0 on a block boundary): codes × the scale of their block, in float32."""
        weight = codes.to(torch.float32)
        scale = parts["scale"].to(device=weight.device, dtype=torch.float32)
        if self.block is None:
            return weight.mul_(scale.reshape(()))
        b0 = self.block[0]
        return weight.mul_(_expand(scale[..., r0 // b0: -(-r1 // b0), :], self.block, weight.shape))

    def encode(self, stored: Stored, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes and inverse scales of ``weight`` (float32): each block scaled to the float8 range."""
        codes, inv = self._encode(stored, weight)
        return {stored.name: codes, stored.parts["scale"].name: inv.reshape(stored.parts["scale"].shape)}

    def encode_block(self, stored: Stored) -> int | None:
        """Row blocks encode on their own; one scale per tensor needs the whole tensor."""
        return self.block[0] if self.block and len(stored.shape) == 2 else None

    def encode_rows(self, stored: Stored, rows: torch.Tensor, r0: int) -> list[tuple[str, int, torch.Tensor]]:
        """Codes of rows r0:r0+n and the scales of their row blocks (r0 on a block boundary)."""
        codes, inv = self._encode(stored, rows)
        return [(stored.name, r0, codes), (stored.parts["scale"].name, r0 // self.block[0], inv)]

    def _encode(self, stored: Stored, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes_dtype = stored.parts["codes"].dtype
        fmax = torch.finfo(codes_dtype).max
        block = self.block or tuple(weight.shape[-2:])
        tiles = _tiles(weight.to(torch.float32), block)  # (..., R, b0, C, b1), zero padded
        amax = tiles.abs().amax(dim=(-3, -1))
        scales = torch.where(amax > 0, fmax / amax.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
        inv = 1.0 / scales
        if self.ue8m0:
            inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
            scales = 1.0 / inv
        codes = (tiles * scales[..., :, None, :, None]).clamp_(-fmax, fmax).to(codes_dtype)
        codes = codes.flatten(-4, -3).flatten(-2, -1)[..., : weight.shape[-2], : weight.shape[-1]].contiguous()
        return codes, inv.to(stored.parts["scale"].dtype)


def _expand(scale: torch.Tensor, block: tuple[int, int], shape) -> torch.Tensor:
    """Block scales repeated over their blocks, cut to the weight's shape."""
    rows, cols = shape[-2], shape[-1]
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def _tiles(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight`` zero-padded to whole blocks, as (..., row blocks, b0, column blocks, b1)."""
    rows, cols = weight.shape[-2:]
    pad_r, pad_c = -rows % block[0], -cols % block[1]
    if pad_r or pad_c:
        weight = nnf.pad(weight, (0, pad_c, 0, pad_r))
    r, c = (rows + pad_r) // block[0], (cols + pad_c) // block[1]
    return weight.reshape(*weight.shape[:-2], r, block[0], c, block[1])
