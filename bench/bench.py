#!/usr/bin/env python
"""Benchmark converter's streaming LoRA merge against PEFT and a plain file copy.

On one synthetic Llama-shaped base + rank-16 LoRA (see make_synthetic.py), every
method runs in its own fresh subprocess, so wall time and peak RSS are per method:

  converter-none     converter merge --base B --adapter A --output O --verify none
  converter-modules  converter merge ... --verify modules
  peft               AutoModelForCausalLM.from_pretrained(B, dtype=bf16)
                     + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  copy               shutil.copyfile + os.fsync of every base file (the I/O bound)

Wall time = the child's wall time + the harness fsync-ing every output file after
the child exits (so methods that do not fsync pay for durability too; for methods
that already fsynced this is ~0).  Peak RSS = max(psutil poll of the sum of the
child's whole process tree every 20 ms, the kernel's ru_maxrss from wait4); the
latter is ignored when it is no bigger than this harness's own RSS high-water
mark, which a forked child inherits.  RSS includes file pages mapped by the child
(e.g. mmap'd safetensors), as the kernel counts them.  Before each run the
base and adapter files are read once so every method starts on a warm page cache
(use --drop-caches for cold runs; needs root and affects the whole machine).
Outputs are deleted after each run.  Runs are interleaved round-robin; each figure
is the median of --repeat runs.

Usage::

    .venv/bin/python bench/bench.py --preset 1b --repeat 3
    .venv/bin/python bench/bench.py --preset 0.1b --repeat 1 --methods peft,copy
    .venv/bin/python bench/bench.py --preset 8b --methods converter,copy --json /tmp/r.json

A converter method that fails (e.g. no CLI yet) is reported as failed and the
others still run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import make_synthetic  # noqa: E402

ALL_METHODS = ["converter-none", "converter-modules", "converter-full", "converter-keep", "converter-none-cold", "peft",
               "copy"]
PASS_METHODS = ["pass", "separate", "copies"]  # N adapters: one pass / N merges / N synced copies
# a stack of --stack adapters merged into one checkpoint: one pass / a chain of merges, each output the next one's
# base (what users do without stacks) / PEFT with every adapter loaded, merge_and_unload(adapter_names=...)
STACK_METHODS = ["stack", "stack-chain", "stack-peft"]
ALIASES = {"converter": ["converter-none", "converter-modules"], "multi": PASS_METHODS,
           "stacks": STACK_METHODS + ["copy"],
           "all": ["converter-none", "converter-modules", "peft", "copy"]}

# The synthetic models' random weights give near-flat next-token logits on random probes, so rounding the merged
# weights to bfloat16 flips the argmax of a few of the 32 probe tokens (KL stays ~1e-4); converter-full gates on KL.
SYNTHETIC_MIN_TOP1 = 0.5

PEFT_SNIPPET = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, device, shard = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
if device and device != "cpu":
    model = model.to(device)
model = PeftModel.from_pretrained(model, adapter)
merged = model.merge_and_unload()
merged.save_pretrained(out, max_shard_size=shard)
"""

COPY_SNIPPET = r"""
import os, shutil, sys
src, dst = sys.argv[1:3]
os.makedirs(dst, exist_ok=True)
for name in sorted(os.listdir(src)):
    s, d = os.path.join(src, name), os.path.join(dst, name)
    if not os.path.isfile(s):
        continue
    shutil.copyfile(s, d)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
fd = os.open(dst, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


PASS_SNIPPET = r"""
import sys
from pathlib import Path
from converter.convert import convert_many
from converter.options import MergeJob
base, out, device, shard, *adapters = sys.argv[1:]
jobs = [MergeJob(base=base, adapter=a, output=Path(out) / f"m{i}", verify="none", max_shard_size=shard,
                 device=device or "auto") for i, a in enumerate(adapters)]
