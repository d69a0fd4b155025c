"""The merge math: pure functions on tensors, one per adapter feature.

Each mirrors PEFT's own code (``peft/tuners/lora/layer.py``, ``variants.py``,
``dora.py``) operation for operation, so that the result equals
``merge_and_unload()`` bit for bit where PEFT computes in the same precision. All
inputs are float32 here; the caller casts the result once to the output dtype.
"""

from __future__ import annotations

import torch


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as (out, in): transposed when stored (in, out), as GPT-2's Conv1D."""
    return weight.T if fan_in_fan_out else weight


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """``LoraLayer.update_layer``: alpha / sqrt(r) with rsLoRA, else alpha / r."""
    return alpha / (r**0.5) if use_rslora else alpha / r


def linear_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """``Linear.get_delta_weight`` (nn.Linear, and GPT-2's Conv1D with fan_in_fan_out)."""
    return transpose(lora_b @ lora_a, fan_in_fan_out) * scale


def merge_linear(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 fan_in_fan_out: bool, delta: torch.Tensor | None = None) -> torch.Tensor:
    """``weight += transpose(B @ A) * scaling``, in place on ``weight`` (our own fp32 copy, or rows of it).

    The same operations and roundings as PEFT; a fused ``addmm(W, B, A, alpha=s)`` is not
    used because it rounds ``s * (B @ A) + W`` once where PEFT rounds twice. ``delta``: a
    reused fp32 buffer for ``B @ A``.
    """
    if delta is None:
        delta = lora_b @ lora_a
    else:
        torch.mm(lora_b, lora_a, out=delta)
    delta.mul_(scale)
    return weight.add_(transpose(delta, fan_in_fan_out))


def merge_rows_fused(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                     out_dtype: torch.dtype, delta: torch.Tensor) -> torch.Tensor:
    """``param.data += (B @ A * scaling).to(param.dtype)`` (PEFT's ParamWrapper, on fused expert parameters), on
    rows of our fp32 copy of the weight: the delta rounded to the dtype, then added (and rounded once more by the
    caller). ``delta``: a reused fp32 buffer."""
    torch.mm(lora_b, lora_a, out=delta)
    delta.mul_(scale)
    if out_dtype != torch.float32:
        delta.copy_(delta.to(out_dtype))
    return weight.add_(delta)


def embedding_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``Embedding.get_delta_weight``: A is (r, num_embeddings), B is (dim, r)."""
    return transpose(lora_b @ lora_a, True) * scale


def add_delta_rounded(weight: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``weight.data += delta.to(weight.dtype)``: PEFT's embedding merge, and its ParamWrapper (fused experts), round
    the delta first."""
    return weight + delta.to(out_dtype).float()


def dora_linear(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                fan_in_fan_out: bool) -> torch.Tensor:
    """``DoraLinearVariant.merge_unsafe``: m / ||W + dW||_row * (W + dW)."""
    combined = transpose(weight, fan_in_fan_out) + transpose(delta, fan_in_fan_out)
    weight_norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = transpose((magnitude / weight_norm).view(-1, 1), fan_in_fan_out)
    return factor * (weight + delta)


def dora_embedding(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``DoraEmbeddingVariant.merge_unsafe``: the norm runs over the vocabulary."""
    combined = weight.T + delta.T
    weight_norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = (magnitude / weight_norm).view(1, -1)
    return factor * (weight + delta)


def lora_bias(bias: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``bias.data += lora_B.bias * scaling`` (``lora_bias=True``)."""
    return bias + lora_b_bias * scale


def overwrite_rows(weight: torch.Tensor, indices: list[int], rows: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``TrainableTokensLayer.merge``: ``index_copy`` of the trained rows (cast to the base dtype)."""
    index = torch.tensor(indices, dtype=torch.long, device=weight.device)
    return weight.index_copy(0, index, rows.to(out_dtype).float())
