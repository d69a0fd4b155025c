"""End-to-end verification: the unmerged PeftModel against the merged checkpoint on disk.

Both run in float32 on the same probe inputs, so the figures measure what the merge
(and the cast to the output dtype) changed, not the precision of the forward pass.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

# Defaults by output dtype: max |Δlogit| relative to max |logit|, mean KL, top-1 agreement.
TOLERANCES = {
    torch.float32: {"max_rel_diff": 1e-4, "max_kl": 1e-6, "min_top1": 0.99},
    torch.float64: {"max_rel_diff": 1e-8, "max_kl": 1e-10, "min_top1": 0.999},
    torch.float16: {"max_rel_diff": 2e-2, "max_kl": 1e-3, "min_top1": 0.9},
    torch.bfloat16: {"max_rel_diff": 5e-2, "max_kl": 5e-3, "min_top1": 0.9},
}


@dataclass(frozen=True)
class Tolerance:
    max_rel_diff: float
    max_kl: float
    min_top1: float
    max_abs_diff: float | None = None  # absolute bound, when the user sets one

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, max_abs_diff=None, max_kl=None, min_top1=None) -> "Tolerance":
        base = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
        return cls(base["max_rel_diff"], base["max_kl"] if max_kl is None else max_kl,
                   base["min_top1"] if min_top1 is None else min_top1, max_abs_diff)


def fits_in_memory(model_bytes_fp32: int) -> bool:
    """Two fp32 copies of the model (unmerged and merged, one at a time) plus headroom."""
    return 2.5 * model_bytes_fp32 < psutil.virtual_memory().available


def probe_inputs(config, batch: int = 2, length: int = 16, seed: int = 0) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    for special in ("image_token_id", "image_token_index", "video_token_id"):
        tok = getattr(config, special, None)
        if isinstance(tok, int) and tok < vocab:
            ids[ids == tok] = (tok + 1) % vocab if tok + 1 < vocab else 0
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : length // 2].clone()
    return inputs


def _outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float(), logits is not None


def compare(ref: torch.Tensor, got: torch.Tensor, is_logits: bool) -> dict:
    diff = (ref - got).abs()
    figures = {"max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / ref.abs().max().clamp_min(1e-30))}
    if is_logits:
        logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        figures["kl"] = float((logp.exp() * (logp - logq)).sum(-1).mean().clamp_min(0.0))
        figures["top1"] = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    else:
        figures["kl"] = None
        figures["top1"] = None
    return figures


def judge(figures: dict, tol: Tolerance) -> list[str]:
    failures = []
    if tol.max_abs_diff is not None:
        if not figures["max_abs_diff"] <= tol.max_abs_diff:
            failures.append(f"max |Δ| {figures['max_abs_diff']:.3g} > {tol.max_abs_diff:g}")
    elif not figures["max_rel_diff"] <= tol.max_rel_diff:
        failures.append(f"max |Δ| / max |ref| {figures['max_rel_diff']:.3g} > {tol.max_rel_diff:g}")
    if figures["kl"] is not None and not figures["kl"] <= tol.max_kl:
        failures.append(f"KL {figures['kl']:.3g} > {tol.max_kl:g}")
    if figures["top1"] is not None and not figures["top1"] >= tol.min_top1:
        failures.append(f"top-1 agreement {figures['top1']:.3f} < {tol.min_top1:g}")
    return failures


def full_verification(model_cls, base_dir: Path, adapter_dir: Path, merged_dir: Path, vocab_size: int | None,
                      trust_remote_code: bool = False) -> dict:
    """Figures of the merged checkpoint (loaded as a user would) against the unmerged PeftModel."""
    from peft import PeftModel

    kw = dict(dtype=torch.float32, trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = model_cls.from_pretrained(base_dir, **kw).eval()
        if vocab_size is not None and base.get_input_embeddings().weight.shape[0] != vocab_size:
            base.resize_token_embeddings(vocab_size)
        unmerged = PeftModel.from_pretrained(base, adapter_dir).eval()
        inputs = probe_inputs(base.config)
        ref, is_logits = _outputs(unmerged, inputs)
        del unmerged, base
        gc.collect()
        merged = model_cls.from_pretrained(merged_dir, **kw).eval()
        got, _ = _outputs(merged, inputs)
        del merged
        gc.collect()
    return compare(ref, got, is_logits)