bad = [o for o in convert_many(jobs) if isinstance(o, Exception) or o.status != "succeeded"]
sys.exit(f"failed: {bad}" if bad else 0)
"""

SEPARATE_SNIPPET = r"""
import subprocess, sys
from pathlib import Path
cmd, base, out, device, shard, *adapters = sys.argv[1:]
for i, a in enumerate(adapters):
    argv = cmd.split() + ["merge", "--base", base, "--adapter", a, "--output", str(Path(out) / f"m{i}"),
                          "--verify", "none", "--max-shard-size", shard] + (["--device", device] if device else [])
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
"""

COPIES_SNIPPET = r"""
import os, shutil, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    d = os.path.join(dst, f"m{i}")
    os.makedirs(d, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(d, name))
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
"""


STACK_PEFT_SNIPPET = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, out, device, shard, *adapters = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
if device and device != "cpu":
    model = model.to(device)
model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
for i, a in enumerate(adapters[1:], 1):
    model.load_adapter(a, adapter_name=f"a{i}")
merged = model.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))])
merged.save_pretrained(out, max_shard_size=shard)
"""

STACK_CHAIN_SNIPPET = r"""
import shutil, subprocess, sys
from pathlib import Path
cmd, base, out, device, shard, *adapters = sys.argv[1:]
for i, a in enumerate(adapters):
    step = Path(out) if i == len(adapters) - 1 else Path(out + f".step{i}")
    argv = cmd.split() + ["merge", "--base", base, "--adapter", a, "--output", str(step), "--verify", "none",
                          "--force", "--max-shard-size", shard] + (["--device", device] if device else [])
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    if i:
        shutil.rmtree(base)
    base = str(step)
"""


def converter_fingerprint() -> str:
    """Short hash of converter/*.py, so runs made against different code are visible."""
    h = hashlib.sha256()
    for f in sorted((REPO / "converter").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def converter_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "converter"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "converter"]


def build_cmd(method: str, base: Path, adapter: Path, out: Path, device: str | None, shard: str,
              adapters: list[Path] | None = None) -> list[str]:
    many = [str(a) for a in adapters or [adapter]]
    if method == "stack":
        return converter_cmd() + ["merge", "--base", str(base), *(x for a in many for x in ("--adapter", a)),
                                  "--output", str(out), "--verify", "none", "--max-shard-size", shard] + \
            (["--device", device] if device else [])
    if method == "stack-chain":
        return [sys.executable, "-c", STACK_CHAIN_SNIPPET, " ".join(converter_cmd()), str(base), str(out),
                device or "", shard, *many]
    if method == "stack-peft":
        return [sys.executable, "-c", STACK_PEFT_SNIPPET, str(base), str(out), device or "cpu", shard, *many]
    if method == "pass":
        return [sys.executable, "-c", PASS_SNIPPET, str(base), str(out), device or "", shard, *many]
    if method == "separate":
        return [sys.executable, "-c", SEPARATE_SNIPPET, " ".join(converter_cmd()), str(base), str(out), device or "",
                shard, *many]
    if method == "copies":
        return [sys.executable, "-c", COPIES_SNIPPET, str(base), str(out), str(len(many))]
    if method.startswith("export-"):  # the merge, then one variant written from it (--quantize METHOD)
        return build_cmd("converter-none", base, adapter, out, device, shard) + ["--quantize",
                                                                                method.removeprefix("export-")]
    if method.endswith("-cold"):  # no converter.cache: the base is described and hashed again
        return ["env", "CONVERTER_CACHE_DIR=off"] + build_cmd(method.removesuffix("-cold"), base, adapter, out, device,
                                                              shard, adapters)
    if method == "converter-keep":  # a quantized base's output in its own format
        return build_cmd("converter-none", base, adapter, out, device, shard) + ["--keep-quantization"]
    if method.startswith("converter-"):
        cmd = converter_cmd() + ["merge", "--base", str(base), "--adapter", str(adapter),
                                 "--output", str(out), "--verify", method.split("-", 1)[1],
                                 "--max-shard-size", shard]
        if method == "converter-full":  # random weights give near-flat logits: bf16 rounding flips a few argmaxes
            cmd += ["--min-top1", str(SYNTHETIC_MIN_TOP1)]
        if device:
            cmd += ["--device", device]
        return cmd
    if method == "peft":
        return [sys.executable, "-c", PEFT_SNIPPET, str(base), str(adapter), str(out), device or "cpu", shard]
    if method == "copy":
        return [sys.executable, "-c", COPY_SNIPPET, str(base), str(out)]
    raise ValueError(method)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def read_files(paths) -> None:
    """Pull files into the page cache."""
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    for d in paths:
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(mv):
                        pass


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError as e:
        print(f"[bench] cannot drop caches: {e}", file=sys.stderr)
        return False


