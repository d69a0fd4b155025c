"""Task heads an adapter trained and the base lacks: PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS adapters.

PEFT trains such an adapter on the task class (``BertForSequenceClassification`` over a
``BertModel`` checkpoint, ``LlamaForSequenceClassification`` over a causal LM) and saves the new
head (``classifier``, ``score``, ``qa_outputs``) through ``modules_to_save``. The merged output
is then a checkpoint of that task class: the base's tensors under their own names (transformers
places a backbone saved without its prefix), the head's tensors under the task model's names,
none of the base's tensors the task model has no place for (a causal LM's ``lm_head``), and a
config naming the class, ``num_labels`` and the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from converter.errors import AdapterMismatchError

TASK_AUTO = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
             "QUESTION_ANS": "AutoModelForQuestionAnswering"}


@dataclass(frozen=True)
class Head:
    """The task head an adapter adds to the base."""

    task_type: str
    cls_path: str  # "module:QualName" of the task class
    num_labels: int
    tensors: dict[str, str]  # the task model's parameter name -> the adapter tensor holding it
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    unused: tuple[str, ...] = ()  # base checkpoint tensors the task model has no place for

    @property
    def class_name(self) -> str:
        """The task class's name (``config.json``'s ``architectures``)."""
        return self.cls_path.rpartition(".")[2].rpartition(":")[2]

    def config(self, labels: tuple[str, ...] | None) -> dict:
        """What the output's config.json says of the task: its class, ``num_labels`` and the labels."""
        names = list(labels) if labels else [f"LABEL_{i}" for i in range(self.num_labels)]
        return {"architectures": [self.class_name], "num_labels": self.num_labels,
                "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def find_head(adapter, base_dir, base_names, candidates: dict[str, str],
              trust_remote_code: bool = False) -> Head | None:
    """The head among ``candidates`` (model-side parameter name -> adapter key: tensors that match nothing of the
    base), when the adapter's task type trains one and they are its ``modules_to_save``; else None."""
    task = str(adapter.config.get("task_type") or "").upper()
    saved = adapter.config.get("modules_to_save") or []
    mine = {name: key for name, key in candidates.items()
            if any(name == f"{m}.{p}" or name.startswith(f"{m}.") for m in saved for p in ("weight", "bias"))}
    if task not in TASK_AUTO or not mine:
        return None
    cls = _task_class(task, base_dir, trust_remote_code)
    shapes = {name: tuple(adapter.shape(key)) for name, key in mine.items()}
    num_labels = 2 if task == "QUESTION_ANS" else min(s[0] for s in shapes.values() if len(s) == 2)
    model = _meta_task_model(cls, base_dir, num_labels, trust_remote_code)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    wrong = [f"{mine[n]}: shape {s} does not fit {cls.__name__}.{n} {expected.get(n)}" for n, s in shapes.items()
             if expected.get(n) != s]
    if wrong:
        raise AdapterMismatchError(wrong, hint=f"the head does not fit {cls.__name__} with num_labels={num_labels}")
    prefix = getattr(model, "base_model_prefix", "") or ""
    unused = tuple(b for b in base_names if not ({b, f"{prefix}.{b}", b.removeprefix(prefix + ".")} & expected.keys()))
    return Head(task, f"{cls.__module__}:{cls.__qualname__}", num_labels, mine, shapes, unused)


def _task_class(task: str, base_dir, trust_remote_code: bool):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    auto = getattr(transformers, TASK_AUTO[task])
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise AdapterMismatchError(
            f"the adapter trains a {task} head, and transformers has no {TASK_AUTO[task].removeprefix('AutoModel')} "
            f"class for model type {config.model_type!r}",
            hint="merge it with a transformers version that has one, or drop the head from modules_to_save") from None


def _meta_task_model(cls, base_dir, num_labels: int, trust_remote_code: bool):
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code, num_labels=num_labels)
    with torch.device("meta"):
        return cls._from_config(config)
