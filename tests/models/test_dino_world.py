"""DINO-world: shapes, gradients, graph capture, parameter counts, frame-causality, 3-axis RoPE."""
import pytest
import torch
import torch.nn.functional as F

from fvcompile.models import dino_world_specs
from fvcompile.models.dino_world import DinoWorld, DinoWorldConfig, apply_rope_pairs, count_params
from fvcompile.models.registry import count_parameters, get

TINY = ["dino-world-tiny", "dino-world-action-tiny"]
PAPER_CONFIGS = ["dino-world-small", "dino-world-large", "dino-world-action"]


def _build(name):
    torch.manual_seed(0)
    spec = get(name)
    return spec, spec.build()


def _randomize_action_weights(model):
    # Action projections start at zero; give them values so that actions matter.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            block.action.weight.copy_(torch.randn(block.action.weight.shape, generator=gen))


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    spec, model = _build(name)
    assert spec.tiny
    (features, *rest) = spec.example_inputs(model, 2)
    out = model(features, *rest)
    assert out.shape == features.shape
    loss = spec.train_step(model, spec.train_batch(model, 2))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", TINY)
def test_no_graph_break(name):
    spec, model = _build(name)
    if model.cfg.action_dim:
        _randomize_action_weights(model)
    inputs = spec.example_inputs(model, 2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_parameter_counts(name):
    spec = get(name)
    assert count_parameters(spec) == spec.params == dino_world_specs.PARAMS[name]
    assert count_params(spec.extra["config"]) == spec.params


def test_tiny_parameter_count_formula():
    for name in TINY:
        spec = get(name)
        assert count_parameters(spec) == count_params(spec.extra["config"])


def test_mask_is_block_triangular():
    model = DinoWorld(DinoWorldConfig(enc_dim=8, dim=16, depth=1, n_heads=2))
    mask = model.frame_causal_mask(frames=3, tokens_per_frame=2)
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("changed_frame", [1, 2])
def test_later_frame_does_not_change_earlier_outputs(changed_frame):
    spec, model = _build("dino-world-tiny")
    (features,) = spec.example_inputs(model, 2)
    perturbed = features.clone()
    perturbed[:, changed_frame] += torch.randn_like(perturbed[:, changed_frame])
    out, out_perturbed = model(features), model(perturbed)
    # Frames before the change are identical; the changed frame's own output does move
    # (tokens see their whole frame), and so does every later one.
    before = slice(0, changed_frame)
    torch.testing.assert_close(out[:, before], out_perturbed[:, before], rtol=0, atol=0)
    for t in range(changed_frame, features.shape[1]):
        assert not torch.allclose(out[:, t], out_perturbed[:, t])


def test_rope_covers_three_axes():
    cfg = DinoWorldConfig(enc_dim=8, dim=128, depth=1, n_heads=2)  # head_dim 64
    d_t, d_h, d_w = cfg.rope_split
    assert (d_t, d_h, d_w) == (24, 20, 20) and d_t + d_h + d_w == cfg.head_dim
    model = DinoWorld(cfg)
    frames, height, width = 3, 4, 5
    angles = model.rope_angles(frames, height, width).view(frames, height, width, -1)
    assert angles.shape[-1] == cfg.head_dim // 2
    t_cols, h_cols, w_cols = angles.split([d_t // 2, d_h // 2, d_w // 2], dim=-1)
    # Each slice of pairs varies along its own axis and is constant along the other two.
    for cols, axis in ((t_cols, 0), (h_cols, 1), (w_cols, 2)):
        for other in {0, 1, 2} - {axis}:
            assert torch.equal(cols, cols.select(other, 0).unsqueeze(other).expand_as(cols))
        assert not torch.equal(cols.select(axis, 0), cols.select(axis, 1))


def test_rope_scores_depend_on_relative_offsets_per_axis():
    cfg = DinoWorldConfig(enc_dim=8, dim=128, depth=1, n_heads=2)
    model = DinoWorld(cfg)
    frames, height, width = 4, 4, 4
    angles = model.rope_angles(frames, height, width)
    cos, sin = angles.cos(), angles.sin()
    n = angles.shape[0]
    gen = torch.Generator().manual_seed(0)
    # The same query and key vectors at every position: scores differ only through RoPE.
    q = torch.randn(cfg.head_dim, generator=gen).expand(1, 1, n, -1)
    k = torch.randn(cfg.head_dim, generator=gen).expand(1, 1, n, -1)
    rq, rk = apply_rope_pairs(q, cos, sin)[0, 0], apply_rope_pairs(k, cos, sin)[0, 0]
    scores = (rq @ rk.T).view(frames, height, width, frames, height, width)
    base = scores[0, 0, 0, 1, 2, 2]  # query at (t, h, w) = (0, 0, 0), key at (1, 2, 2)
    # Shifting query and key together along any one axis keeps the score ...
    torch.testing.assert_close(scores[1, 0, 0, 2, 2, 2], base)
    torch.testing.assert_close(scores[0, 1, 0, 1, 3, 2], base)
    torch.testing.assert_close(scores[0, 0, 1, 1, 2, 3], base)
    # ... while changing the offset along any single axis changes it: all three are encoded.
    for moved in (scores[0, 0, 0, 2, 2, 2], scores[0, 0, 0, 1, 3, 2], scores[0, 0, 0, 1, 2, 3]):
        assert not torch.allclose(moved, base)


def test_action_blocks_start_at_zero_and_are_causal():
    torch.manual_seed(0)
    plain = get("dino-world-tiny").build()
    spec, model = _build("dino-world-action-tiny")
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".action." in key for key in missing)
    features, actions = spec.example_inputs(model, 2)
    # Zero-initialized action blocks: the fine-tuning start point is the unconditional model.
    torch.testing.assert_close(model(features, actions), plain(features))

    _randomize_action_weights(model)
    changed = actions.clone()
    changed[:, 1] += 1.0
    out, out_changed = model(features, actions), model(features, changed)
    torch.testing.assert_close(out[:, :1], out_changed[:, :1], rtol=0, atol=0)
    assert not torch.allclose(out[:, 1], out_changed[:, 1])


def test_train_step_is_next_frame_smooth_l1():
    spec, model = _build("dino-world-tiny")
    (clip,) = spec.train_batch(model, 2)
    assert clip.shape[1] == spec.extra["frames"] + 1
    expected = F.smooth_l1_loss(model(clip[:, :-1]), clip[:, 1:])
    torch.testing.assert_close(spec.train_step(model, (clip,)), expected)


def test_training_reduces_loss():
    spec, model = _build("dino-world-tiny")
    batch = spec.train_batch(model, 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = spec.train_step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
