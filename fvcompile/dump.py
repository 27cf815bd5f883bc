"""Inspect data: every graph fvcompile saw, before and after each pass, as readable files.

Layout of a dump directory:
    index.json                      every file written, per compiled graph; "report": the latest report
    report.json                     the OptimizeReport (a later run into the same directory writes
                                    report_run2.json, ..., and graph_<id>_run2/, never over earlier files)
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


def _unused(root: Path, stem: str, suffix: str = "") -> str:
    """`stem`, or `stem_run2`, `stem_run3`, ... : the first name not yet taken in `root`."""
    name, run = stem + suffix, 1
    while (root / name).exists():
        run += 1
        name = f"{stem}_run{run}{suffix}"
    return name


# The report file of each (dump directory, report) pair, with the report kept alive so that
# its id is not reused: the graphs of one run share a report file, a later run gets its own.
_report_files: dict[tuple[str, int], tuple[OptimizeReport, str]] = {}


class Dumper:
    def __init__(self, root: str | Path, compile_id: str, report: OptimizeReport):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.report = report
        # Compile ids start again at 0/0 in a new process: a reused directory gets new folders.
        self.dir = self.root / _unused(self.root, "graph_" + compile_id.replace("/", "_").strip("[]_"))
        self.dir.mkdir()
        self.key = self.dir.name
        key = (str(self.root.resolve()), id(report))
        if key not in _report_files or _report_files[key][0] is not report:
            _report_files[key] = (report, _unused(self.root, "report", ".json"))
        self.report_name = _report_files[key][1]
        self.count = 0
        self._before = ""

    def _write(self, name: str, text: str) -> None:
        path = self.dir / f"{self.count:02d}_{name}"
        self.count += 1
        path.write_text(text)
        index_path = self.root / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": {}}
        index["graphs"].setdefault(self.key, []).append(str(path.relative_to(self.root)))
        index["report"] = self.report_name
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
        (self.root / self.report_name).write_text(self.report.to_json())
