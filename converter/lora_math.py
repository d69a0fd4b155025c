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


def dora_norm(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool, embedding: bool = False) -> torch.Tensor:
    """``DoraLinearLayer.get_weight_norm``: ||W + dW|| per output (an embedding's: per column of the table)."""
    if embedding:
        return torch.linalg.norm(weight.T + delta.T, dim=1)
    combined = transpose(weight, fan_in_fan_out) + transpose(delta, fan_in_fan_out)
    return torch.linalg.norm(combined, dim=1).to(combined.dtype)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, fan_in_fan_out: bool, embedding: bool) -> torch.Tensor:
    """m / ||W + dW||, shaped to scale the weight."""
    return (magnitude / norm).view(1, -1) if embedding else transpose((magnitude / norm).view(-1, 1), fan_in_fan_out)


def dora_linear(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                fan_in_fan_out: bool, norm: torch.Tensor | None = None) -> torch.Tensor:
    """``DoraLinearVariant.merge_unsafe``: m / ||W + dW||_row * (W + dW); ``norm``: of the weight unmerged, where
    other adapters are merged into ``weight`` already."""
    norm = dora_norm(weight, delta, fan_in_fan_out) if norm is None else norm
    return dora_factor(magnitude, norm, fan_in_fan_out, False) * (weight + delta)


def dora_embedding(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                   norm: torch.Tensor | None = None) -> torch.Tensor:
    """``DoraEmbeddingVariant.merge_unsafe``: the norm runs over the vocabulary."""
    norm = dora_norm(weight, delta, False, embedding=True) if norm is None else norm
    return dora_factor(magnitude, norm, False, True) * (weight + delta)


def unmerge_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                 fan_in_fan_out: bool, embedding: bool) -> torch.Tensor:
    """``Dora*Variant.unmerge``: W / (m / norm) - dW, with the norm its merge used."""
    return weight / dora_factor(magnitude, norm, fan_in_fan_out, embedding) - delta


def unmerge_plain(weight: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``weight.data -= delta.to(weight.dtype)`` (LoRA's unmerge, linear or embedding)."""
    return weight - delta.to(out_dtype).float()


def lora_bias(bias: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``bias.data += lora_B.bias * scaling`` (``lora_bias=True``)."""
    return bias + lora_b_bias * scale


def overwrite_rows(weight: torch.Tensor, indices: list[int], rows: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``TrainableTokensLayer.merge``: ``index_copy`` of the trained rows (cast to the base dtype)."""
    index = torch.tensor(indices, dtype=torch.long, device=weight.device)
    return weight.index_copy(0, index, rows.to(out_dtype).float())
