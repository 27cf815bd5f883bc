"""`simple_fsdp`: fully sharded data parallelism written with DTensor, so that `torch.compile`
traces a training step's computation and its collectives in one graph (SimpleFSDP, arXiv
2411.00284). Read top to bottom:

1. pick the placements of the parameters on the mesh for the mode;
2. turn every parameter into a DTensor with those placements (each rank keeps its shard);
3. make each module read its parameters through a gather (see `parametrization.py`), whose
   backward reduces the gradients;
4. with a mixed-precision policy, cast the root module's floating-point inputs.

The model is changed in place and returned; it then goes through `fvcompile.optimize` (or
`torch.compile`) unchanged. The optimizer is built on `model.parameters()` after wrapping: it
updates the shards, in the parameters' own dtype (the master weights).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor

from fvcompile.fsdp.mixed_precision import MixedPrecisionPolicy, cast_floating_inputs
from fvcompile.fsdp.parametrization import Gather, parametrize_module

MODES = ("fully_shard", "replicate", "hybrid_shard")


def simple_fsdp(model: nn.Module, mesh: DeviceMesh, *, mode: str = "fully_shard",
                mp_policy: MixedPrecisionPolicy | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model`'s parameters over `mesh` and gather them on use.

    mode: "fully_shard" (1-D mesh: each rank holds 1/N of every parameter, dim 0; gradients are
        reduce-scattered), "replicate" (every rank holds every parameter; gradients are
        all-reduced: DDP), or "hybrid_shard" (2-D mesh: replicate over dim 0, e.g. nodes, shard
        over dim 1, e.g. the GPUs of a node; gradients reduce-scattered then all-reduced).
    mp_policy: `MixedPrecisionPolicy(param_dtype=, reduce_dtype=)` (FSDP2's is accepted too);
        None computes and reduces in the parameters' dtype.
    reshard_after_forward: free the gathered parameters after the forward and gather them again
        in the backward (recomputation of the all-gathers, effective under torch.compile);
        False keeps them from forward to backward (one all-gather per parameter per step).

    Returns `model`, changed in place: parameters are DTensors (`state_dict()` keeps the
    model's keys and holds the shards), buffers stay plain tensors, replicated on every rank.
    """
    policy = MixedPrecisionPolicy.from_any(mp_policy)
    placements = _check_arguments(model, mesh, mode, reshard_after_forward)

    # 1. What the forward computes with, and what each rank's gradient is: its part of an average.
    gather = Gather(compute_placements=(Replicate(),) * mesh.ndim,
                    grad_placements=(Partial("avg"),) * mesh.ndim,
                    param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                    reshard_after_forward=reshard_after_forward)

    # 2. Every parameter becomes a DTensor; one shared by two modules (tied weights) stays shared.
    distributed: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in distributed:
                distributed[id(param)] = _distribute(param, mesh, placements)
            module._parameters[name] = distributed[id(param)]

    # 3. Every module reads its own parameters through the gather.
    for module in model.modules():
        parametrize_module(module, gather)

    # 4. Inputs in the compute dtype.
    if policy.param_dtype is not None and policy.cast_forward_inputs:
        model.register_forward_pre_hook(cast_floating_inputs(policy.param_dtype), with_kwargs=True)

    model._simple_fsdp = {"mode": mode, "mesh": mesh, "placements": placements, "mp_policy": policy,
                          "reshard_after_forward": reshard_after_forward}
    return model


def parameter_placements(mode: str, mesh: DeviceMesh) -> tuple[Placement, ...]:
    """Where a parameter lives on `mesh` in `mode` (one placement per mesh dimension)."""
    if mode == "fully_shard":
        return (Shard(0),)
    if mode == "replicate":
        return (Replicate(),) * mesh.ndim
    return (Replicate(), Shard(0))  # hybrid_shard


def _distribute(param: nn.Parameter, mesh: DeviceMesh, placements: tuple[Placement, ...]) -> nn.Parameter:
    # distribute_tensor takes rank 0's values, so every rank starts from the same weights.
    return nn.Parameter(distribute_tensor(param.detach(), mesh, placements), requires_grad=param.requires_grad)


def _check_arguments(model, mesh, mode, reshard_after_forward) -> tuple[Placement, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"simple_fsdp takes an nn.Module instance, got {type(model).__name__}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError("simple_fsdp takes a DeviceMesh, e.g. torch.distributed.device_mesh."
                        f"init_device_mesh('cpu', (world_size,)), got {type(mesh).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; simple_fsdp's modes are {', '.join(MODES)}")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward takes a bool, got {reshard_after_forward!r}")
    if mode == "fully_shard" and mesh.ndim != 1:
        raise ValueError(f"mode='fully_shard' shards over a 1-D mesh, got a {mesh.ndim}-D mesh {tuple(mesh.shape)}: "
                         "use mode='hybrid_shard' (replicate over dim 0, shard over dim 1) or flatten the mesh")
    if mode == "hybrid_shard" and mesh.ndim != 2:
        raise ValueError(f"mode='hybrid_shard' needs a 2-D mesh (replicate, shard), got a {mesh.ndim}-D mesh "
                         f"{tuple(mesh.shape)}: e.g. init_device_mesh('cpu', (nodes, ranks_per_node))")
    if any(hasattr(m, "_fsdp_gather") for m in model.modules()) or any(
            isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model's parameters are DTensors already (simple_fsdp or another "
                         "parallelism was applied to it): wrap a plain model once")
    return parameter_placements(mode, mesh)
