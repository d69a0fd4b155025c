"""Per-job overhead of `converter run` on a local Ray: many tiny jobs on warm workers.

Builds a tiny base and adapter, writes a manifest of N jobs (distinct outputs), runs it
twice (the first run warms the workers' imports), and reports wall time per job against
the time each job spent inside `convert` (from the ledger).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--max-concurrent", type=int, default=2)
    args = ap.parse_args()

    import ray
    import yaml
    from factories import build, make_adapter, save_base, tiny_llama_config
    from peft import LoraConfig

    from jobs.driver import run_manifest

    work = Path(tempfile.mkdtemp(prefix="converter-overhead-"))
    cfg = tiny_llama_config()
    save_base(build(cfg), work / "base")
    make_adapter(build(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                 work / "adapter")
    ray.init(address="local", num_cpus=args.max_concurrent, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False, object_store_memory=100 * 2**20)
    try:
        rows = []
        for round_ in ("cold", "warm"):
            jobs = [{"id": f"j{i:03d}", "base": {"path": "base"}, "adapter": {"path": "adapter"},
                     "output": f"{round_}/j{i:03d}"} for i in range(args.jobs)]
            manifest = work / f"{round_}.yaml"
            manifest.write_text(yaml.safe_dump({"defaults": {"verify": "modules"}, "output_root": "out",
                                                "jobs": jobs}))
            t = time.perf_counter()
            assert run_manifest(manifest, max_concurrent=args.max_concurrent) == 0
            wall = time.perf_counter() - t
            ledger = sorted((work / "out" / "runs").glob("*.jsonl"))[-1]
            records = [json.loads(line) for line in ledger.read_text().splitlines()]
            inside = statistics.median(r["seconds"] for r in records)
            pids = len({r["pid"] for r in records})
            rows.append((round_, wall, wall / args.jobs * args.max_concurrent, inside, pids))
    finally:
        ray.shutdown()
    print(f"\n{args.jobs} tiny jobs, {args.max_concurrent} at a time, local Ray on 127.0.0.1")
    print(f"{'round':6} {'wall s':>8} {'s/job/slot':>11} {'convert s (median)':>19} {'overhead s/job':>15} "
          f"{'worker pids':>12}")
    for round_, wall, per_job, inside, pids in rows:
        print(f"{round_:6} {wall:8.2f} {per_job:11.3f} {inside:19.3f} {per_job - inside:15.3f} {pids:12d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
