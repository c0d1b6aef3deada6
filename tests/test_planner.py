"""The layout planner (--plan): every layout it tries is a valid split of the GPUs, the memory is the estimate's, and
the ranking follows the stated throughput model."""

from __future__ import annotations

import pytest

from memcalc import api, pipeline
from memcalc.errors import UsageError

# Llama-3.1-405B by hand from its config: 126 layers of q and o 16384 x 16384, k and v 1024 x 16384, gate, up and down
# 53248 x 16384 and two norms; the embedding and the untied head 128256 x 16384; the final norm.
LAYER_405B = 2 * 16384 * 16384 + 2 * 1024 * 16384 + 3 * 53248 * 16384 + 2 * 16384
PARAMS_405B = 126 * LAYER_405B + 2 * 128256 * 16384 + 16384


def qwen3_30b_a3b_plan():
    """Qwen3-30B-A3B on 64 H100s at 4,096 positions: the plan this file, tests/test_pipeline_moe.py and
    tests/test_tensor_parallel_moe.py each read (their --ep layouts), made once per test run (most of a second),
    whichever xdist worker asks first."""
    from tests.conftest import shared_measurement

    return shared_measurement("test_planner-layouts-qwen3-30b-a3b-64-h100-80gb-4096",
                              lambda: api.layouts("qwen3-30b-a3b", gpus=64, gpu="h100-80gb", seq_len=4096))


@pytest.fixture(scope="module")
def plan_405b():
    return api.layouts("llama-3.1-405b", gpus=512, gpu="h100-80gb", seq_len=8192)


def test_every_layout_splits_the_gpus_and_the_model(plan_405b):
    assert PARAMS_405B == 405_853_388_800  # Meta's reported count
    assert plan_405b.candidates and plan_405b.fitting
    for c in plan_405b.candidates:
        layout = c.layout
        assert layout.dp * layout.tp * layout.pp == 512
        assert 128 % layout.tp == 0 and 8 % layout.tp == 0 and 53248 % layout.tp == 0 and 8 % layout.tp == 0
        assert c.fits == (c.peak_bytes <= c.capacity_bytes)


def test_ranked_best_first_fitting_first(plan_405b):
    fitting = [c.tokens_per_second for c in plan_405b.fitting]
    assert fitting == sorted(fitting, reverse=True)
    assert plan_405b.candidates[:len(fitting)] == plan_405b.fitting


def _candidate(plan, dp: int, tp: int, pp: int, sharding: str, checkpointing: str, cp: int):
    return next(c for c in plan.candidates if (c.layout.dp, c.layout.tp, c.layout.pp, c.layout.sharding,
                                               c.layout.checkpointing, c.layout.cp) == (dp, tp, pp, sharding,
                                                                                         checkpointing, cp))


def _compute_405b(tokens: int) -> float:
    """The compute term on 512 H100s with full checkpointing: 6 N per token and causal attention's 6 L s heads
    head_dim (126 layers, 128 heads of 128, 8,192 positions), 4/3 for the recomputation, MFU 0.4 of 989 TFLOPS."""
    attention = 6 * 126 * 8192 * 128 * 128
    return (6 * PARAMS_405B + attention) * tokens / 512 * 4 / 3 / (989e12 * 0.4)


def test_throughput_model_by_hand(plan_405b):
    """FSDP over 64 groups of 8 tensor-parallel ranks, checkpointing full, batch 1 x 8192: the module's formula with
    the H100 figures it cites (989 TFLOPS bf16, 450 GB/s NVLink each way, 50 GB/s per GPU between nodes, MFU 0.4)
    and the config's 126 layers of 128 heads of 128."""
    c = _candidate(plan_405b, 64, 8, 1, "fsdp", "full", 1)
    tokens = 64 * 8192
    compute = _compute_405b(tokens)
    tensor = 4 * 126 * 1 * 2 * 7 / 8 * (8192 * 16384 * 2) / 450e9
    data = 3 * 63 / 64 * (PARAMS_405B / 8 * 2) / 50e9
    assert c.tokens_per_step == tokens
    assert c.step_seconds == pytest.approx(compute + tensor + max(0.0, data - compute / 2), rel=1e-12)


