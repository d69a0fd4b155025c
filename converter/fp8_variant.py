"""The ``fp8`` variant: compressed-tensors' FP8_DYNAMIC scheme, what llm-compressor writes and vLLM and SGLang
serve. Linear weights become ``float8_e4m3fn`` with one scale per output channel (``block=N``: one per N×N
block, the DeepSeek layout, compressed-tensors' FP8_BLOCK); activations are quantized per token at run time,
as ``quantization_config`` declares. The scales and codes come from compressed-tensors' own functions
(``calculate_qparams``, the float-quantized compressor), one weight at a time."""

from __future__ import annotations

import torch

COMPRESSION_FORMAT = "float-quantized"


def scheme(block: int | None):
    """The compressed-tensors scheme of the variant: FP8_DYNAMIC, or FP8_BLOCK with ``block``×``block`` weights."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if block is None:
        return preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    scheme = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    weights = scheme.weights.model_copy(update={"block_structure": [block, block]})
    activations = scheme.input_activations.model_copy(update={"group_size": block})
    return scheme.model_copy(update={"weights": weights, "input_activations": activations})


def quantize_fp8(weight: torch.Tensor, block: int | None) -> dict[str, torch.Tensor]:
    """``weight`` (out, in) as FP8 codes and their scales (in the weight's dtype, as llm-compressor stores them)."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    s = scheme(block)
    lo, hi = _ranges(weight, block)  # in the weight's dtype, as llm-compressor's observers take them
    scale, _ = calculate_qparams(lo, hi, s.weights)
    return dict(FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale.to(weight.dtype)}, s))


def _ranges(w: torch.Tensor, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per output channel (rows, 1), or per block (row blocks, column blocks; partial blocks at the
    ends hold what is there)."""
    if block is None:
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    out = []
    for fill, reduce in ((float("inf"), torch.amin), (float("-inf"), torch.amax)):
        padded = w.new_full((rows * block, cols * block), fill)
        padded[: w.shape[0], : w.shape[1]] = w
        out.append(reduce(padded.view(rows, block, cols, block), dim=(1, 3)))
    return out[0], out[1]


def quantization_config(block: int | None, ignore: list[str]) -> dict:
    """config.json's ``quantization_config``, as compressed-tensors' ModelCompressor writes it (``ignore``: the
    linear modules left in the model's dtype, by full name)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = QuantizationConfig(config_groups={"group_0": scheme(block)}, format=COMPRESSION_FORMAT,
                                quantization_status=QuantizationStatus.COMPRESSED, ignore=sorted(ignore))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **config.model_dump(mode="json", exclude={"quant_method"})}
