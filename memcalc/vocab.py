"""The words a report is made of: term names, phases, categories. Used by the engine, the families' rules,
the engines of parallelism, the report and the renderers alike; imports nothing of memcalc.

A term is one named piece of memory (``weights``, ``activations``...); a phase is a moment of the training
step (forward, backward, optimizer step); a category groups terms for the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

TERM_WEIGHTS = "weights"
TERM_MASTER = "master_weights"
TERM_GRADIENTS = "gradients"
TERM_OPTIMIZER_STATES = "optimizer_states"
TERM_AUTOCAST_COPIES = "autocast_weight_copies"
TERM_AUTOCAST_CHECKPOINTED = "autocast_cache_checkpointed"
TERM_ZERO3_GATHERED = "zero3_gathered_params"
TERM_ZERO3_GATHERED_GRADS = "zero3_unit_grads"
TERM_ZERO3_FP32_GRADS = "zero3_fp32_grad_buffer"
TERM_ZERO_REDUCE_BUCKET = "zero_reduce_bucket"
TERM_ZERO_OFFLOAD_GRAD_BUFFER = "zero_offload_grad_buffer"
TERM_FSDP_UNSHARDED = "fsdp_unsharded_params"
TERM_FSDP_ALL_GATHER = "fsdp_all_gather_buffer"
TERM_FSDP_REDUCE_SCATTER = "fsdp_reduce_scatter"
TERM_FSDP_SHARDED_GRADIENTS = "fsdp_sharded_gradients"  # --pp: reduce-scattered at the schedule's end, for the step
TERM_DDP_BUCKETS = "ddp_buckets"
TERM_PIPELINE_BUFFERS = "pipeline_recv_buffers"
TERM_PIPELINE_OUTPUTS = "pipeline_stage_outputs"
TERM_PIPELINE_SENT = "pipeline_sent_tensors"  # sent but not yet waited on (their send work holds them)
TERM_PIPELINE_FORWARD_END = "pipeline_last_layer_end"  # a stage without the head: its last layer's last add
TERM_PIPELINE_LAST_INPUT = "pipeline_last_input"  # Megatron: the model keeps it (and its grad) past the schedule
TERM_PIPELINE_PREVIOUS_INPUT = "pipeline_previous_input"  # Megatron: reached through the previous output's graph
TERM_PIPELINE_RECEIVED_GRADIENT = "pipeline_received_output_gradient"  # Megatron: the backward's, received for it
TERM_PIPELINE_SENT_GRADIENT = "pipeline_sent_input_gradient"  # 1F1B: the previous backward's, still referenced
TERM_PIPELINE_WEIGHT_BACKWARD_INPUTS = "pipeline_weight_backward_inputs"  # zero-bubble: kept for the W half
TERM_PIPELINE_HELD_ACTIVATIONS = "pipeline_held_activations"
TERM_PIPELINE_HELD_LOSSES = "pipeline_held_losses"
TERM_PIPELINE_OTHER_STAGES = "pipeline_other_stages"  # interleaved: the rank's other stages' model states
TERM_PIPELINE_OTHER_STAGES_HELD = "pipeline_other_stages_held"  # ... their micro-batches, buffers and casts
TERM_OFFLOADED_PARAMS = "offloaded_params"
TERM_OFFLOADED_ACTIVATIONS = "offloaded_activations"
TERM_ACTIVATIONS = "activations"
TERM_LOSS_BUFFERS = "logits_and_loss"
TERM_MASTER_GRAD_COPY = "fp32_grad_copy"
TERM_OPTIMIZER_TEMPORARIES = "optimizer_temporaries"
TERM_FP8_CASTS = "fp8_casts"
MODEL_STATE_TERMS = (TERM_WEIGHTS, TERM_MASTER, TERM_GRADIENTS, TERM_OPTIMIZER_STATES)


class Phase(str, Enum):
    forward = "forward"
    backward = "backward"
    optimizer_step = "optimizer_step"
    load = "load"  # the model's load and preparation, before the first step (in phases only when it is the peak)


PHASE_LABELS = {Phase.forward: "forward", Phase.backward: "backward", Phase.optimizer_step: "optimizer step",
                Phase.load: "load"}


# Term.category values.
CATEGORY_MODEL_STATES = "model_states"
CATEGORY_TEMPORARIES = "temporaries"
CATEGORY_ACTIVATIONS = "activations"
CATEGORY_CPU_OFFLOAD = "cpu_offload"  # what offload moves to CPU RAM: reported apart, never in a GPU phase

# The phases a term is alive in, named once for every module that builds terms.
FORWARD_ONLY = [Phase.forward]
BACKWARD_ONLY = [Phase.backward]
FORWARD_BACKWARD = [Phase.forward, Phase.backward]
BACKWARD_AND_STEP = [Phase.backward, Phase.optimizer_step]
STEP_ONLY = [Phase.optimizer_step]
ALL_PHASES = [Phase.forward, Phase.backward, Phase.optimizer_step]


@dataclass(eq=False, repr=False)
class Term:
    name: str
    bytes: int
    formula: str  # with the numbers substituted
    source: str  # paper, seed or implementation it follows
    category: str  # model_states | temporaries | activations | cpu_offload (in CPU RAM, not on the GPU)
    phases: list[Phase]  # phases of the step in which it is alive
    breakdown: dict[str, int] = field(default_factory=dict)  # e.g. exp_avg / exp_avg_sq for optimizer_states

    @property
    def in_cpu_ram(self) -> bool:
        return self.category == CATEGORY_CPU_OFFLOAD


# What is alive at a moment of the step besides whole terms (keys of PhaseTotal.breakdown), and the moments.
EXTRA_LOSS_LOGITS = "logits during the loss"
EXTRA_LOSS_GRADIENTS = "loss gradients"
EXTRA_RECOMPUTED_LAYER = "recomputed layer"
EXTRA_RECOMPUTED_CASTS = "recomputed layer's autocast casts"
EXTRA_LAYER_ACTIVATIONS = "one layer's activations"
EXTRA_REENTRANT_OUTPUT = "recomputed layer's output (reentrant)"
EXTRA_LAYER_GRADIENTS = "one layer's gradient transients"
EXTRA_SHARDED_LAYER = "sharded layer's gathered parameters and gradients"
EXTRA_FSDP_BACKWARD_START = "FSDP2 buffers held, gradients awaiting reduce-scatter"
EXTRA_EXPERTS_GATHERED = "a layer's experts gathered"
EXTRA_EXPERTS_ALL_GATHER = "the experts' all-gather output"
EXTRA_EXPERTS_REDUCE = "the experts' reduce-scatter"
EXTRA_FSDP_LAYER_ALL_GATHER = "the running layer's all-gather output"
EXTRA_HEAD_BACKWARD = "output head's backward"
EXTRA_HEAD_GRADIENT = "output head's weight gradient"
EXTRA_SHARED_GRADIENT_SUM = "tied embedding's gradient contributions"
EXTRA_HELD_OUTPUTS = "model outputs held through the loss"
EXTRA_TRACED_STEP = "activations, transients, buffers and batch (traced step)"
EXTRA_STAGE_FIRST_GRADIENT = "the stage's first weight gradient"
EXTRA_RING_ATTENTION = "ring attention's buffers"
EXTRA_HELD_CAST_GRADIENTS = "cast weights' gradients, held to the backward's end"
EXTRA_INPUT_BACKWARD_RETAINED = "the input backward's retained tensors"
EXTRA_LATER_EMBEDDING_GRADIENT = "the embedding's new gradient, before it is added"
EXTRA_LOAD_IN_FLIGHT = "a checkpoint tensor on the GPU before it is quantized"
EXTRA_LOAD_QUANTIZE = "its NF4 codes and absmax being made"
EXTRA_LOAD_TORCHAO_NF4 = "torchao's to_nf4 at work on it"
EXTRA_LOAD_UPCAST = "a 16-bit parameter beside its fp32 cast"
EXTRA_LOAD_UNIT = "an FSDP2 unit's parameters, whole, before fully_shard shards them"
EXTRA_LOAD_GATHERED = "a module's parameters gathered whole to load them"
EXTRA_LOAD_CONVERSION = "the checkpoint's per-expert tensors and their stacks, being merged"
# What each extra is and where it comes from (--explain prints it).
EXTRA_MEANING = {
    EXTRA_LOAD_IN_FLIGHT: "the load, QLoRA: transformers moves each checkpoint tensor to the GPU in the 16-bit compute "
                          "dtype and bitsandbytes quantizes it there (Params4bit._quantize); one at a time",
    EXTRA_LOAD_QUANTIZE: "the load, QLoRA: functional.quantize_4bit's packed codes and fp32 absmax, and with double "
                         "quantization absmax - offset and its own quantization, before the fp32 absmax is freed",
    EXTRA_LOAD_TORCHAO_NF4: "the load, torchtune's QLoRA: torchao's to_nf4 (NF4Tensor.from_tensor) of the largest "
                            "weight: its new int8 scalers, the per-block absmax, the weight scaled by it (bf16), the "
                            "uint8 code indices, and for one chunk of 2^20 elements the difference from each of the "
                            "16 codes and its absolute value (bf16)",
    EXTRA_LOAD_UPCAST: "the load: PEFT's prepare_model_for_kbit_training (or accelerate's FSDP2 mixed precision) sets "
                       "param.data = param.data.to(torch.float32), so the 16-bit tensor and its fp32 copy coexist",
    EXTRA_LOAD_UNIT: "the load, FSDP2 through accelerate: fully_shard moves the unit's parameters whole to the GPU "
                     "(_move_states_to_device) before FSDPParam makes this rank's padded shard",
    EXTRA_LOAD_CONVERSION: "the load, MoE: the checkpoint holds one tensor per expert; transformers' conversion "
                           "(conversion_mapping.py MergeModulelist, then Concatenate for gate_up_proj) stacks them "
                           "into the fused parameter while the per-expert tensors are still alive",
    EXTRA_LOAD_GATHERED: "the load, DeepSpeed ZeRO-3 through transformers: GatheredParameters over the module's own "
                         "parameters (modifier_rank=0) while rank 0 copies the checkpoint in",
    EXTRA_LATER_EMBEDDING_GRADIENT: "pipeline parallelism, the first stage, a micro-batch after the first: the "
                                    "embedding's backward (the stage's last) makes a new V x h gradient beside the one "
                                    "held from the earlier micro-batches, then adds it in (torch's AccumulateGrad); "
                                    "under autocast beside the held cast weights' gradients, whose own backward comes "
                                    "after it (measured on the fake process group at Llama-3-8B's size)",
    EXTRA_INPUT_BACKWARD_RETAINED: "pipeline parallelism, zero-bubble: an input backward runs with retain_graph=True "
                                   "(torch.distributed.pipelining _backward.py stage_backward_input), so none of the "
                                   "stage's saved tensors is released on the way: what its ordinary backward would "
                                   "have released by its largest moment, and that backward's largest transient",
    EXTRA_HELD_CAST_GRADIENTS: "pipeline parallelism under autocast, a micro-batch after the first: the Linear "
                               "weights' casts come from autocast's cache, made in the first micro-batch's forward, so "
                               "their backward nodes (ToCopyBackward0) carry the oldest sequence numbers and autograd's "
                               "engine runs them last (torch/csrc/autograd/engine.h, ReadyQueue's CompareNodeTaskTime: "
                               "the highest sequence number first); until then each weight's gradient waits in the "
                               "compute dtype, and then each is cast to the weight's dtype and added in turn "
                               "(measured on the fake process group running torch.distributed.pipelining)",
    EXTRA_RING_ATTENTION: "context parallelism: what torch's ring attention (_templated_ring_attention) holds while "
                          "the last layer's attention runs: k and v made contiguous, every rank's k and v all-gathered, "
                          "each block's output and log-sum-exp, the fp32 merged output and the merge's temporaries "
                          "(memcalc.context_parallel.ring_forward)",
    EXTRA_STAGE_FIRST_GRADIENT: "pipeline stages without the head: the first weight gradient the stage's backward makes "
                                "(its last layer's down_proj), beside that layer's gradient transients",
    EXTRA_HELD_OUTPUTS: "tensors no op saves that the forward's outputs keep until the loss is computed (HF "
                        "Trainer then drops them): the DynamicCache's k and v copies where attention saves other "
                        "copies (repeat_kv, autocast casts), and under autocast the fp32 last hidden state",
    EXTRA_TRACED_STEP: "at the traced step's largest op of this segment (memcalc/measure/timeline.py: the real "
                       "forward and backward under FakeTensorMode, op by op): the saved activations still held, the "
                       "recomputed layer and the gradients its backward makes on the way, the loss's buffers, autocast "
                       "copies, the model's buffers and the batch; the parameter gradients made so far are the "
                       "gradients term",
    EXTRA_LOSS_LOGITS: "the logits and their fp32 upcast while the loss runs (transformers loss_utils.ForCausalLMLoss: "
                       "logits.float(), then cross_entropy); gone before backward",
    EXTRA_LOSS_GRADIENTS: "the first gradients of backward: of the log-softmax output and of the logits, each the "
                          "logits' size (torch's log_softmax and linear backward)",
    EXTRA_RECOMPUTED_LAYER: "checkpointing: one layer's activations, recomputed for its backward "
                            "(torch.utils.checkpoint), alive until that layer's backward ends",
    EXTRA_RECOMPUTED_CASTS: "checkpointing under autocast: the recomputed layer casts its Linear weights again",
    EXTRA_REENTRANT_OUTPUT: "reentrant checkpointing: the recomputed layer's output, held by torch.utils.checkpoint's "
                            "CheckpointFunction.backward while backward runs through the layer",
    EXTRA_LAYER_ACTIVATIONS: "late in backward: the first layer's saved activations, still held while its backward "
                             "runs",
    EXTRA_LAYER_GRADIENTS: "the gradients a layer's backward makes on the way (its inputs' and intermediates'), "
                           "freed as it proceeds",
    EXTRA_SHARDED_LAYER: "FSDP2, during a layer's backward: the next layer prefetched, the layer's unsharded "
                         "gradients and their reduce-scatter copy, and its sharded gradient",
    EXTRA_FSDP_BACKWARD_START: "FSDP2 (reshard_after_forward): at the last layer's backward the layer before it "
                               "prefetched, late in backward the next layer's all-gather output (prefetched), the last "
                               "reduce-scatter's input (kept until the next reduce-scatter) and the layer's unsharded "
                               "gradients made so far; and the root "
                               "unit's unsharded gradients (the head's, the final norm's), which wait for the root's "
                               "reduce-scatter at the end of backward",
    EXTRA_EXPERTS_GATHERED: "--ep under FSDP2: a MoE layer's experts unsharded while they run (their own FSDP2 unit), "
                            "with their all-gather output where several ranks hold the same experts, and in the "
                            "forward the block's transients",
    EXTRA_FSDP_LAYER_ALL_GATHER: "FSDP2 resharding after forward, inside a layer's forward: the foreach all-gather "
                                 "output its parameters were copied out of, which FSDPParamGroup.wait_for_unshard "
                                 "keeps (AllGatherState) until the next unit's all-gather in the forward, beside the "
                                 "unsharded parameters (measured on the fake process group: a checkpointed fp32 "
                                 "layer's math-path attention)",
    EXTRA_EXPERTS_ALL_GATHER: "--ep under FSDP2, from the last layer's experts to the last layer's backward: their "
                              "all-gather output, kept until the next all-gather (FSDPParamGroup.wait_for_unshard), "
                              "beyond a layer's",
    EXTRA_EXPERTS_REDUCE: "--ep under FSDP2, at the last layer's experts' reduce-scatter (their own unit, mid-layer): "
                          "its input, output and divided output in the reduce dtype (and the sharded gradient with fp32 "
                          "shards), the layer before prefetched, the root's unsharded gradients, the layer's output "
                          "gradient and its MoE block's input gradient",
    EXTRA_HEAD_BACKWARD: "while the vocabulary head's backward runs: the logits' gradient beside its V x h weight "
                         "gradient as mm makes it (torch FunctionsManual.cpp mm_mat2_backward), then, under autocast, "
                         "that gradient beside its cast to the weight dtype (ToCopyBackward0); with a chunked loss, "
                         "two chunks' weight gradients and their first sum beside the logits gradients of the chunks "
                         "still to come (the loss's log-softmax outputs are gone by then)",
    EXTRA_HEAD_GRADIENT: "the vocabulary head's V x h weight gradient from the head's backward on, where no term holds "
                         "it yet: an untied head's p.grad before the gradients term is counted, or, for a head tied "
                         "to the token embedding, its contribution waiting in autograd's input buffer for the "
                         "embedding's (torch/csrc/autograd/input_buffer.cpp)",
    EXTRA_SHARED_GRADIENT_SUM: "a token embedding used twice (tied to the head, or shared by an encoder and a "
                               "decoder): autograd sums the V x h gradient contributions in its input buffer as each "
                               "later use's backward ends (input_buffer.cpp accumulate). The head's contribution is a "
                               "view of mm's result (mm_mat2_backward's transpose, then TBackward0), which the buffer "
                               "cannot reuse (can_accumulate_inplace: storage use_count 1), so it adds out of place "
                               "and both contributions and their sum coexist; a fresh contribution (autocast's cast, "
                               "a chunked loss's sum, an embedding's) takes the other in place",
}
MOMENT_FORWARD = "during the loss"
MOMENT_STAGE_FORWARD_END = "the stage's last layer's end"  # --pp, a stage without the head
MOMENT_CHECKPOINTED_FORWARD = "a checkpointed layer's forward"
MOMENT_RING_FORWARD = "the last layer's ring attention"
MOMENT_EXPERTS_FORWARD = "the last layer's experts"
MOMENT_EXPERTS_REDUCE = "the last layer's experts' reduce-scatter"
MOMENT_ROOT_REDUCE = "the root's reduce-scatter"
MOMENT_RING_RECOMPUTE = "the last layer's ring attention, recomputed"
MOMENT_BACKWARD_START = "start of backward"
MOMENT_BACKWARD_END = "end of backward"
MOMENT_LATE_BACKWARD = "late backward (first layer)"
# FSDP2 resharding after forward, three or more layers: the same moment at the second layer's turn (the first layer
# prefetched, neither layer's sharded gradients made yet: parallel._fsdp2's late_layers), or at the second layer from the
# top (every lower layer's checkpointed input kept, one layer's sharded gradients made: engine's fsdp_top)
MOMENT_LATE_BACKWARD_SECOND = "late backward (second layer)"
MOMENT_SECOND_TO_LAST_BACKWARD = "second-to-last layer's backward"
MOMENT_LAST_LAYER_BACKWARD = "last layer's backward"
MOMENT_SHARDED_LAYER = "a sharded layer's backward"
MOMENT_SHARED_GRADIENT_SUM = "tied embedding's gradient sum"
MOMENT_HEAD_BACKWARD = "output head's backward"
MOMENT_FIRST_SHARED_SUM = "tied embedding's first gradient sum (before the encoder's backward)"
MOMENT_STEP = "optimizer step"
MOMENT_STEP_IN_BACKWARD = "a parameter's step in backward"


# What --verify measures with (auto picks one of the others), and the tools --compare-with sets beside memcalc.
METHOD_CUDA = "cuda"
METHOD_CPU_TRACKER = "cpu-tracker"
METHOD_TRACE = "trace"
METHODS = (METHOD_CUDA, METHOD_CPU_TRACKER, METHOD_TRACE)
VERIFY_METHODS = ("auto", *METHODS)
COMPARE_TOOLS = ("deepspeed", "accelerate", "megatron", "llm-analysis")
