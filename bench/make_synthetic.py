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


# FP8 block-scaled bases (the DeepSeek-V3 / Qwen3-FP8 layout) of a dense preset's shape: name -> dense preset
FP8_PRESETS = {"fp8-0.5b": "0.5b", "fp8-8b": "8b"}
FP8_BLOCK = (128, 128)
# Mixtral-shaped MoE bases (per-expert tensors on disk): name -> (MixtralConfig kwargs, max shard bytes)
MOE_PRESETS: dict[str, tuple[dict, int]] = {
    # ~1.9B params, 3.8 GB bf16: 8 experts of 2048 x 5632 in 6 layers
    "moe": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=16,
                 num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000), 2 * GB),
    "moe-tiny": (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=1024), 2 * GB),
}
MOE_TARGET_MODULES = ["q_proj", "v_proj"]
MOE_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ALL_PRESETS = sorted(PRESETS) + sorted(FP8_PRESETS) + sorted(MOE_PRESETS)


def shard_bytes(preset: str) -> int:
    """The largest shard a preset's base (and its outputs) are written in."""
    if preset in FP8_PRESETS:
        return PRESETS[FP8_PRESETS[preset]][1]
    return (MOE_PRESETS.get(preset) or PRESETS[preset])[1]


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

    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}
    specs = [(s[0], s[1], s[2] if len(s) > 2 else dtype) for s in specs]  # (name, shape[, own dtype])
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, shape, own in specs:
        n = nbytes(shape, own)
        header[name] = {"dtype": names[own], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # align the data section to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, shape, own in specs:
            t = make_tensor(name, shape)
            assert t.dtype == own and tuple(t.shape) == tuple(shape) and t.is_contiguous(), name
            f.write(t.view(-1).view(torch.uint8).numpy().data)
            del t
    os.replace(tmp, path)
    return 8 + len(hbytes) + off


def shard_specs(specs, dtype, max_shard_bytes: int):
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        n = nbytes(spec[1], spec[2] if len(spec) > 2 else dtype)
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def generate(preset: str, out: Path, seed: int = 0, force: bool = False, quiet: bool = False) -> dict:
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
    make = generate_fp8 if preset in FP8_PRESETS else generate_moe if preset in MOE_PRESETS else generate_llama
    return make(preset, out, seed, quiet)


def generate_llama(preset: str, out: Path, seed: int, quiet: bool) -> dict:
    import torch

    info_path = out / "synthetic.json"
    base_dir, adapter_dir = out / "base", out / "adapter"
    base_dir.mkdir(parents=True)
    adapter_dir.mkdir(parents=True)
    t0 = time.perf_counter()

    cfg = llama_config(preset)
    cfg.to_json_file(base_dir / "config.json")
    write_tokenizer(base_dir)
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


def write_tokenizer(base_dir: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained here on a little text, saved as a model repository ships
    it (tokenizer.json, tokenizer_config.json): the GGUF exports need one. It has fewer tokens than the synthetic
    models have embedding rows; the rest are padding rows, as in many real checkpoints."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = "the merged model writes each tensor once while adapters change weights in rank space".split()
    text = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.save(str(base_dir / "tokenizer.json"))
    (base_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "model_max_length": 4096}, indent=2) + "\n")