def fsync_tree(path: Path) -> None:
    if not path.exists():
        return
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> tuple[int, int]:
    n = size = 0
    if path.exists():
        for f in path.rglob("*"):
            if f.is_file():
                n += 1
                size += f.stat().st_size
    return n, size


def remove_outputs(out: Path) -> None:
    """Delete OUT and siblings such as OUT.partial left by an interrupted writer."""
    for p in out.parent.glob(out.name + "*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def run_once(method: str, cmd: list[str], out: Path, log: Path, timeout: float, poll_s: float = 0.02) -> dict:
    remove_outputs(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    with open(log, "wb") as logf:
        shown = cmd if method.startswith("converter") else cmd[:2] + [f"<{method} snippet>"] + cmd[3:]
        logf.write(("$ " + " ".join(shown) + "\n").encode())
        logf.flush()
        # a forked child inherits this process's RSS high-water mark (Linux copies it with the mm)
        parent_hiwater = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        ps = psutil.Process(child.pid)
        peak, samples, status, ru, timed_out = 0, 0, None, None, False
        while True:
            pid, st, ru_ = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                status, ru = st, ru_
                break
            peak = max(peak, tree_rss(ps))
            samples += 1
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                child.kill()
                _, status, ru = os.wait4(child.pid, 0)
                break
            time.sleep(poll_s)
        proc_s = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    child.returncode = rc  # reaped by wait4 above
    res = dict(method=method, rc=rc, proc_s=proc_s, polled_peak_rss_mb=peak / 2**20,
               ru_maxrss_mb=ru.ru_maxrss / 1024, rss_samples=samples, log=str(log))
    # ru_maxrss also counts the forked copy of this harness before exec(); when it is no
    # bigger than that, it says nothing about the child and the polled figure is used.
    inherited = ru.ru_maxrss * 1024 <= parent_hiwater * 1.02
    res["peak_rss_mb"] = res["polled_peak_rss_mb"] if inherited else max(res["polled_peak_rss_mb"],
                                                                            res["ru_maxrss_mb"])
    if rc == 0 and not timed_out:
        t1 = time.perf_counter()
        fsync_tree(out)
        res["sync_s"] = time.perf_counter() - t1
        res["wall_s"] = proc_s + res["sync_s"]
        res["out_files"], res["out_bytes"] = dir_bytes(out)
        res["ok"] = res["out_files"] > 0
        if method.startswith("export-"):
            res.update(export_figures(out, method.removeprefix("export-")))
        if not res["ok"]:
            res["error"] = "exit 0 but no output files"
    else:
        res["ok"] = False
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        res["log_tail"] = lines[-15:]
        last = lines[-1].strip() if len(lines) > 1 else "(no output)"
        res["error"] = (f"timeout after {timeout:.0f}s" if timed_out else f"exit {rc}") + f": {last}"
    remove_outputs(out)
    return res


def export_figures(out: Path, qmethod: str) -> dict:
    """The variant's own figures from the receipt (its write time, size, peak RSS while writing), its files synced
    here and the sync added: the export beyond the merge, against a synced copy of as many bytes."""
    variant = json.loads((out / "conversion.json").read_text())["quantization"][0]
    t = time.perf_counter()
    fsync_tree(out.with_name(f"{out.name}-{qmethod}"))
    return {"export_s": variant["timings"]["write_s"] + time.perf_counter() - t, "export_bytes": variant["size_bytes"],
            "export_peak_rss_mb": variant["peak_rss_bytes"]["write"] / 2**20}


def summarize(methods, runs) -> dict:
    summ = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        ok = [r for r in rs if r["ok"]]
        if not ok or len(ok) < len(rs):
            summ[m] = dict(status="failed", n=len(rs), n_ok=len(ok),
                           error=next((r.get("error") for r in rs if not r["ok"]), None))
            if ok:  # partial success: still keep numbers
                summ[m].update(wall_s=statistics.median(r["wall_s"] for r in ok),
                               peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in ok))
            continue
        summ[m] = dict(
            status="ok", n=len(ok),
            wall_s=statistics.median(r["wall_s"] for r in ok),
            proc_s=statistics.median(r["proc_s"] for r in ok),
            sync_s=statistics.median(r["sync_s"] for r in ok),
            peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in ok),
            wall_s_all=[round(r["wall_s"], 3) for r in ok],
            peak_rss_mb_all=[round(r["peak_rss_mb"], 1) for r in ok],
            out_bytes=ok[0]["out_bytes"], out_files=ok[0]["out_files"],
        )
        if m.startswith("export-"):
            summ[m].update(export_s=statistics.median(r["export_s"] for r in ok), export_bytes=ok[0]["export_bytes"],
                           export_peak_rss_mb=statistics.median(r["export_peak_rss_mb"] for r in ok))
        srcs = sorted({r["converter_src"] for r in rs if r.get("converter_src")})
        if srcs:
            summ[m]["converter_src"] = srcs
            if len(srcs) > 1 or any(r.get("converter_src_changed_during_run") for r in rs):
                summ[m]["warning"] = "converter source changed between/during runs"

    copy = summ.get("copy", {})
    peft = summ.get("peft", {})
    separate = summ.get("separate", {})
    stack_peft = summ.get("stack-peft", {})
    for m, s in summ.items():
        if s["status"] != "ok":
            continue
        ref = summ.get("copies", {}) if m in PASS_METHODS else copy  # N adapters: against N synced copies
        s["wall_vs_copy"] = s["wall_s"] / ref["wall_s"] if ref.get("status") == "ok" else None
        # against a synced copy of this method's own output size (the copy's throughput, scaled to those bytes)
        s["wall_vs_copy_own_size"] = (s["wall_s"] / (ref["wall_s"] * s["out_bytes"] / ref["out_bytes"])
                                      if ref.get("status") == "ok" and ref.get("out_bytes") else None)
        if m in PASS_METHODS:
            n = next((r["adapters"] for r in runs if r["method"] == m and r.get("adapters")), None)
            s["adapters"] = n
            s["adapters_per_min"] = round(n / s["wall_s"] * 60, 2) if n else None
            if m == "pass" and separate.get("status") == "ok":
                s["speedup_vs_separate"] = separate["wall_s"] / s["wall_s"]
        against = stack_peft if m in STACK_METHODS else peft  # a stack: against PEFT merging the same stack
        if "export_s" in s and ref.get("status") == "ok" and ref.get("out_bytes"):
            s["export_vs_copy_own_size"] = s["export_s"] / (ref["wall_s"] * s["export_bytes"] / ref["out_bytes"])
        s["wall_vs_peft"] = s["wall_s"] / against["wall_s"] if against.get("status") == "ok" else None
        s["rss_vs_peft"] = s["peak_rss_mb"] / against["peak_rss_mb"] if against.get("status") == "ok" else None
    return summ


