"""FFN layers whose width changes: memories added to one layer (T-Patcher), and how such a model is saved.

In memory, each layer's FFN may have its own width. A saved model folder needs one width for every layer (the
config's `intermediate_size`, `n_inner` or `ffn_dim`), so narrower layers are padded with *inert* memories: a
zero key row (and zero key bias) and a zero value vector. An inert memory adds exactly nothing — its coefficient
is f(0)·0 = 0 in a gated FFN and f(0) = 0 (GELU, ReLU, SiLU) times a zero value otherwise — so the folder loads in
plain transformers and computes what the model in memory computes. `trim_inert_memories` drops such a tail again
when kvedit loads the folder, so a patch that added memories reverts to the original shapes.

Neuron axis: a key module's weight holds one row per memory (`[d_ff, d]`; columns of GPT-2's Conv1D `[d, d_ff]`),
its bias one entry; the values module's weight one column per memory (`[d, d_ff]`; rows of Conv1D `[d_ff, d]`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .lm import LM


def neuron_axis(lm: LM, name: str) -> int:
    """The axis of parameter `name` (a key module's weight or bias, or a values module's weight) that runs over
    memories."""
    if name.endswith(".bias"):
        return 0
    values = any(name == f"{lm.values_path(l)}.weight" for l in range(lm.num_layers))
    return int(values != lm.arch.transposed)


def ffn_parameters(lm: LM, layer: int) -> list[str]:
    """The names of every parameter of `layer` whose size is the layer's FFN width."""
    names = [f"{lm.values_path(layer)}.weight"]
    params = dict(lm.model.named_parameters())
    for path in lm.key_paths(layer).values():
        names += [n for n in (f"{path}.weight", f"{path}.bias") if n in params]
    return names


def ffn_width(lm: LM, layer: int) -> int:
    """How many memories layer `layer` has (its values module's input size)."""
    name = f"{lm.values_path(layer)}.weight"
    return int(lm.model.get_parameter(name).shape[neuron_axis(lm, name)])


def set_parameter(lm: LM, name: str, tensor: torch.Tensor) -> None:
    """Give parameter `name` the data `tensor` (any shape), keeping the Parameter object and its requires_grad, and
    the owning module's size attributes (`in_features`/`out_features`, Conv1D's `nf`) in step."""
    module_path, _, attr = name.rpartition(".")
    module = lm.model.get_submodule(module_path)
    param = getattr(module, attr)
    param.data = tensor.to(device=param.device, dtype=param.dtype).clone()
    if attr == "weight":
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = param.shape
        elif hasattr(module, "nf"):  # transformers' Conv1D: weight [nx, nf]
            module.nf = param.shape[1]
            if hasattr(module, "nx"):
                module.nx = param.shape[0]


def grow(lm: LM, additions: Mapping[str, torch.Tensor]) -> None:
    """Append memories: for each parameter name, the new slices along its neuron axis (`[n, d]` rows for a weight
    in memory order, `[n]` for a bias)."""
    with torch.no_grad():
        for name, new in additions.items():
            param = lm.model.get_parameter(name)
            axis = neuron_axis(lm, name)
            piece = new.to(param.dtype) if name.endswith(".bias") or axis == 0 else new.to(param.dtype).T
            set_parameter(lm, name, torch.cat([param.detach(), piece.to(param.device)], dim=axis))


def uniform_state_dict(lm: LM) -> tuple[dict[str, torch.Tensor], int]:
    """The model's state dict with every layer's FFN padded by inert memories to the widest layer's width, and that
    width."""
    widths = [ffn_width(lm, l) for l in range(lm.num_layers)]
    state = lm.model.state_dict()
    widest = max(widths)
    for layer, width in enumerate(widths):
        if width == widest:
            continue
        for name in ffn_parameters(lm, layer):
            axis = neuron_axis(lm, name)
            shape = list(state[name].shape)
            shape[axis] = widest - width
            state[name] = torch.cat([state[name], state[name].new_zeros(shape)], dim=axis)
    return state, widest


def trim_inert_memories(lm: LM) -> int:
    """Drop each layer's trailing inert memories (zero key rows, zero key biases, zero value vectors: they add
    nothing); returns how many were dropped."""
    dropped = 0
    for layer in range(lm.num_layers):
        names = ffn_parameters(lm, layer)
        tensors = {n: lm.model.get_parameter(n).detach() for n in names}
        if any(t.device.type == "meta" for t in tensors.values()):  # offloaded by a device map: left as it is
            continue
        width = ffn_width(lm, layer)
        keep = width
        while keep > 0 and all(not bool(t.select(neuron_axis(lm, n), keep - 1).any()) for n, t in tensors.items()):
            keep -= 1
        if keep == width or keep == 0:
            continue
        for name, t in tensors.items():
            set_parameter(lm, name, t.narrow(neuron_axis(lm, name), 0, keep))
        dropped += width - keep
    return dropped


def config_width(lm: LM) -> int:
    """The FFN width the model's config states (GPT-2 and GPT-J: None means 4 × d_model)."""
    value = getattr(lm.model.config, lm.arch.ffn_width_attr, None)
    return int(value) if value is not None else 4 * lm.d_model
