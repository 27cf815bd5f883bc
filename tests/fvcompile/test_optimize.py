"""fvcompile.optimize and the pass manager, through the codegen=False path (no code generation: fast)."""
import pytest
import torch
from toy_passes import BreakNumericsPass, Mlp, ReluToClampPass, TwoMlps

import fvcompile
from fvcompile.models import get
from fvcompile.testing import assert_train_step_parity
from fvcompile.verify import VerificationError


def test_llama_parity_forward_backward():
    assert_train_step_parity("llama-tiny", codegen=False, fullgraph=True)


def test_state_dict_keys_are_the_models_own_and_model_stays_eager():
    model = Mlp()
    optimized = fvcompile.optimize(model, codegen=False)
    assert list(optimized.state_dict()) == list(model.state_dict())
    assert optimized.up.weight is model.up.weight  # shared parameters
    assert model._compiled_call_impl is None  # the user's model is left eager


def test_joint_hook_training_and_inference():
    x = torch.randn(4, 16)
    p = ReluToClampPass(hook="joint")
    model = Mlp()
    optimized = fvcompile.optimize(model, passes=[p], codegen=False)
    optimized(x.requires_grad_()).sum().backward()
    assert p.seen_kinds == ["joint"]
    torch._dynamo.reset()
    p2 = ReluToClampPass(hook="joint")
    with torch.no_grad():
        fvcompile.optimize(model, passes=[p2], codegen=False)(x)
    assert p2.seen_kinds == ["inference"]
    report = optimized.fvcompile_report
    assert report.passes == ["relu_to_clamp"]
    assert report.rewritten("relu_to_clamp") == 1


def test_post_grad_hook_forward_and_backward():
    p = ReluToClampPass(hook="post_grad")
    model = Mlp()
    optimized = fvcompile.optimize(model, passes=[p], codegen=False)
    x = torch.randn(4, 16, requires_grad=True)
    out = optimized(x)
    assert p.seen_kinds == ["forward"]
    out.sum().backward()
    assert p.seen_kinds == ["forward", "backward"]
    torch.testing.assert_close(out, model(x))


def test_rewrite_is_exact_and_reported_per_site():
    model = TwoMlps()
    x = torch.randn(4, 16, requires_grad=True)
    optimized = fvcompile.optimize(model, passes=[ReluToClampPass()], codegen=False)
    torch.testing.assert_close(optimized(x), model(x))
    sites = optimized.fvcompile_report.pass_runs("relu_to_clamp")[0].result.rewritten
    assert {s.module for s in sites} == {"first", "second"}


@pytest.mark.parametrize("include, exclude, rewritten", [
    (("first",), (), {"first"}),
    ((), ("first",), {"second"}),
    (("*",), ("sec*",), {"first"}),
])
def test_include_exclude_by_module_name(include, exclude, rewritten):
    model = TwoMlps()
    optimized = fvcompile.optimize(model, passes=[ReluToClampPass()], codegen=False,
                                   include=include, exclude=exclude)
    with torch.no_grad():
        optimized(torch.randn(2, 16))
    run = optimized.fvcompile_report.pass_runs("relu_to_clamp")[0]
    assert {s.module for s in run.result.rewritten} == rewritten
    assert all(s.detail == "excluded by module filter" for s in run.result.skipped)


