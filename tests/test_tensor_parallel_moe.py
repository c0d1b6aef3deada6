"""Tensor parallelism on MoE decoders (--tp on Mixtral, Qwen2-MoE, Qwen3-MoE): torchtitan's plan for MoE blocks without
expert parallelism (apply_moe_ep_tp, TensorParallel on the experts), against the same styles applied to the real
transformers class (memcalc.measure.tensor_parallel) on one rank of a fake process group, and on real gloo ranks."""

from __future__ import annotations

import pytest

from memcalc.api import model_input, model_of, run
from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.tiny import tiny_raw

# Mixtral-8x7B's config (presets, mistralai/Mixtral-8x7B-v0.1): hidden 4096, 8 experts of intermediate 14336, 32
# layers, 32 heads of 128, 8 kv heads, vocabulary 32000, untied head. One of 8 tensor-parallel ranks, by hand: the
# embedding and the head split over the vocabulary, q and o 4096 x 4096 / 8, k and v 1024 x 4096 / 8, each expert's
# gate_up (2 x 14336 x 4096) and down (4096 x 14336) / 8, the router (8 x 4096) and the two norms whole.
EMBED_8 = 32000 // 8 * 4096
LAYER_8 = (2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 3 * 14336 * 4096) // 8 + 8 * 4096 + 2 * 4096
RANK_PARAMS_8 = 2 * EMBED_8 + 32 * LAYER_8 + 4096


def _terms(report) -> dict[str, int]:
    return {t.name: t.bytes for t in report.per_gpu.terms}


def test_one_mixtral_rank_holds_its_share_of_every_expert():
    report = run(model_input("mixtral-8x7b", None), TrainingSpec(precision="bf16-pure", num_gpus=8, tp=8))
    terms = _terms(report)
    assert terms["weights"] == 2 * RANK_PARAMS_8
    assert terms["optimizer_states"] == 2 * 2 * RANK_PARAMS_8
    # (the token embedding's gradient whole on every rank, as for the dense models: DTensor's embedding backward)
    assert terms["gradients"] == 2 * (RANK_PARAMS_8 - EMBED_8 + 32000 * 4096)
    assert any("TensorParallel on the experts" in note for note in report.notes)


