"""Regenerate tests/fixtures/peer_figures.json: what DeepSpeed's and accelerate's own code returns over a fixed grid.

memcalc reproduces these peers' estimators (memcalc/compat/) and DeepSpeed's ZeRO-3 optimizer sub-groups
(memcalc/parallel.py); its tests compare those with this file, never with a copy of the formulas. Nothing here is
imported by memcalc, and neither peer is a memcalc dependency: run it with an interpreter that has them, e.g.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 \\
        && DS_BUILD_OPS=0 /tmp/peers/bin/pip install deepspeed==0.19.8 accelerate==1.15.0 transformers==5.24.0
    /tmp/peers/bin/python scripts/peer_figures.py [OUT.json]

What is called (all on the CPU, nothing downloaded):
- deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs and
  deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs (plain functions of counts);
- deepspeed.runtime.zero.stage3.model_to_params on real (uninitialised) transformers models built from presets;
- DeepSpeed's ZeRO-3 partition and sub-group code: partition_parameters.Init._padding_size / _aligned_size (the
  partition of each parameter is aligned size // world size, as Init._partition_param computes it) and
  DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups, called on stand-ins that carry only the sizes they read;
  the largest sub-group is what initialize_optimizer_states sizes its gradient buffer by;
- deepspeed.runtime.zero.config.DeepSpeedZeroConfig(stage=N) for DeepSpeed's defaults of absent keys, and
  transformers' HfTrainerDeepSpeedConfig.trainer_config_finalize for the buckets HF Trainer writes for "auto";
- accelerate.commands.estimate.estimate_training_usage (a plain function of bytes and dtype), and the parameters
  and buffers of AutoModel built under accelerate.init_empty_weights, measured by
  accelerate.utils.calculate_maximum_sizes (what estimate-memory's create_empty_model builds when the Hub is
  reachable; here the config comes from the preset file). accelerate's -1 ("N/A") is written as null.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "presets" / "models"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "peer_figures.json"

# -- the grid -------------------------------------------------------------------------------------------------
# (total_params, largest_layer_params): GPT-2 (wte 50257 x 768), a 7.5B model with a 32000 x 4096 embedding,
# Llama-3-8B (embed_tokens 128256 x 4096), and odd counts that exercise int() truncation.
MODELS = [(124_439_808, 38_597_376), (7_500_000_000, 131_072_000), (8_030_261_248, 525_336_576),
          (1_000_000_007, 12_345_679)]
LAYOUTS = [(1, 1), (8, 1), (4, 2), (8, 2), (4, 3)]  # (num_gpus_per_node, num_nodes)
BUFFER_FACTORS = [1.5, 1.0]
SUB_GROUP_PRESETS = ["gpt2", "llama-3-8b"]
SUB_GROUP_WORLDS = [8, 64]
SUB_GROUP_SIZES = [1_000_000_000, 500_000_000, 100_000_000, 10_000_000, 0]
# Synthetic partitions (elements per parameter on one rank) for the sub-group rule alone.
SYNTHETIC_PARTITIONS = [[5, 3, 8, 1, 9], [10], [4, 4, 4, 4], [1, 100, 1, 1, 50, 2]]
SYNTHETIC_SIZES = [0, 1, 4, 8, 12, 26, 100, 1000]
# Real models for model_to_params: two tied presets and an untied tiny Llama (the LM head its own module).
MODEL_TO_PARAMS = {
    "gpt2": None,
    "qwen2.5-0.5b": None,
    "tiny-llama-untied": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "max_position_embeddings": 512, "tie_word_embeddings": False,
    },
}
ZERO_CONFIG_FIELDS = ["stage", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
                      "prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters",
                      "max_reuse_distance", "sub_group_size", "overlap_comm"]
HF_AUTO_PRESETS = ["gpt2", "llama-3-8b"]  # GPT-2 names its hidden size n_embd (attribute_map)
ACCELERATE_BYTES = [497_759_232, 28_000_000_000, 30_019_698_688, 1_000_000_001]
ACCELERATE_DTYPES = ["float32", "float16", "bfloat16", "fp8", "int8", "int4"]
ACCELERATE_MODELS = ["gpt2", "llama-3-8b"]


# Where each section comes from: the installed peers' own code, called in-process (no copy of it anywhere).
HOW = {
    "deepspeed_zero2_estimate": "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs",
    "deepspeed_zero3_estimate": "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs",
    "deepspeed_zero3_sub_groups": "partition_parameters.Init._aligned_size // world size per parameter of the "
                                  "preset's transformers model (meta device), then "
                                  "DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups; largest = max of sums",
    "deepspeed_model_to_params": "deepspeed.runtime.zero.stage3.model_to_params on the transformers model "
                                 "(uninitialised CPU storage, weights re-tied)",
    "deepspeed_zero_config_defaults": "deepspeed.runtime.zero.config.DeepSpeedZeroConfig(stage=N); "
                                      "deepspeed.runtime.constants.GRADIENT_CLIPPING_DEFAULT",
    "hf_trainer_auto": "transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig.trainer_config_finalize",
    "accelerate": "accelerate.commands.estimate.estimate_training_usage (-1 written as null); AutoModel under "
                  "accelerate.init_empty_weights measured by accelerate.utils.calculate_maximum_sizes",
}


def preset(name: str) -> dict:
    return json.loads((PRESETS / f"{name}.json").read_text())


def build(raw: dict, device: str = "meta", auto_model: bool = False):
    """The transformers model of a config dict ("_" keys are memcalc metadata), built on ``device``."""
    import torch
    import transformers

    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    if auto_model:
        return transformers.AutoModel.from_config(config)
    with torch.device(device):
        return getattr(transformers, raw["architectures"][0])(config)


# -- DeepSpeed ------------------------------------------------------------------------------------------------


def zero2_figures() -> list[dict]:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for total, _ in MODELS:
        for per_node, nodes in LAYOUTS:
            for offload in (True, False):
                for factor in BUFFER_FACTORS:
                    args = {"total_params": total, "num_gpus_per_node": per_node, "num_nodes": nodes,
                            "cpu_offload": offload, "additional_buffer_factor": factor}
                    cpu, gpu = estimate_zero2_model_states_mem_needs(**args)
                    rows.append({"args": args, "cpu_bytes": cpu, "gpu_bytes": gpu})
    return rows


def zero3_figures() -> list[dict]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    rows = []
    for total, largest in MODELS:
        for per_node, nodes in LAYOUTS:
            for offload, offload_params in ((False, False), (False, True), (True, False), (True, True)):
                for zero_init in (True, False):
                    for factor in BUFFER_FACTORS:
                        args = {"total_params": total, "largest_layer_params": largest,
                                "num_gpus_per_node": per_node, "num_nodes": nodes, "cpu_offload": offload,
                                "cpu_offload_params": offload_params, "zero_init": zero_init,
                                "additional_buffer_factor": factor}
                        cpu, gpu, largest_bytes = estimate_zero3_model_states_mem_needs(**args)
                        rows.append({"args": args, "cpu_bytes": int(cpu), "gpu_bytes": int(gpu),
                                     "largest_layer_bytes": int(largest_bytes)})
    return rows


class _Param:
    """A parameter as DeepSpeed's partition and sub-group code reads it: ds_numel, and partition_numel()."""

    def __init__(self, ds_numel: int, partition: int = 0) -> None:
        self.ds_numel = ds_numel
        self.partition = partition

    def partition_numel(self) -> int:
        return self.partition


