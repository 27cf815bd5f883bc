"""How a sharded parameter becomes the full tensor a module computes with.

Each module that holds parameters gets a class of its own, made at wrap time: a subclass of
its class whose parameter names are properties. Reading `linear.weight` then returns the
gathered tensor, while `linear._parameters["weight"]` keeps the sharded DTensor that the
optimizer updates and `state_dict()` saves under the module's own key. (`nn.utils.parametrize`
would rename the keys to `parametrizations.weight.original` and hide the DTensor from DCP.)

The gather is one DTensor redistribution, which autograd differentiates:

    forward:  shard --cast to param_dtype--> all-gather (Shard -> Replicate)   --> to_local()
    backward: grad  --cast to reduce_dtype--> reduce-scatter (Partial -> Shard) --> cast back
              (all-reduce, Partial -> Replicate, on a mesh dimension that replicates)

`to_local(grad_placements=Partial("avg"))` says the gradient each rank computes for the full
parameter is its own part of an average over ranks, which is what data parallelism computes.

Resharding after the forward: the gather runs under `torch.utils.checkpoint` with a policy that
marks every op of it (the cast, the all-gather, its wait and layout ops, all cheap to redo from
the shard) as must-recompute. Under `torch.compile` the partitioner then gathers again in the
backward instead of keeping the full parameter alive between forward and backward. In eager
mode the ops that use the gathered parameter save it for their own backward, so the
recomputation saves memory only in compiled graphs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


@dataclass(frozen=True)
class Gather:
    """The full-parameter view of a sharded parameter: how to gather it and how its gradient
    goes back (the same object serves every parameter of a wrapped model)."""

    compute_placements: tuple[Placement, ...]  # Replicate() on every mesh dimension
    grad_placements: tuple[Placement, ...]  # Partial("avg") on every mesh dimension
    param_dtype: torch.dtype | None
    reduce_dtype: torch.dtype | None
    reshard_after_forward: bool

    def __call__(self, param: DTensor) -> torch.Tensor:
        if self.reshard_after_forward:
            return checkpoint(self.gather, param, use_reentrant=False, context_fn=recompute_gather_contexts)
        return self.gather(param)

    def gather(self, param: DTensor) -> torch.Tensor:
        full = param.redistribute(placements=self.compute_placements, forward_dtype=self.param_dtype,
                                  backward_dtype=self.reduce_dtype)
        return full.to_local(grad_placements=self.grad_placements)


def _recompute_every_op(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # The checkpointed region is the gather alone: its only input is the shard, which stays alive,
    # so every op in it can run again in the backward. MUST (not PREFER) so that torch.compile's
    # partitioner does not save the all-gather's output instead.
    return CheckpointPolicy.MUST_RECOMPUTE


def recompute_gather_contexts():
    """The `context_fn` of the gather's checkpoint: recompute the all-gather in the backward."""
    return create_selective_checkpoint_contexts(_recompute_every_op)


def _gathered(module: nn.Module, name: str) -> torch.Tensor:
    return module._fsdp_gather(module._parameters[name])


@functools.cache
def _parametrized_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of `cls` whose attributes `names` read the gathered parameters (one class per
    original class and parameter names, shared by every module of that kind)."""
    properties = {name: property(functools.partial(_gathered, name=name)) for name in names}
    return type(f"SimpleFSDP{cls.__name__}", (cls,), {**properties, "__module__": cls.__module__,
                                                      "_fsdp_original_class": cls})


def parametrize_module(module: nn.Module, gather: Gather) -> None:
    """Make `module`'s own parameters (already DTensors in `module._parameters`) read as their
    gathered full tensors."""
    names = tuple(name for name, p in module._parameters.items() if p is not None)
    if not names:
        return
    cls = getattr(type(module), "_fsdp_original_class", type(module))
    module.__class__ = _parametrized_class(cls, names)
    module._fsdp_gather = gather
