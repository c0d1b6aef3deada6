"""Pipeline parallelism (--pp, --pp-schedule, --microbatches, --pp-layers): each stage's tensors, micro-batches in
flight and buffers, against torch.distributed.pipelining stages of the transformers class on real gloo ranks."""

from __future__ import annotations

import pytest

from memcalc.api import model_input, run
from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.pipeline import in_flight, rank_actions, stage_ranges, unsharded_window
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
    (["--pp", "2", "--gpus", "2", "--pp-schedule", "gpipe-ish"],
     "--pp-schedule 'gpipe-ish' is not one of gpipe, 1f1b, interleaved-1f1b"),
])
def test_bad_pipelines_are_one_line_exit_2(cli, options, message):
    result = cli("llama-3-8b", *options)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.parametrize(("options", "message"), [
    (["--pp-schedule", "ZBVZeroBubble"], "the V-shaped schedules"),
    (["--pp-schedule", "DualPipeV"], "the V-shaped schedules"),
    (["--pp-schedule", "zero-bubble", "--checkpointing", "full"], "its input backward runs with retain_graph"),
])
def test_unmodelled_schedules_are_one_line_exit_5(cli, options, message):
    result = cli("llama-3-8b", "--pp", "2", "--gpus", "2", *options)
    assert result.exit_code == UnsupportedModelError.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_fsdp2_on_stages_holds_every_unit_unsharded():
    """FSDP2 over each stage's 8 data-parallel ranks, bf16 (fp32 shards, bf16 gathered, fp32 reduce): stage 0 of
    Llama-3-8B (the embedding and layers 0-15; every dimension divides by 8, so no padding) by hand from its config."""
    model = model_input("llama-3-8b", None)
    stage = TABLE + 16 * LAYER
    report = run(model, TrainingSpec(precision="bf16", num_gpus=16, pp=2, pp_stage=0, sharding="fsdp", zero_stage=2))
    terms = {t.name: t.bytes for t in report.per_gpu.terms}
    assert terms["weights"] == 4 * stage // 8  # the fp32 shards
    assert terms["fsdp_unsharded_params"] == 2 * stage  # every unit gathered in bf16, kept to the schedule's end
    assert terms["gradients"] == 4 * stage  # accumulated unsharded in the reduce dtype
    assert terms["fsdp_sharded_gradients"] == 4 * stage // 8  # the reduce-scatter outputs the step reads
    assert terms["optimizer_states"] == 2 * 4 * stage // 8
    assert "master_weights" not in terms and "ddp_buckets" not in terms


def test_fsdp_on_stages_defaults_to_torchtitans_no_reshard_after_forward(cli):
    result = cli("llama-3-8b", "--pp", "2", "--gpus", "4", "--fsdp", "--json")
    assert result.exit_code == 0, result.stderr
    import json

    assert json.loads(result.stdout)["training"]["zero_stage"] == 2


def test_stages_and_tensor_parallelism_over_more_nodes_than_data_parallel_ranks():
    """64 GPUs on 8 nodes as tp 8 x pp 2 leave 4 data-parallel ranks: the data-parallel engine's view runs them on 4
    nodes of one (it was given 8 nodes for 4 GPUs and refused the layout the user asked for)."""
    from memcalc import api

    report = api.estimate("llama-3-70b", nodes=8, gpus_per_node=8, tp=8, pp=2, fsdp=True)
    assert (report.training.num_gpus, report.training.num_nodes, report.training.tp, report.training.pp) == (64, 8, 8, 2)
    assert report.per_gpu.peak_bytes > 0


@pytest.mark.parametrize(("options", "error", "message"), [
    (["--zero", "2"], UsageError, "DeepSpeed's pipeline engine refuses them"),
    # (its weights' backward keeps bf16's gradients outside FSDP2's upcast; --zero 3 reshards between the halves)
    (["--fsdp", "--pp-schedule", "zero-bubble"], UnsupportedModelError,
     "--pp-schedule zero-bubble with FSDP2 is modelled with --zero 2 and --precision fp32, bf16-pure or amp-bf16"),
    (["--fsdp", "--zero", "3", "--pp-schedule", "zero-bubble", "--precision", "bf16-pure"], UnsupportedModelError,
     "--pp-schedule zero-bubble with FSDP2 is modelled with --zero 2"),
])
def test_sharded_stages_not_run_or_not_modelled(cli, options, error, message):
    result = cli("llama-3-8b", "--pp", "2", "--gpus", "8", *options)
    assert result.exit_code == error.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_unmodelled_model_is_one_line_exit_5(cli):
    result = cli("gpt2", "--pp", "2", "--gpus", "2")
    assert result.exit_code == UnsupportedModelError.exit_code, result.stderr
    assert "--pp is modelled for decoders of the Llama layout" in result.stderr