def test_experts_activations_split_by_features():
    """Per MoE layer the experts' intermediate tensors (gate_up output 2 e S I, silu's output and the product e S I
    each: 4 e S I over the S = T x top-k pairs) take 1/tp; the router's and the pairs' gathered rows do not."""
    spec = {"precision": "bf16-pure", "micro_batch_size": 1, "seq_len": 2048}
    whole = _terms(run(model_input("mixtral-8x7b", None), TrainingSpec(**spec)))["activations"]
    split = _terms(run(model_input("mixtral-8x7b", None), TrainingSpec(**spec, num_gpus=8, tp=8)))["activations"]
    tokens, inter, c, heads = 2048, 14336, 2, 32
    pairs = 2 * tokens
    experts = 4 * c * pairs * inter
    attention = c * tokens * (4096 + 2 * 1024) + c * tokens * 4096 + 4 * tokens * heads  # q, k, v, out, lse
    assert whole - split == 32 * (experts - experts // 8 + attention - attention // 8)


@pytest.mark.parametrize(("options", "message"), [
    # a Qwen3-MoE whose experts' width (66) does not split 4 ways, where its heads do
    (["--tp", "4", "--gpus", "4"], "--tp 4 does not divide the model's 66 experts' features"),
    (["--tp", "2", "--gpus", "8", "--ep", "2", "--fsdp", "--pp", "2"], "--ep with --tp and --pp is not modelled yet"),
])
def test_bad_moe_layouts_are_one_line_exit_2(cli, tmp_path, options, message):
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**tiny_raw("qwen3_moe"), "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "moe_intermediate_size": 66}))
    result = cli(str(config), *options)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and result.stdout == ""


def test_with_expert_parallelism_the_experts_width_need_not_divide(cli, tmp_path):
    """Under --ep the experts stay whole, so the 66-wide experts that --tp 4 alone refuses (above) are no refusal with
    --ep 4; the run line names the ranks splitting them."""
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**tiny_raw("qwen3_moe"), "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "moe_intermediate_size": 66}))
    result = cli(str(config), "--tp", "4", "--gpus", "4", "--ep", "4", "--fsdp")
    assert result.exit_code == 0, result.stderr
    assert "4 ranks (1 data- x 4 tensor-parallel) splitting the experts" in " ".join(result.stdout.split())


def test_the_planner_tries_tp_with_ep_where_tp_alone_cannot_split_the_experts(tmp_path):
    """The same 66-wide Qwen3-MoE (4 experts) on 8 GPUs: --tp 4 alone is no layout (its experts' width does not split 4
    ways), but --tp 4 with --ep 4 is (the experts whole; ep a multiple of tp that divides the experts)."""
    import json

    from memcalc import api

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**tiny_raw("qwen3_moe"), "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "moe_intermediate_size": 66}))
    plan = api.layouts(str(config), gpus=8, gpu="h100-80gb", seq_len=256)
    at_tp4 = {c.layout.ep for c in plan.candidates if c.layout.tp == 4}
    assert at_tp4 == {4}


def test_a_dense_width_no_layer_uses_need_not_divide():
    """Qwen3-MoE with every layer sparse never builds its dense MLP: intermediate_size 100 with --tp 8 is no refusal
    (the experts' 768 and the 8 kv heads divide)."""
    raw = {**tiny_raw("qwen3_moe"), "num_attention_heads": 8, "num_key_value_heads": 8, "moe_intermediate_size": 768,
           "intermediate_size": 100}
    report = run(model_of(ModelConfig("tiny", raw, "test")), TrainingSpec(num_gpus=8, tp=8))
    # (and the width is unused: the estimate is the same with a width 8 ranks can split)
    divisible = run(model_of(ModelConfig("tiny", {**raw, "intermediate_size": 96}, "test")),
                    TrainingSpec(num_gpus=8, tp=8))
    assert report.per_gpu.peak_bytes == divisible.per_gpu.peak_bytes
    with pytest.raises(UsageError, match="does not divide the model's 100 dense layers' MLP features"):
        run(model_of(ModelConfig("tiny", {**raw, "decoder_sparse_step": 2}, "test")), TrainingSpec(num_gpus=8, tp=8))


def test_megatron_engine_with_tp_on_a_moe_model_is_one_line_exit_5(cli):
    result = cli("mixtral-8x7b", "--tp", "8", "--gpus", "8", "--engine", "megatron", "--zero", "1",
                 "--precision", "bf16")
    assert result.exit_code == UnsupportedModelError.exit_code, result.stderr
    assert "Megatron's MoE layer" in result.stderr and result.stderr.count("\n") == 1


# -- against the plan applied to the transformers class ------------------------------------------------------------
def _measure(family: str, spec: TrainingSpec, engine: str, world_size: int, method: str = "fake"):
    from memcalc.measure import cuda_semantics
    from memcalc.measure.distributed import measure_distributed

    raw = tiny_raw(family)
    report = run(model_of(ModelConfig("tiny", raw, "test")), spec)
    with cuda_semantics.like_cuda():
        measured = measure_distributed({**raw, "_name": "tiny"}, spec, engine=engine, world_size=world_size,
                                       method=method, sequence_parallel=spec.sequence_parallel,
                                       loss_parallel=spec.loss_parallel, like_cuda=method == "fake")
    return report, measured


# Measured 2026-12-04 (python benchmarks/tensor_parallel.py --families mixtral,qwen3_moe,qwen2_moe --layouts
# 2,2sp,2sp-lp --precision bf16-pure,amp-bf16,fp32): without checkpointing every cell within 0.06% of its rank, but the
# gathered logits' (see tests/test_tensor_parallel.py); checkpointed cells over by up to 4.83% (Mixtral bf16-pure),
# which the un-split Mixtral cell shares (+2.6%).
@pytest.mark.parametrize(("family", "precision", "checkpointing", "sp"), [
    ("mixtral", "bf16-pure", "none", False),
    ("qwen3_moe", "amp-bf16", "none", True),
    ("qwen2_moe", "bf16-pure", "none", False),  # the dense layer 0 and the shared expert of layer 1
    ("qwen2_moe", "fp32", "full", False),
])
def test_moe_rank_matches_the_plan_on_the_transformers_class(family, precision, checkpointing, sp):
    pytest.importorskip("transformers")
    spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=256, checkpointing=checkpointing,
                        num_gpus=2, tp=2, sequence_parallel=sp, loss_parallel=sp)
    report, ranks = _measure(family, spec, "tp", 2)
    measured = ranks[0]
    assert measured.run["distributed"]["tp_moe_layers"] == (1 if family == "qwen2_moe" else 2)
    terms = _terms(report)
    for name in ("weights", "gradients", "optimizer_states"):
        assert terms[name] == measured.model_state_bytes[name], name
    if not precision.startswith("amp"):  # (autocast's casts are split among the terms differently; the peak has all)
        # (the estimate counts the token ids and labels as activations, the measurement as the batch: 2 x 8 x 512 + 4)
        assert terms["activations"] - measured.term_bytes["activations"] == 2 * 8 * 512 + 4
    peak, measured_peak = report.per_gpu.peak_bytes, measured.measured_peak_bytes
    # (the Qwen3-MoE cell peaks in loss parallelism's log-softmax, 2,288 B or 0.03% above the estimate: small tensors
    # there not placed; 0.14% before its three fp32 values a row and the padded labels were counted)
    assert -0.0005 * measured_peak <= peak - measured_peak < 0.001 * measured_peak, (peak, measured_peak)
    assert report.per_gpu.peak_phase.value == measured.measured_peak_phase


