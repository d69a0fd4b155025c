"""Hub sources pinned to revisions, from a local hub cache with HF_HUB_OFFLINE=1 (no network)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig

from factories import (build, make_adapter, peft_oracle, read_output, receipt, run_converter, same_as_peft, save_base,
                       tiny_llama_config)

SHA_A, SHA_B, SHA_AD = "a" * 40, "b" * 40, "c" * 40
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


def add_snapshot(cache: Path, repo: str, sha: str, src: Path, refs: tuple[str, ...] = ()) -> Path:
    """One commit of a repo in huggingface_hub's cache layout: blobs/, refs/, snapshots/<sha>/ (symlinks)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / sha
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(f.relative_to(src).parts) + 1)) / "blobs" / blob.name)
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """org/base at two revisions (A: tag v1 and refs/pr/23; B: main) and org/adapter trained on A."""
    d = tmp_path_factory.mktemp("hub")
    cache = d / "cache"
    cfg = tiny_llama_config()
    save_base(build(cfg, seed=0), d / "src-a")
    save_base(build(cfg, seed=7), d / "src-b")
    add_snapshot(cache, "org/base", SHA_A, d / "src-a", refs=("v1", "refs/pr/23"))
    add_snapshot(cache, "org/base", SHA_B, d / "src-b", refs=("main",))
    make_adapter(build(cfg, seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                 d / "src-adapter")
    conf = json.loads((d / "src-adapter" / "adapter_config.json").read_text())
    conf.update(base_model_name_or_path="org/base", revision=SHA_A)
    (d / "src-adapter" / "adapter_config.json").write_text(json.dumps(conf))
    add_snapshot(cache, "org/adapter", SHA_AD, d / "src-adapter", refs=("main",))
    return d


def merge(hub, out, *extra):
    return run_converter("merge", "--base", "org/base", "--adapter", "org/adapter", "--output", out,
                         "--cache-dir", hub / "cache", "--verify", "modules", *extra)


@pytest.mark.parametrize("revision", ["v1", "refs/pr/23", SHA_A])
def test_pinned_revision_converts_that_revision(hub, tmp_path, revision):
    assert merge(hub, tmp_path / "out", "--base-revision", revision) == 0
    r = receipt(tmp_path / "out")
    assert r["base"]["repo"] == "org/base" and r["base"]["sha"] == SHA_A and r["base"]["revision"] == revision
    assert r["adapter"]["sha"] == SHA_AD
    assert set(r["base"]["files"]) == {"model.safetensors"} and len(r["base"]["files"]["model.safetensors"]) == 64
    snap_a = hub / "cache" / "models--org--base" / "snapshots" / SHA_A
    _, _, oracle = peft_oracle(snap_a, hub / "src-adapter")
    ours = read_output(tmp_path / "out")
    assert all(same_as_peft(ours[k], v) for k, v in oracle.items() if k in ours)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/base" in card


def test_adapter_trained_on_a_merged_onto_b(hub, tmp_path, capsys):
    assert merge(hub, tmp_path / "out") == 2  # main is revision B
    err = capsys.readouterr().err
    assert SHA_A in err and SHA_B in err and "allow_base_mismatch" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    assert merge(hub, tmp_path / "out", "--allow-base-mismatch") == 0
    r = receipt(tmp_path / "out")
    assert r["allow_base_mismatch"] is True and SHA_A in r["base_mismatch"] and r["base"]["sha"] == SHA_B


def test_other_base_repo_is_refused(hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(hub / "cache", cache, symlinks=True)
    shutil.copytree(cache / "models--org--base", cache / "models--org--other", symlinks=True)
    code = run_converter("merge", "--base", "org/other", "--base-revision", "v1", "--adapter", "org/adapter",
                         "--output", tmp_path / "out", "--cache-dir", cache)
    assert code == 2
    assert "org/base" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_missing_from_offline_cache(hub, tmp_path, capsys):
    assert run_converter("merge", "--base", "org/nothere", "--adapter", "org/adapter", "--output", tmp_path / "o",
                         "--cache-dir", hub / "cache") == 2
    err = capsys.readouterr().err
    assert "org/nothere" in err and "not in the local hub cache" in err


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=80 * 2**20, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_lock_pins_shas_and_rerun_is_noop(hub, tmp_path, local_ray, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({
        "defaults": {"verify": "modules", "cache_dir": str(hub / "cache")},
        "output_root": "out",
        "jobs": [{"id": "pinned", "base": {"repo": "org/base", "revision": "v1"},
                  "adapter": {"repo": "org/adapter", "revision": "main"}, "output": "pinned"}],
    }, sort_keys=False))
    assert run_converter("validate", manifest) == 0
    assert run_converter("run", manifest) == 0
    before = (tmp_path / "out" / "pinned" / "conversion.json").stat().st_mtime_ns
    assert run_converter("lock", manifest) == 0
    locked = yaml.safe_load(manifest.read_text())
    assert locked["jobs"][0]["base"]["revision"] == SHA_A and locked["jobs"][0]["adapter"]["revision"] == SHA_AD
    assert run_converter("lock", manifest) == 0  # idempotent
    assert run_converter("run", manifest) == 0  # the locked manifest names the same inputs: nothing to do
    assert (tmp_path / "out" / "pinned" / "conversion.json").stat().st_mtime_ns == before
    ledgers = sorted((tmp_path / "out" / "runs").glob("*.jsonl"))
    assert json.loads(ledgers[-1].read_text().splitlines()[0])["status"] == "skipped"
    # the token never lands in a file or in what was printed
    printed = capsys.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.stat().st_size < 10_000_000:
            assert FAKE_TOKEN.encode() not in f.read_bytes(), f


def test_token_never_in_errors(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert merge(hub, tmp_path / "out") == 2  # the revision mismatch
    assert run_converter("merge", "--base", "org/base", "--base-revision", "nope", "--adapter", "org/adapter",
                         "--output", tmp_path / "o2", "--cache-dir", hub / "cache") == 2
    printed = capsys.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err


def test_inspect_hub_sources_offline(hub, capsys):
    assert run_converter("inspect", "org/adapter", "--base", "org/base", "--base-revision", "v1",
                         "--cache-dir", hub / "cache") == 0
    out = capsys.readouterr().out
    assert "fits: 4 tensors merged" in out


def test_validate_reads_only_headers_when_online(hub, monkeypatch, capsys):
    """Online, a hub base is inspected through its safetensors headers: no weight download."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
    from safetensors import safe_open

    import converter.sources as sources

    snap_a = hub / "cache" / "models--org--base" / "snapshots" / SHA_A
    with safe_open(snap_a / "model.safetensors", "pt") as f:
        tensors = {k: TensorInfo(dtype="F32", shape=list(f.get_slice(k).get_shape()), data_offsets=(0, 0))
                   for k in f.keys()}
    meta = SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map=dict.fromkeys(tensors, "model.safetensors"),
                                   files_metadata={"model.safetensors": SafetensorsFileMetadata(metadata={},
                                                                                                tensors=tensors)})

    class Info:
        sha, siblings = SHA_A, []

    downloads = []
    monkeypatch.setattr(sources, "_offline", lambda: False)
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo, revision=None, **kw: Info())
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", lambda self, repo, revision=None, **kw: meta)
    monkeypatch.setattr("huggingface_hub.hf_hub_download",
                        lambda repo, filename, revision=None, cache_dir=None, **kw: str(snap_a / filename))

    def no_snapshot(repo, **kw):
        downloads.append((repo, kw.get("allow_patterns")))
        return str(hub / "cache" / "models--org--adapter" / "snapshots" / SHA_AD)

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_snapshot)
    assert run_converter("inspect", "org/adapter", "--base", "org/base", "--base-revision", "v1",
                         "--cache-dir", hub / "cache") == 0
    assert "fits: 4 tensors merged" in capsys.readouterr().out
    assert [repo for repo, _ in downloads] == ["org/adapter"]  # the base's weights were never fetched
    assert all(not any("safetensors" in p and "adapter" not in p for p in pats) for _, pats in downloads)


CONFIG_CODE = '''from transformers import LlamaConfig


class AcmeConfig(LlamaConfig):
    model_type = "acme_llama"
'''
MODELING_CODE = '''from transformers import LlamaForCausalLM

from .configuration_acme import AcmeConfig


class AcmeForCausalLM(LlamaForCausalLM):
    config_class = AcmeConfig
'''


def test_custom_architecture_needs_trust_remote_code(tmp_path):
    """A base with its own code: merged without the class; full verification only with trust_remote_code."""
    cfg = tiny_llama_config()
    save_base(build(cfg), tmp_path / "base")
    make_adapter(build(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                 tmp_path / "adapter")
    (tmp_path / "base" / "configuration_acme.py").write_text(CONFIG_CODE)
    (tmp_path / "base" / "modeling_acme.py").write_text(MODELING_CODE)
    conf = json.loads((tmp_path / "base" / "config.json").read_text())
    conf.update(model_type="acme_llama", architectures=["AcmeForCausalLM"],
                auto_map={"AutoConfig": "configuration_acme.AcmeConfig",
                          "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (tmp_path / "base" / "config.json").write_text(json.dumps(conf))
    args = ["merge", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter"]

    assert run_converter(*args, "--output", tmp_path / "plain") == 0
    v = receipt(tmp_path / "plain")["verification"]
    assert v["requested"] == "full" and v["level"] == "modules" and "trust_remote_code" in v["note"]
    assert (tmp_path / "plain" / "modeling_acme.py").exists()  # the base's code travels with the output

    assert run_converter(*args, "--output", tmp_path / "trusted", "--trust-remote-code") == 0
    v = receipt(tmp_path / "trusted")["verification"]
    assert v["level"] == "full" and v["full"]["top1"] == 1.0
    ours, plain = read_output(tmp_path / "trusted"), read_output(tmp_path / "plain")
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