# -- against torch.distributed.pipelining on real gloo ranks ---------------------------------------------------------
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024,
        "max_position_embeddings": 1024, "pad_token_id": 0}
# TINY at half its widths (two layers a stage as well), for the stages without data parallelism: the peaks in the same
# phases and within the same bounds, each rank's step about a third quicker. The FSDP2 stages below stay at TINY's
# widths (at NARROW's, the last FSDP2 stage of test_fsdp2_stages_on_gloo reads +0.86%).
NARROW = {**TINY, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 512}


@pytest.mark.parametrize(("schedule", "microbatches", "precision", "checkpointing"), [
    ("1f1b", 2, "fp32", "none"),
    ("gpipe", 3, "bf16-pure", "none"),
    # (the last stage's later backward beside the input gradient its first sent back: -0.6% at TINY's widths before
    # it was counted)
    ("1f1b", 2, "bf16-pure", "none"),
])
def test_stages_match_pipelining_on_gloo(schedule, microbatches, precision, checkpointing):
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=128, checkpointing=checkpointing,
                        num_gpus=2, pp=2, pp_schedule=schedule, microbatches=microbatches)
    model = model_of(ModelConfig("narrow", NARROW, "test"))
    for measured in measure_distributed({**NARROW, "_name": "narrow"}, spec, engine="pp", world_size=2, method="gloo"):
        stage = measured.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_stage=stage))
        terms = {t.name: t.bytes for t in report.per_gpu.terms}
        for name in ("weights", "gradients", "optimizer_states"):
            assert terms[name] == measured.model_state_bytes[name], (stage, name)
        peak, measured_peak = report.per_gpu.peak_bytes, measured.measured_peak_bytes
        assert abs(peak - measured_peak) < 0.001 * measured_peak, (stage, peak, measured_peak)


def test_a_later_micro_batch_on_gloo():
    """Four micro-batches through two stages under 1F1B, amp-bf16, checkpointed: the first stage's later backwards hold
    the cast weights' gradients to their end (autocast's cache made the casts in the first micro-batch's forward), the
    embedding's new gradient beside the held one, and a warm-up send's hidden state; the first stage within 0.1%, the
    last at most 0.1% below (8 KB at this size) and 3% above (its receive buffer and its first layer's fp32 copy of it
    counted apart)."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    spec = TrainingSpec(precision="amp-bf16", micro_batch_size=2, seq_len=128, checkpointing="full", num_gpus=2, pp=2,
                        microbatches=4)
    model = model_of(ModelConfig("tiny", TINY, "test"))
    for measured in measure_distributed({**TINY, "_name": "tiny"}, spec, engine="pp", world_size=2, method="gloo"):
        stage = measured.run["distributed"]["stage"]
        peak, measured_peak = run(model, spec.replace(pp_stage=stage)).per_gpu.peak_bytes, measured.measured_peak_bytes
        if stage == 0:
            assert abs(peak - measured_peak) < 0.001 * measured_peak, (peak, measured_peak)
        else:
            assert 0.999 * measured_peak <= peak <= 1.03 * measured_peak, (peak, measured_peak)


def test_fsdp2_stages_on_gloo():
    """Two stages over two FSDP2 data-parallel ranks each (a (pp, dp) mesh, torchtitan's apply_fsdp on each stage),
    bf16 with fp32 reduce, 1F1B over 4 micro-batches, checkpointed: both stages within 0.1% (the last one's later
    backwards with the input gradient its previous backward sent back: without it -0.6%); the peak in backward."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    spec = TrainingSpec(precision="bf16", micro_batch_size=2, seq_len=128, checkpointing="full", num_gpus=4, pp=2,
                        microbatches=4, sharding="fsdp", zero_stage=2)
    model = model_of(ModelConfig("tiny", TINY, "test"))
    measured = measure_distributed({**TINY, "_name": "tiny"}, spec, engine="pp", world_size=4, method="gloo")
    assert [m.run["distributed"]["stage"] for m in measured] == [0, 0, 1, 1]
    for m in measured[::2]:
        stage = m.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_stage=stage))
        terms = {t.name: t.bytes for t in report.per_gpu.terms}
        for name in ("weights", "optimizer_states"):
            assert terms[name] == m.model_state_bytes[name], (stage, name)
        assert terms["fsdp_sharded_gradients"] == m.model_state_bytes["gradients"], stage
        peak, measured_peak = report.per_gpu.peak_bytes, m.measured_peak_bytes
        assert abs(peak - measured_peak) < 0.001 * measured_peak, (stage, peak, measured_peak)
        assert report.per_gpu.peak_phase.value == m.measured_peak_phase == "backward", stage


