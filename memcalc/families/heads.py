"""The heads of decoder families other than the causal LM their rules describe: sequence classification and the
bare model (``families.base`` SEQ_CLS and BASE, as ``families.tensors.decoder_heads`` names the classes).

A decoder family's rule counts what ``*ForCausalLM`` saves: the final norm's output as lm_head's input (and its
cast under autocast), int64 input_ids and shifted labels (2 x 8 T), ForCausalLMLoss's log_softmax over T x vocab in
fp32 and its fp32 total_weight, and where the family has them the router aux loss and Gemma-2's final-logit
softcapping. ``for_head`` turns that into what the class ``architectures`` names saves:

``*ForSequenceClassification`` (modeling_layers.GenericForSequenceClassification.forward, and GPT-2's, OPT's,
BLOOM's, Falcon's copies of it): ``score`` reads the final norm's output as lm_head did (the same bytes), then
``logits[arange(b), last_non_pad_token]`` keeps one row per sequence; advanced indexing saves both index tensors
(int64 b each). loss_utils.ForSequenceClassificationLoss: fixed_cross_entropy on the pooled logits as they are (no
upcast): log_softmax saves b x num_labels in the logits' dtype (fp32 under CUDA autocast), nll_loss its labels
(int64 b) and total_weight in that dtype. No shifted labels, no softcapping, no aux loss (only the causal LM
computes load_balancing_loss_func). num_labels 1 (MSE) or multi-label (BCE) save b x num_labels likewise.

``*Model``: no head and no loss. The final norm's output is returned; the first Linear of whatever head trains it
saves it (or, under autocast, its cast), as lm_head's input is counted. The shifted labels, loss, its scalars, the
softcapping and the aux loss are dropped, and the report says the head's own activations and loss are not counted.
"""

from __future__ import annotations

import dataclasses

from memcalc.families.base import BASE, SEQ_CLS, Arch
from memcalc.families.saved import (
    PART_IDS,
    PART_LOGIT_SOFTCAP,
    PART_LOSS_SCALARS,
    PART_ROUTING,
    Loss,
    Rule,
    Run,
)
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SEQ_CLS_SOURCE = ("transformers modeling_layers.GenericForSequenceClassification: the pooled logits (one row per "
                  "sequence), loss_utils.ForSequenceClassificationLoss (cross-entropy on them as they are); "
                  "log_softmax saves its output")


def for_head(rule: Rule, a: Arch, run: Run) -> Rule:
    """A decoder family's causal-LM ``rule`` for the head ``a.head`` names (unchanged for a causal LM, and for
    families whose ``head`` is a class name: BERT and T5 model their heads themselves)."""
    if a.head not in (SEQ_CLS, BASE):
        return rule
    per_model = dict(rule.per_model)
    shifted_labels = BYTES_PER_INT64 * run.tokens
    per_model[PART_IDS] = per_model.get(PART_IDS, 0) - shifted_labels
    for part in (PART_LOGIT_SOFTCAP, PART_ROUTING, PART_LOSS_SCALARS):
        per_model.pop(part, None)
    if a.head == SEQ_CLS:
        # log_softmax's output and total_weight: the logits' dtype (CUDA autocast runs log_softmax in fp32)
        loss_bytes = BYTES_PER_FP32 if run.autocast else run.c
        per_model[PART_IDS] += 3 * BYTES_PER_INT64 * run.b  # labels, and the two index tensors of the pooling
        per_model[PART_LOSS_SCALARS] = loss_bytes
        loss: Loss | None = Loss(run.b, a.num_labels, loss_bytes, SEQ_CLS_SOURCE)
        notes = rule.notes
    else:
        loss = None
        notes = [*rule.notes, (f"{a.architecture} has no head and no loss: beyond the final norm's output (what a "
                               "head's first Linear saves) the activations and loss of the head that trains it are "
                               "not counted")]
    per_model = {part: n for part, n in per_model.items() if n}
    return dataclasses.replace(rule, per_model=per_model, loss=loss, notes=notes)
