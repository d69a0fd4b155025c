#!/usr/bin/env python
"""Generate a synthetic Llama-shaped base checkpoint plus a rank-16 LoRA adapter.

The base is written tensor by tensor straight into safetensors shards (the file
header is computed up front from the shapes, then each tensor is generated, written
and dropped), so memory stays at roughly one tensor no matter how big the model is.

Layout written under ``--out`` (default ``/tmp/converter-bench/<preset>``)::

    base/config.json
    base/model-0000k-of-0000N.safetensors      (bf16, ~2 GB shards; 5 GB for 8b)
    base/model.safetensors.index.json
    adapter/adapter_config.json                (PEFT LoraConfig, r=16, alpha=32)
    adapter/adapter_model.safetensors          (fp32 lora_A / lora_B, nonzero)
    synthetic.json                             (what was generated, for the harness)

Usage::

    python bench/make_synthetic.py --preset 1b [--out DIR] [--force] [--check]

``--check`` loads the result with transformers + PEFT
(``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)``)
and verifies that every key is used and that merging changes the weights; only
meant for the small presets (it holds the whole model in memory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path

# torch/transformers/peft are imported lazily, so bench.py can read PRESETS cheaply.

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16
LORA_ALPHA = 32
BASE_STD = 0.02
LORA_STD = 0.01

GB = 1000**3

# name -> (LlamaConfig kwargs, max shard bytes)
PRESETS: dict[str, tuple[dict, int]] = {
    # ~99M params
    "0.1b": (
        dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
        2 * GB,
    ),
    # ~0.5B params
    "0.5b": (
        dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
             num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
        2 * GB,
    ),
    # TinyLlama-1.1B shape
    "1b": (
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
        2 * GB,
    ),
    # Llama-3-8B shape
    "8b": (
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
             rope_theta=500000.0, max_position_embeddings=8192),
        5 * GB,
    ),
}



def llama_config(preset: str):
    from transformers import LlamaConfig

    kw, _ = PRESETS[preset]
    base = dict(
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    cfg = LlamaConfig(**base)
    cfg.dtype = "bfloat16"  # written as "dtype" (transformers 5) in config.json
    return cfg


def base_tensor_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in LlamaForCausalLM's state dict, in its order.

    Built on the meta device, so no memory is allocated.
    """
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    specs = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    if cfg.tie_word_embeddings:
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    return specs


def adapter_tensor_specs(base_specs) -> list[tuple[str, tuple[int, ...]]]:
    """PEFT key names/shapes for a LoRA on every targeted Linear of the base."""
    out = []
    for name, shape in base_specs:
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        out_f, in_f = shape
        out.append((f"base_model.model.{module}.lora_A.weight", (LORA_RANK, in_f)))
        out.append((f"base_model.model.{module}.lora_B.weight", (out_f, LORA_RANK)))
    return out


def nbytes(shape, dtype) -> int:
    import torch

    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(path: Path, specs, dtype, make_tensor, metadata=None) -> int:
    """Write a safetensors file whose tensors are produced one at a time.

    ``make_tensor(name, shape)`` must return a contiguous tensor of ``dtype`` and
    ``shape``; it is written immediately and dropped.  Returns bytes written.
    """
    import torch

    st_dtype = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[dtype]
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, shape in specs:
        n = nbytes(shape, dtype)
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # align the data section to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, shape in specs:
            t = make_tensor(name, shape)
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape) and t.is_contiguous(), name
            f.write(t.view(-1).view(torch.uint8).numpy().data)
            del t
    os.replace(tmp, path)
    return 8 + len(hbytes) + off


