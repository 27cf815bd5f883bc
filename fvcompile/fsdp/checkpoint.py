"""Saving and loading a `simple_fsdp` model with `torch.distributed.checkpoint` (DCP).

`model.state_dict()` holds each parameter's DTensor shard under the model's own key; DCP
writes every rank's shards with their global offsets, so a checkpoint saved on N ranks loads
on M ranks, into a model wrapped on another mesh or into the plain, unwrapped model (in one
process without a process group, too). Optimizer state is saved by parameter name
(`torch.distributed.checkpoint.state_dict`), so it reshards the same way.
"""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        return {"model": model.state_dict()}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(model: nn.Module, checkpoint_id: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write the model's shards (and the optimizer's state) into the folder `checkpoint_id`.
    Every rank calls it."""
    dcp.save(_state(model, optimizer), checkpoint_id=checkpoint_id)


def load_checkpoint(model: nn.Module, checkpoint_id: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read a checkpoint into `model` (and `optimizer`) in place, whatever number of ranks
    saved it: each rank reads the parts of its own shards. Every rank calls it."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_id)
    if optimizer is None:
        model.load_state_dict(state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every DTensor gathered into a full tensor (a collective: every
    rank calls it), e.g. to compare with or load into an unwrapped model."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
