"""Merge engines, behind one signature: the streaming pass (ours, for LoRA and DoRA) and PEFT's own
in-memory merge (every other adapter type PEFT can merge). Each takes the jobs of one group and
returns, per job, what it merged (``Merged``) or the exception that failed that job."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from converter.codecs import DecodedCheckpoint
from converter.codecs.kept import KeptFormatWriter, Requantized
from converter.errors import JobWarning, MergeError
from converter.inputs import Ready
from converter.merge import Member, MergeStats, output_specs, stream_merge_many
from converter.receipt import Counts
from converter.resources import peak_rss_bytes, reset_peak_rss
from converter.writer import ShardedWriter

log = logging.getLogger("converter")


@dataclass
class Merged:
    """What an engine wrote for one job into its staging directory."""

    counts: Counts
    vocab_size: int | None  # the vocabulary the adapter resized to, if it did
    untie: bool  # tied embeddings written as two tensors
    probes: MergeStats | None  # module probes; None where PEFT's engine merged
    peak_rss: int = 0
    warnings: list[JobWarning] = field(default_factory=list)
    quantization_config: dict | None = None  # the base's, where the output keeps its quantized format
    requantized: Requantized | None = None  # the re-encoded weights against the dense merge
    task_config: dict | None = None  # config.json's task class, num_labels and labels, for a head the adapter adds


Outcomes = dict[int, "Merged | Exception"]  # by job index


def merge_streaming(members: list[Ready], device: torch.device) -> Outcomes:
    """One pass over the members' shared base; each output written tensor by tensor into its staging directory."""
    first = members[0]
    writers = [_writer(r) for r in members]
    try:
        run = [Member(r.inputs.plan, r.inputs.adapter, w) for r, w in zip(members, writers)]
        stream_merge_many(first.inputs.base, run, first.inputs.out_dtype, device, probe=first.job.verify != "none")
        return {r.index: _finished(r, m) for r, m in zip(members, run)}
    finally:
        for w in writers:
            w.abort()


def _writer(r: Ready) -> "ShardedWriter | KeptFormatWriter":
    """The output's writer: the base's quantized format under --keep-quantization, else plain dense shards."""
    inputs = r.inputs
    if r.job.keep_quantization and isinstance(inputs.base, DecodedCheckpoint):
        return KeptFormatWriter(r.partial, inputs.plan, inputs.out_dtype, inputs.base, r.job.max_shard_size)
    return ShardedWriter(r.partial, output_specs(inputs.plan, inputs.out_dtype), r.job.max_shard_size)


def _finished(r: Ready, m: Member) -> "Merged | Exception":
    try:
        if m.error is not None:
            raise m.error
        m.writer.finalize()
    except Exception as exc:  # noqa: BLE001 - this member's outcome
        return exc
    plan = r.inputs.plan
    counts = Counts(merged=plan.count("merge"), replaced=plan.count("replace"), copied=plan.count("copy"),
                    added=plan.count("add"), changed=m.stats.changed)
    warnings = []
    if m.stats.changed == 0:
        msg = "the merged weights equal the base's: the adapter changes nothing at this output dtype"
        if r.job.strict:
            return MergeError(msg + " (--strict)")
        if not any(w.code == "all-deltas-zero" for w in r.inputs.warnings):
            warnings.append(JobWarning("output-unchanged", msg))
    kept = m.writer if isinstance(m.writer, KeptFormatWriter) else None
    return Merged(counts, plan.vocab_size, plan.untie, m.stats, peak_rss_bytes(), warnings,
                  kept.codec.output_config() if kept else None, kept.requantized if kept else None,
                  plan.head.config(r.job.labels) if plan.head else None)


def merge_with_peft(members: list[Ready], device: torch.device) -> Outcomes:
    """PEFT's ``merge_and_unload`` on the whole model (a group of one), saved by transformers."""
    from converter.fallback import peft_merge

    (r,) = members
    try:
        counts, vocab_size, untie = peft_merge(r.job, r.inputs, r.partial, device)
    except Exception as exc:  # noqa: BLE001
        return {r.index: exc}
    return {r.index: Merged(Counts(**counts), vocab_size, untie, None, peak_rss_bytes())}


ENGINES: dict[str, Callable[[list[Ready], torch.device], Outcomes]] = {
    "streaming": merge_streaming,
    "peft": merge_with_peft,
}


def run_engine(members: list[Ready], device: torch.device) -> Outcomes:
    """The members' engine on them (they share one), with peak memory measured from here."""
    reset_peak_rss()
    return ENGINES[members[0].inputs.engine](members, device)
