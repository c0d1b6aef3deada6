"""Trainer configs read and written as data (never executed): ``configs.deepspeed`` reads a DeepSpeed JSON config
with DeepSpeed's defaults (``memcalc.deepspeed_defaults``, written once) and the Hugging Face integration's "auto"
rules, and emits one for a TrainingSpec; ``configs.trainers`` reads a trainer's config (HF TrainingArguments JSON,
TRL, axolotl, torchtune, LLaMA-Factory) into memcalc's settings, every key accounted for (``--from``).
"""