def _write_base(base_dir: Path, specs, shard_max: int, make_tensor, quiet: bool, t0: float) -> int:
    """Sharded safetensors files and their index; returns the bytes of tensor data."""
    import torch

    shards = shard_specs(specs, torch.bfloat16, shard_max)
    weight_map, total = {}, 0
    for i, sh in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(base_dir / fname, sh, torch.bfloat16, make_tensor)
        for name, shape, dtype in sh:
            weight_map[name] = fname
            total += nbytes(shape, dtype)
        if not quiet:
            print(f"[make_synthetic] wrote {fname} ({len(sh)} tensors) t={time.perf_counter() - t0:.1f}s", flush=True)
    (base_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return total


def _finish(preset: str, out: Path, seed: int, specs, aspecs, t0: float, quiet: bool, **extra) -> dict:
    info = dict(preset=preset, seed=seed, complete=True, n_params=sum(math.prod(s[1]) for s in specs),
                n_tensors=len(specs), base_bytes=sum(p.stat().st_size for p in (out / "base").iterdir()),
                adapter_params=sum(math.prod(s) for _, s in aspecs),
                adapter_bytes=sum(p.stat().st_size for p in (out / "adapter").iterdir()),
                generate_s=round(time.perf_counter() - t0, 2), base=str(out / "base"), adapter=str(out / "adapter"),
                **extra)
    (out / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
    if not quiet:
        print(f"[make_synthetic] {preset}: {info['n_params'] / 1e9:.3f}B params, {info['base_bytes'] / 1e9:.2f} GB, "
              f"adapter {info['adapter_params'] / 1e6:.1f}M params, {info['generate_s']:.1f}s", flush=True)
    return info


def _write_adapter(adapter_dir: Path, aspecs, seed: int, **lora) -> None:
    import torch
    from peft import LoraConfig

    LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM", inference_mode=True,
               **lora).save_pretrained(str(adapter_dir))
    gen = torch.Generator().manual_seed(seed + 1)
    write_safetensors_streaming(
        adapter_dir / "adapter_model.safetensors", aspecs, torch.float32,
        lambda name, shape: torch.empty(shape, dtype=torch.float32).normal_(0.0, LORA_STD, generator=gen))


def generate_fp8(preset: str, out: Path, seed: int, quiet: bool) -> dict:
    """A dense preset's shape stored as FP8 block-scaled: every 2-D ``*_proj.weight`` as float8_e4m3fn codes with
    float32 ``weight_scale_inv`` per 128x128 block; embeddings, norms and lm_head in bfloat16."""
    import torch

    t0 = time.perf_counter()
    base_dir, adapter_dir = out / "base", out / "adapter"
    base_dir.mkdir(parents=True)
    adapter_dir.mkdir(parents=True)
    cfg = llama_config(FP8_PRESETS[preset])
    cfg.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                               "weight_block_size": list(FP8_BLOCK)}
    cfg.to_json_file(base_dir / "config.json")
    dense = base_tensor_specs(cfg)
    specs = []
    for name, shape in dense:
        if name.endswith("_proj.weight"):
            grid = (-(-shape[0] // FP8_BLOCK[0]), -(-shape[1] // FP8_BLOCK[1]))
            specs += [(name, shape, torch.float8_e4m3fn), (name + "_scale_inv", grid, torch.float32)]
        else:
            specs.append((name, shape, torch.bfloat16))
    gen = torch.Generator().manual_seed(seed)

    def make(name, shape):
        if name.endswith("_scale_inv"):  # codes ~ N(0, 150) times this: weights ~ N(0, BASE_STD)
            return torch.full(shape, BASE_STD / 150.0, dtype=torch.float32)
        if name.endswith("_proj.weight"):
            return torch.empty(shape).normal_(0.0, 150.0, generator=gen).clamp_(-448, 448).to(torch.float8_e4m3fn)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, BASE_STD, generator=gen)

    _write_base(base_dir, specs, shard_bytes(preset), make, quiet, t0)
    aspecs = adapter_tensor_specs(dense)
    _write_adapter(adapter_dir, aspecs, seed, target_modules=LORA_TARGETS)
    return _finish(preset, out, seed, specs, aspecs, t0, quiet, fp8_block=list(FP8_BLOCK),
                   dense_bytes=sum(nbytes(shape, torch.bfloat16) for _, shape in dense))


def moe_config(preset: str):
    from transformers import MixtralConfig

    kw, _ = MOE_PRESETS[preset]
    cfg = MixtralConfig(max_position_embeddings=2048, tie_word_embeddings=False, architectures=["MixtralForCausalLM"],
                        **kw)
    cfg.dtype = "bfloat16"
    return cfg


def moe_tensor_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Mixtral's checkpoint layout: the model's fused experts as one tensor per expert and projection
    (``block_sparse_moe.experts.E.w1/w2/w3``), the router as ``block_sparse_moe.gate``."""
    import torch
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    specs = []
    for name, value in model.state_dict().items():
        stem = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            for e in range(value.shape[0]):
                half = value.shape[1] // 2
                specs += [(f"{stem[:-len('gate_up_proj')]}{e}.w1.weight", (half, value.shape[2])),
                          (f"{stem[:-len('gate_up_proj')]}{e}.w3.weight", (half, value.shape[2]))]
        elif name.endswith("experts.down_proj"):
            prefix = stem[:-len("down_proj")]
            specs += [(f"{prefix}{e}.w2.weight", tuple(value.shape[1:])) for e in range(value.shape[0])]
        else:
            specs.append((stem, tuple(value.shape)))
    return specs


def moe_adapter_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """PEFT's keys for LoRA on q/v_proj and on the fused experts (``target_parameters``): the gate_up wrapper
    saved under ``experts.base_layer``, the down one under ``experts``; A (r*E, in), B (out, r*E) per parameter."""
    h, i, e, r = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, LORA_RANK
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    specs = []
    for layer in range(cfg.num_hidden_layers):
        stem = f"base_model.model.model.layers.{layer}"
        for proj, out_f in (("q_proj", h), ("v_proj", kv)):
            specs += [(f"{stem}.self_attn.{proj}.lora_A.weight", (r, h)), (f"{stem}.self_attn.{proj}.lora_B.weight",
                                                                          (out_f, r))]
        specs += [(f"{stem}.mlp.experts.base_layer.lora_A.weight", (r * e, h)),
                  (f"{stem}.mlp.experts.base_layer.lora_B.weight", (2 * i, r * e)),
                  (f"{stem}.mlp.experts.lora_A.weight", (r * e, i)), (f"{stem}.mlp.experts.lora_B.weight", (h, r * e))]
    return specs


def generate_moe(preset: str, out: Path, seed: int, quiet: bool) -> dict:
    """A Mixtral-shaped base with per-expert tensors on disk, and a LoRA on its attention and fused experts."""
    import torch

    t0 = time.perf_counter()
    base_dir, adapter_dir = out / "base", out / "adapter"
    base_dir.mkdir(parents=True)
    adapter_dir.mkdir(parents=True)
    cfg = moe_config(preset)
    cfg.to_json_file(base_dir / "config.json")
    specs = [(n, s, torch.bfloat16) for n, s in moe_tensor_specs(cfg)]
    gen = torch.Generator().manual_seed(seed)

    def make(name, shape):
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, BASE_STD, generator=gen)

    _write_base(base_dir, specs, shard_bytes(preset), make, quiet, t0)
    aspecs = moe_adapter_specs(cfg)
    _write_adapter(adapter_dir, aspecs, seed, target_modules=MOE_TARGET_MODULES,
                   target_parameters=MOE_TARGET_PARAMETERS)
    return _finish(preset, out, seed, specs, aspecs, t0, quiet, config=MOE_PRESETS[preset][0])


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
    ap.add_argument("--preset", choices=ALL_PRESETS, default="1b")
    ap.add_argument("--out", type=Path, default=None, help="default: /tmp/converter-bench/<preset>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    ap.add_argument("--check", action="store_true", help="load with transformers+PEFT afterwards")
    ap.add_argument("--add-tokenizer", action="store_true", help="give an existing base a tokenizer (GGUF exports)")
    args = ap.parse_args(argv)
    out = args.out or Path("/tmp/converter-bench") / args.preset
    if args.add_tokenizer:
        write_tokenizer(out / "base")
        return 0
    generate(args.preset, out, seed=args.seed, force=args.force)
    if args.check:
        check_with_peft(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
