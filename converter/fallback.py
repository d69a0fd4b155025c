"""PEFT's own in-memory merge, for adapter types our streaming engine does not implement.

This loads the whole model (as ``merge_and_unload`` always does), so it is only used
where the streaming engine has no twin of PEFT's math (LoHa, LoKr, IA3, VeRA,
AdaLoRA, ...). The receipt records ``"engine": "peft"``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from converter.errors import UnsupportedAdapterError


def peft_merge(job, inputs, partial: Path, device) -> tuple[dict, int | None, bool]:
    """Merge with PEFT in memory and save into ``partial``; returns (counts, vocab size, untied)."""
    from peft import PeftModel

    info = inputs.info
    if not info.instantiable:
        raise UnsupportedAdapterError(
            f"{inputs.adapter.peft_type} adapters are merged through PEFT, which needs the model class, "
            f"but {info.note}", hint="pass --trust-remote-code if the base ships its own code, or use a LoRA adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = info.model_cls.from_pretrained(inputs.base_src.path, dtype=inputs.out_dtype,
                                               trust_remote_code=job.trust_remote_code).to(device)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            peft_model = PeftModel.from_pretrained(model, inputs.adapter_src.path)
            merged = peft_model.merge_and_unload()
        except (NotImplementedError, ValueError, TypeError, AttributeError) as exc:
            raise UnsupportedAdapterError(
                f"PEFT cannot merge this {inputs.adapter.peft_type} adapter into the weights: {exc}",
                hint="serve it as an adapter with PEFT instead") from None
        after = merged.state_dict()
        changed = sum(1 for k, v in after.items() if k in before and not (v.shape == before[k].shape
                                                                             and bool((v == before[k]).all())))
        merged.to("cpu").save_pretrained(partial, max_shard_size=job.max_shard_size)
    counts = {"merged": changed, "replaced": 0, "copied": len(after) - changed, "added": 0, "changed": changed}
    return counts, None, False
