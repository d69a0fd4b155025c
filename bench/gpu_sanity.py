"""A tiny merge with full verification streamed on this machine's device: the CUDA path of converter.streamed."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import build, make_adapter, receipt, run_converter, save_base, tiny_llama_config  # noqa: E402
from peft import LoraConfig  # noqa: E402

import converter.verify  # noqa: E402

converter.verify.STREAM_ABOVE_BYTES = 0
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    cfg = tiny_llama_config()
    save_base(build(cfg), d / "base")
    make_adapter(build(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), d / "a")
    rc = run_converter("merge", "--base", d / "base", "--adapter", d / "a", "--output", d / "out")
    print("rc", rc, receipt(d / "out")["verification"]["full"] if rc == 0 else "", receipt(d / "out")["host"]
          if rc == 0 else "")