def partitions(numels: list[int], world: int) -> list[int]:
    """Each parameter's elements on one rank, by partition_parameters.Init's own padding code."""
    from deepspeed.runtime.zero.partition_parameters import Init

    class _World:  # Init's padding code reads only the partition world size
        _padding_size = Init._padding_size
        _aligned_size = Init._aligned_size

        def _partition_world_size(self, param) -> int:
            return world

    rank = _World()
    # Init._partition_param: tensor_size = self._aligned_size(param); partition_size = tensor_size // world size.
    return [rank._aligned_size(_Param(n)) // world for n in numels]


def sub_groups(partition_numels: list[int], sub_group_size: int) -> list[int]:
    """Elements per sub-group, by DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups itself."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    class _Optimizer:  # the method reads only self.sub_group_size
        _create_fp16_sub_groups = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups

        def __init__(self) -> None:
            self.sub_group_size = sub_group_size

    params = [_Param(n, n) for n in partition_numels]
    groups = _Optimizer()._create_fp16_sub_groups(params)
    return [sum(p.partition_numel() for p in group) for group in groups]


def sub_group_figures() -> dict:
    synthetic = [{"partition_numels": parts, "sub_group_size": size, "sub_group_numels": sub_groups(parts, size)}
                 for parts in SYNTHETIC_PARTITIONS for size in SYNTHETIC_SIZES]
    models = []
    for name in SUB_GROUP_PRESETS:
        numels = [p.numel() for p in build(preset(name)).parameters() if p.requires_grad]
        for world in SUB_GROUP_WORLDS:
            parts = partitions(numels, world)
            for size in SUB_GROUP_SIZES:
                groups = sub_groups(parts, size)
                models.append({"preset": name, "num_gpus": world, "sub_group_size": size,
                               "num_sub_groups": len(groups), "partitioned_numel": sum(parts),
                               # initialize_optimizer_states: largest_numel = max(sum(p.ds_numel) per sub-group)
                               "largest_sub_group_numel": max(groups)})
    return {"synthetic": synthetic, "models": models}


def model_to_params_figures() -> list[dict]:
    from deepspeed.runtime.zero.stage3 import model_to_params

    rows = []
    for name, config in MODEL_TO_PARAMS.items():
        raw = config if config is not None else preset(name)
        # model_to_params tells tied weights apart by data_ptr(), which meta tensors lack: give them real
        # (uninitialised) storage. to_empty swaps in new Parameters, untying the head, so tie them again.
        model = build(raw).to_empty(device="cpu")
        model.tie_weights()
        total, largest = model_to_params(model)
        if total != sum(p.numel() for p in model.parameters()):  # parameters() yields a tied weight once
            raise RuntimeError(f"{name}: tied weights were not re-tied after to_empty")
        rows.append({"preset": name, "config": config, "total_params": int(total),
                     "largest_layer_params": int(largest)})
        del model
    return rows


def zero_config_defaults() -> dict:
    """DeepSpeed's values for absent keys: DeepSpeedZeroConfig(stage=N) fields, and GRADIENT_CLIPPING_DEFAULT."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    by_stage = {}
    for stage in (0, 1, 2, 3):
        config = DeepSpeedZeroConfig(stage=stage)
        by_stage[str(stage)] = {key: (value if isinstance(value, bool) else int(value))
                                for key, value in ((key, getattr(config, key)) for key in ZERO_CONFIG_FIELDS)}
    return {"by_stage": by_stage, "gradient_clipping": constants.GRADIENT_CLIPPING_DEFAULT}


def hf_auto_figures() -> list[dict]:
    """What HF Trainer's DeepSpeed integration writes for "auto" buckets: HfTrainerDeepSpeedConfig
    .trainer_config_finalize on the preset's transformers config (its hidden_size, attribute_map applied)."""
    from types import SimpleNamespace

    import transformers
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    rows = []
    for name in HF_AUTO_PRESETS:
        fields = {k: v for k, v in preset(name).items() if not k.startswith("_")}
        model = SimpleNamespace(config=transformers.AutoConfig.for_model(fields.pop("model_type"), **fields))
        args = SimpleNamespace(get_warmup_steps=lambda steps: 0)  # read only for a scheduler, which is absent
        for stage in (2, 3):
            zero = {"stage": stage, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                    "stage3_param_persistence_threshold": "auto"}
            hf_config = HfTrainerDeepSpeedConfig({"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1})
            hf_config.trainer_config_finalize(args, model, num_training_steps=10)
            rows.append({"preset": name, "stage": stage, "zero_optimization": hf_config.config["zero_optimization"]})
    return rows


# -- accelerate -----------------------------------------------------------------------------------------------


def accelerate_figures() -> dict:
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    def na(value: int) -> int | None:
        return None if value == -1 else int(value)

    usage = []
    for size in ACCELERATE_BYTES:
        for dtype in ACCELERATE_DTYPES:
            raw = estimate_training_usage(size, dtype)
            figure = max(raw.values())  # estimate_command: training_usage = max(item.values()), -1 shown "N/A"
            usage.append({"bytes": size, "mixed_precision": dtype,
                          "components": {k: na(v) for k, v in raw.items()}, "training_figure": na(figure)})
    models = []
    for name in ACCELERATE_MODELS:
        with init_empty_weights():
            model = build(preset(name), auto_model=True)
        total_size, _ = calculate_maximum_sizes(model)
        models.append({"preset": name, "auto_model_class": type(model).__name__,
                       "num_params": sum(p.numel() for p in model.parameters()),
                       "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
                       "total_size_bytes": int(total_size)})
    return {"estimate_training_usage": usage, "auto_models": models}


def versions() -> dict:
    import accelerate
    import deepspeed
    import torch
    import transformers

    return {"deepspeed": deepspeed.__version__, "accelerate": accelerate.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.disable(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its accelerator choice
        figures = {
            "_source": "scripts/peer_figures.py: the peers' own functions called over a fixed grid (see its "
                       "docstring); regenerate with that script, never by hand",
            "versions": versions(),
            "how": HOW,
            "deepspeed_zero2_estimate": zero2_figures(),
            "deepspeed_zero3_estimate": zero3_figures(),
            "deepspeed_zero3_sub_groups": sub_group_figures(),
            "deepspeed_model_to_params": model_to_params_figures(),
            "deepspeed_zero_config_defaults": zero_config_defaults(),
            "hf_trainer_auto": hf_auto_figures(),
            "accelerate": accelerate_figures(),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size:,} bytes) with {figures['versions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
