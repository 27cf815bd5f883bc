"""SAAP's site finder: the attention nodes of post-grad graphs and the keys before their RoPE, in
our Llama, in Hugging Face's Llama (a third-party module written the usual way), and in traced
RoPE functions of both spellings (split halves, sliced halves)."""
import dataclasses

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fvcompile
from fvcompile.models import get
from fvcompile.models.llama import Llama, apply_rope, rope_tables
from fvcompile.passes.saap_match import find_attention_sites, unrope
from fvcompile.testing import PassTestBackend


class KeepGraph(fvcompile.GraphPass):
    name = "keep_graph"
    hook = "post_grad"

    def run(self, gm, ctx):
        self.graph = gm.graph
        return fvcompile.PassResult()


def _inference_graph(model, *inputs):
    keep = KeepGraph()
    compiled = torch.compile(model, backend=PassTestBackend(keep, codegen=False), fullgraph=True)
    with torch.no_grad():
        compiled(*inputs)
    return keep.graph


def _rotate_half_sliced(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.mark.parametrize("rope", [
    lambda x, cos, sin: apply_rope(x, cos, sin),  # our Llama: chunk (split) halves, fp32 casts
    lambda x, cos, sin: x * cos + _rotate_half_sliced(x) * sin,  # Hugging Face's: sliced halves
    lambda x, cos, sin: _rotate_half_sliced(x) * sin + cos * x,  # operands in the other order
])
def test_unrope_finds_the_tensor_before_rope(rope):
    cos, sin = rope_tables(8, 16, 10000.0)
    graph = make_fx(rope)(torch.randn(1, 2, 16, 8), cos, sin).graph
    x = next(iter(graph.find_nodes(op="placeholder")))
    (out,) = next(iter(graph.find_nodes(op="output"))).args[0:1]
    assert unrope(out) is x


def test_unrope_refuses_what_is_not_rope():
    cos, sin = rope_tables(8, 16, 10000.0)
    wrong_halves = lambda x, cos, sin: x * cos + torch.cat([-x[..., :4], x[..., 4:]], -1) * sin  # noqa: E731
    graph = make_fx(wrong_halves)(torch.randn(1, 2, 16, 8), cos, sin).graph
    (out,) = next(iter(graph.find_nodes(op="output"))).args[0:1]
    assert unrope(out) is None


def test_our_llama_every_layer_with_its_pre_rope_key():
    spec = get("llama-tiny")
    cfg = spec.extra["config"]
    graph = _inference_graph(Llama(dataclasses.replace(cfg, n_layers=2)).eval(), torch.randint(0, 256, (1, 32)))
    sites = find_attention_sites(graph)
    assert [s.layer for s in sites] == [0, 1]
    for s in sites:
        assert s.is_causal and not s.has_mask
        assert s.pre_rope_key is not None and s.pre_rope_key is not s.k
        assert tuple(s.pre_rope_key.meta["val"].shape) == (1, cfg.n_kv_heads, 32, cfg.head_dim)
        assert tuple(s.pre_rope_query.meta["val"].shape) == (1, cfg.n_heads, 32, cfg.head_dim)


def test_hugging_face_llama_every_layer_with_its_pre_rope_key():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    graph = _inference_graph(lambda ids: model(ids).logits, torch.randint(0, 128, (1, 16)))
    sites = find_attention_sites(graph)
    assert len(sites) == 2
    for s in sites:
        assert s.is_causal and not s.has_mask
        assert s.pre_rope_key is not None, s.reason
        assert tuple(s.pre_rope_key.meta["val"].shape) == (1, 2, 16, 16)
