"""llm-analysis's training-memory estimate reproduced (arithmetic, no imports): cli99/llm-analysis 0.2.2 (commit d841e40,
llm_analysis/analysis.py ``LLMAnalysis.training`` and the per-layer functions it calls), for dense decoders of the
Llama layout, and the term-by-term view beside memcalc's estimate of the same layout (``--compare-with
llm-analysis``).

What llm-analysis counts, per GPU (s sequence, b micro-batch, h hidden, a heads, f ffn, V vocabulary, L layers, t
tensor-parallel, p pipeline, d data-parallel ranks, sp = t with sequence parallelism else 1; w16a16e16: 2-byte
weights, activations and embedding; fp32 layernorm activations, master weights and gradients):
  parameters   attention 2 h^2 + 2 h (h kv' / a), kv' = max(kv / t, 1) t; gated MLP 3 h f; norms 2 h per layer, h last;
               the embedding h V once (its head is not counted)
  weights      2 B x (attention / t + MLP / t + norms) per layer x floor(L / p) + the embedding / t + the last norm / t,
               each / d under ZeRO-3
  gradients    4 B x (attention + MLP + norms) / t per layer (+ embedding, last norm), / d under ZeRO-2/3
  optimizer    12 B x (MLP / t + attention / t + norms) per layer (+ embedding / t, last norm / t), / d under ZeRO >= 1
  activations  per layer, no recompute: attention (sbh / sp + 4 sbh / t) 2 B + flash (2 sbh + 4 a s b) 2 B / t (eager:
               2 a s^2 b 2 B / t) + a 1-byte dropout mask sbh / sp; MLP sbh / sp 2 B + 2 x 2 B x (f / h) sbh / t; two
               norms sbh / sp 4 B; full recompute: sbh 2 B / t; x L (every layer: the first stage holds p micro-batches
               of L / p layers under 1F1B), + the embedding's output h b s 2 B / t, the logits V b s 2 B / t, the last
               norm sbh / sp 4 B
  peak         optimizer + weights + max(activations, gradients) + max(2 layers' weights prefetched, the logits'
               gradient V b s 2 B / t)
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.compat import ACTIVATION_TERMS, ComparisonRow, memcalc_term_bytes
from memcalc.errors import UsageError
from memcalc.report import Report
from memcalc.vocab import TERM_GRADIENTS, TERM_MASTER, TERM_OPTIMIZER_STATES, TERM_WEIGHTS

BYTES_16 = 2  # w16a16e16: weights, activations and the embedding in 16 bits
LAYERNORM_BYTES = 4  # training(layernorm_dtype_bytes=4)
MASTER_BYTES = 4  # training(master_weights_dtype_bytes=4): the gradients' bytes too
OPTIMIZER_BYTES = 12  # other_op_bytes None: 4 (fp32 master) + 2 x 4 (Adam's two states)


@dataclass(frozen=True)
class LlmAnalysisMemory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    prefetch: float  # two layers' weights gathered ahead (fwd_prefetch and bwd_prefetch, both on by default)
    loss_backward: float  # the logits' gradient

    @property
    def peak(self) -> float:
        return (self.optimizer + self.weights + max(self.activations, self.gradients)
                + max(self.prefetch, self.loss_backward))


def training_memory(arch, *, tp: int, pp: int, dp: int, micro_batch: int, seq: int, sequence_parallel: bool,
                    zero: int, flash: bool, full_recompute: bool) -> LlmAnalysisMemory:
    """llm-analysis's per-GPU figures for a gated (SwiGLU) dense decoder."""
    h, heads, kv, ffn = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.intermediate_size
    vocab, layers = arch.vocab_size, arch.num_layers
    sp = tp if sequence_parallel else 1
    kv_eff = max(kv / tp, 1) * tp
    attention = 2 * h * h + 2 * h * (h * kv_eff / heads)
    mlp = 3 * h * ffn  # mlp_gated_linear_units
    norms = 2 * h
    embedding = h * vocab
    local_layers = int(layers / pp)
    shard_w = dp if zero == 3 else 1
    shard_o = dp if zero >= 1 else 1
    shard_g = dp if zero >= 2 else 1
    layer_weights = attention * BYTES_16 / tp + mlp * BYTES_16 / tp + norms * BYTES_16
    weights = (layer_weights / shard_w * local_layers + embedding / tp * BYTES_16 / shard_w
               + h * BYTES_16 / tp / shard_w)
    optimizer = ((OPTIMIZER_BYTES * mlp / tp + OPTIMIZER_BYTES * (attention / tp + norms)) / shard_o * local_layers
                 + OPTIMIZER_BYTES * embedding / tp / shard_o + OPTIMIZER_BYTES * h / tp / shard_o)
    gradients = (MASTER_BYTES * (mlp + attention + norms) / tp / shard_g * local_layers
                 + MASTER_BYTES * embedding / tp / shard_g + MASTER_BYTES * h / tp / shard_g)
    sbh = seq * micro_batch * h
    if full_recompute:
        per_layer = sbh * BYTES_16 / tp
    else:
        if flash:
            compute = (2 * sbh + 4 * heads * seq * micro_batch) * BYTES_16 / tp
        else:
            compute = 2 * heads * seq * seq * micro_batch * BYTES_16 / tp
        attn = (sbh / sp + 4 * sbh / tp) * BYTES_16 + compute + sbh / sp
        mlp_acts = BYTES_16 * sbh / sp + (BYTES_16 + BYTES_16) * (ffn / h) * sbh / tp
        per_layer = attn + mlp_acts + 2 * sbh / sp * LAYERNORM_BYTES
    logits = vocab * micro_batch * seq * BYTES_16 / tp
    activations = per_layer * layers + h * micro_batch * seq * BYTES_16 / tp + logits + sbh / sp * LAYERNORM_BYTES
    return LlmAnalysisMemory(weights, gradients, optimizer, activations, prefetch=2 * layer_weights,
                             loss_backward=logits)