def test_fsdp2_interleaved_ranks_on_gloo():
    """ScheduleInterleaved1F1B, 2 ranks of 4 stages (14 layers), each rank's stages FSDP2-sharded over 2 data-parallel
    ranks, bf16 with fp32 reduce, 4 micro-batches of 2 x 64 tokens: the runtime keeps a rank's next three stages
    unsharded (_add_unshard_reshard), so at each action one of its four stages holds only shards and its accumulated
    unsharded gradients. Measured peaks: rank 0 +0.09% (its first micro-batch's bf16 gradients counted at fp32), rank 1
    -0.005% (at 128 positions +0.13% and -0.01%); both in backward (all four stages unsharded throughout read +2.6% at
    128 positions)."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    raw = {**TINY, "num_hidden_layers": 14}
    spec = TrainingSpec(precision="bf16", micro_batch_size=2, seq_len=64, num_gpus=4, pp=2,
                        pp_schedule="interleaved-1f1b", pp_virtual=4, microbatches=4, sharding="fsdp", zero_stage=2)
    model = model_of(ModelConfig("tiny", raw, "test"))
    measured = measure_distributed({**raw, "_name": "tiny"}, spec, engine="pp", world_size=4, method="gloo")
    assert [m.run["distributed"]["rank_stages"] for m in measured] == [[0, 2, 4, 6]] * 2 + [[1, 3, 5, 7]] * 2
    for m in measured[::2]:
        rank = m.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_rank=rank))
        peak, measured_peak = report.per_gpu.peak_bytes, m.measured_peak_bytes
        assert 0.999 * measured_peak <= peak <= 1.005 * measured_peak, (rank, peak, measured_peak)
        assert report.per_gpu.peak_phase.value == m.measured_peak_phase == "backward", rank


def test_context_parallel_stages_on_gloo():
    """--cp with --pp, torchtitan's layout: 2 stages, each over 2 ranks that are its FSDP2 data-parallel ranks and its
    context-parallel ranks (torch's ring attention over them, 128 of 256 positions each), bf16, 1F1B over 4
    micro-batches. The first stage peaks in a later micro-batch's ring backward of its last layer, beside that
    layer's bf16 gradients waiting for its post-backward (-1.9% at 512 positions before they were counted); both
    within 0.1% (measured -0.01% and -0.02%; 256 positions rather than 512 halve the ranks' time; the estimate's
    peaks are at the same moments)."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    spec = TrainingSpec(precision="bf16", micro_batch_size=2, seq_len=256, num_gpus=4, pp=2, cp=2, microbatches=4,
                        sharding="fsdp", zero_stage=2)
    raw = {**TINY, "max_position_embeddings": 4096}
    model = model_of(ModelConfig("tiny", raw, "test"))
    measured = measure_distributed({**raw, "_name": "tiny"}, spec, engine="pp", world_size=4, method="gloo")
    for m in measured[::2]:
        stage = m.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_stage=stage))
        peak, measured_peak = report.per_gpu.peak_bytes, m.measured_peak_bytes
        assert abs(peak - measured_peak) < 0.001 * measured_peak, (stage, peak, measured_peak)
        assert report.per_gpu.peak_phase.value == m.measured_peak_phase == "backward", stage


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
    model = model_of(ModelConfig("narrow", NARROW, "test"))
    for measured in measure_distributed({**NARROW, "_name": "narrow"}, spec, engine="pp", world_size=2, method="fake",
                                        fake_ranks=(0, 1)):
        stage = measured.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_stage=stage))
        assert abs(report.per_gpu.peak_bytes - measured.measured_peak_bytes) < 0.001 * measured.measured_peak_bytes


