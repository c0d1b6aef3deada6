"""The library entry point: model reference + training spec (+ GPU) -> Report. No printing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from memcalc import families
from memcalc.engine import estimate
from memcalc.errors import UsageError
from memcalc.model import ModelConfig, ModelInput
from memcalc.report import Report
from memcalc.resolve import resolve_model
from memcalc.spec import TrainingSpec

if TYPE_CHECKING:
    from memcalc.fit import GpuTarget


def model_input(model_ref: str | None, num_params: int | None) -> ModelInput:
    """Resolve MODEL and/or --params. --params replaces the inventory's count (no per-tensor shapes then)."""
    if model_ref is None and num_params is None:
        raise UsageError("give a MODEL (preset name, config.json path) or --params 7B; see 'memcalc presets'")
    config: ModelConfig | None = resolve_model(model_ref) if model_ref is not None else None
    if num_params is not None:
        if config is None:
            return ModelInput.from_count(num_params)
        # --params overrides the count of a named model: no shapes, but the architecture's config stays
        # available for activations.
        flat = ModelInput.from_count(num_params, name=config.name, source=f"{config.source}, count from --params")
        return ModelInput(name=flat.name, source=flat.source, model_type=config.model_type or None,
                          tensors=flat.tensors, architecture_known=False, config=config,
                          described=families.describe(config))
    assert config is not None
    return model_of(config)


def model_of(config: ModelConfig) -> ModelInput:
    """The model a config describes: its family's resolved view and its exact tensors."""
    described = families.describe(config)
    return ModelInput(name=config.name, source=config.source, model_type=config.model_type or None,
                      tensors=tuple(described.inventory()), architecture_known=True, config=config,
                      notes=tuple(described.inventory_notes()), described=described)


def run(model: ModelInput, spec: TrainingSpec, gpu: GpuTarget | None = None,
        defaults_used: Sequence[str] = (), solve_batch: bool = False, solve_seq_len: bool = False) -> Report:
    report = estimate(model, spec, defaults_used)
    if gpu is not None:
        from memcalc.fit import check_fit  # only with --gpu

        fit = check_fit(report, spec, gpu, rerun=lambda changed: estimate(model, changed),
                        solve_batch=solve_batch, solve_seq_len=solve_seq_len)
        report = report.with_fit(fit)
    return report
