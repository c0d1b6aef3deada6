"""Pipeline parallelism (--pp, --pp-schedule, --microbatches, --pp-layers): each stage's tensors, micro-batches in
flight and buffers, against torch.distributed.pipelining stages of the transformers class on real gloo ranks."""

from __future__ import annotations

import pytest

from memcalc.api import model_input, run
from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.pipeline import in_flight, stage_ranges
from memcalc.spec import TrainingSpec

# Llama-3-8B by hand from its config: one decoder layer holds q and o 4096 x 4096, k and v 1024 x 4096, gate, up and
# down 14336 x 4096 and two norms of 4096; the embedding and the (untied) head 128256 x 4096 each.
LAYER = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096
TABLE = 128256 * 4096


def test_torchtitan_split_counts_the_embedding_and_the_head_as_a_layer_each():
    # 32 layers + 2 over 4 stages: 9, 9, 8, 8 "layers", the first and last stage one fewer decoder layer each.
    assert stage_ranges(32, 4) == ((0, 8), (8, 17), (17, 25), (25, 32))
    assert stage_ranges(32, 2) == ((0, 16), (16, 32))
    assert stage_ranges(32, 4, (10, 8, 8, 6)) == ((0, 10), (10, 18), (18, 26), (26, 32))


def test_micro_batches_in_flight():
    # Schedule1F1B: stage i runs pp - i - 1 warm-up forwards and one more before its first backward.
    assert [in_flight(stage, 4, 8, "1f1b") for stage in range(4)] == [4, 3, 2, 1]
    assert [in_flight(stage, 4, 2, "gpipe") for stage in range(4)] == [2, 2, 2, 2]


def test_each_stage_holds_its_layers():
    model = model_input("llama-3-8b", None)
    weights = []
    for stage in range(4):
        report = run(model, TrainingSpec(precision="bf16-pure", num_gpus=4, pp=4, pp_stage=stage))
        weights.append(next(t.bytes for t in report.per_gpu.terms if t.name == "weights"))
    assert weights == [2 * (TABLE + 8 * LAYER), 2 * 9 * LAYER, 2 * 8 * LAYER, 2 * (7 * LAYER + 4096 + TABLE)]


def test_report_is_the_most_loaded_stage_and_names_the_others():
    model = model_input("llama-3-8b", None)
    spec = TrainingSpec(precision="bf16-pure", num_gpus=8, pp=4, microbatches=8, seq_len=4096)
    report = run(model, spec)
    stages = [run(model, spec.replace(pp_stage=stage)).per_gpu.peak_bytes for stage in range(4)]
    assert report.per_gpu.peak_bytes == max(stages)
    assert report.training.pp_stage == stages.index(max(stages))
    assert any("peaks per stage: stage 0 (layers 0-7)" in note for note in report.notes)


@pytest.mark.parametrize(("options", "message"), [
    (["--pp", "40", "--gpus", "40"], "--pp 40 is more stages than this model's 32 layers can fill"),
    (["--pp", "4", "--gpus", "4", "--microbatches", "2"], "--microbatches 2 is fewer than the 4 stages"),
    (["--pp", "4", "--gpus", "6"], "--gpus 6 is not divisible by --tp x --pp = 4"),
    (["--pp", "4", "--gpus", "4", "--pp-layers", "8,8,8"], "--pp-layers takes 4 whole numbers of layers"),
    (["--pp", "4", "--gpus", "4", "--pp-layers", "10,10,10,10"], "adds up to 40 layers; the model has 32"),
    (["--pp", "4", "--gpus", "4", "--pp-layers", "8,x,8,8"], "--pp-layers '8,x,8,8': give each stage's layer count"),
    (["--microbatches", "4"], "--microbatches sets up pipeline stages: add --pp N"),
    (["--pp", "2", "--gpus", "2", "--grad-accum", "2"], "the pipeline's micro-batches are its accumulation"),
    (["--pp", "2", "--gpus", "2", "--pp-schedule", "zero-bubble"], "--pp-schedule"),
])
def test_bad_pipelines_are_one_line_exit_2(cli, options, message):
    result = cli("llama-3-8b", *options)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and result.stdout == ""


def test_unmodelled_model_is_one_line_exit_5(cli):
    result = cli("gpt2", "--pp", "2", "--gpus", "2")
    assert result.exit_code == UnsupportedModelError.exit_code, result.stderr
    assert "--pp is modelled for decoders of the Llama layout" in result.stderr


# -- against torch.distributed.pipelining on real gloo ranks ---------------------------------------------------------
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024,
        "max_position_embeddings": 1024, "pad_token_id": 0}


@pytest.mark.parametrize(("schedule", "microbatches", "precision", "checkpointing"), [
    ("1f1b", 2, "fp32", "none"),
    ("gpipe", 3, "bf16-pure", "none"),
])
def test_stages_match_pipelining_on_gloo(schedule, microbatches, precision, checkpointing):
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=128, checkpointing=checkpointing,
                        num_gpus=2, pp=2, pp_schedule=schedule, microbatches=microbatches)
    model = model_of(ModelConfig("tiny", TINY, "test"))
    for measured in measure_distributed({**TINY, "_name": "tiny"}, spec, engine="pp", world_size=2, method="gloo"):
        stage = measured.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_stage=stage))
        terms = {t.name: t.bytes for t in report.per_gpu.terms}
        for name in ("weights", "gradients", "optimizer_states"):
            assert terms[name] == measured.model_state_bytes[name], (stage, name)
        peak, measured_peak = report.per_gpu.peak_bytes, measured.measured_peak_bytes
        assert abs(peak - measured_peak) < 0.001 * measured_peak, (stage, peak, measured_peak)


def test_verify_of_stages_is_not_one_gpu(cli):
    pytest.importorskip("transformers")
    result = cli("llama-3-8b", "--pp", "2", "--gpus", "2", "--verify=cuda")
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert "--verify=cuda measures one GPU" in result.stderr and result.stderr.count("\n") == 1


def test_stages_on_the_fake_process_group():
    """Each stage alone under FakeTensorMode, given the shapes it sends and receives (what lets a preset at full size
    be measured): 1F1B in fp32 as on the gloo ranks above."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    spec = TrainingSpec(precision="fp32", micro_batch_size=2, seq_len=128, num_gpus=2, pp=2, microbatches=2)
    model = model_of(ModelConfig("tiny", TINY, "test"))
    for measured in measure_distributed({**TINY, "_name": "tiny"}, spec, engine="pp", world_size=2, method="fake",
                                        fake_ranks=(0, 1)):
        stage = measured.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_stage=stage))
        assert abs(report.per_gpu.peak_bytes - measured.measured_peak_bytes) < 0.001 * measured.measured_peak_bytes
