"""Inspect data: every graph fvcompile saw, before and after each pass, as readable files.

Layout of a dump directory written by one process:
    index.json                      every file written, per compiled graph; "report": the latest report
    report.json                     the OptimizeReport (a later run into the same directory writes
                                    report_run2.json, ..., and graph_<id>_run2/, never over earlier files)
    graph_<id>/00_dynamo.py         the graph Dynamo captured
    graph_<id>/NN_<kind>_at_<hook>_hook.py  the graph as it reaches a hook (kind: joint, inference,
                                    forward, backward; hook: any hook name, e.g. joint, post_grad)
    graph_<id>/NN_<kind>_<pass>_after.py / .diff   after each pass, and what it changed
    graph_<id>/NN_<...>.graph.json  beside each graph above: its nodes with shapes, FLOPs and bytes
                                    (fvcompile.graph_stats), for the HTML report
    graph_<id>/NN_<name>.txt        a text artifact that is no FX graph (`Dumper.write_text`),
                                    e.g. Inductor's scheduler nodes at the fusion hooks
    graph_<id>/NN_output_code_<kind>.py   Inductor's generated code
    graph_<id>/NN_provenance_<kind>.json  each generated kernel's post-grad FX nodes and stack traces
                                    (Inductor's provenance tracking, on while dumping)

With TORCH_TRACE set, every file is also a structured-trace artifact named `fvcompile_<graph>_<file>`
(the report: `fvcompile_report`), so tlparse lists them beside Inductor's own artifacts.

With several ranks (torch.distributed initialized, world size > 1), each rank writes that same
layout into its own folder and nothing else, so no two ranks ever write the same path:
    rank_<r>/index.json, rank_<r>/report.json, rank_<r>/graph_<id>/...
A rank's index.json also records "rank" and "world_size". `fvcompile inspect --from DIR`
finds the ranks by their `rank_*` folders (`dumps_in`).
"""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

from torch import fx

from fvcompile.graph_stats import graph_record
from fvcompile.report import OptimizeReport


def readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=True, include_device=True)


def process_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process is one rank of several, None for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def rank_folder_name(rank: int) -> str:
    return f"rank_{rank}"


def _unused(root: Path, stem: str, suffix: str = "") -> str:
    """`stem`, or `stem_run2`, `stem_run3`, ... : the first name not yet taken in `root`."""
    name, run = stem + suffix, 1
    while (root / name).exists():
        run += 1
        name = f"{stem}_run{run}{suffix}"
    return name


def _trace_artifact(name: str, text: str, encoding: str = "string") -> None:
    """`text` as a structured-trace artifact (a no-op unless TORCH_TRACE or TORCH_LOGS ask for them)."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding},
                     payload_fn=lambda: text, expect_trace_id=False)


def artifact_name(key: str, file_name: str) -> str:
    """The structured-trace name of a dump file, e.g. fvcompile_graph_0_0_05_forward_at_post_grad_hook_py."""
    return "fvcompile_" + re.sub(r"[^0-9a-zA-Z_]+", "_", f"{key}_{file_name}")


def _check_file_name(name: str) -> None:
    # Artifact names become file names inside the graph's folder: nothing may climb out of it.
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"dump artifact name {name!r} is not a plain file name: "
                         "use letters, digits, '_', '-' and '.', without '/' or a leading '.'")


def _write_json(path: Path, data: dict) -> None:
    # Written whole, then renamed: a reader (`fvcompile inspect` during a run) never sees half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)


# The report file of each (dump directory, report) pair, with the report kept alive so that
# its id is not reused: the graphs of one run share a report file, a later run gets its own.
_report_files: dict[tuple[str, int], tuple[OptimizeReport, str]] = {}


class Dumper:
    def __init__(self, root: str | Path, compile_id: str, report: OptimizeReport):
        self.rank = process_rank()
        # One folder per rank: ranks share `root`, so each writes only under its own folder.
        self.root = Path(root) / rank_folder_name(self.rank[0]) if self.rank else Path(root)
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
        self._traced_report = ""  # the report as last emitted to the structured trace

    def _write(self, name: str, text: str, number: int | None = None) -> Path:
        """Write `NN_name` (NN: the next number, or `number` for a file beside an earlier one),
        index it, and emit it as a structured-trace artifact."""
        _check_file_name(name)
        if number is None:
            number, self.count = self.count, self.count + 1
        path = self.dir / f"{number:02d}_{name}"
        path.write_text(text)
        _trace_artifact(artifact_name(self.key, path.name), text,
                        "json" if name.endswith(".json") else "string")
        self._index(path)
        return path

    def _index(self, path: Path) -> None:
        index_path = self.root / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": {}}
        index["graphs"].setdefault(self.key, []).append(str(path.relative_to(self.root)))
        index["report"] = self.report_name
        if self.rank:
            index["rank"], index["world_size"] = self.rank
        _write_json(index_path, index)

    def _write_graph(self, name: str, gm: fx.GraphModule, text: str) -> None:
        """The graph's code, and beside it (same number) its record: shapes are only known now."""
        path = self._write(name + ".py", text)
        try:
            record = json.dumps(graph_record(gm))
        except Exception:  # a graph the record cannot describe: the report shows its code alone
            return
        self._write(name + ".graph.json", record, number=int(path.name.split("_")[0]))

    def write_dynamo_graph(self, gm: fx.GraphModule) -> None:
        self._write_graph("dynamo", gm, readable(gm))

    def write_hook_graph(self, hook: str, kind: str, gm: fx.GraphModule) -> None:
        self._before = readable(gm)
        self._write_graph(f"{kind}_at_{hook}_hook", gm, self._before)

    def write_pass_graph(self, kind: str, pass_name: str, gm: fx.GraphModule) -> None:
        text = readable(gm)
        self._write_graph(f"{kind}_{pass_name}_after", gm, text)
        diff = difflib.unified_diff(self._before.splitlines(keepends=True), text.splitlines(keepends=True),
                                    fromfile=f"{kind} before {pass_name}", tofile=f"{kind} after {pass_name}")
        self._write(f"{kind}_{pass_name}.diff", "".join(diff) or "(no change)\n")
        self._before = text

    def write_text(self, name: str, text: str) -> None:
        """A text artifact that is no FX graph (e.g. scheduler nodes at a fusion hook), numbered
        and indexed like the graphs; `.txt` is added to a name without a suffix."""
        self._write(name if Path(name).suffix else name + ".txt", text)

    def wrap_inner_compile(self, inner_compile):
        """Wrap Inductor's inner compile to save the code it generates for each graph."""

        def inner(gm, example_inputs, **kwargs):
            output = inner_compile(gm, example_inputs, **kwargs)
            kind = "backward" if kwargs.get("is_backward") else (
                "inference" if kwargs.get("is_inference") else "forward")
            code = getattr(output, "source_code", None) or "(no source code: served from a cache)"
            self._write(f"output_code_{kind}.py", code)
            provenance = kernel_provenance(code)
            if provenance:
                self._write(f"provenance_{kind}.json", json.dumps(provenance, indent=1))
            self.write_report(trace=True)
            return output

        return inner

    def write_report(self, trace: bool = False) -> None:
        """The report as it stands (written at every hook, so that a failed compile leaves it);
        `trace`: also emit it to the structured trace, once a graph's code is generated."""
        text = self.report.to_json()
        (self.root / self.report_name).write_text(text)
        if trace and text != self._traced_report:
            _trace_artifact("fvcompile_report", text, "json")
            self._traced_report = text


