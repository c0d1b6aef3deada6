"""The command line: options to a ``memcalc.request.Request``, reports to ``memcalc.render``, errors to one stderr
line and an exit code. Nothing else: validation and defaults are the Request's, the answers the API's.

Exit codes (also in README):
  0 success (and, with --gpu, it fits)      1 internal error (a bug; MEMCALC_DEBUG=1 shows the traceback)
  2 bad usage (flag, number, combination)   3 model not found     4 unreadable or invalid config
  5 model type not supported                6 does not fit the GPU given with --gpu / --gpu-memory
  7 an optional dependency is missing       8 the output could not be written
"""


# No `from __future__ import annotations` here: typer reads the option annotations on every run, and
# string annotations would be re-evaluated each time (~8 ms of the start-up budget).
import errno
import functools
import os
import sys
from typing import Annotated, Any

import typer

from memcalc import __version__
from memcalc.errors import MemcalcError, OutputError, UsageError, printable
from memcalc.optimizers import OptimImpl, OptimizerName
from memcalc.precision import Dtype, PrecisionName
from memcalc.spec import (
    DEFAULT_MICRO_BATCH_SIZE,
    DEFAULT_SEQ_LEN,
    ActivationSource,
    Attention,
    Offload,
    Sharding,
)
from memcalc.vocab import COMPARE_TOOLS, VERIFY_METHODS

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_DOES_NOT_FIT = 6
DEBUG_ENV = "MEMCALC_DEBUG"
COMMANDS = ("estimate", "presets", "schema")
HELP_OPTIONS = ("-h", "--help")
# Options of the command line that are not settings of a Request: how to show the answer.
OUTPUT_OPTIONS = ("ctx", "units", "json_output", "explain", "totals", "emit", "compare_with", "verify", "plot",
                  "plan_layouts")
EPILOG = ("Other commands: 'memcalc presets' (model and GPU presets), 'memcalc schema' (JSON Schema of --json). "
          "'memcalc MODEL --flags' is short for 'memcalc estimate MODEL --flags'. Exit codes: 0 ok, 2 bad usage, "
          "3 model not found, 4 bad config, 5 model type not supported, 6 does not fit, 7 missing dependency, "
          "8 output not written.")

CONTEXT = {"help_option_names": list(HELP_OPTIONS)}
app = typer.Typer(add_completion=False, no_args_is_help=False, context_settings=CONTEXT,
                  help="How much GPU memory a training run takes, term by term, and whether it fits. " + EPILOG)

