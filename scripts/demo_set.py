"""The demo set of configs/demo.yaml: a tiny Llama base and adapters that exercise different features."""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch

ADAPTERS = {  # id -> LoraConfig options (every one with a nonzero lora_B)
    "support-bot-lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "summarizer-rslora-all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "legal-dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True),
    "chat-new-tokens": dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
    "patterns-head": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                          rank_pattern={"up_proj": 4}, alpha_pattern={"v_proj": 32}, modules_to_save=["lm_head"]),
}


def build(workdir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(workdir / "base")
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(init_lora_weights=False, **options))
        with torch.no_grad():  # train-like noise on every trainable tensor (tokens, lm_head copy...)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(workdir / "adapters" / name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo-out", type=Path)
    args = parser.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    build(args.workdir)
    print(f"demo set: {args.workdir}/base and {len(ADAPTERS)} adapters in {args.workdir}/adapters")
