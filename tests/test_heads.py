"""Heads and encoder-decoders: what each head's forward saves against the estimate, the verify step's batch for
each head, and T5's decoder length (--decoder-seq-len).

Saved bytes are measured as tests/test_activations.py measures them (torch.autograd.graph.saved_tensors_hooks on a
CPU forward of a tiny model: every distinct storage saved for backward, parameters, buffers and autocast weight
copies excluded), with the batch the verify step builds (memcalc.measure.step.make_batch). Where a CPU forward saves
something else than a CUDA one, each test names the difference and corrects for it.
"""

from __future__ import annotations

import pytest

from memcalc import families
from memcalc.api import model_of, run
from memcalc.errors import UsageError
from memcalc.families.heads import for_head
from memcalc.families.saved import Run
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from memcalc.vocab import TERM_ACTIVATIONS, TERM_LOSS_BUFFERS
from tests.tiny import GEMMA2, tiny_raw

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memcalc.measure import run_verify  # (after the torch check: the step imports torch)
from memcalc.measure import step as st

BYTES = {"fp32": 4, "bf16-pure": 2, "amp-bf16": 2}  # compute dtype
RECIPES = sorted(BYTES)
B, S = 2, 48
T, H, HEADS = B * S, 96, 4
BERT = {"model_type": "bert", "hidden_size": H, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": HEADS, "vocab_size": 300, "max_position_embeddings": 128, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": H, "d_ff": 160, "d_kv": 24,
      "num_layers": 2, "num_decoder_layers": 1, "num_heads": HEADS, "vocab_size": 300, "dropout_rate": 0.0,
      "decoder_start_token_id": 0, "pad_token_id": 0}
