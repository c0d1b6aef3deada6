"""The estimate path imports neither torch nor transformers (a subprocess, so this process's imports don't count)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# pydantic.main (BaseModel) and typer._adapters (typer >= 0.29 builds pydantic adapters per option) each
# cost ~80 ms of start-up; benchmarks/startup.py measures the whole.
HEAVY = ("torch", "transformers", "huggingface_hub", "bitsandbytes", "peft", "numpy", "pydantic.main", "typer._adapters")

PROBE = """
import io, sys, contextlib
from memcalc.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(['llama-3-8b', '--precision', 'bf16', '--optim', 'adamw']),
             main(['llama-3-8b', '--json', '--zero', '0,1,2,3', '--gpus', '8', '--gpu', 'h100-80gb']),
             main(['mixtral-8x7b', '--lora-rank', '16', '--qlora', '--explain', '--activations', 'rules']),
             main(['presets'])]
loaded = [name for name in {heavy!r} if name in sys.modules]
print(codes, loaded)
"""


def test_estimate_path_imports_no_torch_or_transformers():
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY)], capture_output=True, text=True, check=True)
    codes, loaded = out.stdout.strip().rsplit("] [", 1)
    assert loaded == "]", f"heavy modules imported on the estimate path: [{loaded}"
    assert codes.startswith("[0, 6, 0, 0"), out.stdout


def test_importing_the_package_is_light():
    probe = "import sys, memcalc, memcalc.cli, memcalc.api, memcalc.measure; print(sorted(m for m in {h!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe.format(h=HEAVY)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_traced_recipe_imports_torch_once_then_reads_the_cache(tmp_path):
    """LoRA's step is traced (torch and transformers, seconds cold), here of a padded batch; the same estimate again
    reads the cache and imports neither."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    config = tmp_path / "config.json"
    config.write_text(__import__("json").dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}))
    probe = f"""
import io, sys, contextlib
from memcalc.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main([{str(config)!r}, '--lora-rank', '8', '--seq-len', '64', '-b', '2', '--padded'])
print(code, 'torch' in sys.modules)
"""
    env = {**__import__("os").environ, "MEMCALC_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert first.stdout.split()[-2:] == ["0", "True"], first.stdout + first.stderr
    assert again.stdout.split()[-2:] == ["0", "False"], again.stdout + again.stderr
