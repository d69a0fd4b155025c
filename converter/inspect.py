"""``converter inspect``: what an adapter changes, and whether it fits a base."""

from __future__ import annotations

from converter.adapter import load_adapter, named_adapter
from converter.errors import BadInputError
from converter.lora_math import lora_scale
from converter.plan import needs_peft_engine, pattern_value, split_key


def inspect_adapter(adapter_dir: str, base_dir: str | None = None, adapter_revision: str | None = None,
                    base_revision: str | None = None, cache_dir: str | None = None) -> dict:
    """What an adapter changes and, given a base, whether it fits: a summary dict (``--json``)."""
    from converter import sources

    path, named = named_adapter(sources.resolve(adapter_dir, "adapter", adapter_revision, cache_dir=cache_dir).path)
    adapter = load_adapter(path)
    cfg = adapter.config
    engine_reason = needs_peft_engine(adapter)
    modules: dict[str, dict] = {}
    replaced, other = [], []
    for key in adapter.keys():
        module, role = split_key(key)
        if role in ("A", "emb_A"):
            r = pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
            alpha = pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
            modules[module] = {"kind": "embedding" if role == "emb_A" else "linear", "r": r, "alpha": alpha,
                               "scale": lora_scale(r, alpha, bool(cfg.get("use_rslora"))),
                               "dora": False, "shape_A": adapter.shape(key)}
        elif role in ("full", "replace_weight", "replace_bias"):
            replaced.append(key)
        elif role not in ("B", "emb_B", "magnitude", "B_bias"):
            other.append(key)
    for key in adapter.keys():
        module, role = split_key(key)
        if role == "magnitude" and module in modules:
            modules[module]["dora"] = True
    summary = {
        "adapter": str(adapter.directory),
        "named": named,
        "peft_type": adapter.peft_type,
        "engine": "peft" if engine_reason else "streaming",
        "engine_reason": engine_reason,
        "options": {k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern",
                                            "alpha_pattern", "target_modules", "modules_to_save",
                                            "trainable_token_indices", "bias", "lora_bias", "layers_to_transform",
                                            "base_model_name_or_path", "revision") if cfg.get(k) not in (None, {}, [])},
        "tensors": len(adapter.keys()),
        "lora_modules": modules,
        "replaced": replaced,
        "other": other,
        "base": None,
        "fits": None,
        "problems": [],
    }
    if base_dir is not None:
        summary["base"] = str(base_dir)
        summary.update(_against_base(adapter, base_dir, base_revision, cache_dir, engine_reason))
    return summary


def _against_base(adapter, base: str, revision: str | None, cache_dir, engine_reason) -> dict:
    from converter import codecs, sources
    from converter.inputs import expert_plan
    from converter.modelinfo import base_config, describe
    from converter.plan import build_plan

    src, ckpt = sources.open_base(base, revision, cache_dir=cache_dir, metadata_only=True)  # no weight download
    ckpt = codecs.decoded(ckpt, base_config(src.path), base)
    info = describe(src.path, list(ckpt.specs))
    out: dict = {"fits": True, "problems": [], "changes": {}, "untie": False, "vocab_size": None,
                 "architecture": info.cls_path.rpartition(":")[2].rpartition(".")[2] if info.cls_path else info.note,
                 "format": ckpt.codec.label if isinstance(ckpt, codecs.DecodedCheckpoint) else None}
    if engine_reason:
        return out
    try:
        experts = expert_plan(adapter, ckpt, src.path, False) if adapter.config.get("target_parameters") else None
        plan = build_plan(adapter, ckpt, info, experts)
    except BadInputError as exc:
        out["fits"] = False
        out["problems"] = exc.problems
        return out
    out["changes"] = {t.name: t.action for t in plan.tensors.values() if t.action != "copy"}
    out["untie"] = plan.untie
    out["vocab_size"] = plan.vocab_size
    out["counts"] = {a: plan.count(a) for a in ("merge", "replace", "copy", "add")}
    return out


def render(s: dict) -> str:
    """The summary of ``inspect_adapter`` as text."""
    lines = ([s["named"]] if s.get("named") else []) + [
        f"adapter {s['adapter']}: {s['peft_type']}, {s['tensors']} tensors, engine {s['engine']}"
        + (f" ({s['engine_reason']})" if s["engine_reason"] else "")]
    for k, v in s["options"].items():
        lines.append(f"  {k}: {v}")
    if s["lora_modules"]:
        lines.append(f"LoRA modules ({len(s['lora_modules'])}):")
        for m, d in s["lora_modules"].items():
            lines.append(f"  {m}: {d['kind']} r={d['r']} alpha={d['alpha']} scale={d['scale']:.4g}"
                         + (" DoRA" if d["dora"] else ""))
    if s["replaced"]:
        lines.append(f"replaced whole ({len(s['replaced'])}): " + ", ".join(s["replaced"]))
    if s["other"]:
        lines.append(f"other tensors ({len(s['other'])}): " + ", ".join(s["other"][:20]))
    if s["base"] is not None:
        fmt = f", stored as {s['format']}: merged into its decoded weights" if s.get("format") else ""
        lines.append(f"against base {s['base']} ({s.get('architecture')}{fmt}):")
        if s["fits"]:
            c = s.get("counts", {})
            lines.append(f"  fits: {c.get('merge', 0)} tensors merged, {c.get('replace', 0)} replaced, "
                         f"{c.get('add', 0)} added, {c.get('copy', 0)} copied unchanged")
            for name, action in s["changes"].items():
                lines.append(f"    {action:8} {name}")
            if s["untie"]:
                lines.append("  tied embeddings are untied: the adapter changes one side only")
            if s["vocab_size"]:
                lines.append(f"  vocabulary resized to {s['vocab_size']}")
        else:
            lines.append("  DOES NOT FIT:")
            lines += [f"    - {p}" for p in s["problems"]]
    return "\n".join(lines)