def test_fsdp2_over_tensor_parallel_moe_ranks():
    """FSDP2 over the data-parallel dimension of a (dp 2, tp 2) mesh: the experts' tensor-parallel shards sharded
    again over dp, to the byte."""
    pytest.importorskip("transformers")
    spec = TrainingSpec(precision="bf16", micro_batch_size=2, seq_len=256, num_gpus=4, tp=2, sharding="fsdp",
                        zero_stage=3)
    report, ranks = _measure("mixtral", spec, "fsdp2", 4)
    terms = _terms(report)
    for name in ("weights", "gradients", "optimizer_states"):
        assert terms[name] == ranks[0].model_state_bytes[name], name
    peak, measured_peak = report.per_gpu.peak_bytes, ranks[0].measured_peak_bytes
    assert 0 <= peak - measured_peak < 0.001 * measured_peak, (peak, measured_peak)


def test_real_gloo_ranks_of_a_tensor_parallel_moe():
    """Two gloo ranks with real values: the experts' reordered gate/up rows, the router's replicated tuple output, the
    block's partial sums reduce-scattered."""
    pytest.importorskip("transformers")
    spec = TrainingSpec(precision="fp32", micro_batch_size=2, seq_len=256, num_gpus=2, tp=2, sequence_parallel=True,
                        loss_parallel=True)
    report, ranks = _measure("mixtral", spec, "tp", 2, method="gloo")
    for measured in ranks:
        assert _terms(report)["weights"] == measured.model_state_bytes["weights"]
        # (measured over 4 runs: -188 B or -2,236 B, the order gloo's threads free a collective's buffers)
        assert abs(report.per_gpu.peak_bytes - measured.measured_peak_bytes) < 0.001 * measured.measured_peak_bytes


