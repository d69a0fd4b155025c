"""Adapter stacks: ``--adapter A --adapter B`` merged in one pass, in order as PEFT's
``merge_and_unload(adapter_names=[...])`` (DoRA included, where order matters), or weighted as
PEFT's ``add_weighted_adapter(..., combination_type="cat")``; bad stacks refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

from converter import merge
from factories import (assert_state_dicts_match, build, forward_logits, load_base, make_adapter, probe_ids, read_output,
                       receipt, run_converter, save_base, tiny_llama_config)

PLAIN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
RSLORA = dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "gate_proj"],
              rank_pattern={"k_proj": 2}, alpha_pattern={"gate_proj": 16}, init_lora_weights=False)
DORA = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False)


@pytest.fixture(autouse=True)
def several_chunks(monkeypatch):
    """Row chunks of 64 rows: the 128-row MLP weights merge in two."""
    monkeypatch.setattr(merge, "CHUNK_ELEMS", {"cpu": 1, "cuda": 1})


def config():
    return tiny_llama_config(intermediate_size=128)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_base(build(config(), dtype=torch.bfloat16), tmp_path_factory.mktemp("stack") / "base")


def adapter(path: Path, lora: dict, seed: int, **extra) -> Path:
    """An adapter of ``lora`` on the tiny Llama, every trainable tensor randomised (nonzero lora_B)."""
    return make_adapter(build(config()), LoraConfig(**lora, **extra), path, seed=seed)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"plain": adapter(root / "plain", PLAIN, 1), "rslora": adapter(root / "rslora", RSLORA, 2),
            "dora": adapter(root / "dora", DORA, 3)}


def loaded(base: Path, dirs: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(load_base(base, dtype=torch.bfloat16), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_in_order(base: Path, dirs: list[Path]) -> dict[str, torch.Tensor]:
    """PEFT's merge of the adapters one after another: the oracle of an unweighted stack."""
    return state(loaded(base, dirs).merge_and_unload(adapter_names=[f"a{i}" for i in range(len(dirs))]))


def peft_weighted(base: Path, dirs: list[Path], weights: list[float], fix_rslora: bool = False):
    """PEFT's add_weighted_adapter(..., "cat") merged: the oracle of a weighted stack. ``fix_rslora``: the mix's
    scaling set to 1, as PEFT means it (it inherits use_rslora from the first adapter: huggingface/peft#3761)."""
    model = loaded(base, dirs)
    model.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], weights, "mix", combination_type="cat")
    if fix_rslora:
        for module in model.modules():
            if isinstance(module, LoraLayer) and "mix" in module.scaling:
                module.scaling["mix"] = 1.0
    model.set_adapter("mix")
    return state(model.merge_and_unload(adapter_names=["mix"]))


def merged(base: Path, dirs: list[Path], out: Path, *extra: str, weights=()) -> int:
    args = ["merge", "--base", base, "--output", out, "--verify", "full"]
    for d in dirs:
        args += ["--adapter", d]
    for w in weights:
        args += ["--adapter-weight", str(w)]
    return run_converter(*args, *extra)


@pytest.mark.parametrize("names", [["plain", "rslora"], ["plain", "rslora", "dora"], ["dora", "plain"]])
def test_a_stack_merged_in_order_equals_peft(base, adapters, tmp_path, names):
    dirs = [adapters[n] for n in names]
    out = tmp_path / "out"
    assert merged(base, dirs, out) == 0
    ours = read_output(out)
    assert_state_dicts_match(ours, peft_in_order(base, dirs))
    one = tmp_path / "first-only"
    assert run_converter("merge", "--base", base, "--adapter", dirs[0], "--output", one, "--verify", "none") == 0
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           read_output(one)["model.layers.0.self_attn.q_proj.weight"])  # the later ones count
    r = receipt(out)
    assert [a["source"] for a in r["stack"]] == [str(d.resolve()) for d in dirs] and not r["weighted"]
    assert r["verification"]["level"] == "full" and r["verification"]["passed"]
    assert all(f"`{n}`" in (out / "README.md").read_text() for n in names)


def one_at_a_time(base: Path, dirs: list[Path], root: Path) -> dict[str, torch.Tensor]:
    """What users do without stacks: PEFT merges one adapter, the result is saved, the next goes on top of it."""
    for i, d in enumerate(dirs):
        merged_model = PeftModel.from_pretrained(load_base(base, dtype=torch.bfloat16), d).merge_and_unload()
        base = root / f"step{i}"
        merged_model.save_pretrained(base)
    return read_output(base)


