"""einsum's batch-1 bmms seen as mms (passes/bmm_as_mm.py), and put back unchanged."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fvcompile.passes.bmm_as_mm import as_bmm, as_mm, keeps_order

aten = torch.ops.aten


def einsum_mlp(x, w1, w2):
    h = torch.einsum("btd,fd->btf", x, w1)
    return torch.einsum("btf,df->btd", torch.nn.functional.gelu(h), w2)


def traced():
    args = (torch.randn(2, 5, 8), torch.randn(16, 8), torch.randn(8, 16))
    return make_fx(einsum_mlp, tracing_mode="fake")(*args), args


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_as_mm_then_as_bmm_keep_the_numbers_and_put_every_bmm_back():
    gm, args = traced()
    expected = einsum_mlp(*args)
    assert targets(gm).count(aten.bmm.default) == 2 and aten.mm.default not in targets(gm)

    gelu = next(n for n in gm.graph.nodes if n.target == aten.gelu.default)
    assert as_mm(gm.graph, set()) == []  # only bmms reading the given tensors
    mms = as_mm(gm.graph, {gelu, *(n for n in gm.graph.nodes if n.op == "placeholder")})
    gm.recompile()
    assert len(mms) == 2 and aten.bmm.default not in targets(gm) and targets(gm).count(aten.mm.default) == 2
    # Each mm's token-side operand reaches x or gelu(h) through order-keeping views only.
    for mm, _ in mms:
        operand = mm.args[0]
        while operand.op == "call_function" and operand.target != aten.gelu.default:
            assert keeps_order(operand), operand.format_node()
            operand = operand.args[0]
    torch.testing.assert_close(gm(*args), expected)

    as_bmm(gm.graph, mms)
    gm.recompile()
    assert targets(gm).count(aten.bmm.default) == 2 and aten.mm.default not in targets(gm)
    torch.testing.assert_close(gm(*args), expected)


def test_keeps_order_only_for_permutes_of_size_one_dims():
    def f(x, y):
        return x.unsqueeze(3).permute(0, 1, 3, 2), y.permute(1, 0)

    gm = make_fx(f, tracing_mode="fake")(torch.randn(2, 3, 4), torch.randn(3, 4))
    permutes = [n for n in gm.graph.nodes if n.target == aten.permute.default]
    assert [keeps_order(n) for n in permutes] == [True, False]