def kernel_provenance(code: str) -> dict[str, dict]:
    """Each kernel call of Inductor's output code (`# [Provenance debug handles] NAME:HANDLE`) ->
    the post-grad nodes it came from and their stack traces, from Inductor's provenance tracking
    (`trace.provenance_tracking_level`, which fvcompile turns on while dumping). Inductor fills
    these tables in module globals while it generates code, keyed by handles unique within a
    compile: read right after this graph's codegen, the handles in its code pick out its kernels."""
    import torch._inductor.debug as inductor_debug

    nodes = getattr(inductor_debug, "_inductor_triton_kernel_to_post_grad_node_info", {})
    stacks = getattr(inductor_debug, "_inductor_kernel_stack_trace", {})
    found = {}
    for handle in re.findall(r"(?:#|//) \[Provenance debug handles\] (\S+)", code):
        if handle in nodes or handle in stacks:
            found[handle] = {"post_grad_nodes": list(nodes.get(handle, [])),
                             "stack_traces": list(stacks.get(handle, []))}
    return found


# Reading a dump back (`fvcompile inspect --from DIR`).

SINGLE_PROCESS = None  # the key of a single process's dump in `dumps_in`'s answer


def dumps_in(top: str | Path) -> dict[int | None, Path]:
    """The dumps under `top`: rank -> its folder, and SINGLE_PROCESS -> `top` where a single
    process wrote there (both can be: one directory reused by a single and a multi-rank run)."""
    top = Path(top)
    if not top.is_dir():
        raise FileNotFoundError(f"no dump directory {top}: give the folder an earlier run wrote "
                                "(inspect's --out, or optimize's dump_dir=)")
    found: dict[int | None, Path] = {}
    if (top / "index.json").is_file():
        found[SINGLE_PROCESS] = top
    ranks = {}
    for folder in top.iterdir():
        match = re.fullmatch(r"rank_(\d+)", folder.name)
        if match and (folder / "index.json").is_file():
            ranks[int(match.group(1))] = folder
    found.update(sorted(ranks.items()))
    if not found:
        raise FileNotFoundError(f"{top} holds no fvcompile dump (no index.json, no rank_*/index.json): "
                                "give the folder an earlier run wrote (inspect's --out, or optimize's dump_dir=)")
    return found


def select_dumps(top: str | Path, rank: int | str = "all") -> dict[int | None, Path]:
    """The dumps of `rank` ("all": every one) under `top`; an error naming the ranks found when
    `rank` wrote nothing there."""
    found = dumps_in(top)
    if rank == "all":
        return found
    if rank not in found:
        ranks = ", ".join(str(r) for r in found if r is not SINGLE_PROCESS)
        what = f"ranks found: {ranks}" if ranks else "it holds a single-process dump, with no rank folders"
        raise FileNotFoundError(f"{top} has no dump of rank {rank} ({what}): "
                                "give one of those ranks, or --rank all")
    return {rank: found[rank]}
