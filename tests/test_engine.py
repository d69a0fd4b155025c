"""The streaming engine itself: row chunks, one pass for many adapters, the description cache.

PEFT's ``merge_and_unload()`` stays the oracle: chunked merges and one-pass merges must
write exactly what it computes, and exactly what a single merge writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import converter.merge as merge
from converter.checkpoint import Checkpoint
from converter.convert import convert, convert_many
from converter.errors import MergeError
from converter.options import MergeJob
from converter.writer import OutSpec, ShardedWriter
from factories import assert_state_dicts_match, build, make_adapter, peft_oracle, read_output, save_base, \
    tiny_llama_config

REPO = Path(__file__).resolve().parent.parent
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of MIN_CHUNK_ROWS..2*MIN_CHUNK_ROWS rows, so that the tiny models' tensors take several."""
    monkeypatch.setitem(merge.CHUNK_ELEMS, "cpu", 1)
    monkeypatch.setitem(merge.CHUNK_ELEMS, "cuda", 1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A base whose linear weights have 128..256 rows (several chunks each), bf16 and fp32."""
    root = tmp_path_factory.mktemp("wide")
    cfg = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    model = build(cfg)
    save_base(model, root / "base32")
    save_base(build(cfg, dtype=torch.bfloat16), root / "base16")
    adapters = {
        "lora": make_adapter(build(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR), root / "lora"),
        "rslora": make_adapter(build(cfg), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR,
                                                      rank_pattern={"down_proj": 2}), root / "rslora", seed=2),
        "dora": make_adapter(build(cfg), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]), root / "dora", seed=3),
    }
    return root, adapters


def _job(base: Path, adapter: Path, out: Path, **kw) -> MergeJob:
    return MergeJob(base=base, adapter=adapter, output=out, verify=kw.pop("verify", "modules"), **kw)


@pytest.mark.parametrize("shape", [(2048, 2048), (5632, 2048), (2048, 5632), (1000, 777), (96, 160), (14336, 512)])
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
def test_row_chunks_of_the_product_equal_the_whole_product(shape, rank):
    """The chunked engine relies on B[rows] @ A being bit for bit the same rows of B @ A."""
    rows, cols = shape
    g = torch.Generator().manual_seed(rows + rank)
    b, a = torch.randn(rows, rank, generator=g), torch.randn(rank, cols, generator=g)
    whole = b @ a
    for elems in (1, 1 << 16, merge.CHUNK_ELEMS["cpu"]):
        chunks = merge.row_chunks(rows, cols, elems)
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
        assert all(r1 - r0 >= merge.MIN_CHUNK_ROWS or len(chunks) == 1 for r0, r1 in chunks)
        for r0, r1 in chunks:
            part = torch.empty(r1 - r0, cols)
            torch.mm(b[r0:r1], a, out=part)
            assert torch.equal(part, whole[r0:r1]), (shape, rank, elems, r0, r1)


@pytest.mark.parametrize("dtype, base_name", [("float32", "base32"), ("bfloat16", "base16"), ("float32", "base16"),
                                              ("bfloat16", "base32")])
def test_chunked_merge_equals_peft(small_chunks, wide, tmp_path, dtype, base_name):
    root, adapters = wide
    torch_dtype = getattr(torch, dtype)
    result = convert(_job(root / base_name, adapters["lora"], tmp_path / "out", dtype=dtype))
    assert result.status == "succeeded"
    _, _, oracle = peft_oracle(root / base_name, adapters["lora"], dtype=torch_dtype)
    assert_state_dicts_match(read_output(tmp_path / "out"), oracle)
    modules = result.receipt["verification"]["modules"]
    assert modules["checked"] == 14 and modules["max_rel_err"] < modules["tolerance"]


def test_one_pass_for_many_adapters(small_chunks, wide, tmp_path, monkeypatch):
    """Three adapters on one base in one pass: each output is PEFT's merge and byte-identical to a
    merge of its own, and the base is read once (not once per adapter)."""
    root, adapters = wide
    base = root / "base16"
    read = {"bytes": 0}
    real_read, real_get = merge.read_into, Checkpoint.get

    def counting_read(spec, offset, buf):
        read["bytes"] += buf.numel()
        return real_read(spec, offset, buf)

    def counting_get(self, name):
        t = real_get(self, name)
        if self.directory == base:
            read["bytes"] += t.numel() * t.element_size()
        return t

    monkeypatch.setattr(merge, "read_into", counting_read)
    monkeypatch.setattr(Checkpoint, "get", counting_get)
    jobs = [_job(base, adapters[n], tmp_path / "pass" / n, job_id=n) for n in adapters]
    outcomes = convert_many(jobs)
    assert all(o.status == "succeeded" for o in outcomes), outcomes
    base_bytes = sum(s.nbytes for s in Checkpoint(base).specs.values())
    assert 0 < read["bytes"] <= base_bytes, (read, base_bytes)
    for name, adapter in adapters.items():
        receipt = outcomes[list(adapters).index(name)].receipt
        assert receipt["timings"]["merge_pass_adapters"] == 3
        _, _, oracle = peft_oracle(base, adapter, dtype=torch.bfloat16)
        assert_state_dicts_match(read_output(tmp_path / "pass" / name), oracle)
        single = convert(_job(base, adapter, tmp_path / "single" / name))
        assert single.status == "succeeded"
        for f in sorted((tmp_path / "single" / name).glob("*.safetensors")):
            assert f.read_bytes() == (tmp_path / "pass" / name / f.name).read_bytes(), f.name


def test_the_same_adapter_twice_in_one_pass(wide, tmp_path):
    root, adapters = wide
    jobs = [_job(root / "base16", adapters["lora"], tmp_path / n, job_id=n) for n in ("a", "b")]
    a, b = convert_many(jobs)
    assert a.status == b.status == "succeeded" and a.receipt["timings"]["merge_pass_adapters"] == 2
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_one_failing_adapter_does_not_fail_the_pass(wide, tmp_path):
    """An adapter whose merge overflows float16 fails alone: nothing of it is published, the others are."""
    root, adapters = wide
    cfg = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    model = build(cfg)
    huge = make_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "huge", perturb=False)
    from safetensors.torch import load_file, save_file

    f = huge / "adapter_model.safetensors"
    sd = load_file(f)
    sd = {k: torch.full_like(v, 3e3) for k, v in sd.items()}  # B @ A * s ~ 3.6e7: beyond float16
    save_file(sd, f)
    jobs = [_job(root / "base32", adapters["lora"], tmp_path / "ok", dtype="float16", job_id="ok"),
            _job(root / "base32", huge, tmp_path / "huge-out", dtype="float16", job_id="huge")]
    ok, bad = convert_many(jobs)
    assert ok.status == "succeeded" and (tmp_path / "ok" / "conversion.json").is_file()
    assert isinstance(bad, MergeError) and "overflows" in str(bad) and "q_proj" in str(bad)
    assert not (tmp_path / "huge-out").exists() and not (tmp_path / "huge-out.partial").exists()


def test_writer_places_parts_in_any_order(tmp_path):
    specs = [OutSpec("a", torch.float32, (64, 8)), OutSpec("b", torch.bfloat16, (3, 5))]
    values = {"a": torch.randn(64, 8), "b": torch.randn(3, 5).bfloat16()}
    w = ShardedWriter(tmp_path / "x", specs, "1GB")
    (tmp_path / "x").mkdir()
    w.write("b", values["b"])
    for r0 in (48, 0, 32, 16):  # rows out of order
        w.write_part("a", r0 * 8 * 4, values["a"][r0:r0 + 16])
    w.finalize()
    got = read_output(tmp_path / "x")
    assert torch.equal(got["a"], values["a"]) and torch.equal(got["b"], values["b"])
    w2 = ShardedWriter(tmp_path / "y", specs, "1GB")
    (tmp_path / "y").mkdir()
    w2.write("b", values["b"])
    w2.write_part("a", 0, values["a"][:16])
    with pytest.raises(MergeError, match="not fully"):
        w2.finalize()
    w2.abort()


def test_a_cached_description_merges_without_transformers(wide, tmp_path):
    """The second merge on a base reads its description from the cache: transformers is not imported,
    and the output is the same."""
    root, adapters = wide
    env = {**os.environ, "CONVERTER_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    code = ("import sys, json; from converter.convert import convert; from converter.options import MergeJob; "
            "r = convert(MergeJob(base=sys.argv[1], adapter=sys.argv[2], output=sys.argv[3], verify='modules')); "
            "print(json.dumps({'status': r.status, 'transformers': 'transformers' in sys.modules, "
            "'peft': 'peft' in sys.modules}))")
    seen = []
    for out in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", code, str(root / "base32"), str(adapters["lora"]),
                               str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        seen.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert seen[0] == {"status": "succeeded", "transformers": True, "peft": False}
    assert seen[1] == {"status": "succeeded", "transformers": False, "peft": False}
    assert list((tmp_path / "cache" / "modelinfo").glob("*.json")) and list((tmp_path / "cache" / "sha256").glob("*.json"))
    for f in sorted((tmp_path / "first").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "second" / f.name).read_bytes()
    r1 = json.loads((tmp_path / "first" / "conversion.json").read_text())
    r2 = json.loads((tmp_path / "second" / "conversion.json").read_text())
    assert r1["base"]["files"] == r2["base"]["files"] and r1["counts"] == r2["counts"]