# Shared options, defined once.
ModelArg = Annotated[str | None, typer.Argument(help="Preset name (memcalc presets), config.json path, model folder or hub id.", show_default=False)]
ParamsOpt = Annotated[str | None, typer.Option("--params", help="Parameter count (7e9, 7B, 6.74B, 8030261248); replaces the model's count.")]
PrecisionOpt = Annotated[PrecisionName, typer.Option("--precision", help="Precision recipe (see README table). HF Trainer bf16=True is amp-bf16.")]
DtypeOpt = Annotated[Dtype | None, typer.Option(help="Override one dtype of the recipe.", show_default=False)]
OptimOpt = Annotated[OptimizerName, typer.Option("--optim", help="Optimizer.")]
OptimImplOpt = Annotated[OptimImpl, typer.Option("--optim-impl", help="torch.optim implementation (foreach is CUDA's default).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Micro-batch size per GPU.")]
SeqOpt = Annotated[int, typer.Option("--seq-len", "-s", min=1, help="Sequence length in tokens.")]
GpusOpt = Annotated[int, typer.Option("--gpus", min=1, help="Number of GPUs (data parallel).")]
ZeroOpt = Annotated[str, typer.Option("--zero", help="ZeRO stage 0-3, or a list like 0,1,2,3 for a comparison.")]
UnitsOpt = Annotated[str, typer.Option("--units", help="gib (2^30 B), gb (10^9 B), mib or mb.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def route(argv: list[str]) -> list[str]:
    """'memcalc llama-3-8b ...' means 'memcalc estimate llama-3-8b ...'; a bare --verify means --verify=auto;
    'memcalc --help' shows the estimate's options (the command people run), with the other commands listed."""
    argv = _optional_verify_value(argv)
    if argv and argv[0] in COMMANDS:
        return argv
    return ["estimate", *argv]


def _optional_verify_value(argv: list[str]) -> list[str]:
    routed: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--verify":
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following in VERIFY_METHODS:
                routed.append(f"--verify={following}")
                index += 2
                continue
            arg = "--verify=auto"
        routed.append(arg)
        index += 1
    return routed


def flag_of(setting: str) -> str:
    """How the command line spells a setting a message names: ``batch_size`` -> ``--batch-size``."""
    return {"model": "MODEL", "verify": "--verify", "from_config": "--from"}.get(setting, "--" + setting.replace("_", "-"))


def _fail(error: MemcalcError) -> typer.Exit:
    print(f"memcalc: {printable(error.render(flag_of))}", file=sys.stderr)
    return typer.Exit(error.exit_code)


def _version(value: bool) -> None:
    if value:
        print(f"memcalc {__version__}")
        raise typer.Exit(EXIT_OK)


@app.command(epilog=EPILOG)
def estimate(
    ctx: typer.Context,
    model: ModelArg = None,
    params: ParamsOpt = None,
    precision: PrecisionOpt = PrecisionName.bf16,
    master_dtype: DtypeOpt = None,
    grad_dtype: DtypeOpt = None,
    state_dtype: DtypeOpt = None,
    optim: OptimOpt = OptimizerName.adamw,
    optim_impl: OptimImplOpt = OptimImpl.foreach,
    amsgrad: Annotated[bool, typer.Option(help="Adam/AdamW: keep max_exp_avg_sq.")] = False,
    activation_offload: Annotated[str, typer.Option(help="Saved activations moved to host memory: none, torchtune (its OffloadActivations, the loss outside it), trl (TRL's copy: parameter storages skipped, a storage saved twice kept on the GPU, the loss offloaded) or checkpoints (transformers' activation_checkpointing_enable(offload=True): checkpointed layers' inputs in host memory). Traced: needs torch. GPU and host bytes both reported.")] = "none",
    optim_in_backward: Annotated[bool, typer.Option("--optim-in-backward", help="Step each parameter in its post-accumulate-grad hook during backward (torchtune optimizer_in_bwd): gradients are freed one by one.")] = False,
    adafactor_beta1: Annotated[float | None, typer.Option(help="Adafactor first moment (transformers default: none).")] = None,
    optim_rank: Annotated[int | None, typer.Option("--optim-rank", min=1, help="GaLore / APOLLO projection rank (default 128, HF Trainer's).")] = None,
    batch_size: BatchOpt = DEFAULT_MICRO_BATCH_SIZE,
    seq_len: SeqOpt = DEFAULT_SEQ_LEN,
    decoder_seq_len: Annotated[int | None, typer.Option("--decoder-seq-len", min=1, help="Encoder-decoder models (T5): decoder tokens per sequence (default: --seq-len).")] = None,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")] = 1,
    checkpointing: Annotated[str, typer.Option(help="Activation checkpointing: none, full (every decoder layer), every:N (every N-th layer, as torchtitan's layer-frequency checkpointing), or selective-op (torchtitan's per-op policy: matmul and attention outputs kept, every other matmul recomputed; traced, needs torch).")] = "none",
    checkpoint_reentrant: Annotated[bool, typer.Option("--checkpoint-reentrant", help="With --checkpointing full or every:N: torch.utils.checkpoint's reentrant variant (HF gradient_checkpointing_kwargs use_reentrant true), which holds each recomputed layer's output through its backward; transformers' default is non-reentrant.")] = False,
    loss: Annotated[str, typer.Option("--loss", help="The loss: standard (full logits, upcast), chunked:N (torchtune's chunked cross-entropy, N chunks along the sequence), fused-linear (Liger's fused linear cross-entropy: no full logits).")] = "standard",
    attn: Annotated[Attention, typer.Option("--attn", help="Attention implementation (transformers' attn_implementation).")] = Attention.sdpa,
    activations: Annotated[ActivationSource, typer.Option("--activations", help="Where activations come from: rules (the family's hand rules), trace (the model's own code under FakeTensorMode; needs torch and transformers), auto (rules where the family has them, else trace).")] = ActivationSource.auto,
    zero: ZeroOpt = "0",
    gpus: GpusOpt = 1,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes the GPUs are spread over (for offload RAM per node).")] = 1,
    gpus_per_node: Annotated[int | None, typer.Option("--gpus-per-node", min=1, help="GPUs per node (--gpus = nodes x this).")] = None,
    sharding: Annotated[Sharding, typer.Option("--sharding", help="Engine that shards: deepspeed (ZeRO), fsdp (FSDP2, stage 3 unless --zero), torch (DDP / ZeroRedundancyOptimizer).")] = Sharding.deepspeed,
    engine: Annotated[str, typer.Option("--engine", help="torch (default: PyTorch's and DeepSpeed's engines, as --sharding picks) or megatron (Megatron-LM's DDP with --zero 0, its distributed optimizer with --zero 1: bf16 weights, fp32 main gradients in one buffer, fp32 main parameters; with --pp its 1F1B schedule and even layer split).")] = "torch",
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Short for --sharding fsdp (with --zero 3 unless given).")] = False,
    cpu_ram_efficient_loading: Annotated[bool, typer.Option("--cpu-ram-efficient-loading", help="With --fsdp: accelerate's cpu_ram_efficient_loading (only the main process loads the model on the host; the others receive each parameter by broadcast). Changes the load's host memory and GPU moment.")] = False,
    offload: Annotated[Offload, typer.Option("--offload", help="DeepSpeed ZeRO-Offload to CPU RAM.")] = Offload.none,
    deepspeed: Annotated[str | None, typer.Option("--deepspeed", help="Read a DeepSpeed config (stage, offload, buckets, precision, micro-batch, accumulation, optimizer).")] = None,
    from_config: Annotated[str | None, typer.Option("--from", help="Estimate the run a trainer's config describes: HF TrainingArguments JSON, TRL, axolotl, torchtune or LLaMA-Factory YAML (YAML needs the [yaml] extra). Every key read is listed: mapped, read but not modelled, ignored; a flag it contradicts is an error.", show_default=False)] = None,
    from_format: Annotated[str | None, typer.Option("--from-format", help="How to read --from: hf, trl, axolotl, torchtune or llamafactory (default: detected from the keys).", show_default=False)] = None,
    emit: Annotated[str | None, typer.Option("--emit", help="Print a config for this run (or the fit advisor's recommendation): deepspeed.")] = None,
    compare_with: Annotated[str | None, typer.Option("--compare-with", help="Put another tool's figure beside memcalc's: deepspeed, accelerate, megatron (Megatron-LM's theoretical_memory_usage.py) or llm-analysis (LLMAnalysis.training; both for Llama-layout decoders).")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU preset for the fit check (memcalc presets).")] = None,
    gpu_memory: Annotated[str | None, typer.Option(help="GPU memory for the fit check, e.g. 80GiB or 24GB.")] = None,
    cuda_context: Annotated[str | None, typer.Option(help="CUDA context size the fit check takes (default: measured for the --gpu preset's generation where memcalc has a measurement, Hopper 769MiB held by a training process; else 512MiB, assumed).")] = None,
    reserve_fraction: Annotated[float | None, typer.Option(help="Allocator reserve assumed by the fit check, 0 to 0.9 (default 0.05).")] = None,
    nccl_channels: Annotated[str | None, typer.Option(help="NCCL's channel counts for the fit's NCCL buffers, as a run's NCCL_DEBUG=INFO prints them: COLL,NVLS,P2P,PER_PEER (e.g. 24,16,32,32; default: the --gpu preset's, from published logs).", show_default=False)] = None,
    reserved: Annotated[bool, typer.Option("--reserved", help="Predict the caching allocator's reserved memory (max_memory_reserved) by replaying the step's allocations through a model of PyTorch's CUDA caching allocator; the fit then uses it instead of --reserve-fraction. Traces the step at full size (needs torch; cached).")] = False,
    alloc_conf: Annotated[str | None, typer.Option("--alloc-conf", help="PYTORCH_ALLOC_CONF for --reserved, e.g. expandable_segments:True (default: the environment's PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF). Implies --reserved.", show_default=False)] = None,
    plan_layouts: Annotated[bool, typer.Option("--plan", help="With --gpus N and --gpu: search data-parallel sharding, tensor and pipeline parallelism and checkpointing for the layouts that fit, ranked by memcalc.planner's throughput model (printed with its formula). Llama-layout decoders get tp/pp (MoE decoders pp), MoE models of transformers' expert-parallel plan ep, alone and on pipeline stages; others data parallelism only. With --engine megatron: Megatron-LM's DDP or distributed optimizer, its even split and 1F1B.")] = False,
    plan_schedules: Annotated[str | None, typer.Option(help="With --plan: the pipeline schedules searched, comma-separated: 1f1b (the default) and interleaved-1f1b (2 stages a rank; its smaller bubble against its more point-to-point traffic in the ranking).")] = None,
    max_batch: Annotated[bool, typer.Option("--max-batch", help="With --gpu: the largest micro-batch that fits.")] = False,
    max_seq_len: Annotated[bool, typer.Option("--max-seq-len", help="With --gpu: the longest sequence that fits.")] = False,
    lora_rank: Annotated[int | None, typer.Option(min=1, help="Train LoRA adapters of this rank on a frozen base.")] = None,
    lora_dtype: Annotated[str | None, typer.Option(help="The adapters' dtype on the --precision base: fp32 on a 16-bit base is PEFT's default (autocast_adapter_dtype; memcalc's bf16/fp16 recipe), the base's own dtype torchtune's (bf16-pure/fp16-pure).")] = None,
    lora_modules_to_save: Annotated[str | None, typer.Option(help="Comma-separated modules PEFT trains in full beside the adapters (modules_to_save, e.g. lm_head,embed_tokens): a trainable copy of each.")] = None,
    dora: Annotated[bool, typer.Option("--dora", help="DoRA (PEFT's use_dora): a trainable magnitude vector per adapted Linear beside LoRA's adapters.")] = False,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout (PEFT's lora_dropout, default 0): each adapter saves its dropped-out input and a mask.")] = 0.0,
    lora_targets: Annotated[str | None, typer.Option(help="Comma-separated module names, or all-linear (default: PEFT's per family).")] = None,
    qlora: Annotated[bool, typer.Option(help="QLoRA: frozen base Linear weights in 4-bit NF4.")] = False,
    qlora_upcast: Annotated[bool, typer.Option("--qlora-upcast/--no-qlora-upcast", help="QLoRA: the base's other tensors (embeddings, norms, head) cast to fp32, as PEFT's prepare_model_for_kbit_training does for HF Trainer, TRL and axolotl (default); --no-qlora-upcast keeps them 16-bit, as torchtune does.")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="Each decoder layer under torch.compile with Inductor, as torchtune and torchtitan compile (head and loss eager): what AOTAutograd's partitioner saves and the buffers Inductor's fused kernels keep; traced, needs torch.")] = False,
    repeat_kv: Annotated[bool, typer.Option("--repeat-kv", help="Attention repeats k and v to every query head before sdpa (saved for backward), as torchtune's and litgpt's attention do; default: transformers' sdpa with GQA, which does not.")] = False,
    padded: Annotated[bool, typer.Option("--padded", help="Rows padded to the longest of the micro-batch (no packing: HF Trainer's and TRL's default collators): transformers then gives sdpa a 4-D padding mask, which it keeps as a bias in every layer, with k and v repeated to every head. Default: rows unpadded (packed, or all one length).")] = False,
    tp: Annotated[int, typer.Option("--tp", help="Tensor parallelism: N GPUs share each layer (torchtitan's plan: attention heads and MLP features split, the embedding and head split over the vocabulary); --gpus / N data-parallel groups. The figures are one rank's. Llama-layout decoders, dense or MoE (torchtitan's MoE plan: every expert's features split).")] = 1,
    sp: Annotated[bool, typer.Option("--sp", help="With --tp: sequence parallelism (the norms and the residual stream split along the sequence, all-gathered before attention and the MLP).")] = False,
    loss_parallel: Annotated[bool, typer.Option("--loss-parallel", help="With --tp: the loss over the head's vocabulary split (torchtitan's loss_parallel), so no rank holds the full logits.")] = False,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline parallelism: N stages of consecutive layers (torchtitan's split, or with --engine megatron Megatron's even one; the first holds the embedding, the last the head and loss), --gpus / (tp x pp) data-parallel groups. The figures are the most loaded stage's. Llama-layout decoders, dense or MoE (Mixtral, Qwen2-MoE, Qwen3-MoE).")] = 1,
    pp_schedule: Annotated[str, typer.Option("--pp-schedule", help="With --pp: gpipe (all forwards, then all backwards), 1f1b, interleaved-1f1b (each rank several stages, looped; see --pp-virtual) or zero-bubble (interleaved, each backward split, the weights' half later; without checkpointing): torch.distributed.pipelining's schedules. With --engine megatron: 1f1b, megatron-core's.")] = "1f1b",
    pp_virtual: Annotated[int | None, typer.Option("--pp-virtual", help="With --pp-schedule interleaved-1f1b or zero-bubble: stages per pipeline rank (default 2); the layers are split over --pp x N stages, stage s on rank s mod --pp. The figures are the most loaded rank's.", show_default=False)] = None,
    microbatches: Annotated[int | None, typer.Option("--microbatches", help="With --pp: micro-batches per step, each of --batch-size samples (default: one per stage).", show_default=False)] = None,
    pp_layers: Annotated[str | None, typer.Option("--pp-layers", help="With --pp: each stage's layer count, e.g. 8,9,8,7 (default: torchtitan's even split counting the embedding and the head as a layer each; with --engine megatron, Megatron's layers / N each).", show_default=False)] = None,
    cp: Annotated[int, typer.Option("--cp", help="Context parallelism: N GPUs share each sequence, each running seq-len / N positions, attention as torch's ring (context_parallel: keys and values all-gathered, fp32 merge, load balancing); the N ranks are among the --gpus / (tp x pp) data-parallel ones. The figures are the most loaded rank's. Llama-layout decoders, sdpa, no sliding window.")] = 1,
    ep: Annotated[int, typer.Option("--ep", help="Expert parallelism for MoE models (Mixtral, Qwen-MoE, DeepSeek-V2): N data-parallel GPUs split each layer's experts, the routed tokens exchanged all-to-all, as transformers' expert-parallel plan (with --fsdp: the experts sharded over the GPUs holding the same ones; with --pp, each stage's data-parallel GPUs split its experts; with --tp, a multiple of it: the experts whole, split over ranks spanning the tensor-parallel groups, as transformers' DistributedConfig). The figures are the most loaded rank's.")] = 1,
    ep_shard_dim: Annotated[int, typer.Option("--ep-shard-dim", help="With --ep: the dimension FSDP2 shards each rank's experts on: 0, transformers' plan (a rank holding fewer experts than the ranks sharding them keeps whole, padded experts), or 1, torchtitan's Shard(1) (when those ranks x ep exceed the experts).")] = 0,
    dp_replicate: Annotated[str, typer.Option("--dp-replicate", help="With --fsdp: hybrid sharding (HSDP): the data-parallel GPUs form R replicas, each sharding the model over --gpus / (tp x pp x R) of them (FSDP2's fully_shard on a 2-D mesh: reduce-scatter within a replica, all-reduce across them); 'nodes': one replica per node (FSDP1's HYBRID_SHARD). torchtune's data_parallel_replicate_dim, axolotl's dp_replicate_size.")] = "1",
    dp_shard: Annotated[int | None, typer.Option("--dp-shard", help="With --fsdp: hybrid sharding given by its shard group: each replica shards over S GPUs, the replicas are --gpus / (tp x pp x cp x S) (torchtune's data_parallel_shard_dim, axolotl's dp_shard_size).", show_default=False)] = None,
    ep_load: Annotated[float, typer.Option("--ep-load", help="With --ep: the (token, expert) pairs the most loaded rank receives in a MoE layer over the average, T x top-k (T / tp with --tp: a rank's slice) (default 1, balanced routing; at most --ep). The routing decides it: give the factor your router shows.")] = 1.0,
    fp8: Annotated[str, typer.Option(help="torchao float8 training of the Linear layers: none, tensorwise or rowwise (torchtitan's float8 converter; the output layer stays bf16). On one process the step is traced with torchao's float8 layers (measured against CPU steps); sharded runs count the casts from torchao's code.")] = "none",
    qlora_scope: Annotated[str, typer.Option(help="QLoRA: which Linear layers are 4-bit: all-linear (bitsandbytes through transformers; torchtune's Llama, Mistral, Gemma, Phi-3) or lora-targets (only those LoRA wraps: torchtune's Qwen2, Qwen2.5, Qwen3).")] = "all-linear",
    qlora_double_quant: Annotated[bool, typer.Option("--qlora-double-quant/--no-qlora-double-quant", help="QLoRA: the 4-bit blocks' absmax quantized again (bnb_4bit_use_double_quant; TRL's default is off: use_bnb_nested_quant).")] = True,
    qlora_lm_head: Annotated[bool, typer.Option("--qlora-lm-head", help="QLoRA: the output head 4-bit too (BitsAndBytesConfig llm_int8_skip_modules without lm_head); an untied head only.")] = False,
    qlora_quantizer: Annotated[str, typer.Option(help="QLoRA: which library stores the 4-bit base: bitsandbytes (transformers' 4-bit loading: HF Trainer, TRL, axolotl) or torchao (its NF4Tensor, as torchtune's qlora_ builders make it: the step traced with torchao's own to_nf4 and linear_nf4, which needs torchao).")] = "bitsandbytes",
    freeze: Annotated[str | None, typer.Option(help="Freeze parts: embeddings, lm_head, norms, attention, mlp (comma-separated).")] = None,
    verify: Annotated[str | None, typer.Option(
        "--verify", help="Measure a real training step beside the estimate: --verify (auto: cuda with a GPU, else a "
        "CPU step, or the full-size trace when the CPU cannot hold it), --verify=cpu-tracker, --verify=trace (full "
        "size, no memory) or --verify=cuda.", show_default=False)] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Draw memory over the step into FILE (.svg, .png or .html; needs matplotlib).")] = None,
    units: UnitsOpt = "gib",
    json_output: JsonOpt = False,
    explain: Annotated[bool, typer.Option(help="Show each term's formula and source.")] = False,
    totals: Annotated[bool, typer.Option(help="Also show totals across all GPUs.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Estimate per-GPU training memory for MODEL (or --params): every term, the peak and, with --gpu, the fit."""
    options = dict(locals())
    try:
        code = _estimate(options)
    except MemcalcError as error:
        raise _fail(error) from None
    raise typer.Exit(code)


def _typed(options: dict) -> frozenset[str]:
    """The options the user typed (the others are defaults, named as such in the output)."""
    ctx = options["ctx"]
    return frozenset(name for name in options if name not in ("ctx", "version")
                     and ctx.get_parameter_source(name).name != "DEFAULT")


def _estimate(options: dict) -> int:
    # The engine loads here, not at import, so --help stays instant.
    import dataclasses

    from memcalc import api, render
    from memcalc.request import Request
    from memcalc.units import DISPLAY_UNITS

    unit = options["units"].lower()
    if unit not in DISPLAY_UNITS:
        raise UsageError(f"--units {options['units']!r} is not one of gib, gb, mib, mb")
    _check_outputs(options)
    typed = _typed(options)
    settings = {name: getattr(value, "value", value) for name, value in options.items()
                if name not in OUTPUT_OPTIONS and name != "version"}
    plan = Request(**settings, chosen=typed & set(settings)).plan()
    if options["plan_layouts"]:
        return _plan_layouts(plan, typed, options, unit)
    if len(plan.specs) > 1:
        for name in ("emit", "compare_with", "plot"):
            if options[name] is not None:
                raise UsageError(f"{{{name}}} takes one run; {{zero}} {','.join(str(s.zero_stage) for s in plan.specs)} "
                                 "compares several: give one stage")
    if "units" not in typed and not options["json_output"]:  # the JSON is in bytes: no display unit
        plan = dataclasses.replace(plan, defaults_used=(*plan.defaults_used, f"--units {unit}"))
    if options["verify"] is not None:
        with render.progress("verify") as say:
            reports = [api.verify_plan(plan, options["verify"], progress=say)]
    else:
        reports = api.run_plan(plan)
    if options["plot"] is not None:
        from memcalc.plot import plot_step

        plot_step(reports[0], options["plot"], unit=unit)
    fits = plan.gpu is None or all(r.fit and r.fit.fits for r in reports)
    if options["emit"] is not None:
        config, why, emitted_fits = api.deepspeed_config(plan, reports[0])
        print(f"memcalc: DeepSpeed config for {why}", file=sys.stderr)
        _write(render.json_text(config))
        return EXIT_OK if emitted_fits else EXIT_DOES_NOT_FIT
    if options["compare_with"] is not None:
        rows = api.compare_with(options["compare_with"], plan.model, reports[0])
        if options["json_output"]:
            _write(render.rows_json(options["compare_with"], rows))
        else:
            render.print_comparison_rows(rows, options["compare_with"], render.console(), unit)
    elif options["json_output"]:
        _write(render.to_json(reports))
    else:
        render.print_reports(reports, render.console(), unit, explain=options["explain"], totals=options["totals"])
    return EXIT_OK if fits else EXIT_DOES_NOT_FIT


def _plan_layouts(plan, typed: frozenset[str], options: dict, unit: str) -> int:
    from memcalc import api, render

    for name in ("emit", "compare_with", "verify", "plot"):
        if options[name] is not None:
            raise UsageError(f"{{plan}} prints layouts, not {{{name}}}: ask for one at a time")
    layouts = api.plan_layouts(plan, {name for name in api.LAYOUT_SETTINGS if name in typed})
    if options["json_output"]:
        _write(render.json_text(render.layouts_json(layouts)))
    else:
        render.print_layouts(layouts, render.console(), unit)
    return EXIT_OK if layouts.fitting else EXIT_DOES_NOT_FIT


def _check_outputs(options: dict) -> None:
    """Every output option checked before any work: a wrong one costs no estimate, no measurement."""
    if options["emit"] is not None and options["emit"] != "deepspeed":
        raise UsageError(f"{{emit}} {options['emit']!r}: memcalc writes deepspeed configs ({{emit}} deepspeed)")
    if options["compare_with"] is not None and options["compare_with"] not in COMPARE_TOOLS:
        raise UsageError(f"{{compare_with}} {options['compare_with']!r}: use one of {', '.join(COMPARE_TOOLS)}")
    if options["emit"] is not None and options["json_output"]:
        raise UsageError("{emit} prints the DeepSpeed config as JSON and --json the report: ask for one at a time")
    if options["emit"] is not None and options["compare_with"] is not None:
        raise UsageError("{emit} writes a config and {compare_with} a comparison: ask for one at a time")
    for name in ("emit", "compare_with"):
        if options[name] is not None and options["verify"] is not None:
            raise UsageError(f"{{{name}}} prints no measurement: drop {{verify}}, or ask for them one at a time")
    if options["plot"] is not None:
        if not options["plot"].strip():
            raise UsageError("{plot} needs a file name (.svg, .png or .html)")
        from memcalc.plot import plot_format

        plot_format(options["plot"])


def _write(text: str) -> None:
    if sys.stdout is None:  # started with stdout closed (>&-)
        raise OutputError("cannot write the output: stdout is closed")
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            # A bare BrokenPipeError: typer's own handler (errno EPIPE) would exit with 1 before main() sees it.
            raise BrokenPipeError from None
        raise


estimate_app = typer.Typer(add_completion=False, context_settings=CONTEXT)
estimate_app.command(help=estimate.__doc__, epilog=EPILOG)(estimate)


@app.command()
def presets(json_output: JsonOpt = False) -> None:
    """List model presets (with exact parameter counts) and GPU presets."""
    from memcalc import api, render

    try:
        found = api.presets()
        if json_output:
            _write(render.presets_json(found))
        else:
            render.print_presets(found, render.console())
    except MemcalcError as error:
        raise _fail(error) from None
    raise typer.Exit(EXIT_OK)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the --json report."""
    import json

    from memcalc.schema import report_json_schema

    _write(json.dumps(report_json_schema(), indent=2))


@functools.cache
def _command(estimate: bool) -> Any:
    """The click command typer builds from the app's signatures, built once per process: a program calling ``main``
    many times (the test suite's thousands of invocations) would otherwise rebuild it from every option's signature each
    time, more than half of an estimate's time."""
    import typer.main

    return typer.main.get_command(estimate_app if estimate else app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: one line on stderr for every error, never a traceback unless debugging."""
    args = route(list(sys.argv[1:] if argv is None else argv))
    try:
        if args[0] == "estimate":
            # The estimate alone, as a one-command app: typer then builds one command, not the whole group
            # (a few ms of the start-up budget, benchmarks/startup.py).
            result = _command(estimate=True)(args[1:], prog_name="memcalc", standalone_mode=False)
        else:
            result = _command(estimate=False)(args, prog_name="memcalc", standalone_mode=False)
        return int(result or 0)
    except MemcalcError as error:  # raised outside a command (should not happen, but stay one line)
        print(f"memcalc: {printable(error.render(flag_of))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("memcalc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return _closed_pipe()
        error = OutputError(f"cannot write the output: {exc.strerror or type(exc).__name__}")
        print(f"memcalc: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as exc:
        # typer/click usage errors (unknown option, bad choice, out-of-range number) carry format_message().
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"memcalc: {printable(exc.format_message())} (see memcalc --help)", file=sys.stderr)
            return int(exc.exit_code) if exc.exit_code else 2
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"memcalc: internal error: {type(exc).__name__}: {printable(str(exc))}; set {DEBUG_ENV}=1 for a "
              "traceback and please report it", file=sys.stderr)
        return EXIT_INTERNAL


def _closed_pipe() -> int:
    """The reader went away (``memcalc ... | head``): end quietly with success, as Unix tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when the interpreter flushes stdout at exit
    except (OSError, ValueError):
        pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