def test_modules_to_save_and_trainable_tokens_in_a_stack(base, adapters, tmp_path):
    """PEFT cannot merge such a stack in one model (merge_and_unload(adapter_names=...) fails on the
    modules_to_save wrapper); the oracle is merging one adapter at a time through saved checkpoints."""
    saved = adapter(tmp_path / "mts", PLAIN, 5, modules_to_save=["lm_head"])
    tokens = adapter(tmp_path / "tok", dict(PLAIN, target_modules=["q_proj"]), 6, trainable_token_indices=[1, 5, 7])
    dirs = [adapters["plain"], saved, tokens]
    out = tmp_path / "out"
    assert merged(base, dirs, out) == 0
    ours = read_output(out)
    assert_state_dicts_match(ours, one_at_a_time(base, dirs, tmp_path))
    assert not torch.equal(ours["lm_head.weight"], read_output(base)["lm_head.weight"])
    assert receipt(out)["counts"]["replaced"] == 1 and receipt(out)["verification"]["passed"]


def test_order_matters_with_dora(base, adapters, tmp_path):
    a, b = tmp_path / "ab", tmp_path / "ba"
    assert merged(base, [adapters["plain"], adapters["dora"]], a, "--verify", "none") == 0
    assert merged(base, [adapters["dora"], adapters["plain"]], b, "--verify", "none") == 0
    key = "model.layers.0.self_attn.q_proj.weight"  # both adapters change it; DoRA's norm sees the other's delta
    assert not torch.equal(read_output(a)[key], read_output(b)[key])
    assert receipt(a)["fingerprint"] != receipt(b)["fingerprint"]


@pytest.mark.parametrize("names,weights", [(["plain", "rslora"], [0.7, 0.3]),
                                           (["plain", "rslora", "plain"], [1.0, -0.5, 0.25])])
def test_a_weighted_stack_equals_peft_cat(base, adapters, tmp_path, names, weights):
    dirs = [adapters[n] for n in names]
    out = tmp_path / "out"
    assert merged(base, dirs, out, weights=weights) == 0
    assert_state_dicts_match(read_output(out), peft_weighted(base, dirs, weights))
    r = receipt(out)
    assert r["weighted"] and [a["weight"] for a in r["stack"]] == weights
    assert r["verification"]["passed"]
    assert "weighted mix" in (out / "README.md").read_text() and f"(weight {weights[1]:g})" in \
        (out / "README.md").read_text()


def test_a_weighted_stack_led_by_rslora_is_scaled_as_meant(base, adapters, tmp_path):
    """PEFT's mix inherits use_rslora from its first adapter and scales the sum by sqrt(rank) again; ours equals
    its mix with that scaling set to 1, and full verification (every adapter active, scaled by its weight)
    passes."""
    dirs, weights = [adapters["rslora"], adapters["plain"]], [0.5, 0.5]
    out = tmp_path / "out"
    assert merged(base, dirs, out, weights=weights) == 0
    assert_state_dicts_match(read_output(out), peft_weighted(base, dirs, weights, fix_rslora=True))


def test_one_adapter_with_a_weight_is_scaled(base, adapters, tmp_path):
    out = tmp_path / "out"
    assert merged(base, [adapters["plain"]], out, weights=[0.5]) == 0
    model = loaded(base, [adapters["plain"]])
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["a0"] *= 0.5
    ids = probe_ids(128)
    expected = forward_logits(model, ids).float()
    got = forward_logits(load_base(out, dtype=torch.bfloat16), ids).float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    plain = tmp_path / "plain"
    assert merged(base, [adapters["plain"]], plain, "--verify", "none") == 0
    assert not torch.equal(read_output(out)["model.layers.0.self_attn.q_proj.weight"],
                           read_output(plain)["model.layers.0.self_attn.q_proj.weight"])
    assert receipt(out)["fingerprint"] != receipt(plain)["fingerprint"]


def test_weights_of_a_mix_reach_the_fingerprint(base, adapters, tmp_path):
    dirs = [adapters["plain"], adapters["rslora"]]
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert merged(base, dirs, first, "--verify", "none", weights=[0.5, 0.5]) == 0
    assert merged(base, dirs, again, "--verify", "none", weights=[0.5, 0.5]) == 0
    assert merged(base, dirs, other, "--verify", "none", weights=[0.5, 0.25]) == 0
    assert receipt(first)["fingerprint"] == receipt(again)["fingerprint"] != receipt(other)["fingerprint"]


