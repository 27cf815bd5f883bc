"""A dump folder (fvcompile.dump) read back as structured data, for the HTML report.

`read_dump(folder)` checks the folder and names what is wrong with it (no index, an index or a
JSON file that is not JSON, a file the index lists that is gone), then sorts each compiled graph's
files into stages by their names:

    NN_dynamo.py                          Dynamo's graph
    NN_<kind>_at_<hook>_hook.py|.txt      a graph (FX code, or scheduler nodes) as a hook got it
    NN_<kind>_<pass>_after.py|.txt        after a pass; NN_<kind>_<pass>.diff what it changed
    NN_output_code_<kind>.py              Inductor's code; NN_provenance_<kind>.json its kernels' nodes

An FX graph's `NN_*.graph.json` (its nodes with shapes, FLOPs and bytes) is read with it; dumps
written before those records existed read without them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("joint", "inference", "forward", "backward")
_KIND = "|".join(KINDS)


class DumpError(ValueError):
    """A dump folder that cannot be read: the message names the file and the way out."""


@dataclass
class Stage:
    number: int
    what: str  # "dynamo", "hook", "pass", "diff", "code", "provenance", "text"
    kind: str = ""  # graph kind (joint, inference, forward, backward)
    hook: str = ""
    pass_name: str = ""
    path: Path | None = None
    text: str = ""
    record: dict | None = None  # the FX graph's record (graph_stats.graph_record), when dumped;
    # for a provenance file, its kernels' nodes

    @property
    def scheduler(self) -> bool:
        return self.path is not None and self.path.suffix == ".txt"


@dataclass
class GraphDump:
    key: str  # graph_<id>, e.g. graph_0_0 (graph_0_0_run2 for a later run into the same folder)
    stages: list[Stage] = field(default_factory=list)
    report: dict | None = None  # this graph's part of the OptimizeReport, when the report has it


@dataclass
class Dump:
    folder: Path
    rank: int | None
    world_size: int | None
    report: dict
    graphs: list[GraphDump]


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DumpError(f"{path} is not valid JSON ({e}): the dump is corrupt or was cut off; "
                        "write it again (fvcompile inspect MODEL --out DIR, or optimize(..., dump_dir=))") from None


def _stage(path: Path) -> Stage | None:
    match = re.fullmatch(r"(\d+)_(.+)", path.name)
    if not match or path.name.endswith(".graph.json"):
        return None
    number, rest = int(match.group(1)), match.group(2)
    stem, suffix = rest.rsplit(".", 1) if "." in rest else (rest, "")
    if stem == "dynamo" and suffix == "py":
        return Stage(number, "dynamo", path=path)
    if m := re.fullmatch(rf"output_code_({_KIND})", stem):
        return Stage(number, "code", m.group(1), path=path)
    if m := re.fullmatch(rf"provenance_({_KIND})", stem):
        return Stage(number, "provenance", m.group(1), path=path)
    if m := re.fullmatch(rf"({_KIND})_at_(\w+?)_hook", stem):
        return Stage(number, "hook", m.group(1), hook=m.group(2), path=path)
    if m := re.fullmatch(rf"({_KIND})_(\w+)_after", stem):
        return Stage(number, "pass", m.group(1), pass_name=m.group(2), path=path)
    if (m := re.fullmatch(rf"({_KIND})_(\w+)", stem)) and suffix == "diff":
        return Stage(number, "diff", m.group(1), pass_name=m.group(2), path=path)
    return Stage(number, "text", path=path)


def _graph_key(compile_id: str) -> str:
    return "graph_" + compile_id.replace("/", "_").strip("[]_")


def read_dump(folder: str | Path, rank: int | None = None) -> Dump:
    """One dump folder (a single process's, or one rank's)."""
    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise DumpError(f"{folder} holds no fvcompile dump (no index.json): give the folder an earlier run "
                        "wrote (inspect's --out, or optimize's dump_dir=)")
    index = _json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("graphs"), dict):
        raise DumpError(f"{index_path} has no 'graphs' table: it is no fvcompile dump index, or a corrupt one")
    report_name = index.get("report")
    report = _json(folder / report_name) if report_name and (folder / report_name).is_file() else {}
    # The report is the latest run's: a compile id's graph is the last folder of that id
    # (graph_0_0, then graph_0_0_run2 for a later run into the same dump folder).
    latest = {re.sub(r"_run\d+$", "", key): key for key in index["graphs"]}
    by_key = {latest.get(_graph_key(g.get("compile_id", "?"))): g for g in report.get("graphs", [])}
    graphs = []
    for key, files in index["graphs"].items():
        graph = GraphDump(key, report=by_key.get(key))
        for name in files:
            path = folder / name
            if not path.is_file():
                raise DumpError(f"{index_path} lists {name}, which is missing: the dump is incomplete; "
                                "write it again")
            stage = _stage(path)
            if stage is None:
                continue
            stage.text = path.read_text(errors="replace")
            if stage.what == "provenance":
                stage.record = _json(path)
            record_path = path.with_name(path.name.rsplit(".", 1)[0] + ".graph.json")
            if path.suffix == ".py" and record_path.is_file():
                stage.record = _json(record_path)
            graph.stages.append(stage)
        graphs.append(graph)
    return Dump(folder, index.get("rank", rank), index.get("world_size"), report, graphs)
