"""The SAAP index (arXiv 2502.08246): key centroids and query classifiers, fitted offline.

SAAP partitions keys and queries asymmetrically:
- keys, taken before RoPE (the rotation mixes position into direction and spoils clustering), are
  clustered per layer and KV head by spherical k-means: a key belongs to its most similar
  centroid;
- queries are routed by a small per-head classifier (one linear layer, D -> clusters), trained
  on calibration text to predict where each query's attention mass lies: its target is the mass
  of the true (RoPE'd, causal) attention that falls in each cluster, its loss the cross-entropy
  against that distribution, so that the clusters it ranks first hold the most mass.

`fit_layer` fits one layer from tensors; collecting them from a model is the calibration's job.
`SAAPIndex.save` writes safetensors whose header carries the JSON description (model, shapes,
hyper-parameters); `SAAPIndex.load` reads it back and `check_fits` names what differs from a model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fvcompile.kernels.saap_attention import assign_keys


def spherical_kmeans(x: Tensor, clusters: int, *, iters: int = 25, seed: int = 0) -> Tensor:
    """(clusters, D) unit centroids of the rows of x (N, D) under cosine similarity. Starts from
    distinct random rows; a cluster left empty takes the row its centroid fits worst."""
    if x.shape[0] < clusters:
        raise ValueError(f"{clusters} clusters need at least as many vectors, got {x.shape[0]}")
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:clusters]].clone()
    for _ in range(iters):
        similarity = x @ centroids.T
        assign = similarity.argmax(-1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters)
        for empty in (counts == 0).nonzero().flatten().tolist():
            sums[empty] = x[similarity.max(-1).values.argmin()]
        centroids = torch.nn.functional.normalize(sums, dim=-1)
    return centroids


def cluster_mass(attention: Tensor, key_cluster: Tensor, clusters: int) -> Tensor:
    """(..., Lq, clusters): the attention mass (..., Lq, Lk) of each query in each key cluster
    (key_cluster: (..., Lk) ids, broadcast over the queries)."""
    index = key_cluster.unsqueeze(-2).expand_as(attention)
    return torch.zeros(*attention.shape[:-1], clusters, dtype=attention.dtype).scatter_add_(-1, index, attention)


def fit_classifier(queries: Tensor, mass: Tensor, *, steps: int = 200, lr: float = 0.05, batch: int = 4096,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Query classifiers, one per leading index (e.g. per head): weight (..., D, C) and bias
    (..., C) such that softmax(q @ w + b) follows each query's cluster mass (queries (..., N, D),
    mass (..., N, C), rows summing to 1). Adam on the cross-entropy against the mass, each step on
    `batch` queries drawn at random (all of them when N <= batch): a step's cost stays the same
    however many queries the calibration holds. The heads train together in one batched matmul;
    Adam is elementwise and the loss a sum of per-head means, so each head's fit is its own."""
    g = torch.Generator().manual_seed(seed)
    *heads, n, d = queries.shape
    c = mass.shape[-1]
    weight = torch.zeros(*heads, d, c, requires_grad=True)
    bias = torch.zeros(*heads, 1, c, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    q, target = queries.float(), mass.float()
    for _ in range(steps):
        if n > batch:
            rows = torch.randint(0, n, (batch,), generator=g)
            q_step, target_step = q[..., rows, :], target[..., rows, :]
        else:
            q_step, target_step = q, target
        logits = q_step @ weight + bias
        loss = -(target_step * logits.log_softmax(-1)).sum(-1).mean(-1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach().squeeze(-2)


@dataclass
class LayerFit:
    """One layer's part of the index."""

    centroids: Tensor  # (Hkv, C, D), unit rows
    weight: Tensor  # (Hq, D, C)
    bias: Tensor  # (Hq, C)


def fit_layer(sequences: list[tuple[Tensor, Tensor, Tensor]], clusters: int, *, iters: int = 25,
              classifier_steps: int = 200, seed: int = 0) -> LayerFit:
    """Fit one layer on calibration sequences, each (keys, queries, attention): keys (Hkv, L, D)
    before RoPE; queries (Hq, L, D) as the classifier will see them; attention either the true
    causal attention weights (Hq, L, L) of those queries over those keys (rows summing to 1), or
    a function of the keys' clusters (Hq, L) and the number of clusters that returns each query's
    cluster mass (Hq, L, clusters): long sequences' weights are too large to hold, the function
    makes them a block of query rows at a time (`saap_calibration.cluster_mass_rows`).
    Query head h reads key head h // (Hq // Hkv)."""
    hkv, hq = sequences[0][0].shape[0], sequences[0][1].shape[0]
    group = hq // hkv
    keys = torch.cat([k for k, _, _ in sequences], dim=1)
    centroids = torch.stack([spherical_kmeans(keys[h], clusters, iters=iters, seed=seed + h) for h in range(hkv)])
    del keys
    queries, masses = [], []
    for k, q, attention in sequences:
        key_cluster = assign_keys(centroids, k).repeat_interleave(group, dim=0)  # (Hq, L)
        if callable(attention):
            masses.append(attention(key_cluster, clusters).float())
        else:
            masses.append(cluster_mass(attention.float(), key_cluster, clusters))
        queries.append(q)
    queries, masses = torch.cat(queries, dim=1), torch.cat(masses, dim=1)
    weight, bias = fit_classifier(queries, masses, steps=classifier_steps, seed=seed)
    return LayerFit(centroids, weight, bias)


@dataclass
class SAAPIndex:
    """Every layer's centroids and classifiers, and what they were fitted for."""

    centroids: Tensor  # (L, Hkv, C, D)
    weight: Tensor  # (L, Hq, D, C)
    bias: Tensor  # (L, Hq, C)
    meta: dict = field(default_factory=dict)  # model, shapes, hyper-parameters

    @classmethod
    def from_layers(cls, layers: list[LayerFit], meta: dict) -> "SAAPIndex":
        return cls(torch.stack([f.centroids for f in layers]), torch.stack([f.weight for f in layers]),
                   torch.stack([f.bias for f in layers]), dict(meta))

    @property
    def shapes(self) -> dict:
        layers, hkv, clusters, head_dim = self.centroids.shape
        return {"layers": layers, "kv_heads": hkv, "q_heads": self.weight.shape[1], "clusters": clusters,
                "head_dim": head_dim}

    def digest(self) -> str:
        """A hash of the tensors and the description: two indexes with one digest are the same."""
        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        for t in (self.centroids, self.weight, self.bias):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        header = {"meta": self.meta, "shapes": self.shapes}
        save_file({"centroids": self.centroids.contiguous(), "weight": self.weight.contiguous(),
                   "bias": self.bias.contiguous()}, str(path), metadata={"saap": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> "SAAPIndex":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "saap" not in metadata:
                raise ValueError(f"{path} is not a SAAP index (its safetensors header has no 'saap' entry)")
            tensors = {name: f.get_tensor(name) for name in ("centroids", "weight", "bias")}
        return cls(**tensors, meta=json.loads(metadata["saap"])["meta"])

    def check_fits(self, *, layers: int, q_heads: int, kv_heads: int, head_dim: int, model: str | None = None) -> None:
        """Raise a ValueError naming each shape (and the model name) that differs from the index's."""
        asked = {"layers": layers, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim}
        differs = [f"{k}: index {self.shapes[k]}, model {v}" for k, v in asked.items() if self.shapes[k] != v]
        if model is not None and self.meta.get("model") not in (None, model):
            differs.insert(0, f"model: index {self.meta['model']!r}, model {model!r}")
        if differs:
            raise ValueError("this SAAP index does not fit the model (" + "; ".join(differs) +
                             "): calibrate an index on this model")
