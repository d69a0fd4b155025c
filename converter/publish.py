"""Everything around the weights: kept files, config.json, model card, receipt, fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

RECEIPT = "conversion.json"
PARTIAL_SUFFIX = ".partial"
# Base files that are weights or that we write ourselves.
SKIP_BASE = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", RECEIPT, ".gitattributes",
             "config.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "sentencepiece.bpe.model")


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def copy_non_weight_files(base_dir: Path, adapter_dir: Path, out_dir: Path) -> list[str]:
    """Tokenizer, generation config, templates, sentence-transformers modules...; adapter tokenizer files win."""
    kept = []
    for src in sorted(base_dir.rglob("*")):
        rel = src.relative_to(base_dir)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file():
            continue
        if len(rel.parts) == 1 and (rel.name in SKIP_BASE or rel.name.endswith(WEIGHT_SUFFIXES)):
            continue
        if len(rel.parts) > 1 and rel.name.endswith(WEIGHT_SUFFIXES):
            continue  # weights of sub-models we do not merge
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        kept.append(str(rel))
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, out_dir / name)
            if name not in kept:
                kept.append(name)
    return kept


def write_config(config: dict, out_dir: Path, dtype_name: str, vocab_size: int | None, untie: bool) -> dict:
    config = json.loads(json.dumps(config))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = dtype_name
    if text is not None and ("dtype" in text or "torch_dtype" in text):
        text["dtype" if "dtype" in text else "torch_dtype"] = dtype_name
    if vocab_size is not None:
        for scope in (config, text):
            if scope is not None and "vocab_size" in scope:
                scope["vocab_size"] = vocab_size
        if "vocab_size" not in config and (text is None or "vocab_size" not in text):
            config["vocab_size"] = vocab_size
    if untie:
        config["tie_word_embeddings"] = False
        if text is not None and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def model_card(receipt: dict, base_name: str, adapter_name: str) -> str:
    v = receipt.get("verification", {})
    full = v.get("full") or {}
    lines = [
        "---",
        f"base_model: {base_name}",
        "base_model_relation: finetune",
        "library_name: transformers",
        "tags:",
        "- merged-adapter",
        f"- {receipt['adapter']['peft_type'].lower()}",
        "---",
        "",
        f"# {receipt['job_id']}",
        "",
        f"This checkpoint is `{base_name}` with the {receipt['adapter']['peft_type']} adapter `{adapter_name}` "
        "merged into its weights; it loads with `from_pretrained` and needs no PEFT at inference.",
        "",
        f"- output dtype: {receipt['dtype']}",
        f"- tensors merged / replaced / copied / added: {receipt['counts']['merged']} / {receipt['counts']['replaced']} "
        f"/ {receipt['counts']['copied']} / {receipt['counts']['added']}",
        f"- verification: {v.get('level')} ({'passed' if v.get('passed') else 'not passed'})",
    ]
    if full:
        lines.append(f"  - merged vs unmerged outputs: max |Δ| {full.get('max_abs_diff'):.3g}, "
                     f"KL {full.get('kl')}, top-1 agreement {full.get('top1')}")
    if v.get("modules"):
        lines.append(f"  - module probes: {v['modules']['checked']} modules, max relative error "
                     f"{v['modules']['max_rel_err']:.3g}")
    lines += ["", "`conversion.json` beside this card is the full receipt of the conversion.", ""]
    return "\n".join(lines)


def variant_card(receipt: dict, entry: dict, merged_name: str) -> str:
    """The model card of a quantized variant: a quantized derivative of the merged checkpoint."""
    fig = entry.get("figures") or {}
    lines = [
        "---",
        f"base_model: {merged_name}",
        "base_model_relation: quantized",
        "library_name: transformers",
        "tags:",
        "- merged-adapter",
        "- bitsandbytes",
        f"- {entry['method'].removeprefix('bnb-')}",
        "---",
        "",
        f"# {receipt['job_id']} ({entry['method']})",
        "",
        f"This checkpoint is `{merged_name}` (an adapter merged into its base) quantized with bitsandbytes "
        f"`{entry['spec']}`. It loads with `from_pretrained` (bitsandbytes installed); `config.json` holds its "
        "`quantization_config`.",
        "",
        f"- written by: {entry['engine']} engine; {entry['tensors'].get('quantized')} linear weights quantized",
        f"- size of the weights: {entry['size_bytes'] / 2**20:.1f} MiB, {entry['size_ratio']:.2f}× the merged checkpoint's",
    ]
    if fig:
        kl = "n/a" if fig.get("kl") is None else f"{fig['kl']:.3g}"
        top1 = "n/a" if fig.get("top1") is None else f"{fig['top1']:.3f}"
        lines.append(f"- against the merged model (this variant reloaded from disk): max |Δ| {fig['max_abs_diff']:.3g}, "
                     f"KL {kl}, top-1 agreement {top1}")
    else:
        lines.append(f"- quality: {entry.get('note')}")
    lines += ["", "`conversion.json` beside this card is the full receipt of the conversion.", ""]
    return "\n".join(lines)


def read_receipt(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / RECEIPT).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
