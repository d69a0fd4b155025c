"""Verification: module probes through each merged weight, the unmerged PeftModel against the merged
checkpoint on disk, and a quantized variant against the merged model.

End to end, both models run in float32 on the same probe inputs, so the figures measure
what the merge (and the cast to the output dtype) changed, not the precision of the
forward pass. A variant and the merged model run each in its own dtype, as served.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from converter import lora_math
from converter.errors import VerificationError
from converter.modelinfo import config_scopes
from converter.receipt import Figures, FullCheck, ModuleCheck, Verification
from converter.resources import peak_rss_bytes, reset_peak_rss
from converter.stack import reference_model
from converter.streamed import StreamUnsupported, streamed_figures

if TYPE_CHECKING:
    from converter.adapter import Adapter
    from converter.inputs import Inputs
    from converter.options import MergeJob
    from converter.plan import LoraOp

log = logging.getLogger("converter")

# End-to-end checks of models above this size (float32 bytes), or of models that do not fit, run streamed block
# by block (converter.streamed); smaller ones load both models whole, which is faster.
STREAM_ABOVE_BYTES = 1 << 30

# Relative error of a probe through a merged weight, by output dtype (rounding only).
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 2e-2}
PROBE_ROWS_PER_CHUNK = 4
PROBE_COLS = 8

# Defaults by output dtype: max |Δlogit| relative to max |logit|, mean KL, top-1 agreement.
TOLERANCES = {
    torch.float32: {"max_rel_diff": 1e-4, "max_kl": 1e-6, "min_top1": 0.99},
    torch.float64: {"max_rel_diff": 1e-8, "max_kl": 1e-10, "min_top1": 0.999},
    torch.float16: {"max_rel_diff": 2e-2, "max_kl": 1e-3, "min_top1": 0.9},
    torch.bfloat16: {"max_rel_diff": 5e-2, "max_kl": 5e-3, "min_top1": 0.9},
}


@dataclass(frozen=True)
class Tolerance:
    max_rel_diff: float | None  # None: not judged (routed experts in a narrow dtype: verify_job)
    max_kl: float
    min_top1: float
    max_abs_diff: float | None = None  # absolute bound, when the user sets one

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, max_abs_diff=None, max_kl=None, min_top1=None,
                  kept: dict | None = None) -> "Tolerance":
        """The defaults for an output dtype (``kept``: an output re-encoded in its base's quantized format), with
        the bounds the user set."""
        base = kept or TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
        return cls(base["max_rel_diff"], base["max_kl"] if max_kl is None else max_kl,
                   base["min_top1"] if min_top1 is None else min_top1, max_abs_diff)


# ---------------------------------------------------------------------------------------------------------------------
# Module probes: random inputs through W' against W·x + s·B·(A·x), during the merge.
# ---------------------------------------------------------------------------------------------------------------------

def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖."""
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def probe_error(merged: torch.Tensor, unmerged: torch.Tensor, op: "LoraOp", adapter: "Adapter", seed: int = 0,
                norm_base: torch.Tensor | None = None) -> float:
    """Relative error of random probes through a whole W' against W·x + s·B·(A·x) (DoRA: times m/‖W+sBA‖, the
    norm of ``norm_base`` + sBA where given: a DoRA merged after other adapters takes it from the weight
    without them)."""
    g = torch.Generator().manual_seed(seed)
    a, b = adapter.get(op.a_key).float(), adapter.get(op.b_key).float()
    w, merged = unmerged.float().cpu(), merged.float().cpu()
    nw = w if norm_base is None else norm_base.float().cpu()
    magnitude = adapter.get(op.magnitude_key).float() if op.magnitude_key else None
    if op.kind == "embedding":  # rows of the table for random token ids
        idx = torch.randint(0, w.shape[0], (16,), generator=g)
        ref = w[idx] + op.scale * (a[:, idx].T @ b.T)
        if magnitude is not None:
            norm = torch.linalg.vector_norm(nw + op.scale * (b @ a).T, dim=0)
            ref = ref * (magnitude / norm).view(1, -1)
        return relative_error(merged[idx], ref)
    w_std = lora_math.transpose(w, op.fan_in_fan_out)
    x = torch.randn(w_std.shape[1], 8, generator=g)
    ref = w_std @ x + op.scale * (b @ (a @ x))
    if magnitude is not None:
        norm = torch.linalg.vector_norm(lora_math.transpose(nw, op.fan_in_fan_out) + op.scale * (b @ a), dim=1)
        ref = ref * (magnitude / norm).view(-1, 1)
    return relative_error(lora_math.transpose(merged, op.fan_in_fan_out) @ x, ref)


class RowProbe:
    """The probes of a weight merged in row chunks: a few rows of every chunk through W' against W·x + s·B·(A·x)."""

    def __init__(self, cols: int, device):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(cols, PROBE_COLS, generator=g).to(device)
        self.ax: list[torch.Tensor] | None = None  # A·x of each LoRA, the same for every chunk
        self.idx: dict[int, torch.Tensor] = {}  # probed rows of a chunk, by its row count
        self.got: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []

    def add(self, start: torch.Tensor, out: torch.Tensor, loras: list, r0: int) -> None:
        """Probe rows of the chunk starting at row ``r0`` (``start``: its rows before, ``out``: after; ``loras``:
        the factors merged, with ``a``, ``b`` and ``scale``: one, or a stack's)."""
        rows = start.shape[0]
        if rows not in self.idx:
            self.idx[rows] = torch.linspace(0, rows - 1, min(PROBE_ROWS_PER_CHUNK, rows)).round().long().to(out.device)
        idx = self.idx[rows]
        if self.ax is None:
            self.ax = [lora.a @ self.x for lora in loras]
        ref = start[idx].float() @ self.x
        for lora, ax in zip(loras, self.ax):
            ref = torch.addmm(ref, lora.b[r0 + idx], ax, alpha=lora.scale)
        self.ref.append(ref)
        self.got.append(out[idx].float() @ self.x)

    def error(self) -> float:
        """The relative error over every probed row."""
        return relative_error(torch.cat(self.got), torch.cat(self.ref))


# ---------------------------------------------------------------------------------------------------------------------
# A job's verification: the module probes' figures, then the merged model against the unmerged one.
# ---------------------------------------------------------------------------------------------------------------------

def check_memory(specs: dict, streamed: bool = False) -> tuple[int, str]:
    """(bytes, how) full verification holds beyond the runtime, from the tensor headers alone: both models in
    float32 for one up to STREAM_ABOVE_BYTES (unless ``streamed``), else one block's weights in float32 (twice: in
    use and reused) and the largest stored tensor's bytes (read ahead and staged)."""
    model = 4 * sum(s.numel for s in specs.values())
    if model <= STREAM_ABOVE_BYTES and not streamed:
        return int(2.5 * model), "in memory"
    blocks: dict[str, int] = {}
    for name, spec in specs.items():
        parts = name.split(".")
        block = next((".".join(parts[: i + 1]) for i, p in enumerate(parts) if p.isdigit()), name)
        blocks[block] = blocks.get(block, 0) + 4 * spec.numel
    largest = max(s.nbytes for s in specs.values())
    return 2 * max(blocks.values()) + 2 * largest, "streamed"


def fits_in_memory(model_bytes_fp32: int) -> bool:
    """Whether two fp32 copies of the model (unmerged and merged, one at a time) plus headroom fit now."""
    return 2.5 * model_bytes_fp32 < psutil.virtual_memory().available


def verify_job(job: "MergeJob", inputs: "Inputs", merged_dir: Path, probes, vocab_size: int | None,
               model_fits: bool, timings: dict) -> Verification:
    """The verification the job asked for, as far as it can run; raises VerificationError over tolerance.
    ``probes``: the merge's module probes (MergeStats), None where PEFT's engine merged; ``model_fits``:
    whether whole models fit this worker's memory (else the end-to-end check is streamed block by block)."""
    if job.verify == "none":
        return Verification(requested="none")
    modules = _module_check(probes, inputs.out_dtype) if probes is not None else None
    done = Verification(requested=job.verify, level="modules" if modules else "none", modules=modules)
    if job.verify != "full":
        return done
    skipped = _why_not_full(inputs)
    how = "in memory" if model_fits and inputs.base.fp32_bytes() <= STREAM_ABOVE_BYTES else "streamed"
    if inputs.codec and inputs.codec.unloadable(inputs.base.stored):
        how = "streamed"  # transformers cannot load this base; our codec reads it
    kept = job.keep_quantization and inputs.codec is not None  # the output is in the base's quantized format
    t = time.perf_counter()
    reset_peak_rss()
    try:
        figures = None if skipped else _end_to_end(how, job, inputs, merged_dir, vocab_size, kept)
    except StreamUnsupported as exc:
        if not model_fits or (inputs.codec and inputs.codec.unloadable(inputs.base.stored)):
            skipped = f"full verification skipped, modules only: the streamed run failed for this model ({exc})"
        else:  # it fits: both models whole, after all
            log.warning("the streamed check failed for this model (%s): checking it in memory", exc)
            how = "in memory"
            figures = _end_to_end(how, job, inputs, merged_dir, vocab_size, kept)
    if skipped:
        log.warning(skipped)
        return done.model_copy(update={"note": skipped})
    timings["verify_s"] = round(time.perf_counter() - t, 3)
    tol = Tolerance.for_dtype(inputs.out_dtype, job.max_logit_diff, job.max_kl, job.min_top1,
                              inputs.codec.kept_tolerance if kept else None)
    if routes_experts(inputs.info.config) and inputs.out_dtype != torch.float32 and logits_judged(figures):
        # a rounding that flips a router's top-k sends a token through other experts: its logits move by far more
        # than any weight did (PEFT's own merge shows the same), so the maximum is reported, KL and top-1 judge
        tol = replace(tol, max_rel_diff=None)
    failures = judge(figures, tol)
    if failures:
        raise VerificationError(f"the merged model's outputs differ from the unmerged adapter's: "
                                f"{'; '.join(failures)}. Nothing was published. Loosen --max-logit-diff/--max-kl/"
                                "--min-top1 only if this is expected (e.g. a narrow --dtype)")
    full = FullCheck(**figures.model_dump(), tolerance=asdict(tol), how=how, seconds=timings["verify_s"],
                     peak_rss_bytes=peak_rss_bytes())
    return done.model_copy(update={"level": "full", "full": full})


def _end_to_end(how: str, job: "MergeJob", inputs: "Inputs", merged_dir: Path, vocab_size: int | None,
                kept: bool) -> Figures:
    """The merged model against the unmerged adapter: whole models in memory, or streamed block by block."""
    if how == "in memory":
        return full_verification(inputs.model_cls, inputs.base_src.path, inputs.parts, merged_dir,
                                 vocab_size, job.trust_remote_code, quantized=inputs.codec is not None, kept=kept,
                                 overrides=inputs.config_overrides)
    from converter.checkpoint import Checkpoint
    from converter.codecs import decoded
    from converter.modelinfo import base_config, describe
    from converter.resources import forward_device

    merged = decoded(Checkpoint(merged_dir), base_config(merged_dir), str(merged_dir))
    merged_info = describe(merged_dir, list(merged.specs), job.trust_remote_code)
    return streamed_figures(inputs.model_cls, inputs.base, inputs.base_src.path, inputs.info, inputs.parts,
                            merged, merged_info, vocab_size, forward_device(job.device), job.trust_remote_code,
                            inputs.config_overrides)


def import_in_background(members: list) -> None:
    """Import what ``full`` verification needs (transformers, PEFT, the model's class) in a thread while the merge
    runs: the merge itself imports neither, and the import takes seconds."""
    wanted = [r for r in members if r.job.verify == "full" and r.inputs.info.instantiable]
    if wanted:
        threading.Thread(target=_import_models, args=(wanted,), name="import-models", daemon=True).start()


def _import_models(members: list) -> None:
    try:
        import accelerate  # noqa: F401
        import peft  # noqa: F401

        for r in members:
            r.inputs.info.model_cls  # noqa: B018 - imported when first asked for
    except Exception:  # noqa: BLE001 - the check itself will import them again and report
        pass


def routes_experts(config: dict) -> bool:
    """Whether the model routes tokens through a top-k of several experts (MoE)."""
    return any(isinstance(scope.get(key), int) and scope[key] > 1 for scope in config_scopes(config)
               for key in EXPERT_COUNTS)


EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def logits_judged(figures: Figures) -> bool:
    """Whether KL and top-1 agreement were measured (the model has logits)."""
    return figures.kl is not None and figures.top1 is not None


def _module_check(probes, out_dtype: torch.dtype) -> ModuleCheck:
    if probes.failed_probes:
        raise VerificationError("module probes over tolerance: " + "; ".join(probes.failed_probes[:10]))
    return ModuleCheck(checked=len(probes.probes), max_rel_err=max(probes.probes.values(), default=0.0),
                       tolerance=PROBE_TOLERANCE.get(out_dtype, 1e-2))


def _why_not_full(inputs: "Inputs") -> str | None:
    if not inputs.info.instantiable:
        return f"full verification skipped, modules only: {inputs.info.note}"
    return None


def probe_inputs(config, batch: int = 2, length: int = 16, seed: int = 0) -> dict:
    """Random token ids (and what the architecture needs beside them), the same for both models compared."""
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


def model_outputs(model, inputs) -> tuple[torch.Tensor, bool]:
    """(logits, True), or (last hidden state, False) for models without logits; as float32. A question-answering
    model's start and end logits count as logits (over positions)."""
    with torch.no_grad():
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    if logits is None and getattr(out, "start_logits", None) is not None:  # question answering: over positions
        logits = torch.stack((out.start_logits, out.end_logits), dim=1)
    return (logits if logits is not None else out.last_hidden_state).float(), logits is not None


def compare(ref: torch.Tensor, got: torch.Tensor, is_logits: bool) -> Figures:
    """max |Δ| (absolute and relative to max |ref|), and for logits the mean KL and top-1 agreement."""
    diff = (ref - got).abs()
    max_abs, max_rel = float(diff.max()), float(diff.max() / ref.abs().max().clamp_min(1e-30))
    if not is_logits:
        return Figures(max_abs_diff=max_abs, max_rel_diff=max_rel)
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return Figures(max_abs_diff=max_abs, max_rel_diff=max_rel,
                   kl=float((logp.exp() * (logp - logq)).sum(-1).mean().clamp_min(0.0)),
                   top1=float((ref.argmax(-1) == got.argmax(-1)).float().mean()))


def judge(figures: Figures, tol: Tolerance) -> list[str]:
    """What is over the merge's tolerance (empty when nothing)."""
    failures = []
    if tol.max_abs_diff is not None:
        if not figures.max_abs_diff <= tol.max_abs_diff:
            failures.append(f"max |Δ| {figures.max_abs_diff:.3g} > {tol.max_abs_diff:g}")
    elif tol.max_rel_diff is not None and not figures.max_rel_diff <= tol.max_rel_diff:
        failures.append(f"max |Δ| / max |ref| {figures.max_rel_diff:.3g} > {tol.max_rel_diff:g}")
    if figures.kl is not None and not figures.kl <= tol.max_kl:
        failures.append(f"KL {figures.kl:.3g} > {tol.max_kl:g}")
    if figures.top1 is not None and not figures.top1 >= tol.min_top1:
        failures.append(f"top-1 agreement {figures.top1:.3f} < {tol.min_top1:g}")
    return failures


def full_verification(model_cls, base_dir: Path, parts: list, merged_dir: Path, vocab_size: int | None,
                      trust_remote_code: bool = False, quantized: bool = False, kept: bool = False,
                      overrides: dict | None = None) -> Figures:
    """Figures of the merged checkpoint (loaded as a user would) against the unmerged PeftModel (on the base as
    transformers loads it; a ``quantized`` base dequantized by transformers: the weights the adapter saw), with
    every adapter of ``parts`` (converter.stack.Part) active."""

    kw = dict(dtype=torch.float32, trust_remote_code=trust_remote_code, **(overrides or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = (dequantized_model(model_cls, base_dir, kw) if quantized else model_cls.from_pretrained(base_dir, **kw))
        base = base.eval()
        if vocab_size is not None and base.get_input_embeddings().weight.shape[0] != vocab_size:
            base.resize_token_embeddings(vocab_size)
        unmerged = reference_model(base, parts)
        inputs = probe_inputs(base.config)
        ref, is_logits = model_outputs(unmerged, inputs)
        del unmerged, base
        gc.collect()
        merged = (dequantized_model(model_cls, merged_dir, kw) if kept else
                  model_cls.from_pretrained(merged_dir, **kw)).eval()
        got, _ = model_outputs(merged, inputs)
        del merged
        gc.collect()
    return compare(ref, got, is_logits)


def dequantized_model(model_cls, model_dir: Path, kw: dict):
    """A quantized checkpoint as transformers loads it, dequantized by transformers itself (bitsandbytes'
    ``dequantize()``; FP8 with ``dequantize=True``), in float32: an oracle independent of our codecs."""
    from converter.codecs import quant_config_of
    from converter.modelinfo import base_config

    qc = quant_config_of(base_config(model_dir)) or {}
    if qc.get("quant_method") == "fp8":
        from transformers import FineGrainedFP8Config

        fp8 = FineGrainedFP8Config(dequantize=True, **{k: v for k, v in qc.items() if k in FP8_CONFIG_KEYS})
        return model_cls.from_pretrained(model_dir, quantization_config=fp8, **kw)
    model = model_cls.from_pretrained(model_dir, **kw)
    return model.dequantize().float() if getattr(model, "hf_quantizer", None) is not None else model


FP8_CONFIG_KEYS = ("activation_scheme", "weight_block_size", "scale_fmt", "modules_to_not_convert")


# ---------------------------------------------------------------------------------------------------------------------
# A quantized variant: reloaded from disk, against the merged model, on the same probe inputs.
# ---------------------------------------------------------------------------------------------------------------------

def variant_figures(model_cls, merged_dir: Path, variant: Path, trust_remote_code: bool = False,
                    load_kw: dict | None = None) -> Figures:
    """The variant's outputs against the merged model's, both loaded from disk in their own dtype (``load_kw``: what
    loading the variant takes besides, e.g. its ``gguf_file``)."""
    # Both in the checkpoint's own dtype, as they would be served: what serving the variant instead costs. (A bnb
    # checkpoint loaded in another dtype can come out with mixed dtypes: GPT-2's LayerNorms stay bfloat16.)
    kw = dict(dtype="auto", trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model_cls.from_pretrained(merged_dir, **kw).eval()
        inputs = probe_inputs(merged.config, batch=4, length=32)
        ref, is_logits = model_outputs(merged, inputs)
        del merged
        gc.collect()
        model = model_cls.from_pretrained(variant, **kw, **(load_kw or {})).eval()  # judge the files, not live layers
        device = next(model.parameters()).device
        got, _ = model_outputs(model, {k: v.to(device) for k, v in inputs.items()})
        del model
        gc.collect()
    return compare(ref.float(), got.float().cpu(), is_logits)


def judge_variant(figures: Figures, thresholds: dict) -> list[str]:
    """What is over a variant's thresholds (KL and top-1 are None for models without logits: only max |Δ| applies)."""
    failures = []
    bound = thresholds["max_logit_diff"]
    if bound is not None and not figures.max_abs_diff <= bound:
        failures.append(f"max |Δlogit| {figures.max_abs_diff:.3g} > {bound:g}")
    if figures.kl is not None and not figures.kl <= thresholds["max_kl"]:
        failures.append(f"mean KL {figures.kl:.3g} > {thresholds['max_kl']:g}")
    if figures.top1 is not None and not figures.top1 >= thresholds["min_top1"]:
        failures.append(f"top-1 agreement {figures.top1:.3f} < {thresholds['min_top1']:g}")
    return failures
