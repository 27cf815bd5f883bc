"""Chameleon: shapes, gradients, graph capture, parameter count, per-head QK-norm, image tokens."""
import torch
import torch.nn.functional as F

from fvcompile.models import chameleon_specs
from fvcompile.models.chameleon import (
    ChameleonConfig,
    PerHeadLayerNorm,
    build_mixed_sequence,
    count_params,
    generate_image,
    image_codes_to_tokens,
    is_image_code,
    next_token_loss,
    tokens_to_image_codes,
)
from fvcompile.models.registry import count_parameters, get


def _tiny():
    torch.manual_seed(0)
    spec = get("chameleon-tiny")
    return spec, spec.build()


def test_tiny_forward_backward():
    spec, model = _tiny()
    assert spec.tiny
    (tokens,) = spec.example_inputs(model, 2)
    logits = model(tokens)
    assert logits.shape == (*tokens.shape, model.cfg.vocab_size)
    loss = spec.train_step(model, spec.train_batch(model, 2))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_no_graph_break():
    spec, model = _tiny()
    inputs = spec.example_inputs(model, 2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs))


def test_7b_parameter_count():
    spec = get("chameleon-7b")
    assert spec.params == chameleon_specs.PARAMS["chameleon-7b"] == 7_013_666_816
    assert count_parameters(spec) == spec.params
    assert count_params(spec.extra["config"]) == spec.params
    cfg = spec.extra["config"]
    shape = (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden, cfg.vocab_size)
    assert shape == (4096, 32, 32, 11008, 65536)


def test_tiny_parameter_count_formula():
    spec = get("chameleon-tiny")
    assert count_parameters(spec) == count_params(spec.extra["config"])


def test_qk_norm_normalizes_each_head_separately():
    norm = PerHeadLayerNorm(n_heads=4, head_dim=16, eps=1e-5)
    assert norm.weight.shape == norm.bias.shape == (4, 16)  # one affine row per head
    gen = torch.Generator().manual_seed(0)
    head_scale = torch.tensor([0.5, 1.0, 10.0, 100.0])[:, None]  # very different head sizes
    x = torch.randn(2, 5, 4, 16, generator=gen) * head_scale + 3.0
    y = norm(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 5, 4), atol=1e-3, rtol=0)
    # Per-head affine parameters: changing head 2's weight changes only head 2.
    with torch.no_grad():
        norm.weight[2] = 2.0
    y2 = norm(x)
    torch.testing.assert_close(y2[:, :, 2], 2 * y[:, :, 2])
    torch.testing.assert_close(y2[:, :, [0, 1, 3]], y[:, :, [0, 1, 3]])


def test_qk_norm_makes_attention_invariant_to_per_head_scale():
    # Scaling one head's query/key projection rows cannot change the output when q and k are
    # normalized per head; a norm over the whole width would see the heads' relative sizes.
    spec, model = _tiny()
    (tokens,) = spec.example_inputs(model, 2)
    reference = model(tokens)
    hd = model.cfg.head_dim
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight[:hd] *= 7.0  # head 0 of q
            layer.attention.wk.weight[hd:2 * hd] *= 0.2  # head 1 of k
    torch.testing.assert_close(model(tokens), reference, atol=1e-4, rtol=1e-4)


def test_image_codes_map_into_reserved_range():
    cfg = ChameleonConfig()  # the 7B vocabulary
    codes = torch.tensor([0, 1, 4095, 8191])
    tokens = image_codes_to_tokens(codes, cfg)
    assert tokens.tolist() == [4, 5, 4099, 8195]
    assert is_image_code(tokens, cfg).all()
    assert torch.equal(tokens_to_image_codes(tokens, cfg), codes)
    assert (cfg.eoi_id, cfg.boi_id, cfg.first_text_id) == (8196, 8197, 8198)
    # The image range holds exactly the 8192 codes; nothing else in the vocabulary is an image code.
    everything = torch.arange(cfg.vocab_size)
    assert is_image_code(everything, cfg).sum() == 8192
    neighbours = torch.tensor([3, cfg.eoi_id, cfg.boi_id, cfg.vocab_size - 1])
    assert not is_image_code(neighbours, cfg).any()


def test_mixed_sequence_layout():
    cfg = ChameleonConfig()
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(cfg.first_text_id, cfg.vocab_size, (2, 7), generator=gen)
    codes = torch.randint(0, cfg.n_image_codes, (2, 1024), generator=gen)
    seq = build_mixed_sequence(text, codes, cfg)
    assert seq.shape == (2, 7 + 1 + 1024 + 1)
    assert torch.equal(seq[:, :7], text)
    assert (seq[:, 7] == cfg.boi_id).all() and (seq[:, -1] == cfg.eoi_id).all()
    image = seq[:, 8:-1]
    assert is_image_code(image, cfg).all()
    assert torch.equal(tokens_to_image_codes(image, cfg), codes)
    assert not is_image_code(seq[:, :8], cfg).any()


def test_spec_batches_are_mixed_sequences():
    spec, model = _tiny()
    cfg = model.cfg
    (tokens,) = spec.train_batch(model, 2)
    assert tokens.shape[1] == spec.extra["seq_len"]
    assert is_image_code(tokens, cfg).sum(1).tolist() == [cfg.image_tokens] * 2
    assert (tokens == cfg.boi_id).sum(1).tolist() == [1, 1]
    assert (tokens == cfg.eoi_id).sum(1).tolist() == [1, 1]


def test_causal():
    spec, model = _tiny()
    (tokens,) = spec.example_inputs(model, 1)
    changed = tokens.clone()
    changed[:, -1] = model.cfg.first_text_id
    torch.testing.assert_close(model(tokens)[:, :-1], model(changed)[:, :-1])


def test_loss_is_cross_entropy_plus_z_loss():
    spec, model = _tiny()
    (tokens,) = spec.train_batch(model, 2)
    logits = model(tokens[:, :-1]).flatten(0, 1)
    ce = F.cross_entropy(logits, tokens[:, 1:].flatten())
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(next_token_loss(model, tokens, z_loss_weight=0.0), ce)
    torch.testing.assert_close(next_token_loss(model, tokens, z_loss_weight=1e-2), ce + 1e-2 * z)


def test_generate_image_only_samples_image_codes():
    spec, model = _tiny()
    cfg = model.cfg
    # Make one text token overwhelmingly likely: the modality constraint must still hold.
    with torch.no_grad():
        model.output.weight[cfg.first_text_id] = 100.0
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(cfg.first_text_id, cfg.vocab_size, (2, 5), generator=gen)
    for temperature in (0.0, 1.0):
        out = generate_image(model, prompt, temperature=temperature, generator=gen)
        assert out.shape == (2, 5 + 1 + cfg.image_tokens + 1)
        assert torch.equal(out[:, :5], prompt)
        assert (out[:, 5] == cfg.boi_id).all() and (out[:, -1] == cfg.eoi_id).all()
        assert is_image_code(out[:, 6:-1], cfg).all()
