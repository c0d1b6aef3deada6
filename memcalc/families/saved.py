"""What a family's rules return (``Rule``), the run they are evaluated for (``Run``), and the saved-tensor
counts several families share (norms, LayerNorm, activation functions, dropout masks, eager softmax).

A family's ``activations(arch, run)`` follows its transformers (5.25) modeling code tensor by tensor, in the
dtypes CUDA uses; each layer's bytes are given by part (norms, attention, MLP, autocast casts, dropout masks) so
the report can break the activations term down. Notation: T = micro_batch * seq_len tokens, h hidden, c bytes
of the compute dtype, r bytes of the residual stream (fp32 under autocast, else c).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from memcalc.units import BYTES_PER_FP32

# CUDA's native_layer_norm keeps mean and rstd in fp32 (opmath) whatever the input dtype; the CPU kernel keeps
# them in the input dtype (a CPU/GPU difference the tests account for).
BYTES_PER_LAYER_NORM_STAT = BYTES_PER_FP32
# Activation functions transformers computes with several saved elementwise ops (NewGELUActivation:
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))): the input, tanh, 1 + tanh and the product are saved.
PYTHON_GELUS = ("gelu_new",)

# Parts of a layer, in the activations term's breakdown.
PART_NORMS = "norms"
PART_ATTENTION = "attention"
PART_MLP = "mlp"
PART_CASTS = "autocast input casts"
PART_DROPOUT = "dropout masks"
# Parts of the per-model tensors.
PART_IDS = "token ids and labels"
PART_ROTARY = "rotary tables"
PART_EMBEDDINGS = "embeddings"
PART_FINAL_NORM = "final norm"
PART_HEAD = "head input"
PART_LOSS_SCALARS = "loss scalars"
PART_ROUTING = "router aux loss"
PART_LOGIT_SOFTCAP = "final logit softcapping"
PART_PROJECTIONS = "embedding projections"  # OPT-350m project_in / project_out inputs


# Bytes per score at an fp32 softmax's backward beside its saved output: the incoming gradient, the output, and the
# temporary CUDA's kernel makes of their product (aten/src/ATen/native/cuda/SoftMax.cu softmax_backward_cuda_out)
SOFTMAX_BACKWARD_FP32 = 3 * BYTES_PER_FP32


# --padded with --attn flash: transformers' flash path unpads instead of masking (not modelled)
FLASH_PADDED_NOTE = ("rows padded (--padded) with flash_attention_2: its unpadding of q, k and v to the batch's real "
                     "tokens (modeling_flash_attention_utils._upad_input) is not modelled; counted unpadded")


@dataclass(eq=False, repr=False)
class Run:
    """The shapes and dtypes of one micro-batch's forward."""

    b: int
    s: int
    c: int  # bytes of the compute dtype
    autocast: bool
    eager: bool  # --attn eager (else sdpa/flash)
    # sdpa on CUDA's math path (fp32, grouped heads: memcalc.activations.sdpa_runs_math): eager's saves without its
    # mask; eager is then set too (the rules count it so), and a trace runs sdpa with CUDA's kernel choice emulated
    sdpa_math: bool = False
    flash: bool = False  # --attn flash (flash_attention_2: sliding windows and causality without a mask)
    checkpointing: bool = False  # gradient checkpointing (transformers then runs with use_cache=False)
    decoder_s: int | None = None  # encoder-decoder models: decoder tokens per sequence (None: s)
    repeat_kv: bool = False  # --repeat-kv: k and v repeated to every query head before sdpa (torchtune's attention)
    padded: bool = False  # --padded: rows padded to the longest, so attention gets the batch's padding mask
    tp: int = 1  # --tp: tensor-parallel ranks sharing each layer (heads and MLP features split)
    sp: bool = False  # --sp: the norms' regions split along the sequence across the tp ranks
    loss_parallel: bool = False  # --loss-parallel: the head's logits stay split over the vocabulary into the loss
    cp: int = 1  # --cp: context-parallel ranks sharing each sequence (s is this rank's share; attention is the ring)
    ep: int = 1  # --ep: expert-parallel ranks splitting each MoE layer's experts (tokens exchanged all-to-all)
    ep_load: float = 1.0  # --ep-load: the rank's routed pairs received per MoE layer over the average (T x top-k)
    # The transformers release whose code the step runs, (major, minor), for the families whose rules follow more than
    # one (Family.release_dependent: the installed one, installed_transformers); None: the newest the rules know.
    transformers: tuple[int, int] | None = None

    @property
    def sequence_tokens(self) -> int:
        """Tokens of the residual stream one rank holds: all of them, or its split of the sequence (--sp; torch.chunk
        gives rank 0 ceil(s / tp) positions)."""
        return self.b * -(-self.s // self.tp) if self.sp else self.tokens

    @property
    def tokens(self) -> int:
        return self.b * self.s

    @property
    def decoder_len(self) -> int:
        """Decoder tokens per sequence (encoder-decoder models): --decoder-seq-len, else the sequence length."""
        return self.s if self.decoder_s is None else self.decoder_s

    @property
    def residual(self) -> int:
        """Bytes of the residual stream: fp32 under autocast (fp32 weights), else the compute dtype."""
        return BYTES_PER_FP32 if self.autocast else self.c


@functools.cache
def installed_transformers() -> tuple[int, int] | None:
    """The installed transformers' (major, minor), from the name of the first transformers-*.dist-info on sys.path
    (importlib.metadata's search order; nothing imported: importlib.metadata alone costs an estimate ~0.1 s); None
    when absent or unreadable."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            found = re.fullmatch(r"transformers-(\d+)\.(\d+)[^-]*\.dist-info", name)
            if found:
                return int(found[1]), int(found[2])
    return None


LOSS_SOURCE = ("transformers loss_utils.ForCausalLMLoss: logits.float() then cross_entropy; log_softmax saves its "
               "output. HF Trainer drops the model output (and its logits) before backward")


@dataclass(eq=False, repr=False)
class Loss:
    """The logits and the cross-entropy over them: rows x vocab, and the dtype log_softmax saves."""

    rows: int
    vocab: int
    bytes_per_log_softmax: int  # 4: the loss upcasts (ForCausalLMLoss, CUDA autocast); else the logits' dtype
    source: str = LOSS_SOURCE


@dataclass(eq=False, repr=False)
class Rule:
    """What one family's forward saves: per layer by part (forward order), per model by part, and the loss.

    kept: checkpointing full: what the forward keeps instead of the layers' activations (their inputs);
    transient: a layer's gradient transients at its MLP's backward (its widest gradients);
    attention_transient: ... at its attention's backward, where they outgrow the MLP's (its MLP's activations are
    released by then);
    recompute: checkpointing: the largest recompute in backward (default: the largest layer);
    held: tensors no op saves that the model's outputs keep alive through the loss (HF Trainer drops the outputs
    after it): the DynamicCache's k and v copies, an fp32 last hidden state whose head input is a cast.
    """

    layers: list[Mapping[str, int]]
    formula: str  # the first layer's bytes, part by part
    per_model: Mapping[str, int]
    source: str
    kept: int
    transient: int
    loss: Loss | None
    notes: list[str] = field(default_factory=list)
    recompute: int | None = None
    held: int = 0
    attention_transient: int = 0  # a layer's attention backward transients beyond the MLP's (sdpa's math backend)
    # What a layer makes after its attention beyond its MLP's part (the norms after attention, the MLP's input, o_proj's
    # input copy): not yet there at its attention's forward, released by its attention's backward. Given where a
    # moment needs it (--cp's ring attention); 0: not counted off.
    after_attention: int = 0
    # What a layer's backward has released by its eager attention's softmax backward beyond its MLP's part (its largest
    # moment): what it made after attention (as after_attention) and what the probabilities' matmul saved, the 16-bit
    # probabilities and v. 0: not counted off.
    released_at_scores: int = 0
    # ... and the gradients waiting there beside softmax's own (the residual stream's, v's).
    held_at_scores: int = 0
    # ... and the bytes per score there beside softmax's saved output: its incoming gradient, its output and CUDA's
    # temporary (softmax_backward_cuda_out's grad * output, the incoming gradient's size: memcalc.measure.cuda_semantics
    # softmax_backward_like_cuda) (fp32 softmax: 3 x 4; GPT-2's and Falcon's in the scores' dtype; with attention
    # dropout, its backward's, where the mask is still alive, may be the larger).
    scores_backward_bytes: int = SOFTMAX_BACKWARD_FP32
    # A layer's backward transients at its first op, every activation of the layer alive and none of its gradients made
    # yet, where they outgrow its MLP's (Gemma2/3's post-feed-forward norm, a MoE block's restore). 0: none beyond.
    opening_transient: int = 0
    # ... the last layer's (the first in backward; under checkpointing the largest, the one counted recomputed), where it
    # differs (None: opening_transient): DeepSeek-V2's MoE layers above dense first ones (first_k_dense_replace), whose
    # restore's backward opens the top layer's while the first layer's late turn is a dense MLP's.
    last_opening_transient: int | None = None
    # The layer's norm backward between its MLP's and its attention's (the post-attention / pre-feed-forward RMSNorm,
    # in fp32 through autograd): its transients less what is released by then beyond the MLP's activations (the MLP's
    # input, the norm's normalised input). 0: not modelled.
    mid_norm_transient: int = 0
    # What the layer's backward has released by its MLP's peak (Gemma2/3: the post-feed-forward norm's saves; GPT-2: the
    # output projection's input). 0: none.
    released_at_mlp: int = 0
    # ... the last layer's, where it differs (None: released_at_mlp). Not checkpointed, the last layer's backward has
    # released its output projection's saved input by its MLP's peak (GPT-2, BLOOM; found by the traced step) while the
    # first layer's late moment, measured, still holds it.
    released_at_last_mlp: int | None = None
    # The part of ``transient`` that is the layer's output gradient (held for the skip connection through its MLP's
    # backward): a pipeline stage's last layer gets it as the stage's receive buffer, counted there.
    output_gradient: int = 0
    # Checkpointing, eager attention: the score-sized tensors (and others) a layer's checkpointed forward holds at its
    # softmax beyond its saves counted up to there (None: the scores, c b a s^2).
    forward_scores: int | None = None
    # Checkpointing: what the checkpointed layers hold as arguments beside their inputs (sdpa with a sliding window
    # shorter than the sequence: the boolean mask, 1 B per (query, key)). 0: nothing.
    checkpoint_arguments: int = 0
    # Checkpointing, eager attention: how many 4-D additive masks (b, 1, s, s) the checkpointed layers hold as arguments:
    # one, or two in a stack of sliding-window and full-attention layers (each kind gets its own mask).
    eager_masks: int = 1
    # Checkpointing: the bytes of a recomputed layer's saves that are its kept input itself (an input norm that saves an
    # fp32 input as it is): counted once, with the kept inputs. 0: the layer saves its own copy.
    recompute_saves_input: int = 0
    # A layer's tensors while its forward runs beyond what it saves, at their largest (the MoE block's output being
    # put back in token order): counted where a checkpointed layer's forward runs, first in the forward, then its
    # recomputation at the start of backward. 0: none beyond.
    forward_transient: int = 0

    def layer_bytes(self, index: int) -> int:
        return sum(self.layers[index].values())

    @property
    def per_model_bytes(self) -> int:
        return sum(self.per_model.values())


def final_hidden_held(run: Run, hidden_size: int) -> int:
    """Rule.held of a decoder under autocast: the final norm's output is fp32 (the residual stream is) and is the
    outputs' last_hidden_state through the loss, while the head's Linear saves its own cast of it (found by the
    traced step, memcalc/measure/timeline.py)."""
    return BYTES_PER_FP32 * run.tokens * hidden_size if run.autocast else 0


def unsaved_cache_copies(run: Run, num_heads: int, num_kv_heads: int, head_dim: int, repeated_path: bool) -> int:
    """One layer's share of Rule.held with a cache (use_cache, not checkpointing): DynamicLayer.update concatenates k
    (after rotary: fp32 under autocast, cos and sin being fp32) and v into copies of its own, which attention saves
    itself unless repeat_kv expands them to every head (``repeated_path``: eager, or sdpa with an explicit mask, and
    fewer kv heads than heads: the expanded copies are saved instead) or autocast casts k (the cast is saved)."""
    repeated = repeated_path and num_heads != num_kv_heads
    k_bytes = BYTES_PER_FP32 if run.autocast else run.c
    k_held = k_bytes if repeated or run.autocast else 0
    return run.tokens * num_kv_heads * head_dim * (k_held + (run.c if repeated else 0))


def parts(**named: int) -> dict[str, int]:
    """A layer's or the model's parts, zero ones left out; keyword names map to the PART_* labels."""
    labels = {"norms": PART_NORMS, "attention": PART_ATTENTION, "mlp": PART_MLP, "casts": PART_CASTS,
              "dropout": PART_DROPOUT, "ids": PART_IDS, "rotary": PART_ROTARY, "embeddings": PART_EMBEDDINGS,
              "final_norm": PART_FINAL_NORM, "head": PART_HEAD, "loss_scalars": PART_LOSS_SCALARS,
              "routing": PART_ROUTING, "logit_softcap": PART_LOGIT_SOFTCAP, "projections": PART_PROJECTIONS}
    return {labels[key]: value for key, value in named.items() if value}


def act_bytes(activation: str, c: int, numel: int) -> int:
    """An activation between two Linears: what it saves plus its output (saved by the next Linear).

    ReLU saves its result, the tensor the next Linear saves too (1 x); fused F.gelu / silu save their input
    beside the output (2 x); NewGELUActivation (gelu_new) saves input, tanh, 1 + tanh and product, and the
    next Linear the output (5 x).
    """
    if activation == "relu":
        return c * numel
    return (5 if activation in PYTHON_GELUS else 2) * c * numel


def dropout_mask(probability: float, numel: int) -> int:
    """CUDA native_dropout keeps a 1-byte bool mask per element (the CPU saves noise in the input dtype: the
    tests account for it); 0 when the probability is 0."""
    return numel if probability > 0 else 0


def layer_norm(run: Run, th: int, input_bytes: int | None = None) -> int:
    """nn.LayerNorm: its input (the residual stream: fp32 under autocast) and mean/rstd (CUDA: fp32, 2 x 4 T)."""
    return (run.residual if input_bytes is None else input_bytes) * th + 2 * BYTES_PER_LAYER_NORM_STAT * run.tokens


def linear_input(run: Run, th: int, readers: int) -> int:
    """A norm output read by `readers` Linears: saved once in c; under autocast (an fp32 output) each Linear
    saves its own c cast."""
    return (readers if run.autocast else 1) * run.c * th


def eager_probs(run: Run, scores: int, fp32_softmax: bool) -> int:
    """Saved softmax output: softmax(dtype=fp32).to(c) keeps the fp32 output and its c copy (in fp32 the same
    tensor); a softmax in the compute dtype keeps its c output."""
    if fp32_softmax:
        return (BYTES_PER_FP32 + (run.c if run.c != BYTES_PER_FP32 else 0)) * scores
    return run.c * scores


def fp32_softmax_dropout(probability: float, run: Run, scores: int) -> int:
    """Attention dropout after softmax(dtype=fp32).to(c) (eager): the mask (1 B on CUDA), and the dropped probs the
    matmul saves instead of the c copy - new bytes only where that copy was the fp32 softmax output itself."""
    if not probability > 0:
        return 0
    return scores + (BYTES_PER_FP32 * scores if run.c == BYTES_PER_FP32 and not run.autocast else 0)


def rms_norm_bytes(gemma: bool, tokens: int, h: int, c: int, autocast: bool) -> int:
    """Bytes one RMSNorm saves for backward (modeling_llama.LlamaRMSNorm / modeling_gemma.GemmaRMSNorm).

    Llama: x.to(fp32) (4Th; pow and mul save it), rsqrt (4T), the normalized input cast back to the input
    dtype (cTh, saved by the weight multiply) and the output (cTh, saved by the next Linear).
    Gemma: x.float(), rsqrt, the fp32 normalized product (weight multiply in fp32), (1 + weight) in fp32
    (4h) and the output in c. Under autocast the input is fp32, the normalized product stays fp32 and the
    fp32 output is not saved (each Linear saves its own cast instead).
    """
    extra = BYTES_PER_FP32 * h if gemma else 0
    if autocast:
        return 8 * tokens * h + BYTES_PER_FP32 * tokens + extra
    if gemma:
        return (8 + c) * tokens * h + BYTES_PER_FP32 * tokens + extra
    return (4 + 2 * c) * tokens * h + BYTES_PER_FP32 * tokens


def norm_own_bytes(gemma: bool, run: Run, h: int) -> int:
    """What one RMSNorm saves but its output (rms_norm_bytes less the c output a following Linear saves), over the
    tokens this rank normalizes (--sp: its split of the sequence)."""
    tokens = run.sequence_tokens
    return rms_norm_bytes(gemma, tokens, h, run.c, run.autocast) - (0 if run.autocast else run.c * tokens * h)


def loss_vocab(vocab: int, run: Run) -> int:
    """Columns of the logits one rank's loss sees: the whole vocabulary, or its split with --loss-parallel."""
    return -(-vocab // run.tp) if run.loss_parallel else vocab


def head_note(architecture: str, modelled: str) -> list[str]:
    """A note when the activations follow another head class than the one the config names."""
    if architecture == modelled:
        return []
    return [f"activations follow {modelled} (its head and loss); {architecture} has another head: an approximation"]
