"""Data-parallel training with the base model sharded across ranks (FSDP2).

Each decoder layer, the backbone around them (embeddings, final norm) and the LM head
are their own `torch.distributed.fsdp.fully_shard` units: a rank holds 1/world of every
weight and gathers one unit's weights just before the unit runs, so the largest base a
rank can train is world times what fits it alone. The LoRA weights inside the layers
are sharded the same way and trained; their gradients are averaged across ranks by
FSDP's reduce-scatter (the mean of the ranks' gradients, as one process on the global
batch takes). The reference is the same sharded weights with the adapter disabled, so
no second copy of the base is held.

The trainer reads and writes the adapter through this module whether or not the model
is sharded:
- `local_state` / `load_local_state`: this rank's part of the trainable weights, cloned
  (the best step and the starting point are kept this way, without communication);
- `full_state`, `full_optimizer_state`: the whole trainable weights and optimizer
  moments, gathered on every rank, for the adapter file and the resume point;
- `from_full_state`, `load_full_optimizer_state`: the same scattered back, so that a
  resume point is independent of the number of ranks that wrote it.

Every function that gathers is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pipeline.training.errors import TrainError
from pipeline.training.runtime import Runtime


def shard(causal_lm: Any, runtime: Runtime) -> None:
    """Shard the causal LM across the process group's ranks, in place.

    The decoder layers are found by the class names transformers lists as never to be
    split (`_no_split_modules`). A frozen LM head tied to the input embeddings is
    untied first (a frozen copy: same values), so each can be sharded with the module
    that runs it. Precision is the plain path's: weights are kept (and gathered) in the
    dtype they were loaded in (bf16 base and fp32 LoRA under bf16 autocast), so a rank's
    share of a bf16 base is half an fp32 one's, and the LoRA weights, their gradients and
    the optimizer's moments stay fp32.

    Raises:
        TrainError: the model has no layers to shard, or a trainable weight lies
            outside them (its gradient would not be averaged).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world,))
    layers = decoder_layers(causal_lm)
    _untie_output(causal_lm)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The input embeddings are a unit of their own, gathered for the lookup alone (with
    # a large vocabulary they weigh as much as several layers). The backbone and the
    # head are each called on their own, so each is a root: FSDP would keep a root's
    # weights gathered from its forward to the end of the backward unless told not to.
    embed = causal_lm.get_input_embeddings()
    fully_shard(embed, mesh=mesh)
    backbone, head = causal_lm.base_model, causal_lm.get_output_embeddings()
    fully_shard(backbone, mesh=mesh, reshard_after_forward=True)
    fully_shard(head, mesh=mesh, reshard_after_forward=True)
    units = [*layers, embed, backbone, head]
    covered = {id(p) for unit in units for p in unit.parameters()}
    stray = [n for n, p in causal_lm.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise TrainError(
            f"the trainable weights {stray[:3]} lie outside the sharded layers; set [lora] "
            "target_modules to linear layers inside the decoder layers"
        )


def decoder_layers(causal_lm: Any) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' `_no_split_modules` classes).

    Raises:
        TrainError: the model names none, or none are found.
    """
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if not layers:
        raise TrainError(
            f"cannot find the decoder layers of {type(causal_lm).__name__} (its "
            "_no_split_modules name none): it cannot be sharded; train it in one process"
        )
    return layers


def checkpoint_activations(causal_lm: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of
    keeping them (non-reentrant checkpointing), in place. Passes without gradient run
    the layer as it is, so they may extend a key/value cache; a pass with gradient must
    not (its recomputation would extend the cache again)."""
    for layer in decoder_layers(causal_lm):
        layer.forward = _checkpointed(layer.forward)


def _checkpointed(forward: Any) -> Any:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _untie_output(causal_lm: Any) -> None:
    head, embed = causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return
    if head.weight.requires_grad:
        raise TrainError(
            "the LM head shares its weights with the input embeddings and is trained: it "
            "cannot be sharded; leave lm_head and embed_tokens out of [lora] target_modules"
        )
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)


def is_sharded(model: Any) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    """The trainable weights by name, in a fixed order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def local_state(model: Any) -> dict[str, torch.Tensor]:
    """A clone of this rank's part of the trainable weights (no communication)."""
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def load_local_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Put weights from `local_state` (or `from_full_state`) back into the model."""
    with torch.no_grad():
        for name, p in trainable(model).items():
            p.copy_(state[name])


def full_state(model: Any, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The whole trainable weights (or those of `state`, from `local_state`), on the
    CPU, on every rank. A collective when sharded."""
    state = state if state is not None else local_state(model)
    return {n: _full(t).cpu() for n, t in state.items()}


def from_full_state(model: Any, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full_state`'s tensors as this rank's parts of the model's weights.

    Raises:
        KeyError: `full` lacks one of the model's trainable weights.
    """
    return {n: _like(full[n], p) for n, p in trainable(model).items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with every sharded tensor gathered (CPU)."""
    sd = optimizer.state_dict()
    state = {
        idx: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
        for idx, s in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a `full_optimizer_state`, each moment sharded like its parameter (a
    sharded parameter's shape is the whole one's)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, s in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: _like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def total_norm(norm: torch.Tensor) -> float:
    """A gradient norm (clip_grad_norm_'s result) as a number, gathered if sharded."""
    return float(_full(norm))


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` as `p` holds it: this rank's shard when `p` is sharded, on p's device."""
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            full.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements
        )
    return full.to(device=p.device, dtype=p.dtype)