def test_user_pass_is_chained_not_replaced():
    calls = []

    def user_pass(graph):
        calls.append(len(graph.nodes))

    p = ReluToClampPass(hook="joint")
    model = Mlp()
    optimized = fvcompile.optimize(model, passes=[p], codegen=False,
                                   options={"joint_custom_pre_pass": user_pass})
    optimized(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert p.seen_kinds == ["joint"] and len(calls) == 1


def test_unknown_pass_name_lists_known_passes():
    with pytest.raises(ValueError, match="unknown pass 'nope'.*sparse24"):
        fvcompile.optimize(Mlp(), passes=["nope"])


def test_not_a_module_or_callable():
    with pytest.raises(TypeError, match="nn.Module instance or a function"):
        fvcompile.optimize(42)


def test_plain_function_is_compiled():
    fn = fvcompile.optimize(lambda x: torch.relu(x) * 2, passes=[ReluToClampPass()], codegen=False)
    x = torch.randn(8)
    torch.testing.assert_close(fn(x), torch.relu(x) * 2)
    assert fn.fvcompile_report.rewritten() == 1


def test_verify_passes_for_exact_pass():
    optimized = fvcompile.optimize(Mlp(), passes=[ReluToClampPass()], codegen=False, verify=True)
    optimized(torch.randn(4, 16))


def test_verify_names_the_error_of_a_wrong_pass():
    optimized = fvcompile.optimize(Mlp(), passes=[BreakNumericsPass()], codegen=False, verify=True)
    with pytest.raises(VerificationError, match="max abs error .* max rel error"):
        optimized(torch.randn(4, 16))


def test_auto_applies_only_exact_passes():
    from fvcompile.passes import AUTO_CANDIDATES, pass_class, resolve_passes

    assert all(pass_class(n).exact for n in AUTO_CANDIDATES)
    assert all(p.exact for p in resolve_passes("auto", torch.device("cpu")))


def test_graph_break_and_recompilation_are_reported():
    def fn(x):
        y = torch.relu(x)
        torch._dynamo.graph_break()
        return y * 2

    compiled = fvcompile.optimize(fn, codegen=False, dynamic=False)
    compiled(torch.randn(4))
    compiled(torch.randn(5))  # a new static shape: Dynamo recompiles
    report = compiled.fvcompile_report
    assert sum(report.graph_breaks.values()) >= 1
    assert report.recompilations and "size" in report.recompilations[0].recompile_reason
    assert "recompilation" in str(report)
    assert '"graphs"' in report.to_json()


def test_dump_dir_writes_graphs_diffs_and_index(tmp_path):
    import json

    optimized = fvcompile.optimize(Mlp(), passes=[ReluToClampPass()], codegen=False, dump_dir=tmp_path)
    optimized(torch.randn(2, 16, requires_grad=True)).sum().backward()
    index = json.loads((tmp_path / "index.json").read_text())
    files = [f for fs in index["graphs"].values() for f in fs]
    assert any(f.endswith("dynamo.py") for f in files)
    for kind, hook in (("joint", "joint"), ("forward", "post_grad"), ("backward", "post_grad")):
        assert any(f.endswith(f"{kind}_at_{hook}_hook.py") for f in files), (kind, files)
    diff = next(f for f in files if f.endswith("joint_relu_to_clamp.diff"))
    text = (tmp_path / diff).read_text()
    assert "-" in text and "clamp_min" in text
    assert json.loads((tmp_path / "report.json").read_text())["passes"] == ["relu_to_clamp"]


def test_llama_compiles_fullgraph_training_and_inference():
    spec = get("llama-tiny")
    model = spec.build()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    tokens = spec.example_inputs(model, 2)[0]
    compiled(tokens).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens))


def test_torch_compile_backend_takes_options():
    fvcompile.reset()
    p = ReluToClampPass()
    compiled = torch.compile(Mlp(), backend="fvcompile", options={"codegen": False, "passes": [p]})
    compiled(torch.randn(2, 16))
    assert p.seen_kinds == ["joint"]
    assert fvcompile.last_report().rewritten("relu_to_clamp") == 1
    fvcompile.reset()
    assert fvcompile.last_report().graphs == []