def _fmt(x, spec):
    if x is None:
        return "-"
    if spec == ".2f" and 0 < abs(x) < 0.01:
        spec = ".3f"
    return format(x, spec)


def table_rows(methods, summ):
    rows = []
    for m in methods:
        s = summ[m]
        if s["status"] != "ok":
            err = (s.get("error") or "")[:90]
            rows.append([m, "FAILED", "", "", "", "", "", "", err])
            continue
        rows.append([m, _fmt(s["wall_s"], ".2f"), _fmt(s["peak_rss_mb"], ".0f"), _fmt(s["out_bytes"] / 1e9, ".2f"),
                     _fmt(s["wall_vs_copy"], ".2f"), _fmt(s.get("wall_vs_copy_own_size"), ".2f"),
                     _fmt(s["wall_vs_peft"], ".2f"),
                     _fmt(s["rss_vs_peft"], ".2f"),
                     f"n={s['n']}" + (f" {s['adapters']} adapters, {s['adapters_per_min']:.1f}/min"
                                      if s.get("adapters") else "")
                     + (f", {s['speedup_vs_separate']:.2f}x faster than separate"
                        if s.get("speedup_vs_separate") else "")
                     + (f", export {s['export_s']:.2f}s ({s['export_bytes'] / 1e9:.2f} GB, "
                        f"{_fmt(s.get('export_vs_copy_own_size'), '.2f')}x a copy of its size, "
                        f"RSS {s['export_peak_rss_mb']:.0f} MB)" if "export_s" in s else "")
                     + (f" src {s['converter_src'][0][:8]}" if s.get("converter_src") else "")
                     + (" (MIXED SOURCE)" if s.get("warning") else "")])
    return rows


