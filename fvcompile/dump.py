"""Inspect data: every graph fvcompile saw, before and after each pass, as readable files.

Layout of a dump directory:
    index.json                      every file written, per compiled graph
    report.json                     the OptimizeReport
    graph_<id>/00_dynamo.py         the graph Dynamo captured
    graph_<id>/NN_<kind>_at_<hook>_hook.py  the graph as it reaches a hook (kind: joint, inference,
                                    forward, backward; hook: joint or post_grad)
    graph_<id>/NN_<kind>_<pass>_after.py / .diff   after each pass, and what it changed
    graph_<id>/NN_output_code_<kind>.py   Inductor's generated code
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from torch import fx

from fvcompile.report import OptimizeReport


def readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=True, include_device=True)


class Dumper:
    def __init__(self, root: str | Path, compile_id: str, report: OptimizeReport):
        self.root = Path(root)
        self.report = report
        self.dir = self.root / ("graph_" + compile_id.replace("/", "_").strip("[]_") or "graph")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = self.dir.name
        self.count = 0
        self._before = ""

    def _write(self, name: str, text: str) -> None:
        path = self.dir / f"{self.count:02d}_{name}"
        self.count += 1
        path.write_text(text)
        index_path = self.root / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": {}}
        index["graphs"].setdefault(self.key, []).append(str(path.relative_to(self.root)))
        index["report"] = "report.json"
        index_path.write_text(json.dumps(index, indent=2))

    def write_dynamo_graph(self, gm: fx.GraphModule) -> None:
        self._write("dynamo.py", readable(gm))

    def write_hook_graph(self, hook: str, kind: str, gm: fx.GraphModule) -> None:
        self._before = readable(gm)
        self._write(f"{kind}_at_{hook}_hook.py", self._before)

    def write_pass_graph(self, kind: str, pass_name: str, gm: fx.GraphModule) -> None:
        text = readable(gm)
        self._write(f"{kind}_{pass_name}_after.py", text)
        diff = difflib.unified_diff(self._before.splitlines(keepends=True), text.splitlines(keepends=True),
                                    fromfile=f"{kind} before {pass_name}", tofile=f"{kind} after {pass_name}")
        self._write(f"{kind}_{pass_name}.diff", "".join(diff) or "(no change)\n")
        self._before = text

    def wrap_inner_compile(self, inner_compile):
        """Wrap Inductor's inner compile to save the code it generates for each graph."""

        def inner(gm, example_inputs, **kwargs):
            output = inner_compile(gm, example_inputs, **kwargs)
            kind = "backward" if kwargs.get("is_backward") else (
                "inference" if kwargs.get("is_inference") else "forward")
            code = getattr(output, "source_code", None) or "(no source code: served from a cache)"
            self._write(f"output_code_{kind}.py", code)
            self.write_report()
            return output

        return inner

    def write_report(self) -> None:
        (self.root / "report.json").write_text(self.report.to_json())
