"""Megatron-LM's own memory estimate reproduced (arithmetic, no imports): megatron/training/theoretical_memory_usage.py
``report_theoretical_memory`` (``compute_weight_and_optimizer_memory`` and ``compute_activation_memory`` /
``compute_activation_memory_without_sp``), for dense decoders of the Llama layout, and the term-by-term view beside
memcalc's estimate of the same layout (``--compare-with megatron``).

What Megatron counts, per GPU of its most loaded shard (the first pipeline stage):
  weights and optimizer  (L layers / pp + the embedding [+ the untied head without pp]) / tp parameters x 18 B
                         (bf16 weight, fp32 main gradient, fp32 master, Adam's two fp32 states), or 6 + 12 / dp B
                         with the distributed optimizer; parameters from the config as Megatron counts them (gated MLP
                         3/2 x 2 h ffn, attention 2 h^2 (1 + groups / heads), RMSNorm h, the vocabulary padded to a
                         multiple of 128 x tp)
  activations            sequence parallelism with selective recompute: s b h (18 + 4 ffn / h) per layer x L, plus the
                         embedding's input and dropout for pp micro-batches, x min(1, M / pp), plus (pp = 1) the output
                         layer's input and the loss, / tp (Korthikanti et al., Table 2); otherwise s b h (10 + 24 / tp)
                         per layer, the same extras, the logits / tp in 2 B, x 1.05 (Megatron's 5% allowance)
"""

from __future__ import annotations

from memcalc.compat import ACTIVATION_TERMS, ComparisonRow, memcalc_term_bytes
from memcalc.errors import UsageError
from memcalc.megatron import padded_vocab
from memcalc.report import Report
from memcalc.vocab import TERM_GRADIENTS, TERM_MASTER, TERM_OPTIMIZER_STATES, TERM_WEIGHTS


def theoretical_memory(arch, *, tp: int, pp: int, dp: int, micro_batch: int, seq: int, microbatches: int | None,
                       sequence_parallel: bool, selective_recompute: bool, distributed_optimizer: bool
                       ) -> tuple[float, float]:
    """Megatron's (weight and optimizer bytes, activation bytes) of its most loaded shard."""
    h, heads, groups = arch.hidden_size, arch.num_heads, arch.num_kv_heads
    ffn, layers = arch.intermediate_size, arch.num_layers
    kv_channels = arch.head_dim
    attention = 2 * h * h * ((1 + groups / heads) * (kv_channels * heads / h))
    layer = 2 * h * (ffn * 3 / 2 + 1) + attention  # swiglu's 3/2, RMSNorm's one vector per norm
    vocab = padded_vocab(arch.vocab_size, tp)
    embedding = h * vocab
    block = layer * layers + h  # the final norm
    shard = (block / pp + embedding) / tp
    if not arch.tie_word_embeddings and pp == 1:
        shard += embedding / tp
    per_parameter = 6 + 12 / dp if distributed_optimizer else 18
    weights_and_optimizer = shard * per_parameter
    sbh = seq * micro_batch * h
    if sequence_parallel and selective_recompute:
        activations = sbh * (18 + 4 * ffn / h) * layers
    else:
        activations = sbh * (10 + 24 / tp) * layers
    activations += 8 * seq * micro_batch * pp + sbh * pp  # the embedding's input and its dropout
    if pp > 1 and microbatches is not None:
        activations *= min(1, microbatches / pp)
    if sequence_parallel and selective_recompute:
        if pp == 1:
            activations += sbh * 4 * (1 + vocab / h)
        activations /= tp
    else:
        if pp == 1:
            activations += (seq * micro_batch * vocab / tp + sbh) * 2
        activations *= 1.05
    return weights_and_optimizer, activations


def compare_with_megatron(report: Report, arch) -> list[ComparisonRow]:
    t = report.training
    if t.pp_virtual > 1:
        raise UsageError("{compare_with} megatron with {pp_schedule} interleaved-1f1b: memcalc's interleaved rank is "
                         "not put beside Megatron's virtual-pipeline formula yet; drop one of them")
    if t.cp > 1:
        raise UsageError("{compare_with} megatron with {cp}: Megatron's theoretical_memory_usage.py has no context-"
                         "parallel term to compare with; drop one of them")
    if t.ep > 1:
        raise UsageError("{compare_with} megatron with {ep}: memcalc's expert-parallel rank (transformers' all-to-all "
                         "plan under FSDP2) is not put beside Megatron's expert-parallel formula yet; drop one of them")
    selective = t.checkpointing != "none"
    states, activations = theoretical_memory(
        arch, tp=t.tp, pp=t.pp, dp=t.num_gpus // (t.tp * t.pp), micro_batch=t.micro_batch_size, seq=t.seq_len,
        microbatches=t.microbatches if t.pp > 1 else None, sequence_parallel=t.sequence_parallel,
        selective_recompute=selective, distributed_optimizer=t.zero_stage >= 1)
    ours_states = memcalc_term_bytes(report, TERM_WEIGHTS, TERM_MASTER, TERM_GRADIENTS, TERM_OPTIMIZER_STATES)
    ours_acts = memcalc_term_bytes(report, *ACTIVATION_TERMS)
    stage = f"stage {t.pp_stage}" if t.pp > 1 else "the one stage"
    formula = ("SP with selective recompute (Korthikanti Table 2)" if t.sequence_parallel and selective
               else "without SP: s b h (10 + 24 / tp) per layer, x 1.05")
    return [
        ComparisonRow(
            "weights, gradients, optimizer states", ours_states, round(states),
            "Megatron counts 18 B per parameter (fp32 main gradients; 6 + 12/dp with its distributed optimizer) of "
            "the first stage's shard, the embedding with it; " + (
                "memcalc (--engine megatron) counts the same bytes per parameter of the rank's own tensors: it holds "
                "the norms whole (the formula divides them by tp) and the buffers' alignment padding"
                if t.sharding == "megatron" else
                f"memcalc counts {stage}'s tensors in the recipe's dtypes ({t.precision}: {t.grad_dtype} gradients) "
                "and the token embedding's whole gradient under tensor parallelism")),
        ComparisonRow(
            "activations (all micro-batches held)", ours_acts, round(activations),
            f"Megatron: {formula}, for Megatron's own fused kernels and its recompute granularity; memcalc: the "
            "transformers class's saved tensors (its RMSNorm's fp32 copies, rotary outputs, sdpa's saves), per "
            f"micro-batch held by {stage}, with {t.checkpointing} checkpointing"),
        ComparisonRow(
            "peak per GPU", report.per_gpu.peak_bytes, round(states + activations),
            f"Megatron adds its two figures; memcalc's peak is the step's largest moment ({report.per_gpu.peak_phase.value}: "
            "transients, buffers and the loss's gradients included)"),
    ]