def test_context_parallel_layouts_by_hand(plan_405b):
    """64 data-parallel ranks in 32 pairs sharing each 8192-position sequence (cp 2) over 8 tensor-parallel ranks:
    half the sequences per step, the ring's traffic (8 kv heads / 8 = 1 of 128 per rank, over the network: tp x cp =
    16 GPUs > 8 per node), and the memory of that layout's estimate."""
    c = _candidate(plan_405b, 64, 8, 1, "fsdp", "full", 2)
    tokens = 32 * 8192
    compute = _compute_405b(tokens)
    tensor = 4 * 126 * 1 * 2 * 7 / 8 * (4096 * 16384 * 2) / 450e9
    ring = 8 * 126 * 1 * 1 * (4096 * 1 * 128 * 2) / 50e9
    data = 3 * 63 / 64 * (PARAMS_405B / 8 * 2) / 50e9
    assert c.tokens_per_step == tokens
    assert c.step_seconds == pytest.approx(compute + tensor + ring + max(0.0, data - compute / 2), rel=1e-12)
    report = api.estimate("llama-3.1-405b", gpus=512, tp=8, sp=True, loss_parallel=True, cp=2, sharding="fsdp", zero=3,
                          checkpointing="full", seq_len=8192)
    assert c.peak_bytes == report.per_gpu.peak_bytes


def test_context_parallel_pipelines_by_hand(plan_405b):
    """8 data-parallel ranks in 4 pairs sharing each sequence (cp 2) x tp 8 x pp 8, FSDP2 over the stage's ranks (the
    only sharding tried with cp on pipelines, torchtitan's), 16 micro-batches: each stage's 16 layers' tensor and ring
    traffic per micro-batch (4,096 positions on each rank; tp x cp = 16 GPUs, past a node), the sends between stages,
    the 1F1B bubble 7 / 23; the memory the estimate's most loaded stage. cp 4 and 8 are not tried on pipelines at 8,192
    positions (a rank would run fewer than 4,096)."""
    c = _candidate(plan_405b, 8, 8, 8, "fsdp", "none", 2)
    assert not [x for x in plan_405b.candidates if x.layout.cp > 1 and x.layout.pp > 1
                and (x.layout.sharding != "fsdp" or x.layout.cp > 2)]
    tokens = 4 * 8192 * 16
    compute = _compute_405b(tokens) * 3 / 4  # (no recomputation)
    hidden = 4096 * 16384 * 2
    tensor = 4 * 16 * 16 * 2 * 7 / 8 * hidden / 450e9
    pipe = 2 * 16 * hidden / 50e9
    ring = 8 * 16 * 16 * 1 * (4096 * 1 * 128 * 2) / 50e9
    data = 2 * 7 / 8 * (PARAMS_405B / 64 * 2) / 50e9
    bubble = 7 / 23
    assert c.tokens_per_step == tokens
    assert c.step_seconds == pytest.approx((compute + tensor + pipe + ring) / (1 - bubble)
                                           + max(0.0, data - compute / 2), rel=1e-12)
    report = api.estimate("llama-3.1-405b", gpus=512, tp=8, sp=True, loss_parallel=True, cp=2, pp=8, microbatches=16,
                          sharding="fsdp", zero=2, seq_len=8192)
    assert c.peak_bytes == report.per_gpu.peak_bytes


def test_memory_is_the_estimate_of_that_layout(plan_405b):
    c = next(c for c in plan_405b.candidates if (c.layout.tp, c.layout.pp, c.layout.cp) == (8, 1, 1)
             and c.layout.sharding == "fsdp")
    report = api.estimate("llama-3.1-405b", gpus=512, tp=8, sp=True, loss_parallel=True, sharding="fsdp", zero=3,
                          checkpointing=c.layout.checkpointing, seq_len=8192)
    assert c.peak_bytes == report.per_gpu.peak_bytes


@pytest.mark.parametrize(("options", "message"), [
    (["--gpus", "512", "--plan"], "--plan needs the GPU the layouts must fit: add --gpu NAME"),
    (["--gpus", "512", "--gpu", "h100-80gb", "--plan", "--tp", "8"], "--plan chooses the layout itself: drop --tp"),
    (["--gpu", "h100-80gb", "--plan"], "--plan lays a run out over several GPUs: give --gpus N"),
])
def test_bad_plans_are_one_line_exit_2(cli, options, message):
    result = cli("llama-3.1-405b", *options)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_cli_prints_the_model_and_json_lists_every_layout(cli):
    # (Llama-3-8B on 8 GPUs, a quicker search than Llama-3-70B on 64: 38 layouts, 32 of them fitting)
    result = cli("llama-3-8b", "--gpus", "8", "--gpu", "h100-80gb", "--plan")
    assert result.exit_code == 0, result.stderr
    assert "throughput model" in result.stdout and "not a measurement" in result.stdout
    data = cli("llama-3-8b", "--gpus", "8", "--gpu", "h100-80gb", "--plan", "--json").json()["plan"]
    assert data["fitting"] == sum(layout["fits"] for layout in data["layouts"])
    assert {"dp", "tp", "pp", "peak_bytes", "tokens_per_second", "model"} <= set(data["layouts"][0])