HEADERS = ["method", "wall s", "peak RSS MB", "out GB", "wall/copy", "wall/copy of own size", "wall/peft", "rss/peft",
           "note"]


def print_table(title, methods, summ, markdown=False):
    rows = table_rows(methods, summ)
    if markdown:
        print(f"\n**{title}**\n")
        print("| " + " | ".join(HEADERS) + " |")
        print("|" + "|".join("---" for _ in HEADERS) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for i, h in enumerate(HEADERS):
            t.add_column(h, justify="left" if i in (0, len(HEADERS) - 1) else "right", overflow="fold")
        for r in rows:
            t.add_row(*r)
        Console(width=160).print(t)
    except ImportError:
        w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
        print(title)
        print("  ".join(h.ljust(w[i]) for i, h in enumerate(HEADERS)))
        for r in rows:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


def ensure_synthetic(preset: str, data_dir: Path) -> dict:
    """Generate the synthetic files (in a subprocess, so this harness never imports torch:
    a big parent would inflate the children's ru_maxrss through fork) or reuse them."""
    info = data_dir / "synthetic.json"
    if info.exists():
        syn = json.loads(info.read_text())
        if syn.get("preset") == preset and syn.get("complete"):
            print(f"[bench] reusing synthetic files in {data_dir}", flush=True)
            return syn
    subprocess.run([sys.executable, str(HERE / "make_synthetic.py"), "--preset", preset, "--out", str(data_dir)],
                   check=True, cwd=REPO)
    return json.loads(info.read_text())


def ensure_tokenizer(preset: str, data_dir: Path) -> None:
    """Synthetic files made before the bases shipped a tokenizer get one (the GGUF exports need it)."""
    if not (data_dir / "base" / "tokenizer.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_synthetic.py"), "--preset", preset, "--out", str(data_dir),
                        "--add-tokenizer"], check=True, cwd=REPO)