def test_mode_reaches_inductor_config(monkeypatch):
    """torch.compile allows mode= or options=, not both; optimize() takes both."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    fn = torch.compile(lambda x: x + 1, backend="fvcompile", mode="max-autotune-no-cudagraphs")
    fn(torch.ones(2))
    assert seen.get("max_autotune") is True
    seen.clear()
    torch._dynamo.reset()
    fvcompile.optimize(lambda x: x * 2, mode="max-autotune-no-cudagraphs",
                       options={"epilogue_fusion": False})(torch.ones(2))
    assert seen.get("max_autotune") is True and seen.get("epilogue_fusion") is False


def test_train_and_eval_switch_model_and_optimized_together():
    """As with torch.compile: `model.eval()` after optimize() reaches the optimized module's
    own `training` flag (a top-level `if self.training:` in forward), and the other way round."""

    class TrainOnlyScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return y * 0 if self.training else y

    model = TrainOnlyScale()
    optimized = fvcompile.optimize(model, codegen=False)
    x = torch.randn(2, 4)
    assert optimized(x).abs().sum() == 0
    model.eval()
    assert not optimized.training
    torch.testing.assert_close(optimized(x), model(x))
    optimized.train()
    assert model.training and optimized(x).abs().sum() == 0
    assert isinstance(optimized, TrainOnlyScale)
    assert list(optimized.state_dict()) == list(model.state_dict())


def test_include_given_as_one_string():
    optimized = fvcompile.optimize(TwoMlps(), passes=[ReluToClampPass()], codegen=False, include="first")
    with torch.no_grad():
        optimized(torch.randn(2, 16))
    assert {s.module for s in optimized.fvcompile_report.pass_runs()[0].result.rewritten} == {"first"}


class _ActMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"feed_forward": _ActMlp()}) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer["feed_forward"](x)
        return x


@pytest.mark.parametrize("include, exclude, rewritten", [
    (("*.feed_forward",), (), {"layers.0.feed_forward.act", "layers.1.feed_forward.act"}),
    ((), ("layers.*.feed_forward",), set()),
])
def test_glob_selects_submodules_too(include, exclude, rewritten):
    optimized = fvcompile.optimize(_Layers(), passes=[ReluToClampPass()], codegen=False,
                                   include=include, exclude=exclude)
    with torch.no_grad():
        optimized(torch.randn(2, 16))
    run = optimized.fvcompile_report.pass_runs("relu_to_clamp")[0]
    assert {s.module for s in run.result.rewritten} == rewritten


@pytest.mark.parametrize("hook, key", [("joint", "joint_custom_pre_pass"),
                                       ("post_grad", "post_grad_custom_post_pass")])
def test_users_list_of_passes_is_chained(hook, key):
    """Inductor's hooks take a pass or a list of passes; each one runs after ours."""
    calls = []
    optimized = fvcompile.optimize(Mlp(), passes=[ReluToClampPass(hook=hook)], codegen=False,
                                   options={key: [lambda g: calls.append("a"), lambda g: calls.append("b")]})
    optimized(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert calls == ["a", "b"] * (1 if hook == "joint" else 2)


@pytest.mark.parametrize("ours", [True, False])
def test_users_inference_aware_post_grad_pass_is_told_the_graph_kind(ours):
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass

    seen = []

    class UserPass(CustomInferenceAwareGraphPass):
        def __call__(self, graph, is_inference):
            seen.append(is_inference)

        def uuid(self):
            return "user-inference-aware-v1"

    passes = [ReluToClampPass(hook="post_grad")] if ours else []
    model = Mlp()
    optimized = fvcompile.optimize(model, passes=passes, codegen=False,
                                   options={"post_grad_custom_post_pass": UserPass()})
    optimized(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert seen == [False, False]
    torch._dynamo.reset()
    with torch.no_grad():
        fvcompile.optimize(model, passes=passes, codegen=False,
                           options={"post_grad_custom_post_pass": UserPass()})(torch.randn(2, 16))
    assert seen == [False, False, True]


def test_graph_breaks_are_reported_after_dynamos_counters_are_cleared():
    from torch._dynamo.utils import counters

    def fn(x):
        y = torch.relu(x)
        torch._dynamo.graph_break()
        return y * 2

    fvcompile.optimize(fn, codegen=False)(torch.randn(4))
    counters.clear()  # as tests and users do: the same break then counts from 1 again
    torch._dynamo.reset()
    compiled = fvcompile.optimize(fn, codegen=False)
    compiled(torch.randn(4))
    assert sum(compiled.fvcompile_report.graph_breaks.values()) == 1


def test_verify_leaves_batchnorm_statistics_as_one_call_would():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    reference.load_state_dict(model.state_dict())
    optimized = fvcompile.optimize(model, passes=[ReluToClampPass()], codegen=False, verify=True)
    x = torch.randn(16, 8)
    optimized(x)
    reference(x)
    bn, bn_ref = model[1], reference[1]
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)


def test_verify_does_not_apply_an_input_mutation_twice():
    def add_to(x, acc):
        acc.add_(x)
        return acc * 2

    x, acc = torch.ones(3), torch.zeros(3)
    out = fvcompile.optimize(add_to, codegen=False, verify=True)(x, acc)
    assert torch.equal(acc, torch.ones(3)) and torch.equal(out, torch.full((3,), 2.0))


def test_dump_dir_reused_keeps_every_file(tmp_path):
    import json

    first = fvcompile.optimize(Mlp(), passes=[ReluToClampPass()], codegen=False, dump_dir=tmp_path)
    first(torch.randn(2, 16, requires_grad=True)).sum().backward()
    written = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".json"}
    first_report = (tmp_path / "report.json").read_text()

    torch._dynamo.reset()  # the second run's graphs get the same compile ids ("0/0")
    second = fvcompile.optimize(Mlp(), passes=[ReluToClampPass()], codegen=False, dump_dir=tmp_path)
    with torch.no_grad():
        second(torch.randn(2, 16))

    assert all(p.read_text() == text for p, text in written.items())  # nothing overwritten
    assert (tmp_path / "report.json").read_text() == first_report
    index = json.loads((tmp_path / "index.json").read_text())
    files = [f for fs in index["graphs"].values() for f in fs]
    assert len(files) == len(set(files)) and all((tmp_path / f).is_file() for f in files)
    assert len(index["graphs"]) == 2
    # dynamo; the inference graph at the joint hook, after the pass, its diff; at joint_post,
    # post_grad_pre and post_grad; the graph run as code (the graphs' .graph.json records aside)
    assert len([f for f in files if not f.endswith(".json")]) == len(written) + 8
    second_report = json.loads((tmp_path / index["report"]).read_text())
    assert [r["graph_kind"] for g in second_report["graphs"] for r in g["pass_runs"]] == ["inference"]


