"""DINOv2: tiny forward/backward, no graph break, parameter counts, position-embedding
interpolation, registers, the mask token, the self-distillation step and its losses."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fvcompile.models import registry
from fvcompile.models.dino_losses import dino_loss, ibot_loss, teacher_probs
from fvcompile.models.dinov2 import DinoV2

PAPER_CONFIGS = [s.name for s in registry.all_specs() if s.family == "dinov2" and not s.tiny]
TINY = registry.get("dinov2-tiny")
TINY_CFG = TINY.extra["config"]  # 56 px native grid (4x4 patches of 14 px), width 32, depth 2
TINY_REG_CFG = replace(TINY_CFG, n_registers=4, interpolate_offset=0.0, interpolate_antialias=True)


def tiny_model(cfg=TINY_CFG) -> DinoV2:
    torch.manual_seed(0)
    return DinoV2(cfg)


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_parameter_counts(name):
    spec = registry.get(name)
    assert spec.params is not None
    assert registry.count_parameters(spec) == spec.params


def test_giant_uses_swiglu_with_rounded_hidden_width():
    # 4 x 1536 = 6144 -> 2/3 -> 4096 (already a multiple of 8), gate and up fused in w12.
    with torch.device("meta"):
        model = registry.get("dinov2-g14").build()
    mlp = model.blocks[0].mlp
    assert (mlp.w12.out_features, mlp.w3.in_features) == (2 * 4096, 4096)


def test_tiny_forward_backward():
    model = TINY.build()
    (x,) = TINY.example_inputs(model, 2)
    out = model(x)
    n_patches = (x.shape[-1] // 14) ** 2
    assert out.shape == (2, 1 + n_patches, TINY_CFG.dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p is not model.mask_token]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cfg", [TINY_CFG, TINY_REG_CFG], ids=["plain", "registers"])
def test_no_graph_break(cfg):
    model = tiny_model(cfg)
    torch._dynamo.reset()  # fresh recompile budget: every test compiles new instances
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    native, resized = images(2, 56), images(2, 84)  # 4x4 grid (as stored) and 6x6 (interpolated)
    masks = torch.rand(2, 36, generator=torch.Generator().manual_seed(2)) < 0.5
    torch.testing.assert_close(compiled(native), model(native))
    torch.testing.assert_close(compiled(resized, masks), model(resized, masks))


@pytest.mark.parametrize("cfg", [TINY_CFG, TINY_REG_CFG], ids=["offset", "antialias"])
def test_pos_embed_interpolation(cfg):
    model = tiny_model(cfg)
    n, dim = cfg.grid_size, cfg.dim
    assert model.interpolate_pos_embed(n, n) is model.pos_embed  # native grid: no resize
    resized = model.interpolate_pos_embed(6, 6)
    assert resized.shape == (1, 1 + 36, dim)
    torch.testing.assert_close(resized[:, 0], model.pos_embed[:, 0])  # CLS position untouched

    # A position embedding that varies along x only must still do so after resizing to a
    # non-square grid: rows stay identical, and the values stay within the original range.
    with torch.no_grad():
        column = torch.linspace(-1, 1, n)
        model.pos_embed[:, 1:] = column.repeat(n)[None, :, None].expand(1, n * n, dim)
    grid = model.interpolate_pos_embed(3, 5)[0, 1:, 0].reshape(3, 5)
    torch.testing.assert_close(grid, grid[:1].expand(3, 5))
    assert (grid[0].diff() > 0).all()

    # The model itself runs at another resolution.
    assert model(images(1, 84)).shape == (1, 1 + cfg.n_registers + 36, dim)


def test_register_tokens_in_output():
    model = tiny_model(TINY_REG_CFG)
    x = images(2, 56)
    tokens = model.prepare_tokens(x)
    assert model.n_prefix_tokens == 5
    # Registers sit after CLS, without a position embedding.
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
    out = model(x)
    assert out.shape == (2, 1 + 4 + 16, TINY_CFG.dim)
    out[:, 1:5].square().sum().backward()
    assert model.register_tokens.grad.abs().sum() > 0


def test_mask_token_replaces_masked_patches():
    model = tiny_model()
    with torch.no_grad():
        model.mask_token.normal_()
    x = images(2, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[1, 15] = True
    plain, masked = model.prepare_tokens(x), model.prepare_tokens(x, masks)
    changed = (plain != masked).any(-1)[:, 1:]  # per patch, CLS left out
    assert torch.equal(changed, masks)
    expected = model.mask_token + model.pos_embed[0, 1:][masks[0]]
    torch.testing.assert_close(masked[0, 1:][masks[0]], expected)


def test_train_step():
    model = TINY.build()
    batch = TINY.train_batch(model, 2)
    global_crops, local_crops, masks, mask_index, prototypes = batch
    assert global_crops.shape[0] == 4 and local_crops.shape[0] == 4
    assert masks.sum(1).eq(mask_index.shape[1]).all()
    loss = TINY.train_step(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.mask_token.grad.abs().sum() > 0  # iBOT reaches the mask token
    # Deterministic, and the same through a compiled model (the benchmark's setting).
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(TINY.train_step(compiled, batch), loss.detach())


def test_dino_loss_skips_same_view_pairs():
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    center = torch.randn(8, generator=gen) * 0.1
    p = teacher_probs(teacher, center, 0.07)
    log_q = F.log_softmax(student / 0.1, dim=-1)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    expected = sum(-(p[t] * log_q[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
    torch.testing.assert_close(dino_loss(student, teacher, center), expected)


def test_ibot_loss_is_cross_entropy_with_sharpened_teacher():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 8, generator=gen)
    zero = torch.zeros(8)
    # Minimised (over the student) at the teacher's own distribution: entropy <= cross-entropy.
    teacher_like = ibot_loss(logits * 0.7, logits, zero, student_temp=0.1, teacher_temp=0.07)
    assert teacher_like < ibot_loss(-logits, logits, zero)
