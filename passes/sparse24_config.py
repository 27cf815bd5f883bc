"""The options of the sparse24 pass: one frozen, validated config, and named recipes.

`Sparse24Config` holds every option that changes what the pass writes; `RECIPES` names the
combinations worth naming. `Sparse24(recipe="paper")`, `Sparse24(config=...)` and the keyword
form `Sparse24(fp8=True, sparse_weight_grad="all")` all end in one of these.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

WEIGHT_GRADS = ("none", "dW2", "all")  # which weight gradients are 2:4 matmuls (tokens as K)


@dataclass(frozen=True)
class Sparse24Config:
    """emulate: on devices without 2:4 sparse tensor cores, run the masked-dense emulation
        (True) or leave the sites dense (False).
    warmup_steps: training steps to run dense before switching to 2:4.
    sparse_mm: None rewrites the matmuls into `sparse24_mm` where the device has sparse tensor
        cores (or where fp8 is on); True everywhere (emulated at run time); False nowhere.
    sparse_weight_grad: "none" keeps the weight gradients dense and exact; "dW2" makes
        dW2 = dYᵀ·A a 2:4 matmul with a second selection of A along the tokens, grouped strided
        (the paper's approximation of that gradient); "all" does the same for dW1 = dHᵀ·X, with
        the densest features of dH kept whole. True and False are read as "dW2" and "none".
    fp8: all six FFN matmuls in float8_e4m3fn: the 2:4 ones with the sparse operand scaled per
        row and the dense one per tensor (kernels/sparse24_fp8.py), the others dense with
        row-wise scales (passes/fp8_matmuls.py).
    """

    emulate: bool = True
    warmup_steps: int = 0
    sparse_mm: bool | None = None
    sparse_weight_grad: str = "none"
    fp8: bool = False

    def __post_init__(self):
        grads = self.sparse_weight_grad
        grads = ("dW2" if grads else "none") if isinstance(grads, bool) else grads
        if grads not in WEIGHT_GRADS:
            raise ValueError(f"sparse_weight_grad must be one of {WEIGHT_GRADS} (or True / False), "
                             f"got {self.sparse_weight_grad!r}")
        object.__setattr__(self, "sparse_weight_grad", grads)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        for name in ("emulate", "fp8"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.sparse_mm is None or isinstance(self.sparse_mm, bool)):
            raise ValueError(f"sparse_mm must be None, True or False, got {self.sparse_mm!r}")

    @property
    def sparse_dw2(self) -> bool:
        return self.sparse_weight_grad in ("dW2", "all")

    @property
    def sparse_dw1(self) -> bool:
        return self.sparse_weight_grad == "all"

    def replace(self, **changes) -> Sparse24Config:
        """A copy with `changes` (validated as a new config is)."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = [name for name in changes if name not in fields]
        if unknown:
            raise TypeError(f"sparse24 has no option {unknown[0]!r}: its options are {', '.join(fields)}, "
                            f"and recipe= (one of {', '.join(RECIPES)})")
        return dataclasses.replace(self, **changes)

    def options(self) -> dict[str, Any]:
        """The options as JSON values (the pass's uuid is keyed on them)."""
        return dataclasses.asdict(self)


RECIPES: dict[str, Sparse24Config] = {
    # The default: forward and dX sparse, every gradient the exact gradient of the sparse forward.
    "exact": Sparse24Config(),
    # The paper's training recipe: FP8 matmuls, and a token-wise 2:4 dW2 besides forward and dX.
    "paper": Sparse24Config(sparse_weight_grad="dW2", fp8=True),
    # The fastest measured on Hopper (bench/README.md): FP8, all four sparse-able matmuls 2:4.
    "fastest": Sparse24Config(sparse_weight_grad="all", fp8=True),
}


def recipe(name: str) -> Sparse24Config:
    """The config a recipe names (RECIPES)."""
    if name not in RECIPES:
        raise ValueError(f"unknown sparse24 recipe {name!r}: one of {', '.join(RECIPES)}")
    return RECIPES[name]