def machine_info() -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                mem_total_gb=round(psutil.virtual_memory().total / 1e9, 1),
                mem_available_gb=round(psutil.virtual_memory().available / 1e9, 1),
                loadavg=os.getloadavg())
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("torch", "transformers", "peft", "safetensors", "converter"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:  # pragma: no cover
            pass
    return info


def parse_methods(spec: str) -> list[str]:
    out = []
    for tok in spec.split(","):
        tok = tok.strip()
        if not tok:
            continue
        for m in ALIASES.get(tok, [tok]):
            if m not in ALL_METHODS + PASS_METHODS + STACK_METHODS and not m.startswith("export-"):
                raise SystemExit(f"unknown method {m!r}; choose from "
                                 f"{ALL_METHODS + PASS_METHODS + STACK_METHODS + list(ALIASES)}")
            if m not in out:
                out.append(m)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=make_synthetic.ALL_PRESETS, default="1b")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; figures are medians (default 3)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/converter-bench"))
    ap.add_argument("--device", default=None, help="passed to converter (--device) and used by PEFT")
    ap.add_argument("--methods", default="all",
                    help="comma list of converter-none,converter-modules,peft,copy (aliases: converter, all)")
    ap.add_argument("--json", type=Path, default=None, help="default: bench-out/results-<preset>.json")
    ap.add_argument("--timeout", type=float, default=3600, help="per run, seconds")
    ap.add_argument("--no-warm", action="store_true", help="do not pre-read inputs before each run")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--adapters", type=int, default=8,
                    help="adapters for the one-pass methods (pass, separate, copies; alias multi); default 8")
    ap.add_argument("--stack", type=int, default=3,
                    help="adapters in the stack of stack, stack-chain and stack-peft (alias stacks); default 3")
    args = ap.parse_args(argv)
    methods = parse_methods(args.methods)

    data_dir = args.workdir / args.preset
    syn = ensure_synthetic(args.preset, data_dir)
    base, adapter = Path(syn["base"]), Path(syn["adapter"])
    if any(m.startswith("export-gguf") for m in methods):
        ensure_tokenizer(args.preset, data_dir)
    adapters = (make_synthetic.extra_adapters(data_dir, args.adapters)
                if any(m in PASS_METHODS for m in methods) else [adapter])
    stack = make_synthetic.extra_adapters(data_dir, args.stack) if any(m in STACK_METHODS for m in methods) else []
    shard = f"{make_synthetic.shard_bytes(args.preset) // 10**9}GB"
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[bench] preset {args.preset}: {syn['n_params'] / 1e9:.3f}B params, base {syn['base_bytes'] / 1e9:.2f} GB, "
          f"methods {methods}, repeat {args.repeat}", flush=True)

    runs = []
    started = _dt.datetime.now().isoformat(timespec="seconds")
    for i in range(args.repeat):
        for m in methods:
            if args.drop_caches:
                drop_caches()
            elif not args.no_warm:
                read_files([base, *adapters])
            out = args.workdir / f"out-{args.preset}-{m}"
            cmd = build_cmd(m, base, adapter, out, args.device, shard, stack if m in STACK_METHODS else adapters)
            fp_before = converter_fingerprint() if m.startswith("converter") else None
            r = run_once(m, cmd, out, logs / f"{args.preset}-{m}-{i}.log", args.timeout)
            r["repeat"] = i
            if m in STACK_METHODS:
                r["adapters"] = len(stack)
            if m in PASS_METHODS:
                r["adapters"] = len(adapters)
                if r["ok"]:
                    r["adapters_per_min"] = round(len(adapters) / r["wall_s"] * 60, 2)
            if m.startswith("converter"):
                r["converter_src"] = fp_before
                if converter_fingerprint() != fp_before:
                    r["converter_src_changed_during_run"] = True
            r["loadavg_1m_after"] = os.getloadavg()[0]
            runs.append(r)
            if r["ok"]:
                print(f"[bench] {m} #{i}: {r['wall_s']:.2f}s (proc {r['proc_s']:.2f} + sync {r['sync_s']:.2f}), "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            else:
                print(f"[bench] {m} #{i}: FAILED ({r['error'][:300]})", flush=True)

    summ = summarize(methods, runs)
    title = (f"{args.preset} ({syn['n_params'] / 1e9:.2f}B params, {syn['base_bytes'] / 1e9:.2f} GB base), "
             f"median of {args.repeat}")
    print()
    print_table(title, methods, summ)
    if args.markdown:
        print_table(title, methods, summ, markdown=True)

    result = dict(preset=args.preset, started=started, finished=_dt.datetime.now().isoformat(timespec="seconds"),
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  methods=methods, synthetic=syn, machine=machine_info(),
                  converter_cmd=converter_cmd(), summary=summ, runs=runs)
    jpath = args.json or HERE.parent / "bench-out" / f"results-{args.preset}.json"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] wrote {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