def test_layouts_the_run_cannot_take_are_left_out_and_counted():
    plan = api.layouts("llama-3-8b", gpus=8, gpu="h100-80gb", lora_rank=8, activations="rules")
    assert plan.candidates and all(c.layout.tp == 1 and c.layout.pp == 1 for c in plan.candidates)
    assert any(note.startswith(f"{n} layouts left out") for note in plan.notes for n in range(1, 200))


def test_expert_parallel_layouts_by_hand():
    """Qwen3-30B-A3B (48 MoE layers, 128 experts, top 8, hidden 2048) on 64 H100s at 4,096 positions: the planner tries
    --ep with FSDP alone; the all-to-all term by hand (4 L M (ep-1)/ep x T x top-k x h x 2 B over NVLink inside a node,
    over the network past 8 GPUs), compute from the active parameters (the dense ones and 8 of 128 experts), and each
    layout's memory is the estimate of that layout."""
    plan = qwen3_30b_a3b_plan()
    by_ep = {c.layout.ep: c for c in plan.candidates
             if c.layout.checkpointing == "full" and c.layout.sharding == "fsdp" and c.layout.pp == 1
             and c.layout.tp == 1}
    assert set(by_ep) == {1, 2, 4, 8, 16, 32, 64}
    pairs = 4096 * 8 * 2048 * 2
    assert by_ep[8].parts["expert_parallel_s"] == pytest.approx(4 * 48 * 7 / 8 * pairs / 450e9, rel=1e-12)
    assert by_ep[64].parts["expert_parallel_s"] == pytest.approx(4 * 48 * 63 / 64 * pairs / 50e9, rel=1e-12)
    assert by_ep[1].parts["expert_parallel_s"] == 0
    model = api.model_input("qwen3-30b-a3b", None)
    experts = sum(t.numel for t in model.tensors if t.role == "expert")
    active = sum(t.numel for t in model.tensors) - experts + experts * 8 // 128
    attention = 6 * 48 * 4096 * 32 * 128
    compute = (6 * active + attention) * 64 * 4096 / 64 * 4 / 3 / (989e12 * 0.4)
    assert by_ep[8].parts["compute_s"] == pytest.approx(compute, rel=1e-12)
    report = api.estimate("qwen3-30b-a3b", gpus=64, ep=8, sharding="fsdp", zero=3, checkpointing="full", seq_len=4096)
    assert by_ep[8].peak_bytes == report.per_gpu.peak_bytes


def test_expert_layouts_with_torchtitans_dim_1_sharding():
    """Where torchtitan shards a rank's experts on dim 1 (the ranks sharding them times ep, here all 64 data-parallel
    ranks, exceed Mixtral's 8 experts: torchtitan/models/llama4/infra/parallelize.py apply_fsdp), the planner tries that
    layout beside transformers' dim 0: the same throughput, the memory of that layout's estimate, less than dim 0's
    whole padded experts. Qwen3-30B-A3B's 128 experts exceed 64 ranks: dim 0 only."""
    plan = api.layouts("mixtral-8x7b", gpus=64, gpu="h100-80gb", seq_len=4096)
    pair = {c.layout.ep_dim: c for c in plan.candidates
            if (c.layout.ep, c.layout.checkpointing, c.layout.pp, c.layout.tp) == (8, "full", 1, 1)}
    assert set(pair) == {0, 1} and "experts on dim 1" in pair[1].layout.label
    assert pair[1].step_seconds == pair[0].step_seconds and pair[1].peak_bytes < pair[0].peak_bytes
    report = api.estimate("mixtral-8x7b", gpus=64, ep=8, ep_shard_dim=1, sharding="fsdp", zero=3,
                          checkpointing="full", seq_len=4096)
    assert pair[1].peak_bytes == report.per_gpu.peak_bytes
    qwen = qwen3_30b_a3b_plan()
    assert {c.layout.ep_dim for c in qwen.candidates} == {0}


