"""The HTML report of a dump (`fvcompile report`, `fvcompile inspect --html`), its graph statistics
and drawings, and the structured-trace artifacts (TORCH_TRACE) the Dumper emits.

One real Inductor compile (llama-tiny-relu2, training, sparse24) runs once per test run, in a
subprocess with TORCH_TRACE set (shared by pytest-xdist's workers through a file lock); the other
tests use small graphs.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fvcompile import graph_stats
from fvcompile.cli import main
from fvcompile.dump import Dumper
from fvcompile.graph_svg import STYLE, graph_svg
from fvcompile.output_code import kernel_calls
from fvcompile.report import OptimizeReport

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)


def ffn(x, w1, w2):
    return torch.mm(torch.relu(torch.mm(x, w1)) ** 2, w2).sum()


def ffn_record():
    gm = make_fx(ffn, tracing_mode="fake")(torch.randn(8, 16), torch.randn(16, 32), torch.randn(32, 4))
    return graph_stats.graph_record(gm)


# Small graphs: statistics, drawings, errors.

def test_graph_record_counts_flops_bytes_and_the_critical_path():
    record = ffn_record()
    by_name = {n["name"]: n for n in record["nodes"]}
    assert by_name["mm"]["flops"] == 2 * 8 * 16 * 32 and by_name["mm_1"]["flops"] == 2 * 8 * 32 * 4
    assert by_name["mm"]["shape"] == [8, 32] and by_name["mm"]["bytes"] == 8 * 32 * 4
    assert by_name["relu"]["flops"] == 0 and by_name["mm"]["inputs"] == ["x_1", "w1_1"]
    assert graph_stats.op_histogram(record)["aten.mm.default"] == 2
    path, weight, total = graph_stats.critical_path(record)
    assert weight == "flops" and total == 2 * 8 * 16 * 32 + 2 * 8 * 32 * 4
    assert path.index("mm") < path.index("relu") < path.index("pow_1") < path.index("mm_1")


def test_changed_nodes_are_highlighted_and_linkable():
    before = ffn_record()
    after = json.loads(json.dumps(before))
    relu = next(n for n in after["nodes"] if n["name"] == "relu")
    relu.update(name="sparse24_relu", target="fvcompile.sparse24_relu.default")
    next(n for n in after["nodes"] if n["name"] == "pow_1")["inputs"] = ["sparse24_relu"]
    changed, removed = graph_stats.changed_nodes(before, after)
    assert changed == {"sparse24_relu", "pow_1"} and removed == {"relu"}
    svg = graph_svg(after, prefix="g-after", changed=changed)
    node = re.search(r'<g class="node" id="g-after-sparse24_relu">.*?</g>', svg, re.S).group(0)
    assert f'fill="{STYLE["changed"][0]}"' in node and "fvcompile.sparse24_relu.default" in node
    untouched = re.search(r'<g class="node" id="g-after-mm">.*?</g>', svg, re.S).group(0)
    assert f'fill="{STYLE["default"][0]}"' in untouched
    region = graph_stats.neighbourhood(after, {"sparse24_relu"})
    assert {n["name"] for n in region["nodes"]} == {"mm", "sparse24_relu", "pow_1"}


# What Inductor writes on a GPU (the wrapper's comments are the same for C++ and Triton kernels).
TRITON_OUTPUT_CODE = """
triton_poi_fused_pow_relu_0 = async_compile.triton('triton_poi_fused_pow_relu_0', '''
import triton
@triton.jit
def triton_poi_fused_pow_relu_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    tmp0 = tl.load(in_ptr0 + x0)
''', device_str='cuda')

def call(args):
        # Topologically Sorted Source Nodes: [linear], Original ATen: [aten.mm]
        # [Provenance debug handles] extern_kernels.mm:1
        extern_kernels.mm(arg0_1, arg1_1, out=buf0)
        # Topologically Sorted Source Nodes: [relu, square], Original ATen: [aten.relu, aten.pow]
        # [Provenance debug handles] triton_poi_fused_pow_relu_0:2
        triton_poi_fused_pow_relu_0.run(buf0, buf1, 1024, stream=stream0)
