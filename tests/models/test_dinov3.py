"""DINOv3: tiny forward/backward, no graph break, parameter counts, RoPE on patch tokens only,
registers, the mask token, the masked key bias, the 7B-style options, Gram loss, training step."""
import math
from dataclasses import replace

import pytest
import torch

from fvcompile.models import registry
from fvcompile.models.dino_losses import gram_loss
from fvcompile.models.dinov3 import DinoV3, rope_patches, rope_sin_cos

PAPER_CONFIGS = [s.name for s in registry.all_specs() if s.family == "dinov3" and not s.tiny]
TINY = registry.get("dinov3-tiny")
TINY_CFG = TINY.extra["config"]  # patch 16, width 32, depth 2, 2 heads, 4 registers
# The 7B's options at tiny width: SwiGLU, no qkv bias, a separate norm for local-crop CLS.
TINY_7B_CFG = replace(TINY_CFG, ffn="swiglu", ffn_ratio=3.0, swiglu_multiple_of=8,
                      qkv_bias=False, untie_local_cls_norm=True)


def tiny_model(cfg=TINY_CFG) -> DinoV3:
    torch.manual_seed(0)
    return DinoV3(cfg)


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_parameter_counts(name):
    spec = registry.get(name)
    assert spec.params is not None
    assert registry.count_parameters(spec) == spec.params


def test_7b_options():
    with torch.device("meta"):
        model = registry.get("dinov3-7b16").build()
    block = model.blocks[0]
    assert block.attn.qkv.bias is None
    assert block.mlp.w3.in_features == 8192  # 3 x 4096 -> 2/3 -> 8192 (a multiple of 64)
    assert model.local_cls_norm is not None


def test_tiny_forward_backward():
    model = TINY.build()
    (x,) = TINY.example_inputs(model, 2)
    out = model(x)
    n_patches = (x.shape[-1] // 16) ** 2
    assert out.shape == (2, 1 + 4 + n_patches, TINY_CFG.dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p is not model.mask_token]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cfg", [TINY_CFG, TINY_7B_CFG], ids=["mlp", "7b-style"])
def test_no_graph_break(cfg):
    model = tiny_model(cfg)
    torch._dynamo.reset()  # fresh recompile budget: every test compiles new instances
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, local = images(2, 64), images(2, 48)
    masks = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    torch.testing.assert_close(compiled(x, masks), model(x, masks))
    torch.testing.assert_close(compiled(local, local_crops=True), model(local, local_crops=True))


def test_rope_rotates_patch_tokens_only():
    h, w, head_dim, n_prefix = 3, 4, 8, 5
    sin, cos = rope_sin_cos(h, w, head_dim, base=100.0, device=torch.device("cpu"))
    assert sin.shape == cos.shape == (h * w, head_dim)
    x = torch.randn(2, 2, n_prefix + h * w, head_dim)
    rotated = rope_patches(x, sin, cos)
    torch.testing.assert_close(rotated[..., :n_prefix, :], x[..., :n_prefix, :])  # CLS, registers
    assert (rotated[..., n_prefix:, :] - x[..., n_prefix:, :]).abs().amax(-1).gt(1e-4).all()
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation

    # Relative positions: with the same query and key at every patch, the score between two
    # patches depends only on their offset on the grid.
    q, k = torch.randn(head_dim).expand(h * w, -1), torch.randn(head_dim).expand(h * w, -1)
    scores = rope_patches(q, sin, cos) @ rope_patches(k, sin, cos).T
    at = lambda row, col: row * w + col  # noqa: E731
    torch.testing.assert_close(scores[at(0, 0), at(1, 2)], scores[at(1, 1), at(2, 3)])
    torch.testing.assert_close(scores[at(2, 1), at(1, 0)], scores[at(1, 3), at(0, 2)])
    assert not math.isclose(scores[at(0, 0), at(0, 1)].item(), scores[at(0, 0), at(1, 1)].item())


def test_register_tokens_in_output():
    model = tiny_model()
    x = images(2, 64)
    tokens, h, w = model.prepare_tokens(x)
    assert (h, w) == (4, 4)
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
    out = model(x)
    assert out.shape == (2, 1 + 4 + 16, TINY_CFG.dim)
    out[:, 1:5].square().sum().backward()
    assert model.register_tokens.grad.abs().sum() > 0


def test_mask_token_replaces_masked_patches():
    model = tiny_model()
    with torch.no_grad():
        model.mask_token.normal_()
    x = images(2, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 7]] = True
    masks[1, 9] = True
    (plain, _, _), (masked, _, _) = model.prepare_tokens(x), model.prepare_tokens(x, masks)
    changed = (plain != masked).any(-1)[:, 5:]  # per patch, CLS and registers left out
    assert torch.equal(changed, masks)
    torch.testing.assert_close(masked[:, 5:][masks], model.mask_token.expand(3, -1))


def test_key_bias_is_masked():
    model = tiny_model()
    x = images(1, 64)
    before = model(x)
    dim = TINY_CFG.dim
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias[dim : 2 * dim] = 5.0  # the key third: no effect
    torch.testing.assert_close(model(x), before)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[:dim] = 5.0  # the query third: an effect
    assert not torch.allclose(model(x), before)


def test_untied_local_cls_norm():
    model = tiny_model(TINY_7B_CFG)
    with torch.no_grad():
        model.local_cls_norm.weight.fill_(2.0)
    x = images(2, 48)
    global_out, local_out = model(x), model(x, local_crops=True)
    torch.testing.assert_close(local_out[:, 5:], global_out[:, 5:])  # patches: the shared norm
    assert not torch.allclose(local_out[:, :5], global_out[:, :5])  # CLS + registers: their own


def test_gram_loss():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 10, 16, generator=gen)
    assert gram_loss(feats, feats).item() == 0.0
    assert gram_loss(feats, 3.0 * feats).abs().item() < 1e-6  # features are L2-normalized
    other = feats + 0.5 * torch.randn(2, 10, 16, generator=gen)
    for remove_negative in (True, False):
        assert gram_loss(feats, other, remove_negative).item() > 0.0
    # Without clipping it is the mean squared difference of the two Gram matrices.
    s, t = (torch.nn.functional.normalize(f, dim=-1) for f in (feats, other))
    expected = (s @ s.mT - t @ t.mT).square().mean()
    torch.testing.assert_close(gram_loss(feats, other, remove_negative=False), expected)


@pytest.mark.parametrize("cfg", [TINY_CFG, TINY_7B_CFG], ids=["mlp", "7b-style"])
def test_train_step(cfg):
    model = tiny_model(cfg)
    batch = TINY.train_batch(model, 2)
    loss = TINY.train_step(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.mask_token.grad.abs().sum() > 0
    if cfg.untie_local_cls_norm:
        assert model.local_cls_norm.weight.grad.abs().sum() > 0
    # Deterministic, and the same through a compiled model (the benchmark's setting).
    torch._dynamo.reset()  # fresh recompile budget: every test compiles new instances
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(TINY.train_step(compiled, batch), loss.detach())