def test_verify_of_tensor_parallel_stages_runs_on_gloo_ranks_only(cli):
    """--verify with --tp and --pp: the stages over their tensor-parallel groups run on gloo ranks; elsewhere, one line."""
    pytest.importorskip("transformers")
    trace = cli("llama-3-8b", "--tp", "2", "--pp", "2", "--gpus", "4", "--verify=trace")
    assert trace.exit_code == UsageError.exit_code and trace.stdout == ""
    assert "use --verify=cpu-tracker" in trace.stderr and trace.stderr.count("\n") == 1
    sp = cli("llama-3-8b", "--tp", "2", "--pp", "2", "--gpus", "4", "--sp", "--verify=cpu-tracker")
    assert sp.exit_code == UsageError.exit_code and "without --sp or --loss-parallel" in sp.stderr


def test_a_tensor_parallel_stage_without_the_embedding_holds_none_of_its_gradient():
    """--tp 2 --pp 2, the last stage (layers 2 and 3, the final norm, the head): its gradients are its tensors' shards,
    by hand (per layer q 128 x 256, k and v 64 x 256, o 256 x 128, gate, up and down 256 x 256, two norms of 256; the
    norm 256; the head 512 x 256), 2 B each in bf16-pure: 1,444,352 B, what rank 2 of the fake process group measures.
    The token embedding's whole gradient (DTensor's embedding backward) is the first stage's only: counted on every
    stage, this one read 262,144 B high."""
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    layer = 128 * 256 + 2 * 64 * 256 + 256 * 128 + 3 * 256 * 256 + 2 * 256
    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=2, seq_len=256, num_gpus=4, tp=2, pp=2, microbatches=2)
    report = run(model_of(ModelConfig("tiny", TINY, "test")), spec.replace(pp_stage=1))
    assert report.term("gradients").bytes == 2 * (2 * layer + 256 + 512 * 256) == 1_444_352


