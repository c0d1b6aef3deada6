"""Real models and steps the traced estimates are checked against: a bitsandbytes 4-bit model as transformers loads
it, and one training step measured by memcalc's tracker. torch, transformers and bitsandbytes are imported inside."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any


def bnb_4bit_model(raw: dict, compute_dtype: Any = None, double_quant: bool = True,
                   skip_modules: list[str] | None = None) -> Any:
    """A random Llama of ``raw`` saved in bf16 and loaded by transformers with BitsAndBytesConfig (NF4, double
    quantization unless told, the output head skipped unless ``skip_modules`` is given), on this CPU."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=double_quant, llm_int8_skip_modules=skip_modules,
                                      **({"bnb_4bit_compute_dtype": compute_dtype} if compute_dtype else {}))
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu",
                                                    quantization_config=quantization)


def tracked_step(model: Any, loss_of: Callable[[], Any], others: tuple[Any, ...] = ()) -> dict[str, Any]:
    """One warm-up step (AdamW over the trainable parameters creates its states), then one step under memcalc's
    tracker, the parameters registered as weights, the states as optimizer states and ``others`` (the batch) as
    other: each phase's peak snapshot."""
    import torch

    from memcalc.measure import tracker as trk

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)

    def step(tracker: trk.MemoryTracker | None) -> None:
        loss = loss_of()
        if tracker is not None:
            tracker.mark(trk.BACKWARD)
        loss.backward()
        del loss
        if tracker is not None:
            tracker.mark(trk.OPTIMIZER_STEP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(None)
    tracker = trk.MemoryTracker()
    tracker.register(model.parameters(), trk.WEIGHTS)
    tracker.register(others, trk.OTHER)
    for state in optimizer.state.values():
        tracker.register([v for v in state.values() if isinstance(v, torch.Tensor)], trk.OPTIMIZER_STATES)
    tracker.watch_gradients(trainable)
    with tracker:
        step(tracker)
    return dict(tracker.phase_peaks)
