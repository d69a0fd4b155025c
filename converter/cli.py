"""The ``converter`` command: a thin shim over ``convert`` and ``inspect``."""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from converter.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_SIGINT,
    BadInputError,
    ConverterError,
    Interrupted,
    sigterm_interrupts,
    write_failure,
)


def _setup_logging() -> None:
    logging.basicConfig(format="%(levelname)s %(message)s", level=logging.WARNING, stream=sys.stderr)
    for noisy in ("transformers", "peft", "accelerate", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # read by transformers and huggingface_hub when (and only if) they are imported: a merge
    # that needs neither does not pay for importing them here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


EXIT_CODES = """\b
Exit status:
  0    done (or already done: the output's receipt has the same fingerprint)
  1    a job failed (verification over tolerance, non-finite values, full disk, write error)
  2    bad arguments, manifest or inputs, found before any work (nothing written)
  130  interrupted by Ctrl-C (SIGINT): finished outputs kept, unfinished ones removed
  143  interrupted by SIGTERM: the same"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EXIT_CODES)
@click.version_option(package_name="converter", prog_name="converter", message="%(prog)s %(version)s")
def cli() -> None:
    """Merge LoRA-family adapters into their base models; write verified safetensors checkpoints."""


@cli.command(epilog=EXIT_CODES)
@click.option("--base", required=True, help="Base model directory, or hub repo id (org/name).")
@click.option("--adapter", "adapters", required=True, multiple=True,
              help="Adapter directory (adapter_config.json + weights), or hub repo id. Repeat it for a stack: merged "
                   "in that order into one checkpoint, in one pass.")
@click.option("--adapter-weight", "weights", type=float, multiple=True,
              help="Each adapter's weight, in --adapter order (repeat it): the stack becomes a weighted mix "
                   "(PEFT's add_weighted_adapter, combination cat).")
@click.option("--output", required=True, help="Output directory (written as OUTPUT.partial, renamed last).")
@click.option("--base-revision", default=None,
              help="Revision of the base (a hub base is fetched at it); must match the adapter's record.")
@click.option("--adapter-revision", "revisions", multiple=True,
              help="Revision of the adapter (a hub adapter is fetched at it); in a stack, one per --adapter.")
@click.option("--cache-dir", default=None, help="Hub cache for repo sources (default: huggingface_hub's).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Output dtype; auto keeps the base's.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the fp32 merge math runs; auto: CUDA when torch sees a GPU.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard (e.g. 5GB, 500MB); shards are model-0000i-of-0000N.safetensors.")
@click.option("--verify", type=click.Choice(["none", "modules", "full"]), default="full", show_default=True,
              help="modules: probes through each merged weight; full: also the unmerged PeftModel's outputs "
                   "against the merged checkpoint loaded from disk.")
@click.option("--quantize", multiple=True, metavar="METHOD[:key=value,...]",
              help="Also write a quantized variant to OUTPUT-METHOD (repeatable): bnb-int8, bnb-nf4, bnb-fp4 "
                   "(transformers), fp8 (compressed-tensors: vLLM, SGLang), gguf-f16, gguf-bf16, gguf-q8_0 "
                   "(llama.cpp, Ollama); e.g. bnb-nf4:double_quant=true or fp8:block=128.")
@click.option("--force", is_flag=True, help="Replace an earlier output of converter made with other inputs or "
              "options (never an input, never a directory converter did not write).")
@click.option("--strict", is_flag=True, help="Fail on warnings, e.g. an adapter whose deltas are all zero.")
@click.option("--label", "labels", multiple=True, metavar="NAME", help="A task head's labels, in order (repeat it): "
              "config.json's id2label / label2id (default LABEL_0, LABEL_1...).")
@click.option("--keep-quantization", is_flag=True, help="A quantized base (bitsandbytes, FP8): write the merged model "
              "in the base's own format and layout, re-encoding the merged weights (default: dense, in --dtype).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the base's own model code for full verification.")
@click.option("--allow-base-mismatch", is_flag=True, help="Merge although the base revision differs.")
@click.option("--max-logit-diff", type=float, default=None, help="Absolute bound on max |Δlogit| (full verify).")
@click.option("--max-kl", type=float, default=None, help="Bound on the mean KL (full verify).")
@click.option("--min-top1", type=float, default=None, help="Lower bound on top-1 agreement (full verify).")
@click.option("--job-id", default=None, help="Name recorded in the receipt (default: the output's name).")
def merge(**kw) -> None:
    """Merge one adapter into one base; write OUTPUT (and OUTPUT-METHOD per --quantize)."""
    from pydantic import ValidationError

    from converter.convert import convert
    from converter.options import MergeJob

    adapters = _adapter_options(kw.pop("adapters"), kw.pop("weights"), kw.pop("revisions"))
    try:
        job = MergeJob(**kw, **adapters)
    except ValidationError as exc:
        raise BadInputError([_option_error(e, kw) for e in exc.errors()]) from None
    result = convert(job)
    if result.status == "skipped":
        fingerprint = result.record.fingerprint[:12] if result.record else "?"
        click.echo(f"{result.output}: already converted with the same inputs and options (fingerprint "
                   f"{fingerprint}); nothing to do")
        return
    _summary(result.output, result.record)


def _adapter_options(adapters: tuple[str, ...], weights: tuple[float, ...], revisions: tuple[str, ...]) -> dict:
    """MergeJob's adapter fields from the repeated --adapter, --adapter-weight and --adapter-revision."""
    for option, values in (("--adapter-weight", weights), ("--adapter-revision", revisions)):
        if values and len(values) != len(adapters):
            raise BadInputError(f"{option} is given {len(values)} time(s) for {len(adapters)} --adapter",
                                hint=f"give one {option} per --adapter, in the same order, or none")
    weights, revisions = weights or (None,) * len(adapters), revisions or (None,) * len(adapters)
    return {"adapter": adapters[0], "adapter_weight": weights[0], "adapter_revision": revisions[0],
            "stack": [{"adapter": a, "weight": w, "revision": r} for a, w, r in zip(adapters[1:], weights[1:],
                                                                                   revisions[1:])]}


def _option_error(e: dict, kw: dict) -> str:
    loc, msg = e["loc"], e["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    if loc[0] == "quantize" and len(loc) > 1 and isinstance(loc[1], int):  # name the --quantize value and option
        where = f" ({loc[2]})" if len(loc) > 2 else ""
        return f"--quantize {kw['quantize'][loc[1]]}{where}: {msg}"
    return f"--{str(loc[0]).replace('_', '-')}: {msg}"


def _summary(output, r) -> None:
    v, c = r.verification, r.counts
    click.echo(f"wrote {output}")
    click.echo(f"  engine {r.engine}, dtype {r.dtype}: {c.merged} merged, {c.replaced} replaced, {c.copied} copied, "
               f"{c.added} added")
    if v.modules:
        click.echo(f"  module probes: {v.modules.checked} modules, max relative error {v.modules.max_rel_err:.3g} "
                   f"(tolerance {v.modules.tolerance:g})")
    if v.full:
        click.echo(f"  merged vs unmerged outputs: {_figures(v.full)}")
    if v.note:
        click.echo(f"  note: {v.note}")
    for q in r.quantization:
        figures = _figures(q.figures, logits_only=True) if q.figures else q.note
        click.echo(f"  {q.method} -> {q.path} ({q.engine}, {q.size_ratio:.2f}× the merged size): {figures}")
    for w in r.warnings:
        click.echo(f"  WARNING: {w}", err=True)
    click.echo(f"  {r.timings['total_s']:.2f}s, peak RSS {r.peak_rss_bytes['merge'] / 2**20:.0f} MiB while merging")


def _figures(f, logits_only: bool = False) -> str:
    if logits_only and f.kl is None:  # a model without logits: max |Δ| alone
        return f"max |Δ| {f.max_abs_diff:.3g}"
    kl = "n/a" if f.kl is None else f"{f.kl:.3g}"
    top1 = "n/a" if f.top1 is None else f"{f.top1:.3f}"
    return f"max |Δ| {f.max_abs_diff:.3g}, KL {kl}, top-1 agreement {top1}"


@cli.command(epilog=EXIT_CODES)
@click.argument("manifest")
def validate(manifest: str) -> None:
    """Resolve and inspect every job of MANIFEST; write nothing, list every problem at once."""
    from converter.manifest import load_manifest

    m = load_manifest(manifest)
    click.echo(f"{manifest}: {len(m.jobs)} jobs OK (output_root {m.output_root})")


@cli.command(epilog=EXIT_CODES)
@click.argument("manifest")
def lock(manifest: str) -> None:
    """Write back the commit sha every hub source of MANIFEST resolves to."""
    from converter.manifest import lock_manifest

    changes = lock_manifest(manifest)
    for line in changes:
        click.echo(line)
    click.echo(f"{manifest}: {'locked, ' + str(len(changes)) + ' revision(s) pinned' if changes else 'already locked'}")


@cli.command(epilog=EXIT_CODES)
@click.argument("manifest")
@click.option("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help="At most N tasks at once.")
@click.option("--group-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Jobs on the same base merged in one pass (one task) at most; 1: a task per job.")
@click.option("--force", is_flag=True, help="Redo jobs whose outputs were made from other inputs or options.")
def run(manifest: str, ray_address: str | None, max_concurrent: int | None, group_size: int, force: bool) -> None:
    """Convert every job of MANIFEST on Ray; re-runs skip what is done."""
    # The Ray driver lives in jobs/, the only package that imports ray; merge/inspect never load it.
    try:
        from jobs.driver import run_manifest
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise BadInputError("`converter run` runs its jobs on Ray, which is not installed here",
                            hint="pip install ray (converter's own install brings it), or convert one pair "
                                 "with `converter merge`") from None

    code = run_manifest(manifest, ray_address=ray_address, max_concurrent=max_concurrent, force=force,
                        group_size=group_size)
    if code:
        raise click.exceptions.Exit(code)


@cli.command(epilog=EXIT_CODES)
@click.argument("adapter")
@click.option("--base", default=None, help="Base model directory or hub repo id to check the adapter against.")
@click.option("--base-revision", default=None, help="Revision of a hub base.")
@click.option("--adapter-revision", default=None, help="Revision of a hub adapter.")
@click.option("--cache-dir", default=None, help="Hub cache for repo sources (default: huggingface_hub's).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(adapter: str, base: str | None, base_revision: str | None, adapter_revision: str | None,
            cache_dir: str | None, as_json: bool) -> None:
    """What ADAPTER (directory or hub repo id) changes, and whether it fits BASE."""
    from converter.inspect import inspect_adapter, render

    summary = inspect_adapter(adapter, base, adapter_revision, base_revision, cache_dir)
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else render(summary))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 job failed, 2 bad arguments or input, 130/143 interrupted)."""
    _setup_logging()
    try:
        with sigterm_interrupts():
            code = cli.main(args=argv, prog_name="converter", standalone_mode=False)
        if isinstance(code, int):  # click returns an Exit's code in non-standalone mode
            return code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return EXIT_BAD_INPUT
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted (SIGINT): nothing unfinished was kept", err=True)
        return EXIT_SIGINT
    except Interrupted as exc:
        click.echo(f"interrupted ({exc}): nothing unfinished was kept", err=True)
        return exc.exit_code
    except ConverterError as exc:
        kind = "error" if exc.exit_code == EXIT_BAD_INPUT else "failed"
        click.echo(f"{kind}: {exc}", err=True)
        return exc.exit_code
    except OSError as exc:  # outside a job (a manifest, a ledger, the terminal): named, not a traceback
        click.echo(f"failed: {write_failure(exc, 'working on')}", err=True)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a bug: one screen, the traceback on request
        if os.environ.get("CONVERTER_DEBUG"):
            raise
        click.echo(f"failed: unexpected {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}\n"
                   "This is a bug in converter: rerun with CONVERTER_DEBUG=1 for the traceback, and report it.",
                   err=True)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