def test_dumped_report_has_the_lazily_compiled_backward(tmp_path):
    import json

    optimized = fvcompile.optimize(Mlp(), passes=[ReluToClampPass(hook="post_grad")], codegen=False,
                                   dump_dir=tmp_path)
    optimized(torch.randn(2, 16, requires_grad=True)).sum().backward()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["graph_kind"] for g in report["graphs"] for r in g["pass_runs"]] == ["forward", "backward"]


def test_pass_with_a_misspelt_hook_is_refused():
    with pytest.raises(ValueError, match="has hook 'post-grad'"):
        fvcompile.optimize(Mlp(), passes=[ReluToClampPass(hook="post-grad")], codegen=False)


def test_module_path_drops_any_dynamo_root():
    from torch import fx

    from fvcompile.passes.graph_utils import module_path

    graph = fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"a": ("L['model'].layers[0].up", None)}
    assert module_path(node) == "layers.0.up"


def test_pass_options_must_be_json_values():
    pass_ = ReluToClampPass(tag=torch.ones(2))
    with pytest.raises(TypeError, match="options\\(\\) must return JSON values"):
        pass_.uuid()


def test_passes_none_is_a_clear_error():
    with pytest.raises(TypeError, match="passes= takes 'auto'"):
        fvcompile.optimize(Mlp(), passes=None)


def test_a_model_dynamo_runs_eagerly_is_reported_not_silent():
    """Past Dynamo's recompile limit a model runs uncompiled: the report and a warning say so."""
    torch._dynamo.reset()
    x = torch.randn(4, 16)
    with torch._dynamo.config.patch(recompile_limit=2):
        compiled = [fvcompile.optimize(Mlp(), passes=[ReluToClampPass()], codegen=False) for _ in range(3)]
        for optimized in compiled[:2]:
            optimized(x)
            assert optimized.fvcompile_report.graphs and not optimized.fvcompile_report.ran_eagerly
        with pytest.warns(UserWarning, match="ran eagerly, no pass applied: Dynamo.s recompile limit"):
            compiled[2](x)
    report = compiled[2].fvcompile_report
    assert not report.graphs and report.summary().startswith("ran eagerly: Dynamo's recompile limit (2")
    torch._dynamo.reset()