"""


def test_triton_kernels_are_read_with_their_nodes():
    provenance = {"triton_poi_fused_pow_relu_0:2": {"post_grad_nodes": ["relu", "pow_1"], "stack_traces": []}}
    mm, fused = kernel_calls(TRITON_OUTPUT_CODE, provenance)
    assert (mm.name, mm.source_nodes, mm.aten_ops, mm.source) == ("extern_kernels.mm", ["linear"], ["aten.mm"], "")
    assert fused.handle == "triton_poi_fused_pow_relu_0:2" and fused.post_grad_nodes == ["relu", "pow_1"]
    assert fused.source_nodes == ["relu", "square"] and "@triton.jit" in fused.source


class Chain(torch.nn.Module):
    def forward(self, x):
        for _ in range(30):
            x = torch.relu(x) + 1
        return x


def _small_dump(tmp_path: Path) -> Path:
    dump = tmp_path / "dump"
    dumper = Dumper(dump, "0/0", OptimizeReport(passes=["toy"]))
    dumper.write_dynamo_graph(torch.fx.symbolic_trace(Chain()))
    dumper.write_report()
    return dump


def test_a_graph_too_large_to_draw_is_summarized(tmp_path, capsys):
    dump = _small_dump(tmp_path)
    assert main(["report", str(dump), "--html", str(tmp_path / "small"), "--max-nodes", "10"]) == 0
    html = (tmp_path / "small" / "index.html").read_text()
    assert "62 nodes: too large to draw (the limit is 10" in html and "<svg" not in html
    assert "<code>relu</code>" in html  # the op histogram is still there
    assert main(["report", str(dump), "--html", str(tmp_path / "big")]) == 0
    assert 'id="single-graph_0_0-00-relu"' in (tmp_path / "big" / "index.html").read_text()
    assert "index.html" in capsys.readouterr().out


def test_scheduler_passes_graph_breaks_and_recompilations_are_shown(tmp_path):
    from fvcompile.passes.base import PassResult, Site
    from fvcompile.report import GraphReport, PassRun

    report = OptimizeReport(passes=["toy"], graph_breaks={"call to print (a side effect)": 2})
    skipped = Site("buf3", detail="a reduction", reason="not_pointwise")
    run = PassRun("toy", "pre_fusion", "forward", 0.002, PassResult(rewritten=[Site("buf1")], skipped=[skipped]))
    report.graphs.append(GraphReport("0/1", True, 62, recompile_reason="x.size()[0] == 8", pass_runs=[run]))
    dumper = Dumper(tmp_path, "0/1", report)
    dumper.write_text("forward_at_pre_fusion_hook.txt", "op0: SchedulerNode\nop1: SchedulerNode\n")
    dumper.write_text("forward_toy_after.txt", "op1: SchedulerNode\nop0: SchedulerNode\n")
    dumper.write_report()
    assert main(["report", str(tmp_path)]) == 0
    html = (tmp_path / "index.html").read_text()
    assert "Pass <b>toy</b> on the forward scheduler nodes" in html and "op1: SchedulerNode\nop0" in html
    timeline = re.search(r'<tr class="pass-run">.*?</tr>', html, re.S).group(0)
    assert "2.0 ms" in timeline and "a reduction" in timeline and "not_pointwise" in timeline
    assert "Recompiled: x.size()[0] == 8" in html and "x2: call to print (a side effect)" in html


def test_a_dump_of_several_ranks_shows_each_rank(tmp_path, monkeypatch, capsys):
    import fvcompile.dump

    for rank in (0, 1):
        monkeypatch.setattr(fvcompile.dump, "process_rank", lambda rank=rank: (rank, 2))
        Dumper(tmp_path, "0/0", OptimizeReport()).write_dynamo_graph(torch.fx.symbolic_trace(Chain()))
    assert main(["report", str(tmp_path)]) == 0
    html = (tmp_path / "index.html").read_text()
    assert "Rank 0 of 2" in html and "Rank 1 of 2" in html
    assert 'id="rank0-graph_0_0-00-relu"' in html and 'id="rank1-graph_0_0-00-relu"' in html
    assert main(["report", str(tmp_path), "--rank", "1", "--html", str(tmp_path / "one")]) == 0
    assert "Rank 0 of 2" not in (tmp_path / "one" / "index.html").read_text()


def test_bad_dumps_and_models_get_one_line_errors(tmp_path, capsys):
    def error(argv):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "no dump directory" in error(["report", str(tmp_path / "missing")])
    assert "holds no fvcompile dump" in error(["report", str(tmp_path)])
    dump = _small_dump(tmp_path)
    graph_json = next(dump.rglob("*.graph.json"))
    graph_json.write_text('{"nodes": [')
    assert f"{graph_json} is not valid JSON" in error(["report", str(dump)])
    graph_json.unlink()
    assert "which is missing: the dump is incomplete" in error(["report", str(dump)])
    (dump / "index.json").write_text("{not json")
    assert "index.json is not valid JSON" in error(["report", str(dump)])
    assert "unknown model 'no-such-model'" in error(["inspect", "no-such-model", "--html", str(tmp_path / "h")])


# One real compile: llama-tiny-relu2 training with sparse24, through `fvcompile inspect --html`.

@pytest.fixture(scope="session")
def inspected(tmp_path_factory):
    """(page folder, TORCH_TRACE folder) of one `fvcompile inspect llama-tiny-relu2 --passes sparse24
    --html`, run once for the whole test run: xdist's workers share it through a file lock."""
    from filelock import FileLock

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = tmp_path_factory.getbasetemp().parent / f"inspect_{run_id}" if run_id else tmp_path_factory.mktemp("inspect")
    root.mkdir(parents=True, exist_ok=True)
    html, trace, done = root / "html", root / "trace", root / "done.json"
    with FileLock(str(root / "lock")):
        if not done.exists():
            env = dict(os.environ, TORCH_TRACE=str(trace))
            proc = subprocess.run([sys.executable, "-m", "fvcompile.cli", "inspect", "llama-tiny-relu2", "--passes",
                                   "sparse24", "--task", "train", "--html", str(html)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            done.write_text(json.dumps({"returncode": proc.returncode, "output": proc.stdout + proc.stderr}))
    result = json.loads(done.read_text())
    assert result["returncode"] == 0, result["output"][-3000:]
    return html, trace


@pytest.mark.inductor
def test_report_shows_every_pass_and_links_kernels_to_nodes(inspected):
    html_dir, _ = inspected
    page = (html_dir / "index.html").read_text()
    report = json.loads((html_dir / "dump" / "report.json").read_text())
    runs = [r for g in report["graphs"] for r in g["pass_runs"]]
    assert [r["name"] for r in runs] == ["sparse24"] and len(runs[0]["result"]["rewritten"]) == 2
    assert page.count('class="pass-title"') == len(runs) and "Pass <b>sparse24</b> on the joint graph" in page
    assert page.count('class="pass-run"') == len(runs)
    # Offline: nothing is fetched (the SVG namespace is a name, not a request).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page
    ids = set(re.findall(r'id="([^"]+)"', page))
    links = re.findall(r'<a class="node-link" href="#([^"]+)">', page)
    assert len(links) > 20 and all(link in ids for link in links)
    # The sparse24 ReLU of the forward graph is a kernel of its own, linked to its node and source line.
    row = re.search(r'<tr class="kernel" id="[^"]*forward[^"]*">(?:(?!</tr>).)*sparse24_relu(?:(?!</tr>).)*</tr>',
                    page, re.S).group(0)
    assert 'class="node-link"' in row and "models/llama.py:" in row
    assert "IR before fusion" in page and "IR after fusion" in page and "cpp_fused" in page


@pytest.mark.inductor
def test_torch_trace_log_holds_fvcompile_artifacts(inspected):
    _, trace = inspected
    log = "".join(p.read_text() for p in trace.glob("*.log"))
    names = set(re.findall(r'"name": "(fvcompile_[A-Za-z0-9_]+)"', log))
    assert "fvcompile_report" in names
    assert "fvcompile_graph_0_0_02_joint_sparse24_after_py" in names
    assert "fvcompile_graph_0_0_03_joint_sparse24_diff" in names
    assert any(n.startswith("fvcompile_graph_0_0_") and n.endswith("_output_code_backward_py") for n in names)
    assert "inductor_provenance_tracking_node_mappings" in log  # Inductor's own, beside ours


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.inductor
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary: `make install` installs Debian's chromium "
                                            "(apt-get install chromium) where apt-get exists")
def test_report_loads_in_a_headless_browser(inspected, tmp_path):
    html_dir, _ = inspected
    url = (html_dir / "index.html").as_uri()
    # Loaded at a kernel's node link: the page must open the collapsed graph holding the node.
    link = re.search(r'<a class="node-link" href="#([^"]+)">', (html_dir / "index.html").read_text()).group(1)
    dom = _chromium("--dump-dom", f"{url}#{link}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # the page logs nothing: any line is an error or a failed load
    page = dom.stdout
    assert "Pass <b>sparse24</b> on the joint graph" in page and 'class="kernel"' in page
    node = page.index(f'id="{link}"')
    details = page.rfind('<details class="snapshot"', 0, node)
    assert details >= 0 and page[details:page.index(">", details)].endswith('open=""'), \
        "the graph holding the linked node stays closed"
