"""Study: can all four sparse-able FFN matmuls run 2:4 without losing accuracy? (CPU, emulated)

sparse24 makes the forward matmul and dX sparse exactly, and dW2 = dYᵀ·A sparse with a second
2:4 selection of A along the tokens (an approximation, within the loss bar in
sparse24_training.py). dW1 = dHᵀ·X the same way cost far more and was rejected (bench/README.md).
The paper keeps its backward sparse with two tricks: the few densest features (5%) stay dense, and the tokens are
permuted at random before they are grouped in fours. Before building kernels for that, this
script measures whether the tricks hold accuracy here: llama-tiny-relu2 trained as in
sparse24_training.py, its FFNs swapped for a plain-PyTorch FFN whose backward computes dW1 and
dW2 from token-wise 2:4 operands, without the tricks, with each, and with both.

    python bench/diag/sparse24_backward_study.py --out bench/results/
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fvcompile.kernels.sparse24 import mask24, sparse24_relu_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for sparse24_training
from sparse24_training import study_setup, train  # noqa: E402


def token_sparse(m: Tensor, dense_fraction: float, perm: Tensor | None) -> Tensor:
    """m (T, H) with, in every feature column, the 2 largest |values| of every 4 tokens kept
    (tokens grouped in `perm` order), except the `dense_fraction` densest columns, kept whole."""
    t = m.shape[0]
    mp = m[perm] if perm is not None else m
    padded = torch.nn.functional.pad(mp, (0, 0, 0, (-t) % 4))
    keep = mask24(padded.t().abs()).t()[:t]
    if dense_fraction:
        densest = (m != 0).sum(0).topk(math.ceil(dense_fraction * m.shape[1])).indices
        keep[:, densest] = True
    sparse = torch.where(keep, mp, 0)
    if perm is None:
        return sparse
    out = torch.empty_like(sparse)
    out[perm] = sparse
    return out


def token_order(t: int, permute) -> Tensor | None:
    """The order in which tokens are grouped in fours: as they come (None), "random", or
    "strided": tokens t, t + T/4, t + T/2, t + 3T/4 together (far apart, so from different
    sequences, yet a fixed pattern a kernel can compute instead of gathering)."""
    if not permute:
        return None
    if permute == "random":
        return torch.randperm(t)
    quarter = -(-t // 4)
    order = torch.arange(4 * quarter).view(4, quarter).t().reshape(-1)
    return order[order < t]


class AllSparseFFN(torch.autograd.Function):
    """y = S(relu(x W1ᵀ))² W2ᵀ (S: 2:4 along hidden); dX exact (dH is 2:4 along hidden);
    dW2 = dYᵀ·S_tok(A) and dW1 = S_tok(dH)ᵀ·X with token-wise 2:4 operands."""

    @staticmethod
    def forward(ctx, x, w1, w2, dense_fraction, permute, sparse_dw1=True):
        r = sparse24_relu_reference(x @ w1.t())
        ctx.save_for_backward(x, w1, w2, r)
        ctx.dense_fraction, ctx.permute, ctx.sparse_dw1 = dense_fraction, permute, sparse_dw1
        return (r * r) @ w2.t()

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, r = ctx.saved_tensors
        d_h = (dy @ w2) * 2 * r  # zero wherever the sparse relu is
        perm = token_order(x.shape[0], ctx.permute)
        d_w2 = dy.t() @ token_sparse(r * r, ctx.dense_fraction, perm)
        d_w1 = (token_sparse(d_h, ctx.dense_fraction, perm) if ctx.sparse_dw1 else d_h).t() @ x
        return d_h @ w1, d_w1, d_w2, None, None, None


class SwappedFFN(nn.Module):
    """Holds the original FFN's weights; runs AllSparseFFN on them."""

    def __init__(self, ffn: nn.Module, dense_fraction: float, permute, sparse_dw1: bool = True):
        super().__init__()
        self.w1, self.w2 = ffn.w1, ffn.w2
        self.dense_fraction, self.permute, self.sparse_dw1 = dense_fraction, permute, sparse_dw1

    def forward(self, x):
        y = AllSparseFFN.apply(x.reshape(-1, x.shape[-1]), self.w1.weight, self.w2.weight,
                               self.dense_fraction, self.permute, self.sparse_dw1)
        return y.reshape(*x.shape[:-1], -1)


def main() -> None:
    args, _, train_data, val_tokens = study_setup(__doc__)
    variants = {"dense": None, "all four sparse": (0.0, False), "+ 5% densest features dense": (0.05, False),
                "+ tokens permuted": (0.0, "random"), "+ both": (0.05, "random"),
                "+ tokens strided": (0.0, "strided"), "+ strided, 5% dense": (0.05, "strided"),
                # Only dW2 token-wise sparse (sparse24's sparse_weight_grad), tokens as they come or strided.
                "dW2 only": (0.0, False, False), "dW2 only, strided": (0.0, "strided", False)}
    runs = {}
    for label, tricks in variants.items():
        print(f"training {label} for {args.steps} steps ...", flush=True)

        def swap(model, tricks=tricks):
            for layer in model.layers if tricks else ():
                layer.feed_forward = SwappedFFN(layer.feed_forward, *tricks)

        torch.manual_seed(args.seed)  # the permutations too
        runs[label] = train([], args, train_data, val_tokens, prepare=swap)
        torch._dynamo.reset()
    dense = runs["dense"]["val_loss"][-1]
    gaps = {label: (run["val_loss"][-1] - dense) / dense for label, run in runs.items()}
    print(f"\nllama-tiny-relu2, {args.steps} steps, batch {args.batch}x{args.seq}, CPU; held-out loss:")
    for label, run in runs.items():
        print(f"  {label:<30} {run['val_loss'][-1]:.4f} ({gaps[label] * 100:+.2f}%)")
    if args.out:
        out = Path(args.out) / f"sparse24_backward_study_cpu_{time.strftime('%Y-%m-%d')}.json"
        out.write_text(json.dumps({"device": "cpu", "torch": torch.__version__, "args": vars(args),
                                   "final_gaps": gaps, "runs": runs}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