@pytest.fixture(scope="module")
def plan_interleaved():
    # Llama-3-8B over 32 H100s at 4 x 4096: pipelines of 2 to 16 ranks, interleaved where the 32 layers split in
    # 2 x pp stages
    return api.layouts("llama-3-8b", gpus=32, gpu="h100-80gb", batch_size=4, seq_len=4096,
                       plan_schedules="1f1b,interleaved-1f1b")


def test_interleaved_pipelines_are_searched_when_asked(plan_interleaved):
    default = api.layouts("llama-3-8b", gpus=32, gpu="h100-80gb", batch_size=4, seq_len=4096)
    assert all(c.layout.virtual == 1 for c in default.candidates)
    interleaved = [c for c in plan_interleaved.candidates if c.layout.virtual > 1]
    assert interleaved and all(c.layout.schedule == "interleaved-1f1b" and c.layout.virtual == 2 and c.layout.pp > 1
                               for c in interleaved)
    assert "interleaved x2" in interleaved[0].layout.label
    # interleaved alone: the 1F1B pipelines still bound the search, but are not among the layouts
    only = api.layouts("llama-3-8b", gpus=32, gpu="h100-80gb", batch_size=4, seq_len=4096,
                       plan_schedules="interleaved-1f1b")
    assert all(c.layout.virtual == 2 for c in only.candidates if c.layout.pp > 1)
    assert any(c.layout.pp > 1 for c in only.candidates) and any(c.layout.pp == 1 for c in only.candidates)


def test_interleaved_bubble_and_sends_by_hand(plan_interleaved):
    """Narayanan et al. 2021 (sec. 2.2.2): with v stages a rank the pipeline bubble is (p - 1) / (v m) of the ideal
    step, so (p - 1) / (v m + p - 1) of the whole; each micro-batch crosses v times as many stage boundaries."""
    c = next(c for c in plan_interleaved.candidates if c.layout.virtual == 2)
    pp, m = c.layout.pp, c.layout.microbatches
    assert c.parts["bubble_fraction"] == pytest.approx((pp - 1) / (2 * m + pp - 1), rel=1e-12)
    plain = next(p for p in plan_interleaved.candidates if p.layout.virtual == 1 and
                 (p.layout.dp, p.layout.tp, p.layout.pp, p.layout.sharding, p.layout.checkpointing) ==
                 (c.layout.dp, c.layout.tp, c.layout.pp, c.layout.sharding, c.layout.checkpointing))
    assert c.parts["pipeline_s"] == pytest.approx(2 * plain.parts["pipeline_s"], rel=1e-12)


def _layout_peaks(layout_args: dict) -> tuple[int, int, int]:
    """Llama-3-8B over 32 GPUs at 4 x 4096 in one layout: the planner's peak with interleaved 1F1B, the engine's own
    most loaded rank of it (every rank walked), and the planner's peak with 1F1B."""
    from memcalc import planner
    from memcalc.engine import estimate

    plan = api.plan_of("llama-3-8b", gpus=32, batch_size=4, seq_len=4096)
    model, base = plan.model, plan.specs[0]
    interleaved = planner._spec_for(base, planner.Layout(**layout_args, schedule="interleaved-1f1b", virtual=2))
    plain = planner._spec_for(base, planner.Layout(**layout_args))
    return (planner._peak(model, interleaved), estimate(model, interleaved).per_gpu.peak_bytes,
            planner._peak(model, plain))


LAYOUTS = [{"dp": 32 // (tp * pp), "tp": tp, "pp": pp, "sharding": sharding, "checkpointing": ckpt,
            "microbatches": 2 * pp} for tp, pp, sharding, ckpt in
           [(1, 4, "fsdp", "none"), (2, 4, "ddp", "full"), (1, 8, "zero1", "full"), (2, 2, "fsdp", "full")]]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"tp{layout['tp']}-pp{layout['pp']}-"
                         f"{layout['sharding']}-{layout['checkpointing']}")
def test_interleaved_layouts_read_the_most_loaded_rank_and_hold_at_least_1f1bs(layout):
    """The planner reads ranks 0, 1 and the last of an interleaved pipeline: the engine, walking every rank, finds no
    more. And the search skips an interleaved layout whose 1F1B layout does not fit: each holds at least its 1F1B
    layout's peak (torch's Interleaved1F1B warms rank r up with (v - 1) pp + 2 (pp - 1 - r) forwards of 1/v of its
    layers, at least the pp - r micro-batches 1F1B keeps)."""
    sampled, every_rank, plain = _layout_peaks(layout)
    assert sampled == every_rank
    assert sampled >= plain


