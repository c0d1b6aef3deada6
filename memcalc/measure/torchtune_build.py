"""torchtune's model build and checkpoint load as its releases before 0.3 ran them, for replaying the published runs
of those releases (its tutorials' figures, benchmarks/reserved.py): ``with releases_before_0_3(): ...`` around a
``--reserved`` estimate of a torchtune recipe. Nothing else uses it: memcalc's own replay is of torchtune as it is.

What differed (torchtune 0914d5cfb, the QLoRA tutorial's commit, as in every release to 0.2.1):

- the build (``models/llama2/_component_builders.py`` ``lora_llama2``; ``modules/transformer.py``
  ``TransformerDecoder.__init__`` and ``_get_clones``): the builder made ONE decoder layer (its LoRALinear weights in
  16-bit on the device, each quantized by ``to_nf4`` under QLoRA, the 16-bit weight dropped as
  ``_create_weight_and_bias`` returned; its RotaryPositionalEmbeddings with their own ``theta`` and fp32 ``cache`` of
  max_seq_len x head_dim / 2 x 2), then the token embeddings and the output projection; ``TransformerDecoder`` then
  deep-copied that layer once per layer, and made the final norm. A deep copy of an NF4 weight is torchtune's
  ``clone`` (``utils/_register_nf4_dispatch_ops.py``): ``to_nf4(get_original_weight())``, a dequantization and a
  quantization of the whole tensor. The template layer was freed when the builder returned.
- the load: torchtune's own NF4 ``copy_`` (the same file, deleted in August 2024, #1294): the checkpoint's tensor moved
  to the device and quantized (``to_nf4``), then the destination's tensors REPLACED by the new ones (attribute by
  attribute), where torchao's ``copy_`` copies into them.

Each decoder layer kept its own rotary cache (2 MiB for Llama-2-7B's 4,096 positions). Today's builders share one.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_BEFORE_0_3: contextvars.ContextVar[bool] = contextvars.ContextVar("memcalc_torchtune_before_0_3", default=False)
# NF4Tensor's attributes in the order torchtune's inplace_copy assigned them (each assignment frees the old tensor)
REPLACED_IN_ORDER = ("quantized_scalers", "quantization_factor", "scaler_mean", "quantized_data", "nf4")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@contextlib.contextmanager
def releases_before_0_3() -> Iterator[None]:
    """Replay torchtune's build and load as releases 0.1 to 0.2.1 ran them (the module docstring), for the
    ``--reserved`` estimates made inside this block (their traces are cached apart: ``active()`` is in the key)."""
    token = _BEFORE_0_3.set(True)
    try:
        yield
    finally:
        _BEFORE_0_3.reset(token)


def active() -> bool:
    return _BEFORE_0_3.get()


def _layer_index(name: str) -> int | None:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def _rope(model: torch.nn.Module, with_temporaries: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's rotary buffers as torchtune 0914d5cfb's RotaryPositionalEmbeddings._rope_init made them (fp32):
    ``with_temporaries``, as the builder made them (the positions, their product with theta, its cosine and sine, each
    freed once stacked); else as a deep copy makes them (the two buffers alone)."""
    import torch

    config = model.config
    half = (config.hidden_size // config.num_attention_heads) // 2
    positions = config.max_position_embeddings
    theta = torch.empty(half, dtype=torch.float32)  # (its own scratch, a few hundred bytes each, left out)
    if not with_temporaries:
        return theta, torch.empty(positions, half, 2, dtype=torch.float32)
    seq_idx = torch.empty(positions, dtype=torch.float32)
    idx_theta = torch.empty(positions, half, dtype=torch.float32)
    cos, sin = torch.empty_like(idx_theta), torch.empty_like(idx_theta)
    cache = torch.empty(positions, half, 2, dtype=torch.float32)
    del cos, sin  # (torch.stack's arguments, freed as it returns; the locals as _rope_init returns)
    del seq_idx, idx_theta
    return theta, cache


def register(tracker: Any, model: torch.nn.Module, logging_into: Callable[[list], Any], weights_kind: str) -> None:
    """The build and the load, into ``tracker``'s log. The build: the template layer (its weights made and quantized
    as LoRALinear made them, its rotary buffers), the token embeddings and the output projection, each layer's deep
    copy of the template in module order (an NF4 weight dequantized and quantized again, any other tensor copied),
    the final norm, then the template freed; the model's own tensors are those the copies made (registered as
    ``weights_kind``). The load, where there are NF4 weights: each checkpoint tensor moved to the device and
    quantized, the arrived tensor freed as to_nf4 returns, then the layer's NF4 tensors replaced one by one
    (REPLACED_IN_ORDER), each old one freed as it is replaced. One logging tracker sees it all: a free is logged by
    the tracker that saw the allocation, for as long as that tracker lives."""
    import torch

    from memcalc.measure import qlora

    layers_nf4 = qlora.torchao_layers(model)
    nf4_of = {id(m.weight): m for m in layers_nf4}
    named = list(model.named_parameters())
    head = model.get_output_embeddings()
    head_params = list(head.parameters()) if head is not None else []
    head_ids = {id(p) for p in head_params}
    embeddings: list[torch.nn.Parameter] = []  # (the model's tensors outside its layers: before them, after them)
    final_norm: list[torch.nn.Parameter] = []
    layers: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in named:
        index = _layer_index(name)
        if index is not None:
            layers.setdefault(index, []).append((name, param))
        elif id(param) not in head_ids:
            (final_norm if layers else embeddings).append(param)
    first = layers.get(0)
    if not first:
        raise ValueError("torchtune's build before 0.3: the model has no decoder layer 0")
    to_nf4 = qlora._to_nf4() if layers_nf4 else None
    template: dict[str, Any] = {}
    with logging_into(tracker.events):
        for name, param in _rope_placed(first):  # the builder's one layer
            if param is None:  # the attention's RotaryPositionalEmbeddings, built
                template_rope = _rope(model, with_temporaries=True)
                continue
            module = nf4_of.get(id(param))
            if module is not None:  # LoRALinear(quantize_base=True)._create_weight_and_bias
                weight = torch.empty(module.nf4.shape, dtype=param.dtype)
                template[_relative(name)] = to_nf4(weight)
                del weight
            else:
                template[_relative(name)] = torch.empty_like(param)
        tracker.register(embeddings, weights_kind)
        tracker.register(head_params, weights_kind)
        kept_rope = []
        for index in sorted(layers):  # _get_clones: a deep copy of the template per layer
            for name, param in _rope_placed(layers[index]):
                if param is None:  # the copy's rotary buffers
                    kept_rope.append(_rope(model, with_temporaries=False))
                    continue
                module = nf4_of.get(id(param))
                if module is None:
                    tracker.register([param], weights_kind)
                    continue
                original = template[_relative(name)].get_original_weight()  # torchtune's NF4 clone
                module.nf4 = to_nf4(original)
                del original
        model._torchtune_rope_buffers = kept_rope  # (each layer's own rotary buffers, kept as long as the model)
        tracker.register(final_norm, weights_kind)
        del template_rope  # (the builder returns: its template layer freed)
        template.clear()
        for module in layers_nf4:  # load_state_dict through torchtune's NF4 copy_
            made = to_nf4(torch.empty(module.nf4.shape, dtype=module.weight.dtype))
            for attribute in REPLACED_IN_ORDER:
                setattr(module.nf4, attribute, getattr(made, attribute))
            del made


def _rope_placed(params: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A decoder layer's parameters in module order with its attention's rotary buffers (a ``None``) where torchtune's
    layer had them: after the attention's own parameters (CausalSelfAttention's pos_embeddings), before the MLP's."""
    last = max((i for i, (name, _p) in enumerate(params) if ".self_attn." in name), default=len(params) - 1)
    return [*params[:last + 1], ("rope", None), *params[last + 1:]]


def _relative(name: str) -> str:
    """A decoder layer's parameter name without the layer's index (the template's name for it)."""
    return _LAYER.sub(".layers.#.", name, count=1)
