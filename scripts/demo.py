"""The demo: a tiny Llama-shaped base and a LoRA adapter built on the fly, then `converter merge`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch


def build_inputs(workdir: Path) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    base_dir, adapter_dir = workdir / "base", workdir / "adapter"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base_dir)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True, init_lora_weights=False))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo-out", type=Path)
    args = parser.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    base, adapter = build_inputs(args.workdir)
    output = args.workdir / "merged"
    print(f"demo base: {base} (tiny Llama, bfloat16); adapter: {adapter} (rsLoRA r=8 on all linear layers)")
    from converter.cli import main as converter_main

    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(output)]
    print("$ converter " + " ".join(argv))
    code = converter_main(argv)
    if code == 0:
        receipt = json.loads((output / "conversion.json").read_text())
        print(f"\noutput: {output.resolve()}")
        print("files: " + ", ".join(sorted(p.name for p in output.iterdir())))
        print("verification: " + json.dumps(receipt["verification"]["full"]))
    return code


if __name__ == "__main__":
    sys.exit(main())