# -- --ep with --tp: transformers' layout ------------------------------------------------------------------------
def test_planner_searches_expert_parallelism_over_tensor_parallel_groups():
    """Qwen3-30B-A3B (48 MoE layers, 128 experts, top 8, hidden 2048) on 64 H100s at 4,096 positions: beside --ep alone
    the planner tries --ep with --tp (ep a multiple of tp). tp 2 x ep 8: a rank sends its slice's pairs (4 L M (ep-1)/ep
    x T/tp x top-k x h x 2 B, by hand) and all-gathers the tp ranks' outputs (2 L M (tp-1)/tp x T x h x 2 B, NVLink);
    its dense parameters are split over tp 2 and synced over dp 32, its experts (1/8, whole) over the 64 x ... / 8 = 8
    ranks holding the same ones; the memory is that layout's estimate."""
    from memcalc import api
    from tests.test_planner import qwen3_30b_a3b_plan

    plan = qwen3_30b_a3b_plan()  # (api.layouts("qwen3-30b-a3b", gpus=64, gpu="h100-80gb", seq_len=4096), made once)
    found = {(c.layout.tp, c.layout.ep) for c in plan.candidates if c.layout.ep > 1 and c.layout.tp > 1}
    assert found and all(ep % tp == 0 for tp, ep in found)
    wanted = (2, 8, 1, "full", 0)
    layout = next(c for c in plan.candidates
                  if (c.layout.tp, c.layout.ep, c.layout.pp, c.layout.checkpointing, c.layout.ep_dim) == wanted)
    assert layout.layout.dp == 32
    pairs = 4096 // 2 * 8 * 2048 * 2
    gathered = 2 * 48 * 1 / 2 * 4096 * 2048 * 2 / 450e9
    assert layout.parts["expert_parallel_s"] == pytest.approx(4 * 48 * 7 / 8 * pairs / 450e9 + gathered, rel=1e-12)
    # the tensor-parallel all-reduces: each layer's attention output only (its MoE block's outputs are all-gathered),
    # forward and backward: (4 x 48 - 2 x 48) x 2 (tp-1)/tp x T x h x 2 B over NVLink
    assert layout.parts["tensor_parallel_s"] == pytest.approx((4 * 48 - 2 * 48) * 1 * 4096 * 2048 * 2 / 450e9,
                                                              rel=1e-12)
    model = model_input("qwen3-30b-a3b", None)
    params = sum(t.numel for t in model.tensors)
    experts = sum(t.numel for t in model.tensors if t.role == "expert")
    synced = 31 / 32 * (params - experts) / 2 + 7 / 8 * experts / 8
    assert layout.parts["data_parallel_s"] == pytest.approx(3 * synced * 2 / 50e9, rel=1e-12)
    report = api.estimate("qwen3-30b-a3b", gpus=64, tp=2, ep=8, sharding="fsdp", zero=3, checkpointing="full",
                          seq_len=4096, sp=True, loss_parallel=True)
    assert layout.peak_bytes == report.per_gpu.peak_bytes


def test_experts_stay_whole_with_expert_parallelism():
    """--ep 8 --tp 2 on Mixtral-8x7B (64 GPUs, dp 32): the experts are not tensor-split (transformers' experts are
    never tensor-sharded under expert parallelism): a rank's expert weights are one whole expert per layer (2 x 14336 x
    4096 + 4096 x 14336 = 176,160,768 params) over the 8 ranks holding it, on dim 1 (ceil(28672 / 8) and 4096 / 8
    rows); and the note names the layout."""
    mixtral = model_input("mixtral-8x7b", None)
    report = run(mixtral, TrainingSpec(precision="bf16-pure", num_gpus=64, tp=2, ep=8, ep_shard_dim=1,
                                       sharding="fsdp", zero_stage=3))
    without_ep = run(mixtral, TrainingSpec(precision="bf16-pure", num_gpus=64, tp=2, sharding="fsdp", zero_stage=3))
    experts_rank = 32 * (3584 * 4096 + 512 * 14336)  # (per layer: gate_up 28672 / 8 rows, down 4096 / 8 rows)
    # without --ep every expert is split over tp 2 and its shard over dp 32 on dim 0 (8 experts: ceil(8 / 32) = 1 row
    # of an expert's (14336, 4096) gate_up share and (4096, 7168) down share)
    experts_split = 32 * (14336 * 4096 + 4096 * 7168)
    weights, weights_split = _terms(report)["weights"], _terms(without_ep)["weights"]
    assert weights - weights_split == 2 * (experts_rank - experts_split)
    assert any("--tp 2 the expert-parallel groups span the tensor-parallel ranks" in n for n in report.notes)