def shard_specs(specs, dtype, max_shard_bytes: int):
    shards, cur, cur_bytes = [], [], 0
    for name, shape in specs:
        n = nbytes(shape, dtype)
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def generate(preset: str, out: Path, seed: int = 0, force: bool = False, quiet: bool = False) -> dict:
    import torch

    out = Path(out)
    info_path = out / "synthetic.json"
    if info_path.exists() and not force:
        info = json.loads(info_path.read_text())
        if info.get("preset") == preset and info.get("complete"):
            if not quiet:
                print(f"[make_synthetic] reusing {out} ({info['base_bytes'] / 1e9:.2f} GB)")
            return info
    if out.exists():
        shutil.rmtree(out)
    base_dir, adapter_dir = out / "base", out / "adapter"
    base_dir.mkdir(parents=True)
    adapter_dir.mkdir(parents=True)
    t0 = time.perf_counter()

    cfg = llama_config(preset)
    cfg.to_json_file(base_dir / "config.json")
    specs = base_tensor_specs(cfg)
    n_params = sum(math.prod(s) for _, s in specs)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(seed)

    def make_base(name, shape):
        if len(shape) == 1:  # RMSNorm weights: ones, so the model stays numerically sane
            return torch.ones(shape, dtype=dtype)
        return torch.empty(shape, dtype=dtype).normal_(0.0, BASE_STD, generator=gen)

    shards = shard_specs(specs, dtype, PRESETS[preset][1])
    weight_map, total = {}, 0
    for i, sh in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(base_dir / fname, sh, dtype, make_base)
        for name, shape in sh:
            weight_map[name] = fname
            total += nbytes(shape, dtype)
        if not quiet:
            print(f"[make_synthetic] wrote {fname} ({len(sh)} tensors) t={time.perf_counter() - t0:.1f}s", flush=True)
    (base_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total, "total_parameters": n_params},
                    "weight_map": weight_map}, indent=2) + "\n")

    # adapter
    from peft import LoraConfig

    lcfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM", inference_mode=True,
                      fan_in_fan_out=False)
    lcfg.save_pretrained(str(adapter_dir))
    acfg_path = adapter_dir / "adapter_config.json"  # PEFT writes the target set unordered
    acfg = json.loads(acfg_path.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True))
    aspecs = adapter_tensor_specs(specs)
    agen = torch.Generator().manual_seed(seed + 1)
    write_safetensors_streaming(
        adapter_dir / "adapter_model.safetensors", aspecs, torch.float32,
        lambda name, shape: torch.empty(shape, dtype=torch.float32).normal_(0.0, LORA_STD, generator=agen),
    )

    base_bytes = sum(p.stat().st_size for p in base_dir.iterdir())
    info = dict(
        preset=preset, seed=seed, complete=True,
        n_params=n_params, n_tensors=len(specs), n_shards=len(shards),
        base_bytes=base_bytes,
        adapter_params=sum(math.prod(s) for _, s in aspecs),
        adapter_bytes=sum(p.stat().st_size for p in adapter_dir.iterdir()),
        lora=dict(r=LORA_RANK, alpha=LORA_ALPHA, targets=LORA_TARGETS),
        config={k: v for k, v in PRESETS[preset][0].items()},
        generate_s=round(time.perf_counter() - t0, 2),
        base=str(base_dir), adapter=str(adapter_dir),
    )
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    if not quiet:
        print(f"[make_synthetic] {preset}: {n_params / 1e9:.3f}B params, {base_bytes / 1e9:.2f} GB in "
              f"{len(shards)} shard(s), adapter {info['adapter_params'] / 1e6:.1f}M params, "
              f"{info['generate_s']:.1f}s", flush=True)
    return info


def check_with_peft(out: Path) -> None:
    """Load base + adapter through transformers/PEFT and sanity-check the merge."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(out)
    base, loading = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.bfloat16,
                                                         output_loading_info=True)
    bad = {k: v for k, v in loading.items() if v and k != "error_msgs"} | (
        {"error_msgs": loading["error_msgs"]} if loading.get("error_msgs") else {})
    assert not bad, f"base loading problems: {bad}"
    ref = {k: v.clone() for k, v in base.state_dict().items() if "q_proj" in k or "down_proj" in k}
    model = PeftModel.from_pretrained(base, out / "adapter")
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    expected = len(adapter_tensor_specs(base_tensor_specs(base.config)))
    assert n_lora == expected, (n_lora, expected)
    # the adapter values actually made it in (not PEFT's zero init of lora_B)
    from safetensors.torch import load_file

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    sd = model.state_dict()
    for k, v in list(saved.items())[:4]:
        lk = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(sd[lk].float(), v), k
    ids = torch.randint(0, base.config.vocab_size, (1, 8))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    merged = model.merge_and_unload()
    msd = merged.state_dict()
    changed = sum(not torch.equal(msd[k], v) for k, v in ref.items())
    assert changed == len(ref), f"only {changed}/{len(ref)} weights changed by merge"
    print(f"[make_synthetic] PEFT check OK: {n_lora} LoRA tensors loaded, "
          f"{changed}/{len(ref)} probed weights changed by merge_and_unload, logits finite")


def extra_adapters(out: Path, n: int) -> list[Path]:
    """``adapter`` plus n-1 more adapters of the same shape (other seeds), for one-pass benchmarks."""
    import torch

    out = Path(out)
    first = out / "adapter"
    dirs = [first]
    aspecs = None
    for k in range(1, n):
        d = out / f"adapter-{k}"
        dirs.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        if aspecs is None:
            cfg = json.loads((out / "base" / "config.json").read_text())
            from transformers import LlamaConfig

            aspecs = adapter_tensor_specs(base_tensor_specs(LlamaConfig(**cfg)))
        tmp = out / f".adapter-{k}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copy(first / "adapter_config.json", tmp / "adapter_config.json")
        gen = torch.Generator().manual_seed(1000 + k)
        write_safetensors_streaming(
            tmp / "adapter_model.safetensors", aspecs, torch.float32,
            lambda name, shape: torch.empty(shape, dtype=torch.float32).normal_(0.0, LORA_STD, generator=gen))
        tmp.rename(d)
    return dirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--out", type=Path, default=None, help="default: /tmp/converter-bench/<preset>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    ap.add_argument("--check", action="store_true", help="load with transformers+PEFT afterwards")
    args = ap.parse_args(argv)
    out = args.out or Path("/tmp/converter-bench") / args.preset
    generate(args.preset, out, seed=args.seed, force=args.force)
    if args.check:
        check_with_peft(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
