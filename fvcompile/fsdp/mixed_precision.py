"""The mixed-precision policy of `simple_fsdp`: in which dtype the forward computes with the
gathered parameters, and in which dtype the gradients are reduced.

The parameters themselves (the master weights the optimizer updates) keep their own dtype,
float32 in training: the gather casts a shard to `param_dtype` before the all-gather, and the
backward casts the gradient to `reduce_dtype` before the reduce-scatter (or all-reduce) and
back to the parameter's dtype after it (`DTensor.redistribute(forward_dtype=, backward_dtype=)`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixedPrecisionPolicy:
    """param_dtype: dtype of the gathered parameters the forward and backward compute with
        (None: the parameter's own dtype). The all-gather runs in this dtype.
    reduce_dtype: dtype in which gradients are reduced across ranks (None: the parameter's own
        dtype, as FSDP2 does when it is unset).
    cast_forward_inputs: cast the root module's floating-point inputs to `param_dtype`, so that
        a model fed float32 inputs computes in `param_dtype` (integer inputs are left alone).
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True

    def __post_init__(self):
        for field_name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, field_name)
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise TypeError(f"MixedPrecisionPolicy.{field_name} takes a floating-point torch.dtype "
                                f"(e.g. torch.bfloat16) or None, got {value!r}")
        if not isinstance(self.cast_forward_inputs, bool):
            raise TypeError(f"MixedPrecisionPolicy.cast_forward_inputs takes a bool, got {self.cast_forward_inputs!r}")

    @classmethod
    def from_any(cls, policy) -> "MixedPrecisionPolicy":
        """Ours as it is, None as full precision, and FSDP2's `torch.distributed.fsdp.MixedPrecisionPolicy`
        (its param_dtype, reduce_dtype and cast_forward_inputs; its output_dtype is not supported)."""
        if policy is None:
            return cls()
        if isinstance(policy, cls):
            return policy
        from torch.distributed.fsdp import MixedPrecisionPolicy as FSDP2Policy

        if isinstance(policy, FSDP2Policy):
            if policy.output_dtype is not None:
                raise ValueError("simple_fsdp does not cast outputs: leave MixedPrecisionPolicy.output_dtype "
                                 f"unset (got {policy.output_dtype})")
            return cls(policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs)
        raise TypeError("mp_policy takes fvcompile.fsdp.MixedPrecisionPolicy(param_dtype=..., reduce_dtype=...), "
                        f"torch.distributed.fsdp.MixedPrecisionPolicy or None, got {type(policy).__name__}")


def cast_floating_inputs(dtype: torch.dtype):
    """A forward pre-hook (with kwargs) that casts the floating-point tensors among a module's
    arguments to `dtype`."""

    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return type(value)(*(cast(v) for v in value))
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value

    def hook(module, args, kwargs):
        return cast(args), cast(kwargs)

    return hook
