"""LoRA feature coverage of ``converter merge`` against PEFT's ``merge_and_unload()``.

Every test goes through :func:`merge_case`, which saves a tiny Llama base, makes an
adapter (nonzero lora_B, every trainable tensor perturbed), runs the CLI in process and
then checks

(a) the written tensors against the oracle (PEFT's merge, base loaded in the output dtype),
(b) the logits of the merged directory loaded with ``from_pretrained`` (as a user would)
    against the unmerged ``PeftModel``,
(c) receipt fields (status, engine, peft_type, dtype, verification, counts invariant).

Exception (contract): tied input/output embeddings where the adapter changes one side
only -- there the expected output is the UNMERGED model's behaviour (the converter unties).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from factories import (
    AutoModelForCausalLM,
    assert_state_dicts_match,
    build,
    forward_logits,
    make_adapter,
    peft_oracle,
    probe_ids,
    read_output,
    receipt,
    run_converter,
    same_as_peft,
    save_base,
    tiny_llama_config,
)

QV = ["q_proj", "v_proj"]
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
N_LAYERS = 2


# --------------------------------------------------------------------------- helpers


@dataclass
class Merge:
    tmp: Path
    base_dir: Path
    adapter_dir: Path
    out: Path
    rc: int
    cfg: object
    base_sd: dict
    oracle_dtype: torch.dtype
    resize_to: int | None
    _oracle: tuple | None = field(default=None, repr=False)

    @property
    def vocab(self) -> int:
        return self.resize_to or self.cfg.vocab_size

    def oracle(self):
        """(unmerged PeftModel, PEFT-merged model, PEFT-merged state dict), cached."""
        if self._oracle is None:
            self._oracle = peft_oracle(
                self.base_dir, self.adapter_dir, dtype=self.oracle_dtype, resize_to=self.resize_to
            )
        return self._oracle

    @property
    def ours(self) -> dict:
        return read_output(self.out)

    @property
    def receipt(self) -> dict:
        return receipt(self.out)

    @property
    def config(self) -> dict:
        return json.loads((self.out / "config.json").read_text())

    def load_merged(self, dtype=None):
        return AutoModelForCausalLM.from_pretrained(self.out, dtype=dtype or self.oracle_dtype).eval()

    def adapter_tensors(self) -> dict:
        return load_file(self.adapter_dir / "adapter_model.safetensors")


def merge_case(
    tmp_path: Path,
    lora_kw: dict,
    cfg_kw: dict | None = None,
    *,
    base_dtype=torch.float32,
    oracle_dtype=None,
    fmt: str = "safetensors",
    base_shard: str = "1GB",
    resize_to: int | None = None,
    args: tuple = (),
    verify: str | None = "modules",
    expect_rc: int = 0,
) -> Merge:
    """Save base, make adapter, run converter. Checks exit status and basic receipt.

    ``verify`` defaults to "modules" to keep the suite fast (our own logits check replaces
    the engine's full verification); None passes no --verify (the default, full)."""
    cfg = tiny_llama_config(**(cfg_kw or {}))
    model = build(cfg, dtype=base_dtype)
    base_dir = tmp_path / "base"
    if fmt == "bin":
        save_base(model, base_dir, fmt="bin")
        assert (base_dir / "pytorch_model.bin").exists()
        assert not list(base_dir.glob("*.safetensors"))
    else:
        save_base(model, base_dir, fmt=fmt, max_shard_size=base_shard)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resize_to is not None:
        model.resize_token_embeddings(resize_to)
    lora_kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora_kw}
    adapter_dir = make_adapter(model, LoraConfig(**lora_kw), tmp_path / "adapter")
    out = tmp_path / "out"
    if verify is not None:
        args = ("--verify", verify, *args)
    rc = run_converter("merge", "--base", base_dir, "--adapter", adapter_dir, "--output", out, *args)
    m = Merge(tmp_path, base_dir, adapter_dir, out, rc, cfg, base_sd, oracle_dtype or base_dtype, resize_to)
    assert rc == expect_rc, f"converter exit status {rc}, expected {expect_rc}"
    if rc == 0:
        assert out.is_dir()
        assert not Path(str(out) + ".partial").exists()
        rec = m.receipt
        assert rec["status"] == "succeeded"
        assert rec["engine"] == "streaming"
        assert rec["adapter"]["peft_type"] == "LORA"
        v = rec["verification"]
        assert v["level"] == (verify or "full")
        if verify != "none":
            assert v["passed"] is True, v
        assert (out / "config.json").exists() and (out / "README.md").exists()
        assert "base_model" in (out / "README.md").read_text()
        # every output tensor is counted exactly once
        c = rec["counts"]
        assert sum(c[k] for k in ("merged", "replaced", "copied", "added")) == len(m.ours), c
    return m


