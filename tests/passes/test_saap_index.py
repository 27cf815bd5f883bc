"""The SAAP index's pieces on planted data: spherical k-means finds planted key directions, the
query classifier learns where the attention mass lies, and the index saves, loads and refuses a
model it does not fit."""
import pytest
import torch
from safetensors.torch import save_file

from fvcompile.kernels.saap_attention import assign_keys, probe_clusters
from fvcompile.passes.saap_index import SAAPIndex, cluster_mass, fit_layer, spherical_kmeans

D, C = 16, 6


def _planted(n=600, seed=0):
    """Keys around C random directions, with random norms; their planted labels."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    labels = torch.randint(0, C, (n,), generator=g)
    keys = directions[labels] + 0.15 * torch.randn(n, D, generator=g)
    return keys * torch.rand(n, 1, generator=g).add(0.5) * 4, labels, directions


def test_spherical_kmeans_finds_the_planted_directions():
    keys, labels, _ = _planted()
    centroids = spherical_kmeans(keys, C)
    assert torch.allclose(centroids.norm(dim=-1), torch.ones(C))
    found = assign_keys(centroids[None], keys[None])[0]
    # Each found cluster holds one planted cluster's keys (purity 1, up to relabelling).
    for c in range(C):
        assert len(labels[found == c].unique()) == 1
    with pytest.raises(ValueError, match="6 clusters need at least as many vectors"):
        spherical_kmeans(keys[:3], C)


def _layer_data(n=240, seed=1):
    """One KV head, two query heads; each query looks along one planted direction, so its true
    attention mass lies in that direction's cluster."""
    keys, labels, directions = _planted(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    aim = torch.randint(0, C, (2, n), generator=g)
    queries = 6 * directions[aim] + 0.3 * torch.randn(2, n, D, generator=g)
    scores = queries @ keys.T / D ** 0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return keys[None], queries, attention


def test_cluster_mass_splits_each_querys_attention_by_cluster():
    attention = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    mass = cluster_mass(attention, torch.tensor([2, 0, 2]), 3)
    torch.testing.assert_close(mass, torch.tensor([[0.25, 0.0, 0.75], [0.6, 0.0, 0.4]]))


def test_the_classifier_probes_the_clusters_that_hold_the_mass():
    keys, queries, attention = _layer_data()
    fit = fit_layer([(keys, queries, attention)], C, classifier_steps=150)
    key_cluster = assign_keys(fit.centroids, keys)  # (1, N)
    mass = cluster_mass(attention, key_cluster[0].expand(2, -1), C)  # (2, N, C)
    probed = probe_clusters(fit.weight, fit.bias, queries, probes=2)  # (2, N, 2)
    recall = mass.gather(-1, probed).sum(-1)
    later = recall[:, 40:]  # queries with a few keys behind them
    random_probes = 2 / C
    assert later.mean() > 0.85 and later.mean() > random_probes + 0.4


def test_the_index_saves_loads_and_names_what_does_not_fit(tmp_path):
    keys, queries, attention = _layer_data(n=120)
    fit = fit_layer([(keys, queries, attention)], C, classifier_steps=20)
    index = SAAPIndex.from_layers([fit, fit], {"model": "planted", "probes": 2})
    index.save(tmp_path / "index.safetensors")
    back = SAAPIndex.load(tmp_path / "index.safetensors")
    for name in ("centroids", "weight", "bias"):
        assert torch.equal(getattr(back, name), getattr(index, name))
    assert back.meta == {"model": "planted", "probes": 2}
    assert back.shapes == {"layers": 2, "kv_heads": 1, "q_heads": 2, "clusters": C, "head_dim": D}
    back.check_fits(layers=2, q_heads=2, kv_heads=1, head_dim=D, model="planted")
    with pytest.raises(ValueError, match=r"model: index 'planted', model 'other'; layers: index 2, model 30"):
        back.check_fits(layers=30, q_heads=2, kv_heads=1, head_dim=D, model="other")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a SAAP index"):
        SAAPIndex.load(tmp_path / "other.safetensors")