def test_tensor_parallel_stages_on_the_fake_process_group():
    """--tp 2 --pp 2: the model split over each stage's tensor-parallel group (memcalc.measure.tensor_parallel's plan),
    then cut into stages, 1F1B over the (pp, tp) mesh; the first stage, rank 0 of the fake process group. Its peak is
    its last layer's post-attention norm backward, beside the other micro-batch's activations: the norm's fp32
    backward is whole where the MLP's transients are split (-3.10% before that moment was counted at the last layer;
    states exact, the stage without the embedding holding none of its gradient). python benchmarks/pipeline.py --tp 2
    runs both stages on gloo ranks (64 stage steps, -0.06% to +4.91%)."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=2, seq_len=256, num_gpus=4, tp=2, pp=2, microbatches=2)
    measured = measure_distributed({**TINY, "_name": "tiny"}, spec, engine="pp", world_size=4, method="fake")[0]
    report = run(model_of(ModelConfig("tiny", TINY, "test")), spec.replace(pp_stage=0))
    terms = {t.name: t.bytes for t in report.per_gpu.terms}
    for name in ("weights", "gradients", "optimizer_states"):
        assert terms[name] == measured.model_state_bytes[name], name
    assert measured.run["distributed"]["engine"] == "pp+tp"
    assert abs(report.per_gpu.peak_bytes - measured.measured_peak_bytes) < 0.0005 * measured.measured_peak_bytes
    assert report.per_gpu.peak_phase.value == measured.measured_peak_phase == "backward"


# -- interleaved 1F1B: several stages per rank ----------------------------------------------------------------------
@pytest.mark.parametrize("zero_bubble", [False, True])
@pytest.mark.parametrize(("pp", "virtual", "microbatches"), [(2, 2, 2), (2, 2, 4), (3, 2, 3), (4, 2, 8), (4, 3, 6),
                                                              (4, 2, 10), (8, 4, 16), (2, 3, 1)])
def test_rank_order_is_torchs_interleaved_1f1b(pp, virtual, microbatches, zero_bubble):
    """memcalc.pipeline.rank_actions (pure Python, the estimate path imports no torch) against the order torch's own
    ScheduleInterleaved1F1B and ScheduleInterleavedZeroBubble compute for each rank (their idle slots dropped)."""
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from torch.distributed.pipelining import schedules

    kinds = {schedules._ComputationType.FORWARD: "F", schedules._ComputationType.FULL_BACKWARD: "B",
             schedules._ComputationType.BACKWARD_INPUT: "I", schedules._ComputationType.BACKWARD_WEIGHT: "W"}
    schedule_class = schedules.ScheduleInterleavedZeroBubble if zero_bubble else schedules.ScheduleInterleaved1F1B
    rounds = max(1, microbatches // pp)
    schedule = SimpleNamespace(n_local_stages=virtual, pp_group_size=pp, _n_microbatches=microbatches,
                               microbatches_per_round=microbatches // rounds)
    for rank in range(pp):
        actions = schedule_class._calculate_single_rank_operations(schedule, rank)
        theirs = [(a.stage_index // pp, kinds[a.computation_type], a.microbatch_index) for a in actions
                  if a is not None]
        assert rank_actions(rank, pp, virtual, microbatches, zero_bubble) == theirs, rank


@pytest.mark.parametrize(("pp", "virtual", "microbatches"), [(2, 2, 4), (2, 4, 4), (3, 4, 6), (4, 5, 8), (2, 6, 2)])
def test_unsharded_stages_are_torchs_fsdp_window(pp, virtual, microbatches):
    """Which of a rank's stages FSDP2's units are unsharded for at each action (memcalc.pipeline.unsharded_window)
    against torch's own lowering: _add_unshard_reshard's UNSHARD and RESHARD actions replayed over the rank's compute
    actions (up to three stages a rank: every stage that has work left)."""
    pytest.importorskip("torch")
    from torch.distributed.pipelining import schedules

    kind = {"F": schedules._ComputationType.FORWARD, "B": schedules._ComputationType.FULL_BACKWARD}
    for rank in range(pp):
        ours = rank_actions(rank, pp, virtual, microbatches)
        compute = [schedules._Action(local * pp + rank, kind[k], mb) for local, k, mb in ours]
        unsharded: set[int] = set()
        index = 0
        for action in schedules._add_unshard_reshard(compute):
            if action.computation_type == schedules._ComputationType.UNSHARD:
                unsharded.add(action.stage_index)
            elif action.computation_type == schedules._ComputationType.RESHARD:
                unsharded.discard(action.stage_index)
            else:
                theirs = tuple(local * pp + rank in unsharded for local in range(virtual))
                assert unsharded_window(ours, index, virtual) == theirs, (rank, index)
                index += 1
        assert index == len(ours)


def test_interleaved_rank_holds_its_stages_and_names_them():
    # Llama-3-8B's 32 layers + 2 over 8 stages (torchtitan's split): 4, 5, 4, 4, 4, 4, 4, 3 decoder layers; rank 0
    # runs stages 0 (the embedding and layers 0-3) and 4 (layers 17-20).
    assert stage_ranges(32, 8)[0] == (0, 4) and stage_ranges(32, 8)[4] == (17, 21)
    model = model_input("llama-3-8b", None)
    spec = TrainingSpec(precision="bf16-pure", num_gpus=4, pp=4, pp_schedule="interleaved-1f1b", microbatches=8)
    report = run(model, spec.replace(pp_rank=0))
    terms = {t.name: t for t in report.per_gpu.terms}
    assert report.model.num_params == TABLE + 8 * LAYER
    # bf16-pure: weights, gradients and AdamW's two states, 2 B each, for every parameter of both stages
    assert report.per_gpu.model_states_bytes == 4 * 2 * (TABLE + 8 * LAYER)
    assert "rank 0 runs stages 0, 4 (layers 0-3, 17-20)" in " ".join(report.notes)
    assert terms["pipeline_other_stages"].bytes > 0 and "stage " in terms["pipeline_other_stages"].formula
    whole = run(model, spec)
    ranks = [run(model, spec.replace(pp_rank=rank)).per_gpu.peak_bytes for rank in range(4)]
    assert whole.per_gpu.peak_bytes == max(ranks) and whole.training.pp_stage == ranks.index(max(ranks))
    assert any("peaks per rank: rank 0" in note for note in whole.notes)


@pytest.mark.parametrize(("options", "message"), [
    (["--pp", "4", "--gpus", "4", "--pp-virtual", "2"], "--pp-virtual gives each rank several stages"),
    (["--pp-virtual", "2"], "--pp-virtual sets up pipeline stages: add --pp N"),
    (["--pp", "4", "--gpus", "4", "--pp-schedule", "interleaved-1f1b", "--pp-virtual", "1"],
     "--pp-virtual must be between 2 and 64"),
    (["--pp", "4", "--gpus", "4", "--pp-schedule", "interleaved-1f1b", "--microbatches", "9"],
     "--microbatches 9 does not split into the 2 rounds"),
    (["--pp", "8", "--gpus", "8", "--pp-schedule", "interleaved-1f1b", "--pp-virtual", "4"],
     "--pp 8 x --pp-virtual 4 = 32 is more stages than this model's 32 layers can fill"),
    (["--pp", "2", "--gpus", "2", "--pp-schedule", "interleaved-1f1b", "--pp-layers", "16,16"],
     "--pp-layers takes 4 whole numbers of layers"),
])
def test_bad_interleaved_pipelines_are_one_line_exit_2(cli, options, message):
    result = cli("llama-3-8b", *options)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.parametrize(("schedule", "lowest"), [("interleaved-1f1b", 1.0), ("zero-bubble", 0.98)])
def test_interleaved_ranks_match_pipelining_on_gloo(schedule, lowest):
    """Each rank's two stages under torch's ScheduleInterleaved1F1B or ScheduleInterleavedZeroBubble on real gloo
    ranks (NARROW with 6 layers, 4 stages, 4 micro-batches of 2 x 64 tokens, fp32): interleaved 1F1B never below the
    measured peak, zero-bubble (each micro-batch held until its weights' backward, with the gradients that backward
    starts from; the input backward retaining its stage's saved tensors) at most 2% below, both at most 3% above
    (measured: interleaved 1F1B ranks 0 and 1 +1.03% and +1.11%, zero-bubble +0.68% and +0.58%;
    benchmarks/pipeline.py --interleaved [--zero-bubble] has the grid)."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    raw = {**NARROW, "num_hidden_layers": 6}
    spec = TrainingSpec(precision="fp32", micro_batch_size=2, seq_len=64, num_gpus=2, pp=2, pp_schedule=schedule,
                        microbatches=4)
    model = model_of(ModelConfig("narrow", raw, "test"))
    for measured in measure_distributed({**raw, "_name": "narrow"}, spec, engine="pp", world_size=2, method="gloo"):
        rank = measured.run["distributed"]["stage"]
        assert measured.run["distributed"]["rank_stages"] == [rank, rank + 2]
        report = run(model, spec.replace(pp_rank=rank))
        assert report.per_gpu.model_states_bytes == sum(measured.model_state_bytes[name] for name in (
            "weights", "gradients", "optimizer_states"))
        assert (schedule == "zero-bubble") == any(t.name == "pipeline_weight_backward_inputs"
                                                  for t in report.per_gpu.terms)
        peak, measured_peak = report.per_gpu.peak_bytes, measured.measured_peak_bytes
        assert lowest * measured_peak <= peak <= 1.03 * measured_peak, (rank, peak, measured_peak)


def test_zero_bubble_under_fsdp2_on_gloo():
    """ScheduleInterleavedZeroBubble with each rank's 2 stages FSDP2-sharded over 2 data-parallel ranks (--zero 2),
    bf16-pure, 4 micro-batches of 2 x 64 tokens: FSDP2 adds nothing to the zero-bubble model's error (measured: rank 0
    -1.05%, rank 1 +0.22%; the same cells without data parallelism -0.97% and +0.20%; at 128 positions -1.47% and
    +0.29%, without -1.39% and +0.28%)."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of

    raw = {**TINY, "num_hidden_layers": 6}
    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=2, seq_len=64, num_gpus=4, pp=2,
                        pp_schedule="zero-bubble", microbatches=4, sharding="fsdp", zero_stage=2)
    model = model_of(ModelConfig("tiny", raw, "test"))
    measured = measure_distributed({**raw, "_name": "tiny"}, spec, engine="pp", world_size=4, method="gloo")
    for m in measured[::2]:
        rank = m.run["distributed"]["stage"]
        peak, measured_peak = run(model, spec.replace(pp_rank=rank)).per_gpu.peak_bytes, m.measured_peak_bytes
        assert 0.98 * measured_peak <= peak <= 1.01 * measured_peak, (rank, peak, measured_peak)


@pytest.mark.parametrize("other", ["megatron", "llm-analysis"])
def test_interleaved_comparisons_are_refused_in_one_line(cli, other):
    result = cli("llama-3-8b", "--pp", "4", "--gpus", "4", "--pp-schedule", "interleaved-1f1b", "--compare-with", other)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert f"--compare-with {other} with --pp-schedule interleaved-1f1b" in result.stderr
    assert result.stderr.count("\n") == 1
