"""--engine megatron: Megatron-LM's DDP and distributed optimizer per GPU (memcalc.megatron).

The expected figures are Megatron's own: bytes per parameter from its distributed-optimizer guide
(docs/source/api-guide/dist_optimizer.md: bf16 parameters with fp32 gradients 18, or 6 + 12/d with the distributed
optimizer; fp32 16, or 8 + 8/d), its vocabulary padding (make_vocab_size_divisible_by 128 x tp) and its buffers'
padding rules (param_and_grad_buffer.py: each bucket of max(40M, 1M x d) parameters ends at a multiple of
lcm(d, 128)); Llama-3 shapes from its config.json. Megatron needs CUDA, so these are checks against its documented
arithmetic, not measurements.
"""

from __future__ import annotations

import math

import pytest

from memcalc.api import compare_with, estimate, model_input
from memcalc.errors import UnsupportedModelError, UsageError

LLAMA3_8B = 8_030_261_248  # parameters: every dimension a multiple of 64, the vocabulary (128,256) of 128
BUCKETS_8B = math.ceil(LLAMA3_8B / 40_000_000)  # 201 buckets of the distributed optimizer's 40M


def _states(report) -> dict[str, int]:
    terms = {t.name: t for t in report.per_gpu.terms}
    adam = terms["optimizer_states"].breakdown
    return {"weights": terms["weights"].bytes, "gradients": terms["gradients"].bytes,
            "master": terms["master_weights"].bytes if "master_weights" in terms else 0,
            "adam": adam["exp_avg"] + adam["exp_avg_sq"]}


@pytest.mark.parametrize(("precision", "per_param"), [("bf16", 18), ("fp32", 16)])
def test_ddp_holds_megatrons_bytes_per_parameter(precision, per_param):
    report = estimate("llama-3-8b", engine="megatron", precision=precision, gpus=8, zero=0)
    states = _states(report)
    assert sum(states.values()) == per_param * LLAMA3_8B
    assert states["gradients"] == 4 * LLAMA3_8B  # fp32 main gradients under bf16 too


@pytest.mark.parametrize(("precision", "whole", "sharded"), [("bf16", 6, 12), ("fp32", 8, 8)])
def test_distributed_optimizer_holds_megatrons_bytes_per_parameter(precision, whole, sharded):
    """6 + 12/d (bf16) and 8 + 8/d (fp32) of the buffer, which is the parameters and 127 elements of end padding per
    bucket (lcm(8, 128) = 128)."""
    buffer = LLAMA3_8B + 127 * BUCKETS_8B
    report = estimate("llama-3-8b", engine="megatron", precision=precision, gpus=8, zero=1)
    states = _states(report)
    assert states["weights"] + states["gradients"] == whole * buffer
    assert states["master"] + states["adam"] == sharded * math.ceil(buffer / 8)


def test_gradient_buffer_is_alive_in_forward():
    """Megatron allocates its main-gradient buffer once and zeroes it between steps: the forward runs beside it."""
    report = estimate("llama-3-8b", engine="megatron", gpus=8, zero=1)
    gradients = next(t for t in report.per_gpu.terms if t.name == "gradients")
    assert "forward" in [p.value for p in gradients.phases]
    forward = next(p for p in report.per_gpu.phases if p.phase.value == "forward")
    assert forward.breakdown["gradients"] == gradients.bytes


def test_tensor_parallel_pads_the_vocabulary_and_shards_the_embedding_gradient():
    """tp 8: 128,256 rows padded to 129,024 (a multiple of 1,024), 16,128 on each rank, the gradient its rows only
    (VocabParallelEmbedding), unlike torch's whole one."""
    report = estimate("llama-3-8b", engine="megatron", gpus=8, tp=8, sp=True)
    # a rank's layer: q and o 512 x 4096, k and v 128 x 4096, gate, up and down 1792 x 4096, its two norms whole
    layer = 2 * 512 * 4096 + 2 * 128 * 4096 + 3 * 1792 * 4096 + 2 * 4096
    assert report.model.num_params == 32 * layer + 2 * 16128 * 4096 + 4096  # embedding and head of 16,128 rows
    torch_tp = estimate("llama-3-8b", gpus=8, tp=8, sp=True)
    assert torch_tp.model.num_params == 32 * layer + 2 * 16032 * 4096 + 4096  # torch.chunk: ceil(128,256 / 8) rows
    grads = {r: next(t for t in x.per_gpu.terms if t.name == "gradients").bytes
             for r, x in (("megatron", report), ("torch", torch_tp))}
    assert grads["megatron"] == 4 * report.model.num_params  # fp32, each rank's own rows
    assert grads["torch"] == 2 * (torch_tp.model.num_params + (128256 - 16032) * 4096)  # bf16, the embedding's whole
    assert any("padded from 128,256 to 129,024" in note for note in report.notes)


def test_megatrons_own_formula_differs_by_the_norms_and_the_padding():
    """Llama-3-70B, tp 8 with SP, 8 data-parallel ranks, distributed optimizer: memcalc's model states and Megatron's
    theoretical_memory_usage.py agree but for the norms (whole on every tensor-parallel rank, divided by tp in the
    formula: (80 x 2 + 1) x 8192 x 7/8 parameters) and the buffers' end padding (the rank's 8.8B parameters in 221
    buckets of 127 elements), both at 6 + 12/8 B per parameter."""
    model = model_input("llama-3-70b", None)
    report = estimate("llama-3-70b", engine="megatron", gpus=64, tp=8, sp=True, zero=1, checkpointing="full")
    row = compare_with("megatron", model, report)[0]
    per_param = 6 + 12 / 8
    norms = (80 * 2 + 1) * 8192 * 7 / 8 * per_param
    padding = 221 * 127 * per_param
    assert abs(row.memcalc_bytes - row.tool_bytes - norms - padding) < 64, (row.memcalc_bytes, row.tool_bytes)
    assert "--engine megatron" in row.why


@pytest.mark.parametrize(("options", "error", "message"), [
    (["--zero", "2"], UnsupportedModelError, "Megatron's own FSDP"),
    (["--precision", "bf16-pure"], UsageError, "Megatron trains in fp32 or bf16"),
    (["--pp", "2", "--pp-schedule", "gpipe"], UsageError, "Megatron-LM has no GPipe schedule"),
    (["--pp", "2", "--pp-schedule", "interleaved-1f1b"], UnsupportedModelError, "interleaved schedule"),
    (["--cp", "2"], UnsupportedModelError, "Megatron's context and expert parallelism are not modelled yet"),
    (["--optim-impl", "foreach"], UsageError, "FusedAdam"),
    (["--fsdp"], UsageError, "drop --fsdp or --sharding"),
    (["--checkpointing", "selective-op"], UsageError, "estimate it with none, an upper bound"),
    (["--lora-rank", "8"], UsageError, "--lora-rank with --engine megatron is not modelled yet"),
    (["--verify=cpu-tracker"], UsageError, "drop --verify"),
    (["--emit", "deepspeed"], UsageError, "a DeepSpeed config does not run"),
])
def test_what_megatrons_engine_does_not_run_is_one_line(cli, options, error, message):
    result = cli("llama-3-8b", "--engine", "megatron", "--gpus", "8", *options)
    assert result.exit_code == error.exit_code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_unknown_engine(cli):
    result = cli("llama-3-8b", "--engine", "jax")
    assert result.exit_code == 2 and "--engine 'jax' is not one of torch, megatron" in result.stderr