LAYER_NORM_DECODERS = {  # dropout off; the three causal-LM rules CPU and CUDA agree on in fp32
    "gpt2": {"model_type": "gpt2", "n_embd": H, "n_layer": 2, "n_head": HEADS, "vocab_size": 300, "n_positions": 128,
             "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "opt": {"model_type": "opt", "hidden_size": H, "ffn_dim": 160, "num_hidden_layers": 2, "num_attention_heads": HEADS,
            "vocab_size": 300, "max_position_embeddings": 256, "dropout": 0.0, "attention_dropout": 0.0},
    "bloom": {"model_type": "bloom", "hidden_size": H, "n_layer": 2, "n_head": HEADS, "vocab_size": 300,
              "hidden_dropout": 0.0, "attention_dropout": 0.0},
    "phi": {"model_type": "phi", "hidden_size": H, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": HEADS, "vocab_size": 300},
    "falcon": {"model_type": "falcon", "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": HEADS,
               "vocab_size": 300, "hidden_dropout": 0.0, "attention_dropout": 0.0},
}
CLASS_PREFIX = {"llama": "Llama", "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe", "gemma2": "Gemma2", "gpt2": "GPT2",
                "opt": "OPT", "bloom": "Bloom", "phi": "Phi", "falcon": "Falcon"}


def _spec(recipe: str, attention: str = "sdpa", decoder: int | None = None, seq: int = S) -> TrainingSpec:
    return TrainingSpec(precision=recipe, micro_batch_size=B, seq_len=seq, attention=attention, decoder_seq_len=decoder)


def measure_saved_bytes(raw: dict, spec: TrainingSpec, batch: dict | None = None) -> int:
    """Bytes of the distinct storages one training forward saves for backward (make_batch's batch unless given)."""
    setup = st.resolve_setup(spec, spec.attention.value)
    torch.manual_seed(0)
    model = st.build_model(raw, setup)
    excluded = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    parameters = set(excluded)
    saved, copies = {}, []

    class WeightCopies(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in parameters:
                excluded.add(out.untyped_storage().data_ptr())
                copies.append(out)  # held: a freed copy's address must not be taken for a later activation's
            return out

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage  # held alive, so that no later storage reuses its address
        return tensor

    if batch is None:
        batch, _ = st.make_batch(model, setup)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.autocast_dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), WeightCopies(), autocast:
        model(**batch)
    return sum(storage.nbytes() for storage in saved.values())


def estimated_saved_bytes(raw: dict, spec: TrainingSpec) -> int:
    """The estimate's activations and loss buffers through memcalc's own path."""
    report = run(model_of(ModelConfig("tiny", raw, "test")), spec)
    names = {t.name for t in report.per_gpu.terms}
    return report.term(TERM_ACTIVATIONS).bytes + (report.term(TERM_LOSS_BUFFERS).bytes if TERM_LOSS_BUFFERS in names else 0)


def rule_saved_bytes(raw: dict, run_: Run) -> int:
    """A family's rule, its head applied (families.heads.for_head), summed as memcalc.activations sums it."""
    described = families.describe(ModelConfig("tiny", raw, "test"))
    rule = for_head(described.family.activations(described.arch, run_), described.arch, run_)
    loss = rule.loss.rows * rule.loss.vocab * rule.loss.bytes_per_log_softmax if rule.loss is not None else 0
    return sum(rule.layer_bytes(i) for i in range(len(rule.layers))) + rule.per_model_bytes + loss


def _run(recipe: str, eager: bool = False, decoder: int | None = None, seq: int = S) -> Run:
    return Run(B, seq, BYTES[recipe], recipe == "amp-bf16", eager, decoder_s=decoder)


# -- BERT: every head of the family --------------------------------------------------------------------------------
BERT_HEADS = {  # class: LayerNorms (CPU statistics in bf16), MLM head (its LayerNorm), labels = input_ids
    "BertForMaskedLM": (6, True, True),
    "BertForPreTraining": (6, True, True),
    "BertLMHeadModel": (6, True, False),  # its shifted labels are a new tensor (ForCausalLMLoss)
    "BertForSequenceClassification": (5, False, False),
    "BertForTokenClassification": (5, False, False),
    "BertForQuestionAnswering": (5, False, False),
}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("head", sorted(BERT_HEADS))
def test_bert_heads_saved_activations(head, recipe):
    """Each head of modeling_bert.py against a forward with the verify step's batch. CPU-vs-CUDA differences,
    explicitly: a language-model batch here passes labels = input_ids, one int64 tensor where a real batch has two
    (8 T); bf16: the CPU LayerNorm keeps mean/rstd in bf16, CUDA in fp32 (LayerNorms x 2 x T x 2 B); amp-bf16: the
    MLM head's LayerNorm gets the bf16 GELU output, normalised as it is on the CPU where CUDA autocast saves an fp32
    copy ((4 - 2) T h)."""
    raw = {**BERT, "architectures": [head]}
    layer_norms, mlm_head, shared_labels = BERT_HEADS[head]
    measured = measure_saved_bytes(raw, _spec(recipe))
    estimated = estimated_saved_bytes(raw, _spec(recipe))
    cpu = 8 * T if shared_labels else 0
    if recipe == "bf16-pure":
        cpu += layer_norms * 2 * T * (4 - 2)
    if recipe == "amp-bf16" and mlm_head:
        cpu += (4 - 2) * T * H
    print(f"{head} {recipe}: estimated {estimated:,} (CPU differences -{cpu:,}) measured {measured:,}")
    assert estimated - cpu == measured


@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForTokenClassification"])
def test_bert_classifier_dropout(head):
    """classifier_dropout 0.1 (hidden dropout off): a mask on the classifier's input, b h (pooled) or T h (tokens),
    and the dropped output the classifier saves. CUDA keeps a 1-byte mask, the CPU a noise tensor in c (fp32 here)."""
    raw = {**BERT, "architectures": [head], "classifier_dropout": 0.1}
    measured = measure_saved_bytes(raw, _spec("fp32"))
    estimated = estimated_saved_bytes(raw, _spec("fp32"))
    masked = B * H if head == "BertForSequenceClassification" else T * H
    assert estimated + (4 - 1) * masked == measured


def test_bert_model_without_head_counts_no_loss_and_says_so():
    report = run(model_of(ModelConfig("tiny", {**BERT, "architectures": ["BertModel"]}, "test")), _spec("fp32"))
    assert TERM_LOSS_BUFFERS not in {t.name for t in report.per_gpu.terms}
    assert any("BertModel has no head and no loss" in note for note in report.notes)


# -- decoder families: sequence classification and the bare model ----------------------------------------------------
DECODER_CASES = [("llama", recipe) for recipe in RECIPES] + [
    ("mixtral", "bf16-pure"), ("qwen3_moe", "fp32"), ("gemma2", "fp32"),
    *((family, "fp32") for family in LAYER_NORM_DECODERS),
]


def _decoder_raw(family: str, head: str) -> dict:
    if family in LAYER_NORM_DECODERS:
        raw = dict(LAYER_NORM_DECODERS[family])
    elif family == "gemma2":
        raw = {**GEMMA2, "final_logit_softcapping": 30.0}  # the causal LM's softcapping: no classifier has it
    else:
        raw = tiny_raw(family)
    name = {"ForCausalLM": "GPT2LMHeadModel", "Model": "GPT2Model"}.get(head) if family == "gpt2" else None
    return {**raw, "pad_token_id": 0, "architectures": [name or CLASS_PREFIX[family] + head]}


@pytest.mark.parametrize(("family", "recipe"), DECODER_CASES)
def test_sequence_classification_differs_from_the_causal_lm_as_measured(family, recipe):
    """*ForSequenceClassification against *ForCausalLM of the same config: the estimated difference of the two heads
    (families.heads.for_head: no shifted labels, b x num_labels log_softmax in the logits' dtype, its labels and the
    pooling's two index tensors, no softcapping or aux loss) is the measured one, to the byte. (The CPU differences of
    each family's layers are the same for both heads and cancel; tests/test_activations.py states them.)"""
    attention = "eager" if family in ("bloom", "gemma2") else "sdpa"  # no sdpa path in transformers
    causal, classifier = _decoder_raw(family, "ForCausalLM"), _decoder_raw(family, "ForSequenceClassification")
    spec, run_ = _spec(recipe, attention), _run(recipe, attention == "eager")
    measured = measure_saved_bytes(classifier, spec) - measure_saved_bytes(causal, spec)
    estimated = rule_saved_bytes(classifier, run_) - rule_saved_bytes(causal, run_)
    assert estimated == measured


@pytest.mark.parametrize(("family", "recipe"), [("llama", "fp32"), ("llama", "amp-bf16"), ("gpt2", "bf16-pure")])
def test_bare_decoder_counts_the_output_a_head_would_save(family, recipe):
    """*Model trains under a head of the caller's: the estimate keeps the final norm's output as a head's first
    Linear saves it (c T h: the output, or its cast under autocast) and counts no loss; the bare forward saves neither.
    bf16 GPT-2: the CPU LayerNorm statistics in bf16 (5 LayerNorms x 2 x T x 2 B)."""
    raw = _decoder_raw(family, "Model")
    spec = _spec(recipe)
    ids = torch.randint(1, raw["vocab_size"], (B, S))
    measured = measure_saved_bytes(raw, spec, {"input_ids": ids})
    described = families.describe(ModelConfig("tiny", raw, "test"))
    rule = for_head(described.family.activations(described.arch, _run(recipe)), described.arch, _run(recipe))
    cpu = 5 * 2 * T * (4 - 2) if family == "gpt2" else 0
    assert rule.loss is None and any("has no head and no loss" in note for note in rule.notes)
    assert rule_saved_bytes(raw, _run(recipe)) - cpu == measured + BYTES[recipe] * T * H


# -- T5: the decoder's own length ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("feed_forward_proj", "seq", "decoder"), [("relu", 64, 16), ("gated-gelu", 16, 64)])
@pytest.mark.parametrize("recipe", RECIPES)
def test_t5_decoder_length(recipe, feed_forward_proj, seq, decoder):
    """Encoder over seq tokens, decoder over decoder_seq_len (labels of that length; the decoder input is them shifted
    right): self-attention s_e^2 and s_d^2, cross-attention s_d x s_e, the loss over the decoder's tokens. Eager (on the
    CPU sdpa with the relative-position bias takes the math kernel). CPU-vs-CUDA difference, explicitly: amp-bf16:
    the cross-attention scores (bf16 with a zero bf16 bias) go through softmax in bf16 on the CPU, in fp32 on CUDA,
    which then casts them for the matmul (4 b a s_d s_e per decoder layer)."""
    raw = {**T5, "feed_forward_proj": feed_forward_proj}
    measured = measure_saved_bytes(raw, _spec(recipe, "eager", decoder, seq))
    estimated = rule_saved_bytes(raw, _run(recipe, eager=True, decoder=decoder, seq=seq))
    cpu = 4 * B * HEADS * decoder * seq if recipe == "amp-bf16" else 0
    assert estimated - cpu == measured


@pytest.mark.parametrize("recipe", ["fp32", "bf16-pure"])
def test_t5_decoder_length_dropout_masks(recipe):
    """dropout_rate 0.1, encoder 64 / decoder 16: CUDA's 1-byte masks where the CPU saves noise in c. Masks: the
    embedding and final dropouts of both stacks 2 (T_e + T_d) h; per encoder layer T_e I + 2 T_e h + b a s_e^2; per
    decoder layer T_d I + 3 T_d h + b a s_d^2 + b a s_d s_e."""
    seq, decoder, c = 64, 16, BYTES[recipe]
    t_e, t_d, inner = B * seq, B * decoder, 160
    raw = {**T5, "dropout_rate": 0.1}
    measured = measure_saved_bytes(raw, _spec(recipe, "eager", decoder, seq))
    estimated = rule_saved_bytes(raw, _run(recipe, eager=True, decoder=decoder, seq=seq))
    masks = (2 * (t_e + t_d) * H + 2 * (t_e * inner + 2 * t_e * H + B * HEADS * seq * seq)
             + t_d * inner + 3 * t_d * H + B * HEADS * decoder * (decoder + seq))
    assert estimated + (c - 1) * masks == measured


def test_t5_equal_lengths_are_the_default():
    raw = {**T5, "feed_forward_proj": "gated-gelu"}
    for eager in (False, True):
        default = rule_saved_bytes(raw, Run(B, S, 2, False, eager))
        assert rule_saved_bytes(raw, Run(B, S, 2, False, eager, decoder_s=S)) == default
        assert rule_saved_bytes(raw, Run(B, S, 2, False, eager, decoder_s=S // 2)) < default


# -- the verify step ------------------------------------------------------------------------------------------------
def _batch(raw: dict, spec: TrainingSpec) -> tuple[dict, list[str]]:
    setup = st.resolve_setup(spec, spec.attention.value)
    return st.make_batch(st.build_model(raw, setup), setup)


@pytest.mark.parametrize(("architecture", "extra", "expected"), [
    ("BertForMaskedLM", {}, {"input_ids": (B, S), "labels": (B, S)}),
    ("BertForSequenceClassification", {}, {"input_ids": (B, S), "labels": (B,)}),
    ("BertForTokenClassification", {}, {"input_ids": (B, S), "labels": (B, S)}),
    ("BertForQuestionAnswering", {}, {"input_ids": (B, S), "start_positions": (B,), "end_positions": (B,)}),
    ("BertForPreTraining", {}, {"input_ids": (B, S), "labels": (B, S), "next_sentence_label": (B,)}),
    ("BertForNextSentencePrediction", {}, {"input_ids": (B, S), "labels": (B,)}),
    ("BertForSequenceClassification", {"num_labels": 1}, {"input_ids": (B, S), "labels": (B,)}),
    ("BertForSequenceClassification", {"num_labels": 3, "problem_type": "multi_label_classification"},
     {"input_ids": (B, S), "labels": (B, 3)}),
])
def test_batch_follows_the_forward_signature(architecture, extra, expected):
    """modeling_bert.py: labels per token (MLM, token classification), per sequence (classification, next sentence),
    start/end positions (QA), both for pre-training; float targets for regression and multi-label."""
    batch, _ = _batch({**BERT, "architectures": [architecture], **extra}, _spec("fp32"))
    assert {name: tuple(t.shape) for name, t in batch.items()} == expected
    floats = extra.get("num_labels") == 1 or "problem_type" in extra
    assert (batch.get("labels") is not None and batch["labels"].is_floating_point()) == floats


def test_t5_batch_has_labels_of_the_decoder_length():
    batch, _ = _batch(T5, _spec("fp32", decoder=16, seq=64))
    assert {name: tuple(t.shape) for name, t in batch.items()} == {"input_ids": (B, 64), "labels": (B, 16)}


def test_decoder_classifier_without_pad_token_runs_and_says_so():
    """GenericForSequenceClassification refuses batches > 1 without a pad token; the run sets one, and says so."""
    raw = {k: v for k, v in _decoder_raw("llama", "ForSequenceClassification").items() if k != "pad_token_id"}
    batch, notes = _batch(raw, _spec("fp32"))
    assert tuple(batch["labels"].shape) == (B,)
    assert any("no pad_token_id" in note for note in notes)


@pytest.mark.parametrize(("architecture", "message"), [
    ("BertModel", r"is a base model \(no head, no loss\)"),
    ("BertForMultipleChoice", "multiple-choice heads"),
])
def test_verify_refuses_what_it_cannot_train(architecture, message):
    with pytest.raises(UsageError, match=message):
        _batch({**BERT, "architectures": [architecture]}, _spec("fp32"))


# The int64 batch tensors the estimate counts as saved where the tracker counts them as inputs ('other'), and the
# loss itself (a 4-byte fp32 scalar alive at the end of the forward, not counted by the estimate).
VERIFY_HEADS = {
    "BertForMaskedLM": 2 * 8 * B * 32,  # input_ids, labels (a real batch has both; the run passes one)
    "BertForSequenceClassification": 8 * B * 32 + 8 * B,  # input_ids, labels
    "BertForTokenClassification": 2 * 8 * B * 32,  # input_ids, labels
    "BertForQuestionAnswering": 8 * B * 32,  # input_ids (the loss saves clamped copies of the positions)
    "BertLMHeadModel": 8 * B * 32,  # input_ids (the loss saves the shifted labels, a new tensor)
}


@pytest.mark.parametrize("architecture", sorted(VERIFY_HEADS))
def test_verify_runs_every_bert_head(architecture):
    """cpu-tracker, fp32 (CPU and CUDA agree): what the step leaves alive for backward is the estimate's activations
    and loss buffers, less the inputs the estimate counts and the tracker calls inputs."""
    raw = {**BERT, "architectures": [architecture]}
    spec = TrainingSpec(precision="fp32", micro_batch_size=B, seq_len=32)
    measured = run_verify(ModelConfig("tiny", raw, "test"), spec, "cpu-tracker")
    assert measured.run["model_class"] == architecture
    got = measured.term_bytes.get(TERM_ACTIVATIONS, 0) + measured.term_bytes.get(TERM_LOSS_BUFFERS, 0)
    assert estimated_saved_bytes(raw, spec) - VERIFY_HEADS[architecture] + 4 == got


@pytest.mark.parametrize("method", ["cpu-tracker", "trace"])
def test_verify_runs_decoder_classifiers(method):
    """LlamaForSequenceClassification and GPT2ForSequenceClassification crashed verify (labels of batch x seq for a
    loss over batch rows). What is created from the score on and alive when backward begins: log_softmax b x
    num_labels (fp32: 16 B), the pooling's two int64 index tensors (2 x 8 b), nll_loss's total_weight and the loss
    (4 B each)."""
    for family in ("llama", "gpt2"):
        raw = _decoder_raw(family, "ForSequenceClassification")
        measured = run_verify(ModelConfig("tiny", raw, "test"), _spec("fp32"), method)
        assert measured.run["model_class"] == raw["architectures"][0]
        assert measured.term_bytes[TERM_LOSS_BUFFERS] == B * 2 * 4 + 2 * 8 * B + 4 + 4


def test_verify_t5_runs_the_decoder_length():
    """T5 with encoder 64 / decoder 16 tokens: the loss region holds log_softmax over the decoder's tokens
    (b s_d x vocab, fp32), nll_loss's total_weight and the loss."""
    spec = _spec("fp32", "eager", decoder=16, seq=64)
    measured = run_verify(ModelConfig("tiny", T5, "test"), spec, "cpu-tracker")
    assert measured.run["decoder_seq_len"] == 16
    assert measured.term_bytes[TERM_LOSS_BUFFERS] == B * 16 * 300 * 4 + 4 + 4


# -- the setting --------------------------------------------------------------------------------------------------
def test_decoder_seq_len_is_refused_where_there_is_no_decoder_length(cli, tmp_path):
    import json

    llama, bart = tmp_path / "llama.json", tmp_path / "bart.json"
    llama.write_text(json.dumps(tiny_raw("llama")))
    bart.write_text(json.dumps({"model_type": "bart", "architectures": ["BartForConditionalGeneration"], "d_model": 64,
                                "encoder_layers": 1, "decoder_layers": 1, "vocab_size": 300, "is_encoder_decoder": True}))
    for path, message in ((llama, "reads one sequence (--seq-len): drop --decoder-seq-len"),
                          (bart, "models a decoder length of its own for T5 only")):
        result = cli(str(path), "--decoder-seq-len", "16")
        assert (result.exit_code, result.stdout) == (2, "")
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    t5 = tmp_path / "t5.json"
    t5.write_text(json.dumps(T5))
    assert cli(str(t5), "--seq-len", "64", "--decoder-seq-len", "16", "--json").exit_code == 0
    with pytest.raises(UsageError, match="decoder_seq_len must be between 1"):
        TrainingSpec(decoder_seq_len=0)


def test_estimate_reads_the_decoder_length():
    spec = _spec("bf16-pure", "eager", decoder=16, seq=64)
    assert estimated_saved_bytes(T5, spec) == rule_saved_bytes(T5, _run("bf16-pure", True, decoder=16, seq=64))


def test_estimate_follows_the_decoder_head():
    raw = _decoder_raw("llama", "ForSequenceClassification")
    # (fp32 with grouped kv heads: CUDA's sdpa runs its math path, counted as eager: activations.sdpa_runs_math)
    assert estimated_saved_bytes(raw, _spec("fp32")) == rule_saved_bytes(raw, _run("fp32", eager=True))