def scale_tol(ref: torch.Tensor, rel: float) -> float:
    return rel * max(1.0, ref.abs().max().item())


def check_tensors(m: Merge, expected: dict | None = None, atol: float = 1e-6, dtype=None):
    """(a) written tensors == oracle (or ``expected``), same names, output dtype."""
    expected = expected if expected is not None else m.oracle()[2]
    ours = m.ours
    assert_state_dicts_match(ours, expected, atol=atol)
    extra = set(ours) - set(expected)
    assert not extra, f"unexpected tensors in output: {sorted(extra)}"
    dtype = dtype or m.oracle_dtype
    wrong = {k: v.dtype for k, v in ours.items() if v.dtype != dtype}
    assert not wrong, f"tensors not in {dtype}: {wrong}"


def check_logits(m: Merge, rel: float = 1e-5):
    """(b) merged dir via from_pretrained vs the unmerged PeftModel."""
    unmerged = m.oracle()[0]
    ids = probe_ids(m.vocab)
    ref = forward_logits(unmerged, ids)
    got = forward_logits(m.load_merged(), ids)
    assert got.shape == ref.shape
    diff = (got.float() - ref.float()).abs().max().item()
    assert diff <= scale_tol(ref, rel), f"merged vs unmerged logits: max |diff| {diff:.3g}"
    return diff


def check_oracle_and_logits(m: Merge, atol: float = 0.0, rel: float = 1e-5):
    check_tensors(m, atol=atol)
    check_logits(m, rel=rel)


# --------------------------------------------------------------------------- plain LoRA


