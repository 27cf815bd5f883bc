import itertools

import pytest
import torch

from fvcompile.models.detr import DETR, sine_position_encoding
from fvcompile.models.detr_loss import (
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    hungarian_match,
    matching_cost,
)
from fvcompile.models.registry import count_parameters, get
from fvcompile.models.resnet import FrozenBatchNorm2d


@pytest.fixture(scope="module")
def tiny():
    spec = get("detr-tiny")
    torch.manual_seed(0)
    return spec, spec.build()


def test_tiny_forward_backward(tiny):
    spec, model = tiny
    cfg = spec.extra["config"]
    model.train()
    model.zero_grad(set_to_none=True)
    logits, boxes = model(*spec.example_inputs(model, 2))
    L, Q = cfg.n_decoder_layers, cfg.num_queries
    assert logits.shape == (L, 2, Q, cfg.num_classes + 1)
    assert boxes.shape == (L, 2, Q, 4)
    assert ((boxes > 0) & (boxes < 1)).all()

    loss = spec.train_step(model, spec.train_batch(model, 2))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradients_reach_trainable_backbone_only(tiny):
    spec, model = tiny
    model.train()
    model.zero_grad(set_to_none=True)
    spec.train_step(model, spec.train_batch(model, 2)).backward()
    for name, p in model.backbone.named_parameters():
        if name.startswith(("layer2", "layer3", "layer4")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # the stem and layer1 are frozen
            assert not p.requires_grad and p.grad is None, name
    # Frozen batch norms hold buffers only: nothing for the optimizer, no gradient.
    frozen = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not any(list(m.parameters()) for m in frozen)
    assert not any(b.requires_grad or b.grad is not None for m in frozen for b in m.buffers())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_no_graph_break(tiny):
    spec, model = tiny
    model.eval()
    inputs = spec.example_inputs(model, 2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for got, want in zip(compiled(*inputs), model(*inputs)):
            torch.testing.assert_close(got, want)
    # Training: the compiled forward, then matching and loss outside it.
    model.train()
    loss = spec.train_step(compiled, spec.train_batch(model, 2))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["detr-r50", "detr-r101"])
def test_paper_parameter_counts(name):
    spec = get(name)
    assert count_parameters(spec) == spec.params


def test_padding_mask_changes_position_encoding():
    dim = 16
    no_padding = torch.zeros(1, 6, 8, dtype=torch.bool)
    padded = no_padding.clone()
    padded[:, 4:, :] = True
    padded[:, :, 5:] = True
    pos_full = sine_position_encoding(no_padding, dim)
    pos_padded = sine_position_encoding(padded, dim)
    assert pos_full.shape == (1, 6, 8, dim)
    # Coordinates are normalised by the *valid* extent: the valid region encodes differently...
    assert not torch.allclose(pos_full[:, :4, :5], pos_padded[:, :4, :5])
    # ...and matches an unpadded image of the valid size exactly.
    pos_small = sine_position_encoding(torch.zeros(1, 4, 5, dtype=torch.bool), dim)
    torch.testing.assert_close(pos_padded[:, :4, :5], pos_small)


def test_padding_mask_changes_model_output(tiny):
    spec, model = tiny
    model.eval()
    images, mask = spec.example_inputs(model, 1)
    padded = mask.clone()
    padded[:, 64:, :] = True
    with torch.no_grad():
        logits_full, _ = model(images, mask)
        logits_padded, _ = model(images, padded)
    assert not torch.allclose(logits_full, logits_padded)


def test_giou():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(generalized_box_iou(boxes, boxes), torch.ones(2))
    # Disjoint unit squares side by side one apart: IoU 0, hull 3x1 with 1 empty -> -1/3.
    a, b = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 3.0, 1.0])
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor(-1 / 3))
    # Half-overlapping: IoU (0.5 / 1.5), hull equals the union -> 1/3.
    c = torch.tensor([0.5, 0.0, 1.5, 1.0])
    torch.testing.assert_close(generalized_box_iou(a, c), torch.tensor(1 / 3))
    # cx, cy, w, h -> corners
    torch.testing.assert_close(box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])),
                               torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_matcher_minimises_cost_brute_force():
    gen = torch.Generator().manual_seed(0)
    queries, classes = 5, 4
    logits = torch.randn(1, 2, queries, classes + 1, generator=gen)
    boxes = 0.2 + 0.6 * torch.rand(1, 2, queries, 4, generator=gen)
    targets = [
        {"labels": torch.tensor([0, 3, 1]), "boxes": 0.2 + 0.6 * torch.rand(3, 4, generator=gen)},
        {"labels": torch.tensor([2, 2]), "boxes": 0.2 + 0.6 * torch.rand(2, 4, generator=gen)},
    ]
    matching = hungarian_match(logits, boxes, targets)
    assert len(matching) == 1 and len(matching[0]) == 2
    for b, (q_idx, t_idx) in enumerate(matching[0]):
        t = targets[b]
        n = len(t["labels"])
        assert sorted(t_idx.tolist()) == list(range(n))  # every target matched once
        assert len(set(q_idx.tolist())) == n  # to distinct queries
        cost = matching_cost(logits[0, b], boxes[0, b], [t])  # (Q, n)
        # The cost by its definition, entry by entry.
        probs = logits[0, b].softmax(-1)
        for q, j in itertools.product(range(queries), range(n)):
            giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[0, b, q]),
                                       box_cxcywh_to_xyxy(t["boxes"][j]))
            want = (-probs[q, t["labels"][j]] + 5 * (boxes[0, b, q] - t["boxes"][j]).abs().sum()
                    - 2 * giou)
            torch.testing.assert_close(cost[q, j], want)
        # Brute force over every injective assignment of targets to queries.
        best = min(sum(cost[perm[j], j].item() for j in range(n))
                   for perm in itertools.permutations(range(queries), n))
        got = cost[q_idx, t_idx].sum().item()
        assert got == pytest.approx(best, abs=1e-5)


def test_matching_uses_every_decoder_layer(tiny):
    spec, model = tiny
    model.eval()
    images, mask, targets = spec.train_batch(model, 2)
    with torch.no_grad():
        logits, boxes = model(images, mask)
    matching = hungarian_match(logits, boxes, targets)
    assert len(matching) == spec.extra["config"].n_decoder_layers
    for per_image in matching:
        for (q_idx, t_idx), t in zip(per_image, targets):
            assert len(q_idx) == len(t_idx) == len(t["labels"])


def test_meta_build_has_no_storage():
    with torch.device("meta"):
        model = DETR(get("detr-tiny").extra["config"])
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