def refused(base: Path, dirs: list[Path], out: Path, capfd, weights=()) -> str:
    """Exit 2 with nothing written; what the tool said."""
    capfd.readouterr()
    assert merged(base, dirs, out, weights=weights) == 2
    assert not out.exists() and not Path(f"{out}.partial").exists()
    return capfd.readouterr().err


def test_dora_in_a_weighted_stack_is_refused(base, adapters, tmp_path, capfd):
    err = refused(base, [adapters["plain"], adapters["dora"]], tmp_path / "out", capfd, weights=[0.5, 0.5])
    assert f"adapter 2 ({adapters['dora']})" in err and "DoRA magnitudes" in err and "without --adapter-weight" in err


def test_a_weight_for_some_adapters_only_is_refused(base, adapters, tmp_path, capfd):
    err = refused(base, [adapters["plain"], adapters["rslora"]], tmp_path / "out", capfd, weights=[0.5])
    assert "--adapter-weight is given 1 time(s) for 2 --adapter" in err


def test_adapters_of_different_bases_are_refused_naming_both(base, tmp_path, capfd):
    a = adapter(tmp_path / "a", PLAIN, 1, revision="v1")
    b = adapter(tmp_path / "b", PLAIN, 2, revision="v2")
    err = refused(base, [a, b], tmp_path / "out", capfd)
    assert f"adapter 1 ({a}) records base revision v1" in err and f"adapter 2 ({b}) records v2" in err


def test_an_adapter_that_does_not_fit_is_named_by_its_place(base, adapters, tmp_path, capfd):
    other = adapter(tmp_path / "wide", PLAIN, 4)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))  # its tensors have rank 4
    err = refused(base, [adapters["plain"], other], tmp_path / "out", capfd)
    assert f"adapter 2 ({other}): " in err and "r=5" in err


def test_two_adapters_replacing_one_module_are_refused(base, tmp_path, capfd):
    a = adapter(tmp_path / "a", PLAIN, 1, modules_to_save=["lm_head"])
    b = adapter(tmp_path / "b", PLAIN, 2, modules_to_save=["lm_head"])
    err = refused(base, [a, b], tmp_path / "out", capfd)
    assert f"adapter 1 ({a}) replaces lm_head.weight" in err and f"adapter 2 ({b}) also changes it" in err


def test_a_stack_from_a_manifest(base, adapters, tmp_path, capfd):
    from converter.convert import convert
    from converter.manifest import load_manifest

    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps({"output_root": str(tmp_path / "o"), "defaults": {"verify": "none"}, "jobs": [
        {"id": "mix", "base": {"path": str(base)}, "output": "mix",
         "adapters": [{"path": str(adapters["plain"]), "weight": 0.7}, {"path": str(adapters["rslora"]),
                                                                         "weight": 0.3}]},
        {"id": "both", "base": {"path": str(base)}, "adapter": {"path": str(adapters["plain"])},
         "adapters": [{"path": str(adapters["plain"])}], "output": "both"}]}))
    assert run_converter("validate", manifest) == 2
    assert "job both: give exactly one of `adapter` or `adapters`" in capfd.readouterr().err
    jobs = json.loads(manifest.read_text())
    jobs["jobs"].pop()
    manifest.write_text(json.dumps(jobs))
    job, = load_manifest(manifest).jobs
    assert convert(job).status == "succeeded"
    assert_state_dicts_match(read_output(tmp_path / "o" / "mix"),
                             peft_weighted(base, [adapters["plain"], adapters["rslora"]], [0.7, 0.3]))


def test_a_stack_and_a_single_adapter_share_one_pass(base, adapters, tmp_path):
    from converter.convert import convert_many
    from converter.options import MergeJob, StackedAdapter

    stack = MergeJob(base=str(base), adapter=str(adapters["plain"]), output=tmp_path / "stack", verify="modules",
                     stack=(StackedAdapter(adapter=str(adapters["dora"])),))
    single = MergeJob(base=str(base), adapter=str(adapters["rslora"]), output=tmp_path / "single", verify="modules")
    assert [r.status for r in convert_many([stack, single])] == ["succeeded", "succeeded"]
    assert_state_dicts_match(read_output(tmp_path / "stack"), peft_in_order(base, [adapters["plain"],
                                                                                   adapters["dora"]]))
    assert_state_dicts_match(read_output(tmp_path / "single"), peft_in_order(base, [adapters["rslora"]]))