def test_plain_lora_fp32(tmp_path):
    m = merge_case(tmp_path, {"target_modules": QV}, verify=None)
    check_oracle_and_logits(m)
    rec, ours = m.receipt, m.ours
    assert rec["counts"]["merged"] == 2 * N_LAYERS
    assert rec["counts"]["replaced"] == 0
    assert rec["counts"]["added"] == 0
    assert rec["counts"]["copied"] == len(ours) - 2 * N_LAYERS
    # the merge did change the targeted tensors, and only those
    changed = {k for k in ours if not torch.equal(ours[k], m.base_sd[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(N_LAYERS) for p in QV}
    assert m.config["dtype"] == "float32"
    assert rec["dtype"] == "float32"
    assert rec["verification"]["level"] == "full"  # the default
    check_full_figures(rec["verification"])


def test_plain_lora_bf16(tmp_path, capsys):
    m = merge_case(tmp_path, {"target_modules": QV}, base_dtype=torch.bfloat16)
    unmerged, merged, oracle_sd = m.oracle()
    ours = m.ours
    assert m.config["dtype"] == "bfloat16"
    assert m.receipt["dtype"] == "bfloat16"
    assert set(ours) == set(oracle_sd)
    for k, theirs in oracle_sd.items():
        mine = ours[k]
        assert mine.dtype == torch.bfloat16, k
        # bitwise: PEFT adds the fp32 delta into the bf16 weight, rounding once, as we do
        assert same_as_peft(mine, theirs), f"{k}: {int((mine != theirs).sum())} elements differ from PEFT's merge"
        if k.endswith(("q_proj.weight", "v_proj.weight")):  # the merge changed something measurable
            assert not torch.equal(theirs, m.base_sd[k]), k
    # logits: ours vs unmerged no worse than PEFT's own merge vs unmerged (+ bf16 slack)
    ids = probe_ids(m.vocab)
    ref = forward_logits(unmerged, ids).float()
    d_ours = (forward_logits(m.load_merged(), ids).float() - ref).abs().max().item()
    d_peft = (forward_logits(merged, ids).float() - ref).abs().max().item()
    assert d_ours <= 2 * d_peft + scale_tol(ref, 2e-2), (d_ours, d_peft)


def test_dtype_float32_on_bf16_base(tmp_path):
    m = merge_case(
        tmp_path, {"target_modules": QV}, base_dtype=torch.bfloat16, oracle_dtype=torch.float32,
        args=("--dtype", "float32"),
    )
    check_oracle_and_logits(m, atol=0.0)
    assert m.config["dtype"] == "float32"
    assert m.receipt["dtype"] == "float32"


# --------------------------------------------------------------------------- LoRA variants (oracle = PEFT merge)

ATTN_BIAS = {"attention_bias": True, "mlp_bias": True}

FEATURES = {
    "rslora": ({"target_modules": QV, "use_rslora": True, "r": 4, "lora_alpha": 16}, None),
    "patterns": (
        {
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "r": 4,
            "lora_alpha": 8,
            # get_pattern_key: re.match(rf"(.*\.)?({key})$", module_name), first key wins
            "rank_pattern": {"layers.0.self_attn.v_proj": 2, "q_proj": 6},
            "alpha_pattern": {r"layers\.1\.self_attn\.(k|v)_proj": 3, "o_proj": 32},
        },
        None,
    ),
    "dora": ({"target_modules": QV + ["o_proj"], "use_dora": True}, None),
    "lora_bias": ({"target_modules": QV, "lora_bias": True}, ATTN_BIAS),
    "bias_all": ({"target_modules": QV, "bias": "all"}, ATTN_BIAS),
    "bias_lora_only": ({"target_modules": QV, "bias": "lora_only"}, ATTN_BIAS),
    "embedding_lora": ({"target_modules": ["embed_tokens", "q_proj"]}, None),
    "layers_to_transform": ({"target_modules": QV, "layers_to_transform": [1]}, None),
    "all_linear": ({"target_modules": "all-linear"}, None),
    "modules_to_save_lm_head": ({"target_modules": QV, "modules_to_save": ["lm_head"]}, None),
    "trainable_tokens_untied": ({"target_modules": QV, "trainable_token_indices": [3, 7, 100]}, None),
    "trainable_tokens_tied": (
        {"target_modules": QV, "trainable_token_indices": [3, 7, 100]},
        {"tie_word_embeddings": True},
    ),
}


# receipt counts where "number of base tensors the LoRA changed" is unambiguous
EXPECTED_MERGED = {
    "rslora": 2 * N_LAYERS,
    "patterns": 4 * N_LAYERS,
    "dora": 3 * N_LAYERS,
    "embedding_lora": 1 + N_LAYERS,
    "layers_to_transform": 2,
    "all_linear": 7 * N_LAYERS,
    "modules_to_save_lm_head": 2 * N_LAYERS,
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_lora_feature_matches_peft(tmp_path, name):
    lora_kw, cfg_kw = FEATURES[name]
    m = merge_case(tmp_path, lora_kw, cfg_kw)
    atol = 0.0  # bitwise: the engine mirrors PEFT op for op
    check_oracle_and_logits(m, atol=atol)
    ours, base, counts = m.ours, m.base_sd, m.receipt["counts"]
    if name in EXPECTED_MERGED:
        assert counts["merged"] == EXPECTED_MERGED[name], counts
    if name in ("rslora", "patterns", "dora", "layers_to_transform", "all_linear"):
        assert counts["replaced"] == 0 and counts["added"] == 0, counts

    if name == "patterns":
        a = m.adapter_tensors()
        pre = "base_model.model.model.layers"
        ranks = {k: a[f"{pre}.{k}.lora_A.weight"].shape[0] for k in
                 ("0.self_attn.v_proj", "1.self_attn.v_proj", "0.self_attn.q_proj", "1.self_attn.k_proj")}
        assert ranks == {"0.self_attn.v_proj": 2, "1.self_attn.v_proj": 4,
                         "0.self_attn.q_proj": 6, "1.self_attn.k_proj": 4}
    elif name == "layers_to_transform":
        changed = {k for k in ours if not torch.equal(ours[k], base[k])}
        assert changed == {f"model.layers.1.self_attn.{p}.weight" for p in QV}
    elif name == "all_linear":
        assert torch.equal(ours[HEAD], base[HEAD])  # all-linear excludes the output layer
    elif name == "modules_to_save_lm_head":
        assert counts["replaced"] == 1
        assert not torch.equal(ours[HEAD], base[HEAD])
    elif name in ("bias_all", "bias_lora_only", "lora_bias"):
        biased = {k for k in ours if k.endswith(".bias") and not torch.equal(ours[k], base[k])}
        qv_bias = {f"model.layers.{i}.self_attn.{p}.bias" for i in range(N_LAYERS) for p in QV}
        if name == "bias_all":
            assert qv_bias < biased and any("mlp" in k for k in biased)
        else:
            assert biased == qv_bias
    elif name.startswith("trainable_tokens"):
        idx = [3, 7, 100]
        others = [i for i in range(m.cfg.vocab_size) if i not in idx]
        assert not torch.equal(ours[EMBED][idx], base[EMBED][idx])
        assert torch.equal(ours[EMBED][others], base[EMBED][others])
        if name == "trainable_tokens_tied":
            # PEFT's trainable tokens change both sides of a tied pair: stays tied
            assert m.config["tie_word_embeddings"] is True
            if HEAD in ours:
                assert torch.equal(ours[HEAD], ours[EMBED])
        else:
            assert torch.equal(ours[HEAD], base[HEAD])
    elif name == "embedding_lora":
        assert not torch.equal(ours[EMBED], base[EMBED])
        assert torch.equal(ours[HEAD], base[HEAD])
        assert m.config["tie_word_embeddings"] is False


# --------------------------------------------------------------------------- resized vocabulary


def test_modules_to_save_embed_and_head_resized_vocab(tmp_path):
    m = merge_case(
        tmp_path, {"target_modules": QV, "modules_to_save": ["embed_tokens", "lm_head"]}, resize_to=136
    )
    check_oracle_and_logits(m)
    assert m.config["vocab_size"] == 136
    assert m.ours[EMBED].shape[0] == 136 and m.ours[HEAD].shape[0] == 136
    c = m.receipt["counts"]
    assert c["replaced"] == 2 and c["merged"] == 2 * N_LAYERS
    # a plain from_pretrained load of the output must not complain about shapes
    model = m.load_merged()
    assert model.get_input_embeddings().weight.shape[0] == 136


def test_modules_to_save_lm_head_only_resized_vocab(tmp_path, capsys):
    """Only lm_head saved but the vocabulary was resized: the base's embed_tokens has 128
    rows, PEFT's oracle gets 136 rows with RANDOM new rows (resize_token_embeddings).
    The contract does not say what the converter must do; accept either a clean refusal
    (exit 2, nothing left behind) or a merge that keeps the 128 known rows and the new head."""
    cfg = tiny_llama_config()
    model = build(cfg)
    base_dir = save_base(model, tmp_path / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.resize_token_embeddings(136)
    adapter = make_adapter(model, LoraConfig(target_modules=QV, modules_to_save=["lm_head"], init_lora_weights=False),
                           tmp_path / "adapter")
    out = tmp_path / "out"
    rc = run_converter("merge", "--base", base_dir, "--adapter", adapter, "--output", out)
    assert rc in (0, 2)
    assert not Path(str(out) + ".partial").exists()
    if rc == 2:
        assert not out.exists()
        assert "embed_tokens" in capsys.readouterr().err  # names the tensor that does not fit
        return
    ours = read_output(out)
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["vocab_size"] == 136
    assert ours[HEAD].shape[0] == 136
    assert ours[EMBED].shape[0] == 136
    assert torch.equal(ours[EMBED][:128], base_sd[EMBED])
    _, _, oracle_sd = peft_oracle(base_dir, adapter, resize_to=136)
    assert same_as_peft(ours[HEAD], oracle_sd[HEAD])


# --------------------------------------------------------------------------- tied embeddings, one side changed


TIED = {
    # name: (lora kwargs, side the adapter changes)
    "lora_embed_tokens": ({"target_modules": ["embed_tokens"]}, EMBED),
    "lora_lm_head": ({"target_modules": ["lm_head"]}, HEAD),
    "modules_to_save_embed_tokens": ({"target_modules": QV, "modules_to_save": ["embed_tokens"]}, EMBED),
}

@pytest.mark.parametrize("name", list(TIED))
def test_tied_embeddings_one_side_untied(tmp_path, name, capsys):
    lora_kw, changed = TIED[name]
    m = merge_case(tmp_path, lora_kw, {"tie_word_embeddings": True})
    unmerged, peft_merged, oracle_sd = m.oracle()
    base = m.base_sd
    # expected: PEFT's merge for everything, except that the untouched side keeps the base weight
    untouched = HEAD if changed == EMBED else EMBED
    expected = dict(oracle_sd)
    expected[untouched] = base[EMBED]  # tied base: lm_head == embed_tokens
    ours = m.ours
    assert EMBED in ours and HEAD in ours, sorted(ours)
    check_tensors(m, expected=expected, atol=0.0)
    assert not torch.equal(ours[EMBED], ours[HEAD])
    assert m.config["tie_word_embeddings"] is False
    diff = check_logits(m, rel=1e-5)

    # why we untie: PEFT's own merge does not reproduce the unmerged model
    ids = probe_ids(m.vocab)
    ref = forward_logits(unmerged, ids)
    d_peft = (forward_logits(peft_merged, ids) - ref).abs().max().item()
    if d_peft <= scale_tol(ref, 1e-5):
        # modules_to_save=["embed_tokens"]: PEFT swaps in the trained copy as a new module, so
        # its in-memory merge is already untied (and it sets tie_word_embeddings=False)
        with capsys.disabled():
            print(f"\n[tied:{name}] PEFT merge_and_unload == unmerged (max diff {d_peft:.3g}); ours {diff:.3g}")
    else:
        assert d_peft > diff


# --------------------------------------------------------------------------- base formats and output sharding


@pytest.mark.parametrize("fmt,shard", [("safetensors", "20KB"), ("bin", None)], ids=["sharded", "bin"])
def test_base_formats(tmp_path, fmt, shard):
    m = merge_case(tmp_path, {"target_modules": QV}, fmt=fmt, base_shard=shard or "1GB")
    if fmt == "safetensors":
        assert len(list(m.base_dir.glob("model-*.safetensors"))) > 1
        assert (m.base_dir / "model.safetensors.index.json").exists()
    check_oracle_and_logits(m)
    assert m.receipt["counts"]["merged"] == 2 * N_LAYERS
    assert set(m.receipt["base"]["files"]) >= (
        {"pytorch_model.bin"} if fmt == "bin" else {p.name for p in m.base_dir.glob("model-*.safetensors")}
    )


def test_output_sharding(tmp_path):
    m = merge_case(tmp_path, {"target_modules": QV}, args=("--max-shard-size", "30KB"))
    check_oracle_and_logits(m)
    shards = sorted(m.out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (m.out / "model.safetensors").exists()
    index = json.loads((m.out / "model.safetensors.index.json").read_text())
    ours = m.ours
    assert set(index["weight_map"]) == set(ours)
    for name, fname in index["weight_map"].items():
        assert name in load_file(m.out / fname), (name, fname)
    total = sum(t.numel() * t.element_size() for t in ours.values())
    assert index["metadata"]["total_size"] == total


# --------------------------------------------------------------------------- verification levels


@pytest.mark.parametrize("level", ["none", "modules", "full"])
def test_verify_levels(tmp_path, level):
    m = merge_case(tmp_path, {"target_modules": QV}, verify=level)
    check_oracle_and_logits(m)
    v = m.receipt["verification"]
    assert v["level"] == level
    assert v["requested"] == level
    if level == "none":
        return
    assert v["passed"] is True
    if level == "modules":
        assert v["modules"]["checked"] >= 2 * N_LAYERS
        assert v["modules"]["max_rel_err"] <= v["modules"]["tolerance"]
    else:
        check_full_figures(v)


def check_full_figures(v: dict):
    f = v["full"]
    assert f["max_abs_diff"] < 1e-4, f
    assert f["top1"] == 1.0, f
    assert f["kl"] < 1e-6, f


# --------------------------------------------------------------------------- idempotence / crash recovery


def _mtimes(d: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def test_rerun_is_skipped(tmp_path):
    m = merge_case(tmp_path, {"target_modules": QV})
    before = _mtimes(m.out)
    rec_before = m.receipt
    rc = run_converter("merge", "--base", m.base_dir, "--adapter", m.adapter_dir, "--output", m.out,
                       "--verify", "modules")
    assert rc == 0
    assert _mtimes(m.out) == before
    assert m.receipt == rec_before
    assert not Path(str(m.out) + ".partial").exists()


def test_leftover_partial_is_not_done(tmp_path):
    m = merge_case(tmp_path, {"target_modules": QV})
    fingerprint = m.receipt["fingerprint"]
    partial = Path(str(m.out) + ".partial")
    # a crash right before the final rename: complete-looking .partial (receipt, same
    # fingerprint) but no output dir; corrupt a shard so reuse would be caught
    shutil.move(m.out, partial)
    (partial / "model.safetensors").write_bytes(b"truncated")
    rc = run_converter("merge", "--base", m.base_dir, "--adapter", m.adapter_dir, "--output", m.out,
                       "--verify", "modules")
    assert rc == 0
    assert m.out.is_dir()
    assert not partial.exists()
    assert m.receipt["fingerprint"] == fingerprint
    check_oracle_and_logits(m)
