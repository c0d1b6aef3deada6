"""A DeepSpeed config, end to end: every setting it makes reaches the estimate, and a flag that contradicts it is
an error. Regression tests for issue 10's and 11's DeepSpeed bugs.

Expected values come from DeepSpeed's and transformers' own code (tests/fixtures/peer_figures.json, written by
scripts/peer_figures.py: HF Trainer's trainer_config_finalize for "auto" buckets; DeepSpeed's
_create_fp16_sub_groups for the ZeRO-3 sub-groups) or from the config itself. The module tests are in
test_configs_deepspeed.py, test_compat_deepspeed.py and test_compat_accelerate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcalc.api import model_input, run
from memcalc.parallel import zero3_sub_group_numels
from memcalc.spec import TrainingSpec, ZeroBuffers
from memcalc.vocab import TERM_ZERO3_FP32_GRADS, TERM_ZERO_REDUCE_BUCKET

PEER = json.loads((Path(__file__).parent / "fixtures" / "peer_figures.json").read_text())
BYTES_PER_BF16 = 2
# stage3.py initialize_optimizer_states: gradient_dtype = fp32_partitioned_groups_flat[0].dtype, the master
# dtype (master_weights_and_grads_dtype: fp32 unless bf16/fp16_master_weights_and_grads).
BYTES_PER_FP32 = 4


def write(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def term(data: dict, name: str) -> dict:
    return next(t for t in data["per_gpu"]["terms"] if t["name"] == name)


# -- issue 10: the HF "auto" reduce bucket uses the model's hidden size (GPT-2 calls it n_embd) --------------------


def test_gpt2_auto_reduce_bucket_is_hidden_size_squared(cli, tmp_path):
    config = write(tmp_path, {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1,
                              "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    data = cli("gpt2", "--gpus", "8", "--deepspeed", config, "--json").json()
    hf = next(r for r in PEER["hf_trainer_auto"] if r["preset"] == "gpt2" and r["stage"] == 2)
    assert hf["zero_optimization"]["reduce_bucket_size"] == 768 * 768  # what HF Trainer writes for GPT-2
    # One bucket (overlap_comm is False by default at stage 2) of that many bf16 elements, not 1e9 elements.
    assert PEER["deepspeed_zero_config_defaults"]["by_stage"]["2"]["overlap_comm"] is False
    bucket = term(data, TERM_ZERO_REDUCE_BUCKET)
    assert bucket["bytes"] == hf["zero_optimization"]["reduce_bucket_size"] * BYTES_PER_BF16
    assert any("reduce_bucket_size" in note and "hidden_size 768" in note for note in data["notes"])


# -- issue 10: sub_group_size reaches the ZeRO-3 fp32 gradient, sized as DeepSpeed's code sizes it ---------------


@pytest.mark.parametrize("case", PEER["deepspeed_zero3_sub_groups"]["synthetic"],
                         ids=lambda c: f"{c['partition_numels']}-{c['sub_group_size']}")
def test_sub_groups_as_deepspeed_forms_them(case):
    assert zero3_sub_group_numels(case["partition_numels"], case["sub_group_size"]) == case["sub_group_numels"]


@pytest.mark.parametrize("case", PEER["deepspeed_zero3_sub_groups"]["models"],
                         ids=lambda c: f"{c['preset']}-{c['num_gpus']}-{c['sub_group_size']}")
def test_zero3_fp32_gradient_is_the_largest_sub_group(case):
    model = model_input(case["preset"], None)
    spec = TrainingSpec(zero_stage=3, num_gpus=case["num_gpus"],
                        zero_buffers=ZeroBuffers(sub_group_size=case["sub_group_size"]))
    fp32_grads = run(model, spec).term(TERM_ZERO3_FP32_GRADS)
    assert fp32_grads.bytes == case["largest_sub_group_numel"] * BYTES_PER_FP32
    # initialize_optimizer_states frees its gradient_buffer (every .grad set to None without offload); each step
    # casts one sub-group at a time (_prepare_fp32_grad_for_sub_group) and frees it (_release_sub_group).
    assert [phase.value for phase in fp32_grads.phases] == ["optimizer_step"]


def test_sub_group_size_from_the_config_changes_the_fp32_gradient(cli, tmp_path):
    case = next(c for c in PEER["deepspeed_zero3_sub_groups"]["models"]
                if (c["preset"], c["num_gpus"], c["sub_group_size"]) == ("llama-3-8b", 8, 100_000_000))
    assert case["num_sub_groups"] > 1
    config = write(tmp_path, {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1,
                              "zero_optimization": {"stage": 3, "sub_group_size": 1e8}})
    data = cli("llama-3-8b", "--gpus", "8", "--deepspeed", config, "--json").json()
    assert term(data, TERM_ZERO3_FP32_GRADS)["bytes"] == case["largest_sub_group_numel"] * BYTES_PER_FP32


def test_allgather_bucket_size_changes_nothing(cli, tmp_path):
    # utils.py all_gather_dp_groups all-gathers into the 16-bit flat buffer (all_gather_into_tensor): no bucket.
    runs = []
    for size in (2e8, 5e8):
        config = write(tmp_path, {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1,
                                  "zero_optimization": {"stage": 2, "allgather_bucket_size": size}})
        runs.append(cli("llama-3-8b", "--gpus", "8", "--deepspeed", config, "--json").json()["per_gpu"])
    assert runs[0] == runs[1]


# -- issue 11: gradient_accumulation_steps and optimizer.type reach the estimate --------------------------------


def test_accumulation_and_optimizer_from_the_config(cli, tmp_path):
    config = write(tmp_path, {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2,
                              "gradient_accumulation_steps": 4,
                              "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
                              "zero_optimization": {"stage": 2}})
    training = cli("llama-3-8b", "--gpus", "8", "--deepspeed", config, "--json").json()["training"]
    assert (training["grad_accum"], training["optimizer"], training["micro_batch_size"], training["zero_stage"]) == (
        4, "sgd-momentum", 2, 2)


def test_auto_accumulation_takes_the_grad_accum_flag(cli, tmp_path):
    config = write(tmp_path, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": "auto",
                              "zero_optimization": {"stage": 2}})
    data = cli("llama-3-8b", "--gpus", "8", "--grad-accum", "3", "--deepspeed", config, "--json").json()
    assert data["training"]["grad_accum"] == 3


# -- issue 11: a typed flag that contradicts the config is an error -------------------------------------------------

CONFIG = {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
          "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}


@pytest.mark.parametrize("flags", [
    ["--zero", "2"], ["--zero", "0,1,2,3"], ["--offload", "optimizer"], ["--fsdp"], ["--sharding", "torch"],
    ["--sharding", "fsdp"], ["--precision", "fp16"], ["--batch-size", "8"], ["--grad-accum", "2"],
    ["--optim", "lion"], ["--master-dtype", "bf16"], ["--amsgrad"],
])
def test_contradicting_flag_is_one_line_exit_2(cli, tmp_path, flags):
    result = cli("llama-3-8b", "--gpus", "8", "--deepspeed", write(tmp_path, CONFIG), *flags, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "contradicts" in lines[0] and flags[0] in lines[0]


def test_typed_offload_none_contradicts_a_config_that_offloads(cli, tmp_path):
    offloading = {**CONFIG, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    result = cli("llama-3-8b", "--gpus", "8", "--deepspeed", write(tmp_path, offloading), "--offload", "none")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        (f"memcalc: --offload none contradicts {tmp_path / 'ds_config.json'}, which sets offload optimizer; drop the "
         "setting or edit the config")]


@pytest.mark.parametrize("flags", [
    ["--zero", "3"], ["--precision", "bf16"], ["--batch-size", "2"], ["--grad-accum", "4"], ["--optim", "adamw"],
    ["--offload", "none"], ["--sharding", "deepspeed"],
    # bf16 without bf16_master_weights_and_grads keeps an fp32 master and fp32 states (stage_1_and_2.py).
    ["--master-dtype", "fp32"], ["--state-dtype", "fp32"],
])
def test_agreeing_flag_is_fine(cli, tmp_path, flags):
    result = cli("llama-3-8b", "--gpus", "8", "--deepspeed", write(tmp_path, CONFIG), *flags, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["training"]["zero_stage"] == 3


def test_a_broken_config_is_one_line_exit_4(cli, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "bogus": 1}')
    result = cli("llama-3-8b", "--gpus", "8", "--deepspeed", str(path))
    assert result.exit_code == 4 and len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


# -- --emit and --compare-with through the new modules ----------------------------------------------------------


def test_emit_carries_accumulation_and_offload(cli):
    result = cli("llama-3-8b", "--gpus", "8", "--zero", "3", "--grad-accum", "4", "--offload", "optimizer",
                 "--emit", "deepspeed")
    assert result.exit_code == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["gradient_accumulation_steps"] == 4 and config["train_batch_size"] == 32
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    hf = next(r for r in PEER["hf_trainer_auto"] if r["preset"] == "llama-3-8b" and r["stage"] == 3)
    assert config["zero_optimization"]["reduce_bucket_size"] == hf["zero_optimization"]["reduce_bucket_size"]


@pytest.mark.parametrize("tool", ["deepspeed", "accelerate"])
def test_compare_with_has_no_sentinels(cli, tool):
    data = cli("llama-3-8b", "--gpus", "8", "--zero", "3", "--compare-with", tool, "--json").json()
    assert data["tool"] == tool and data["rows"]
    assert all(row["tool_bytes"] is None or row["tool_bytes"] >= 0 for row in data["rows"])


def test_fit_suggestions_edit_the_config_instead_of_contradicting_it(cli, tmp_path):
    """A change the config decides (stage, offload, micro-batch) is said as an edit of its keys; one no config key
    says (bf16-pure, an 8-bit optimizer where the config names AdamW) is not suggested."""
    config = {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW"},
              "zero_optimization": {"stage": 1}}
    path = write(tmp_path, config)
    result = cli("llama-3-8b", "--gpus", "8", "--deepspeed", path, "--gpu", "a100-40gb", "--json")
    assert result.exit_code == 6
    changes = [s["change"] for s in result.json()["fit"]["suggestions"]]
    assert changes and not any(flag in change for change in changes
                               for flag in ("--zero", "--offload", "--batch-size", "--grad-accum", "--optim ",
                                            "--precision", "--optim-impl"))
    assert f"in {path}: zero_optimization.stage 3" in changes
    # Each suggestion, made in the config, runs without a contradiction and gives the peak it promised.
    staged = {**config, "zero_optimization": {"stage": 3}}
    promised = next(s for s in result.json()["fit"]["suggestions"]
                    if s["change"] == f"in {path}: zero_optimization.stage 3")
    (tmp_path / "staged").mkdir()
    edited = cli("llama-3-8b", "--gpus", "8", "--deepspeed", write(tmp_path / "staged", staged), "--json")
    assert edited.json()["per_gpu"]["peak_bytes"] == promised["peak_bytes"]


@pytest.mark.parametrize(("params", "impl"), [({}, "fused"), ({"torch_adam": True}, "foreach"),
                                              ({"torch_adam": True, "foreach": False}, "forloop")])
def test_deepspeed_adamw_steps_as_deepspeed_builds_it(cli, tmp_path, params, impl):
    """runtime/engine.py get_optimizer_configuration: FusedAdam, or torch.optim.AdamW(foreach=...) with torch_adam."""
    config = {**CONFIG, "optimizer": {"type": "AdamW", "params": params}}
    data = cli("llama-3-8b", "--gpus", "8", "--deepspeed", write(tmp_path, config), "--json").json()
    assert data["training"]["optim_impl"] == impl


def test_emit_exits_6_when_nothing_deepspeed_can_express_fits(cli):
    """Llama-3-70B on a 16 GB T4 with 16 x 8,192 tokens: even ZeRO-3 with everything offloaded and full
    checkpointing keeps more than the GPU holds; the config is still written, for the run as asked."""
    result = cli("llama-3-70b", "--gpu", "t4", "--seq-len", "8192", "--batch-size", "16", "--emit", "deepspeed")
    assert result.exit_code == 6
    assert "which does not fit t4: no change" in result.stderr
    assert json.loads(result.stdout)["train_micro_batch_size_per_gpu"] == 16


def test_emit_describes_the_run_it_estimates(cli, tmp_path):
    """--emit deepspeed: an FSDP or torch-engine run has no DeepSpeed config (before, a ZeRO-3 config was printed for
    --fsdp), --json beside it is refused (before, ignored), and the emitted config read back with --deepspeed is the run
    whose peak the message states (its buffers HF's "auto" values for hidden size 4096: before, the message gave the
    estimate with DeepSpeed's defaults, 1.04 GB above the config's own run)."""
    for options in (["--fsdp", "--gpus", "8"], ["--sharding", "torch", "--zero", "1", "--gpus", "8"]):
        refused = cli("llama-3-8b", "--emit", "deepspeed", *options)
        assert refused.exit_code == 2 and "which a DeepSpeed config does not run" in refused.stderr, refused.stderr
    assert cli("llama-3-8b", "--emit", "deepspeed", "--json").exit_code == 2
    emitted = cli("llama-3-8b", "--zero", "3", "--gpus", "8", "--emit", "deepspeed")
    stated = int(emitted.stderr.split("the peak per GPU is ")[1].split(" B")[0].replace(",", ""))
    path = tmp_path / "ds.json"
    path.write_text(emitted.stdout)
    read_back = cli("llama-3-8b", "--deepspeed", str(path), "--gpus", "8", "--json").json()["per_gpu"]["peak_bytes"]
    # (read back, the config's AdamW section is DeepSpeed's FusedAdam, whose step memcalc counts as a 4-byte state)
    assert read_back - stated == 4
    assert "no optimizer section" in cli("llama-3-8b", "--zero", "2", "--gpus", "8", "--optim", "adamw-8bit",
                                         "--emit", "deepspeed").stderr