def test_expert_and_tensor_parallel_ranks_on_gloo():
    """4 gloo ranks, dp 2 x tp 2, the experts over ep 4 (every rank its own), or with the 2 data-parallel ranks sharing
    each sequence (--cp 2, 2 x 128 positions) over ep 2 (efsdp 2): every pair routed to one rank (weights zero); the
    most loaded rank's states to the byte and the busiest rank's peak within 1% below and 3% above (python benchmarks/expert_parallel.py
    --tp 2 [--sp | --cp]: 168 rank steps, -0.05% to +18.5% since the gradient waiting at the last layer's output is
    counted at the first recomputation (before, checkpointed Qwen2-MoE cells down to -1.6%); these two cells, not
    checkpointed, read +0.01% and +0.67%)."""
    pytest.importorskip("transformers")
    from memcalc.measure.distributed import measure_distributed

    for family, ep, precision, cp in (("mixtral", 4, "bf16", 1), ("qwen2_moe", 2, "bf16-pure", 2)):
        raw = {**tiny_raw(family), "initializer_range": 0.0}
        spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=64 * cp, num_gpus=4, tp=2, ep=ep, cp=cp,
                            sharding="fsdp", zero_stage=3)
        ranks = measure_distributed(raw, spec, engine="fsdp2", world_size=4, method="gloo")
        received = max(max(m.run["distributed"]["ep_received_pairs"]) for m in ranks)
        # (each rank sends its slice's 64 tokens x 2 pairs, every pair to the same two experts: the rank holding them
        # receives twice that, from 4 senders or 2)
        assert received == 2 * 64 * 2
        busiest = max(ranks, key=lambda m: m.measured_peak_bytes)
        report = run(model_of(ModelConfig("tiny", raw, "test")), spec.replace(ep_load=received / (64 * 2)))
        terms = _terms(report)
        # (each state term against the rank holding the most of it, the rank the estimate describes: Qwen2-MoE's two
        # most loaded ranks peak 25 KB apart, and under load the one measured higher has varied, its optimizer states
        # 384 B fewer; 2026-12-05, cause not found)
        for name in ("weights", "gradients", "optimizer_states"):
            assert terms[name] == max(m.model_state_bytes[name] for m in ranks), (family, name)
        error = report.per_gpu.peak_bytes / busiest.measured_peak_bytes - 1
        assert -0.01 <= error <= 0.03, (family, error)


@pytest.mark.parametrize("sp, measured", [(False, 1_420_196), (True, 1_333_668)])
def test_the_first_recomputation_holds_the_gradient_waiting_at_the_last_layer(sp, measured):
    """A checkpointed Qwen2-MoE rank on 4 gloo ranks (dp 2 x tp 2, ep 2, random routing: 184 of 128 pairs received)
    peaks at the last layer's recomputation, at its combine, with the gradient the final norm's backward handed that
    layer's output waiting (24,576 B; its 12,288 B split under --sp). measured: that rank's peak in
    `python benchmarks/expert_parallel.py --tp 2 [--sp] --families qwen2_moe --routing random --checkpointing full`
    (docs/accuracy.md, the --ep with --tp tables); the estimate read -0.81% and -0.86% before the gradient was counted."""
    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=2, seq_len=64, num_gpus=4, tp=2, ep=2,
                        sequence_parallel=sp, loss_parallel=sp, sharding="fsdp", zero_stage=3, checkpointing="full",
                        ep_load=184 / 128)
    report = run(model_of(ModelConfig("tiny", tiny_raw("qwen2_moe"), "test")), spec)
    assert report.per_gpu.peak_phase.value == "backward"
    assert 0 <= report.per_gpu.peak_bytes / measured - 1 <= 0.02