@pytest.mark.parametrize(("options", "message"), [
    (["--gpus", "32", "--gpu", "h100-80gb", "--plan", "--plan-schedules", "zero-bubble"],
     "--plan-schedules 'zero-bubble': --plan searches 1f1b and interleaved-1f1b"),
    (["--gpus", "32", "--plan-schedules", "interleaved-1f1b"],
     "--plan-schedules says which pipeline schedules the layout search tries: add --plan"),
])
def test_bad_plan_schedules_are_one_line_exit_2(cli, options, message):
    result = cli("llama-3-8b", *options)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_megatrons_layouts_are_searched_under_its_engine(cli):
    """--engine megatron --plan: Megatron-LM's DDP or distributed optimizer over the data-parallel ranks, its even split
    of the 80 layers (pp 1, 2, 4, 8, 16 divide them), 1F1B, no context or expert parallelism; each layout's memory is
    --engine megatron's estimate of it (the planner's _peak: stages 0, 1 and the last)."""
    plan = api.layouts("llama-3-70b", gpus=64, gpu="h100-80gb", engine="megatron")
    assert plan.fitting and {c.layout.sharding for c in plan.candidates} == {"megatron-ddp", "megatron-distopt"}
    assert all(80 % c.layout.pp == 0 and c.layout.cp == c.layout.ep == c.layout.virtual == 1 for c in plan.candidates)
    assert {c.layout.pp for c in plan.candidates} == {1, 2, 4, 8, 16}
    c = next(c for c in plan.fitting if c.layout.pp == 4 and c.layout.sharding == "megatron-distopt")
    report = api.estimate("llama-3-70b", engine="megatron", gpus=64, tp=c.layout.tp, pp=4, zero=1,
                          sp=c.layout.tp > 1, loss_parallel=c.layout.tp > 1, microbatches=c.layout.microbatches,
                          checkpointing=c.layout.checkpointing)
    assert c.peak_bytes == report.per_gpu.peak_bytes
    # Llama-3.1-405B's 126 layers divide by no pp past 2: Megatron's first and last stage take fewer
    # (--decoder-first/last-pipeline-num-layers), 7 + 14 x 8 + 7 at pp 16, the middle stages' count dividing evenly
    assert pipeline.megatron_ends(126, 16) == 7 and pipeline.megatron_ends(126, 8) == 15
    assert pipeline.megatron_ends(80, 16) == 0 and pipeline.megatron_ends(32, 3) == 0  # (divides; no such count)
    plan = api.layouts("llama-3.1-405b", gpus=512, gpu="h100-80gb", engine="megatron")
    uneven = [c for c in plan.candidates if c.layout.pp == 16]
    assert uneven and all(c.layout.pp_ends == 7 for c in uneven) and "7 layers first and last" in uneven[0].layout.label
    refused = cli("llama-3-70b", "--engine", "megatron", "--gpus", "64", "--gpu", "h100-80gb", "--plan",
                  "--plan-schedules", "1f1b,interleaved-1f1b")
    assert refused.exit_code == 5 and "its interleaved schedule is not modelled yet" in refused.stderr
    assert "drop --zero" in cli("llama-3-70b", "--engine", "megatron", "--zero", "1", "--gpus", "64", "--gpu",
                                "h100-80gb", "--plan").stderr


def test_the_printed_flags_estimate_each_layout(cli, plan_405b):
    """Each layout's flags (planner.layout_flags), given to the command without --plan, give the planner's own peak:
    before, a label alone left out --sp and --loss-parallel (every tp layout's) and the sharding engine, and
    'dp 4 fsdp x tp 8 x pp 16' estimated as its label reads came out 107.00 GiB against the plan's 65.90 GiB."""
    shown = plan_405b.fitting[:3] + [c for c in plan_405b.fitting if c.layout.sharding == "fsdp"][:1]
    for c in shown:
        result = cli("llama-3.1-405b", "--gpu", "h100-80gb", "--seq-len", "8192", *c.flags.split(), "--json")
        assert result.exit_code == 0, (c.flags, result.stderr)
        assert result.json()["per_gpu"]["peak_bytes"] == c.peak_bytes, c.flags
    printed = cli("llama-3.1-405b", "--gpus", "512", "--gpu", "h100-80gb", "--seq-len", "8192", "--plan").stdout
    assert " ".join(f"#1: {plan_405b.fitting[0].flags}".split()) in " ".join(printed.split())
