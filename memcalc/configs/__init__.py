"""Trainer configs read and written as data (never executed): ``configs.deepspeed`` reads a DeepSpeed JSON config
with DeepSpeed's defaults and the Hugging Face integration's "auto" rules, and emits one for a TrainingSpec;
``configs.deepspeed_defaults`` holds DeepSpeed's defaults for absent keys, once, standard library only.

Nothing is imported here: ``memcalc.spec`` imports the defaults at start-up and must not pay for the reader.
"""