def compare_with_llm_analysis(report: Report, arch) -> list[ComparisonRow]:
    t = report.training
    if t.pp_virtual > 1:
        raise UsageError("{compare_with} llm-analysis with {pp_schedule} interleaved-1f1b: the comparison does not "
                         "cover interleaved schedules yet; drop one of them")
    if t.cp > 1:
        raise UsageError("{compare_with} llm-analysis with {cp}: llm-analysis has no context parallelism to compare "
                         "with; drop one of them")
    if t.ep > 1:
        raise UsageError("{compare_with} llm-analysis with {ep}: the comparison does not cover expert parallelism yet; "
                         "drop one of them")
    if t.precision == "fp32":
        raise UsageError("{compare_with} llm-analysis models 16-bit training (its dtype configs have no 32-bit "
                         "weights or activations): use a 16-bit {precision}")
    if t.checkpointing not in ("none", "full"):
        raise UsageError(f"{{compare_with}} llm-analysis: its recompute levels have no {t.checkpointing} "
                         "checkpointing: use none or full")
    dp = t.num_gpus // (t.tp * t.pp)
    theirs = training_memory(arch, tp=t.tp, pp=t.pp, dp=dp, micro_batch=t.micro_batch_size, seq=t.seq_len,
                             sequence_parallel=t.sequence_parallel, zero=t.zero_stage,
                             flash=t.attention != "eager", full_recompute=t.checkpointing == "full")
    ours_weights = memcalc_term_bytes(report, TERM_WEIGHTS)
    ours_states = memcalc_term_bytes(report, TERM_MASTER, TERM_OPTIMIZER_STATES)
    ours_grads = memcalc_term_bytes(report, TERM_GRADIENTS)
    ours_acts = memcalc_term_bytes(report, *ACTIVATION_TERMS)
    where = f"stage {t.pp_stage}'s" if t.pp > 1 else "this rank's"
    return [
        ComparisonRow(
            "weights", ours_weights, round(theirs.weights),
            f"llm-analysis: 16-bit weights of floor(L / pp) layers and the embedding (its head not counted), norms not "
            f"split by tp; memcalc: {where} tensors in the recipe's dtype ({t.weight_dtype}), the untied head "
            "included"),
        ComparisonRow(
            "gradients", ours_grads, round(theirs.gradients),
            f"llm-analysis: fp32 gradients (master_weights_dtype_bytes 4); memcalc: {t.grad_dtype} gradients as the "
            "recipe keeps them, the token embedding's whole under tensor parallelism"),
        ComparisonRow(
            "optimizer states (with the fp32 master)", ours_states, round(theirs.optimizer),
            f"llm-analysis: 12 B per parameter (fp32 master and Adam's two states) whatever the optimizer; memcalc: "
            f"{t.optimizer}'s states in {t.state_dtype} and the master the recipe keeps"),
        ComparisonRow(
            "activations (all micro-batches held)", ours_acts, round(theirs.activations),
            "llm-analysis: Korthikanti-style per-layer bytes (K and V at the full hidden width, a 1-byte attention "
            "dropout mask, fp32 layernorm inputs) x every layer, the embedding's output and the 16-bit logits; "
            "memcalc: the transformers class's saved tensors and the fp32 loss"),
        ComparisonRow(
            "peak per GPU", report.per_gpu.peak_bytes, round(theirs.peak),
            "llm-analysis: optimizer + weights + max(activations, gradients) + max(two prefetched layers, the "
            f"logits' gradient); memcalc: the step's largest moment ({report.per_gpu.peak_phase.value})"),
    ]
