"""Tiny configs of the hand-modelled families and the estimate's saved bytes for them: shared by the activation
tests, the trace tests and benchmarks/conformance.py. No torch and no pytest here: the benchmark imports it."""

from __future__ import annotations

from memcalc.api import model_of, run
from memcalc.model import ModelConfig
from memcalc.report import Report
from memcalc.spec import TrainingSpec
from memcalc.vocab import TERM_ACTIVATIONS, TERM_LOSS_BUFFERS

BASE = {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256, "pad_token_id": 0}
FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),
    "gemma": ("GemmaForCausalLM", {"head_dim": 32}),
    "phi3": ("Phi3ForCausalLM", {}),
    # MoE: 4 experts, 2 per token; which expert gets which token depends on the routing, the total does not.
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 64, "norm_topk_prob": True}),
    # decoder_sparse_step 2: layer 0 is dense (intermediate_size), layer 1 sparse with the shared expert.
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                          "shared_expert_intermediate_size": 112, "decoder_sparse_step": 2}),
}
# Gemma-2 (eager only in transformers) and Gemma-3 (sliding layers): the window is longer than the tests' sequences.
GEMMA2 = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], **BASE, "head_dim": 32,
          "query_pre_attn_scalar": 32, "sliding_window": 4096}
GEMMA3 = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **BASE, "head_dim": 32,
          "query_pre_attn_scalar": 32, "sliding_window": 4096}

# LayerNorm decoders, dropout off.
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 96, "n_layer": 2, "n_head": 4,
        "vocab_size": 300, "n_positions": 128, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
LAYER_NORM_FAMILIES = {  # name: (config, LayerNorms in the model, attention implementations it has)
    "opt": ({"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 96, "ffn_dim": 160,
             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 256,
             "dropout": 0.0, "attention_dropout": 0.0}, 5, ("sdpa", "eager")),
    "bloom": ({"model_type": "bloom", "architectures": ["BloomForCausalLM"], "hidden_size": 96, "n_layer": 2,
               "n_head": 4, "vocab_size": 300, "hidden_dropout": 0.0, "attention_dropout": 0.0}, 6, ("eager",)),
    "phi": ({"model_type": "phi", "architectures": ["PhiForCausalLM"], "hidden_size": 96, "intermediate_size": 160,
             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300}, 3, ("sdpa", "eager")),
    "falcon": ({"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "hidden_dropout": 0.0,
                "attention_dropout": 0.0}, 3, ("sdpa", "eager")),
    "falcon-40b-layout": ({"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 96,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "hidden_dropout": 0.0,
                           "attention_dropout": 0.0, "new_decoder_architecture": True, "num_kv_heads": 2}, 5,
                          ("sdpa", "eager")),
    "falcon-sequential": ({"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 96,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "hidden_dropout": 0.0,
                           "attention_dropout": 0.0, "multi_query": False, "parallel_attn": False}, 5,
                          ("sdpa", "eager")),
}


def tiny_raw(family: str) -> dict:
    arch, extra = FAMILIES[family]
    return {"model_type": family, "architectures": [arch], **BASE, **extra}


def estimated_saved_bytes(raw: dict, recipe: str, batch: int, seq: int, checkpointing: bool | str = False,
                          attention: str = "sdpa", activations: str = "auto") -> tuple[int, Report]:
    """The estimate's activations and loss buffers (what the forward saves for backward), and its report."""
    spec = TrainingSpec(precision=recipe, micro_batch_size=batch, seq_len=seq,
                        checkpointing=checkpointing if isinstance(checkpointing, str) else
                        ("full" if checkpointing else "none"), attention=attention,
                        activations=activations)
    report = run(model_of(ModelConfig("tiny", raw, "test")), spec)
    return report.term(TERM_ACTIVATIONS).bytes + report.term(TERM_LOSS_BUFFERS).bytes, report
