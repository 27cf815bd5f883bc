"""What only real Inductor can show: hook installation, chaining, the FX graph cache, output code.

A cold compile is slow on CPU (bench/README.md), so these tests share a few compiles.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from toy_passes import Mlp, RecordingPass, ReluToClampPass
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

import fvcompile
from fvcompile.testing import assert_train_step_parity

pytestmark = pytest.mark.inductor


def _train_once(optimized, x):
    optimized(x).sum().backward()


def test_cache_hit_and_miss_on_a_pass_option():
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(4, 16, requires_grad=True)
    with fresh_cache():
        first = fvcompile.optimize(model, passes=[ReluToClampPass(tag=1)])
        _train_once(first, x)
        assert not first.fvcompile_report.graphs[0].cache_hit
        assert first.fvcompile_report.rewritten() == 1

        torch._dynamo.reset()
        counters.clear()
        same = fvcompile.optimize(model, passes=[ReluToClampPass(tag=1)])
        _train_once(same, x)
        report = same.fvcompile_report
        assert report.graphs[0].cache_hit and report.pass_runs() == []
        assert "cache hit" in str(report) and report.summary() == "cache hit: no pass ran"

        torch._dynamo.reset()
        changed = fvcompile.optimize(model, passes=[ReluToClampPass(tag=2)])
        _train_once(changed, x)
        assert not changed.fvcompile_report.graphs[0].cache_hit
        assert changed.fvcompile_report.rewritten() == 1


def test_chains_the_users_inductor_pass_and_dumps_output_code(tmp_path):
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class UserPass(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            UserPass.calls += 1

        def uuid(self):
            return "user-pass-v1"

    model, x = Mlp(), torch.randn(4, 16, requires_grad=True)
    with torch._inductor.config.patch(joint_custom_pre_pass=UserPass()):
        optimized = fvcompile.optimize(model, passes=[ReluToClampPass()], dump_dir=tmp_path)
        out = optimized(x)
        out.sum().backward()
    assert UserPass.calls == 1
    torch.testing.assert_close(out, model(x))
    index = json.loads((tmp_path / "index.json").read_text())
    files = [f for fs in index["graphs"].values() for f in fs]
    forward_code = next(f for f in files if "output_code_forward" in f)
    assert "def call" in (tmp_path / forward_code).read_text()
    assert any("output_code_backward" in f for f in files)
    assert any(f.endswith("joint_relu_to_clamp.diff") for f in files)


def test_torch_compile_finds_the_backend_in_a_fresh_process():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: torch.relu(x) + 1, backend='fvcompile', options={'codegen': False})\n"
        "assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))\n"
        "import fvcompile\n"
        "assert fvcompile.last_report().graphs, 'the backend did not record its graph'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_llama_inductor_parity_forward_backward():
    """Parity with eager, and the post-grad graphs a pass receives are those codegen=False gives
    it (Inductor's own post-grad passes included); the scheduler hook runs under codegen."""
    def recorders():
        return [RecordingPass("post_grad", name="record_post_grad"),
                RecordingPass("pre_fusion", name="record_pre_fusion")]

    with_codegen, without = recorders(), recorders()
    with fresh_cache():  # a cached graph would run no pass, and record nothing
        assert_train_step_parity("llama-tiny", atol=1e-4, rtol=1e-4, fullgraph=True, passes=with_codegen)
    torch._dynamo.reset()
    assert_train_step_parity("llama-tiny", atol=1e-4, rtol=1e-4, fullgraph=True, passes=without, codegen=False)
    assert [c.graph_kind for c in with_codegen[0].contexts] == ["forward", "backward"]
    assert with_codegen[0].graphs == without[0].graphs
    assert [c.graph_kind for c in with_codegen[1].contexts] == ["forward", "backward"] and not without[1].contexts
