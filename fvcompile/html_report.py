"""A dump folder as one self-contained HTML page: the page people open first to see a compile.

For each compiled graph: the pass pipeline as a timeline (hook, pass, time, sites rewritten and
skipped with their reasons); each pass's graph before and after, drawn as SVG (fvcompile.graph_svg)
with the changed nodes highlighted, and the text diff; every graph a hook saw, with its statistics
(op histogram, FLOPs and bytes per node, critical path: fvcompile.graph_stats); Inductor's IR
before and after fusion beside the generated code; and the kernels, each linked to the post-grad
FX nodes and source lines it came from. Then the OptimizeReport: graph breaks, recompilations.

The page works offline: CSS, SVG and a few lines of script are inline, fonts are the system's.
`write_html_report(dump_dir, out_dir)` writes out_dir/index.html; `fvcompile report DUMP_DIR`
and `fvcompile inspect MODEL --html OUT` call it.
"""
from __future__ import annotations

import difflib
import json
import re
from html import escape
from pathlib import Path

from fvcompile import graph_stats
from fvcompile.dump_reader import Dump, GraphDump, Stage, read_dump
from fvcompile.graph_svg import graph_svg
from fvcompile.output_code import kernel_calls

MAX_DRAWN_NODES = 1000  # a graph with more nodes is summarized (histogram, totals), not drawn
REGION_ABOVE = 80  # a pass's changes in a graph with more nodes are drawn with their neighbours only

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 1.5em 3em; color: #1d232a; }
h1 { margin: .6em 0 .2em; } h2 { border-bottom: 2px solid #d0d7de; padding-bottom: .2em; margin-top: 1.6em; }
h3 { margin: 1.2em 0 .4em; } code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
pre { background: #f6f8fa; padding: .6em; overflow: auto; margin: 0; }
table { border-collapse: collapse; margin: .4em 0; } td, th { border: 1px solid #d0d7de; padding: 2px 8px;
 text-align: left; vertical-align: top; font-size: 13px; } th { background: #f0f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 10px; background: #4f8cc9; vertical-align: middle; }
.skip { color: #8a5a00; } .muted { color: #57606a; } .note { background: #fff8c5; padding: .3em .6em; }
.pair { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1em; }
.triple { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr) minmax(0, 1.3fr); gap: .8em; }
table.kernels, table.timeline { width: 100%; table-layout: fixed; } table.kernels td { overflow-wrap: anywhere; }
.scroll { overflow: auto; max-height: 640px; border: 1px solid #d0d7de; }
.scroll pre { max-height: none; }
details { margin: .3em 0; } summary { cursor: pointer; font-weight: 600; }
.diff .add { background: #dafbe1; } .diff .del { background: #ffebe9; } .diff .hunk { color: #6639ba; }
.legend span { display: inline-block; padding: 0 .5em; margin-right: .5em; border: 1px solid #888; font-size: 12px; }
g.node:target rect { stroke: #d00000; stroke-width: 4; }
tr:target { background: #fff3b0; }
nav a { margin-right: 1em; }
"""

# Opens the <details> around a linked element (a node of a collapsed graph) and scrolls to it.
SCRIPT = """
function fvReveal() {
  var id = decodeURIComponent(location.hash.slice(1));
  var t = id && document.getElementById(id);
  if (!t) return;
  for (var e = t.parentElement; e; e = e.parentElement) { if (e.tagName === 'DETAILS') e.open = true; }
  t.scrollIntoView({block: 'center', inline: 'nearest'});
}
window.addEventListener('hashchange', fvReveal);
window.addEventListener('load', fvReveal);
"""


def _id(*parts: str) -> str:
    """An HTML id from parts (graph key, kind, node name, ...): letters, digits, '_' and '-'."""
    return "-".join(re.sub(r"[^0-9A-Za-z_-]+", "_", str(p)) for p in parts)


def _fmt(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _names(record: dict) -> set[str]:
    return {n["name"] for n in record["nodes"]}


def _pre(text: str, cls: str = "") -> str:
    return f'<pre class="{cls}">{escape(text)}</pre>'


def _diff_html(text: str) -> str:
    lines = []
    for line in text.splitlines():
        cls = ("hunk" if line.startswith("@@") else "add" if line.startswith("+") and not line.startswith("+++")
               else "del" if line.startswith("-") and not line.startswith("---") else "")
        lines.append(f'<span class="{cls}">{escape(line)}</span>' if cls else escape(line))
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


class _Page:
    """The HTML of one report, built section by section."""

    def __init__(self, max_nodes: int):
        self.max_nodes = max_nodes
        self.parts: list[str] = []

    def add(self, html: str) -> None:
        self.parts.append(html)

    # -- graphs ---------------------------------------------------------------------------------

    def drawing(self, record: dict | None, prefix: str, changed=frozenset(), removed=frozenset()) -> str:
        if record is None:
            return '<p class="muted">no graph record in this dump (written by an older fvcompile)</p>'
        svg = graph_svg(record, prefix=prefix, changed=changed, removed=removed, max_nodes=self.max_nodes)
        if svg is None:
            totals = graph_stats.totals(record)
            return (f'<p class="note">{totals["nodes"]} nodes: too large to draw (the limit is {self.max_nodes}; '
                    f'--max-nodes raises it). Summary: {totals["ops"]} ops, {_fmt(totals["flops"])}FLOPs, '
                    f'{_fmt(totals["bytes"])}B written; the op histogram and the per-node table are below.</p>')
        return f'<div class="scroll">{svg}</div>'

    def stats(self, record: dict | None, prefix: str) -> str:
        if record is None:
            return ""
        totals = graph_stats.totals(record)
        hist = graph_stats.op_histogram(record).most_common()
        top = max((c for _, c in hist), default=1)
        rows = "".join(f'<tr><td><code>{escape(op)}</code></td><td class="num">{c}</td>'
                       f'<td><span class="bar" style="width:{120 * c / top:.0f}px"></span></td></tr>'
                       for op, c in hist)
        path, weight, total = graph_stats.critical_path(record)
        links = " &rarr; ".join(f'<a href="#{_id(prefix, n)}"><code>{escape(n)}</code></a>' for n in path)
        nodes = [n for n in record["nodes"] if n["op"] not in ("placeholder", "output")]
        per_node = "".join(
            f'<tr><td><a href="#{_id(prefix, n["name"])}"><code>{escape(n["name"])}</code></a></td>'
            f'<td><code>{escape(n["target"])}</code></td><td>{escape(str(n["shape"]))}</td>'
            f'<td>{escape(n["dtype"] or "")}</td><td class="num">{n["flops"]:,}</td><td class="num">{n["bytes"]:,}</td>'
            f'<td><code>{escape(n.get("source") or "")}</code></td></tr>' for n in nodes)
        return (f'<p>{totals["nodes"]} nodes, {totals["ops"]} ops, {_fmt(totals["flops"])}FLOPs, '
                f'{_fmt(totals["bytes"])}B of outputs.</p>'
                f'<div class="pair"><div><b>Op histogram</b><table class="hist">{rows}</table></div>'
                f'<div><b>Critical path</b> ({len(path)} nodes, {_fmt(total)} {weight}; networkx longest path '
                f'weighted by {weight}): <p>{links}</p></div></div>'
                f'<details><summary>FLOPs and bytes per node ({len(nodes)})</summary><table class="per-node">'
                f'<tr><th>node</th><th>op</th><th>shape</th><th>dtype</th><th>FLOPs</th><th>bytes out</th>'
                f'<th>source</th></tr>{per_node}</table></details>')

    # -- one compiled graph ---------------------------------------------------------------------

    def graph(self, tag: str, graph: GraphDump) -> None:
        gid = _id(tag, graph.key)
        report = graph.report or {}
        title = report.get("compile_id", graph.key)
        self.add(f'<section class="compiled-graph" id="{gid}"><h2>Graph {escape(title)} '
                 f'<span class="muted">({escape(graph.key)})</span></h2>')
        if report.get("recompile_reason"):
            self.add(f'<p class="note">Recompiled: {escape(report["recompile_reason"])}</p>')
        if report.get("cache_hit"):
            self.add('<p class="note">Served from Inductor\'s cache: no pass ran.</p>')
        for note in report.get("notes", []):
            self.add(f'<p class="note">{escape(note)}</p>')
        prefixes = {s.number: _id(gid, f"{s.number:02d}") for s in graph.stages}
        self.timeline(graph, report)
        self.passes(graph, prefixes)
        self.snapshots(graph, prefixes)
        self.inductor(gid, graph, prefixes)
        self.add("</section>")

    def timeline(self, graph: GraphDump, report: dict) -> None:
        """Every stage in the order it happened: hooks with their graph's size, passes with their
        time and sites (rewritten, skipped with reasons)."""
        runs = list(report.get("pass_runs", []))
        longest = max((r.get("seconds", 0) for r in runs), default=0) or 1
        rows = []
        for s in graph.stages:
            if s.what in ("diff", "provenance", "text"):
                continue
            if s.what == "pass":
                run = next((r for r in runs if r.get("name") == s.pass_name and r.get("graph_kind") == s.kind), None)
                if run:
                    runs.remove(run)
                rows.append(self._pass_row(s, run or {}, longest))
                continue
            what = {"dynamo": "Dynamo's graph", "code": "Inductor's generated code"}.get(s.what, "graph at the hook")
            size = f'{len(s.record["nodes"])} nodes' if s.record else (
                f"{sum(1 for line in s.text.splitlines() if line and not line.startswith(' '))} scheduler nodes"
                if s.scheduler else "")
            rows.append(f'<tr><td class="num">{s.number:02d}</td><td>{escape(s.hook or "-")}</td>'
                        f'<td>{escape(s.kind or "-")}</td><td class="muted">{what}</td><td></td><td></td>'
                        f'<td>{size}</td></tr>')
        self.add('<h3>Pass pipeline</h3><table class="timeline"><colgroup><col style="width:3em">'
                 '<col style="width:8em"><col style="width:7em"><col style="width:13em"><col style="width:9em">'
                 '<col style="width:45%"><col></colgroup><tr><th>#</th><th>hook</th><th>graph</th>'
                 '<th>pass</th><th>time</th><th>rewritten</th><th>skipped (reason)</th></tr>'
                 + "".join(rows) + "</table>")

    @staticmethod
    def _pass_row(s: Stage, run: dict, longest: float) -> str:
        result = run.get("result", {})
        done, skipped = result.get("rewritten", []), result.get("skipped", [])
        seconds = run.get("seconds", 0)
        done_html = "".join(f"<li><code>{escape(x.get('node', ''))}</code> {escape(x.get('module', ''))}: "
                            f"{escape(x.get('detail', ''))}</li>" for x in done)
        skip_html = "".join(f"<li><code>{escape(x.get('node', ''))}</code> {escape(x.get('module', ''))}: "
                            f"{escape(x.get('detail', ''))} <span class='muted'>({escape(x.get('reason', ''))})"
                            f"</span></li>" for x in skipped)
        return (f'<tr class="pass-run"><td class="num">{s.number:02d}</td><td>{escape(run.get("hook", s.hook) or "-")}'
                f'</td><td>{escape(s.kind)}</td><td><b class="pass-name">{escape(s.pass_name)}</b></td>'
                f'<td class="num">{seconds * 1e3:.1f} ms <span class="bar" style="width:{60 * seconds / longest:.0f}px">'
                f'</span></td><td>{len(done)}<ul>{done_html}</ul></td>'
                f'<td class="skip">{len(skipped)}<details><summary>reasons</summary><ul>{skip_html}</ul></details>'
                f"</td></tr>")

    def passes(self, graph: GraphDump, prefixes: dict[int, str]) -> None:
        """Each pass: the graph before and after, side by side, changes highlighted; its diff."""
        # (graph kind, scheduler nodes or FX) -> the latest graph of that kind and form
        before: dict[tuple[str, bool], Stage] = {}
        for s in graph.stages:
            if s.what == "hook":
                before[s.kind, s.scheduler] = s
            if s.what != "pass":
                continue
            where = "scheduler nodes" if s.scheduler else "graph"
            self.add(f'<h3 class="pass-title">Pass <b>{escape(s.pass_name)}</b> on the {escape(s.kind)} {where}</h3>')
            prev = before.get((s.kind, s.scheduler))
            before[s.kind, s.scheduler] = s
            if s.scheduler or prev is None:  # scheduler nodes are listed, not drawn
                self.add(f'<div class="pair"><div><b>before</b>{_pre(prev.text if prev else "(not dumped)")}</div>'
                         f'<div><b>after</b>{_pre(s.text)}</div></div>')
                continue
            changed = removed = set()
            if prev.record and s.record:
                changed, removed = graph_stats.changed_nodes(prev.record, s.record)
            old_record, new_record, scope = prev.record, s.record, "the whole graph"
            if (changed or removed) and len(s.record["nodes"]) > REGION_ABOVE:
                # A large graph drawn whole hides its few changes: draw them with their neighbours.
                old_record = graph_stats.neighbourhood(prev.record, removed | (changed & _names(prev.record)))
                new_record = graph_stats.neighbourhood(s.record, changed | (removed & _names(s.record)))
                scope = (f"the changed nodes and their neighbours; whole graphs: "
                         f'<a href="#{prefixes[prev.number]}-details">#{prev.number:02d}</a>, '
                         f'<a href="#{prefixes[s.number]}-details">#{s.number:02d}</a>')
            elif not (changed or removed):
                scope = "no node changed"
            self.add(f'<p class="legend"><span style="background:#ffd27f">changed or new: {len(changed)}</span>'
                     f'<span style="background:#ffb3b3">removed: {len(removed)}</span>'
                     f'<span style="background:#e3d4ff">fvcompile op</span> drawn: {scope}</p>'
                     f'<div class="pair"><div><b>before</b> (#{prev.number:02d})'
                     f'{self.drawing(old_record, _id(prefixes[s.number], "before"), removed=removed)}</div>'
                     f'<div><b>after</b> (#{s.number:02d})'
                     f'{self.drawing(new_record, _id(prefixes[s.number], "after"), changed=changed)}'
                     f"</div></div>")
            diff = next((d for d in graph.stages if d.what == "diff" and d.kind == s.kind
                         and d.pass_name == s.pass_name and d.number == s.number + 1), None)
            text = diff.text if diff else "".join(difflib.unified_diff(
                prev.text.splitlines(True), s.text.splitlines(True), "before", "after"))
            self.add(f"<details><summary>text diff</summary>{_diff_html(text)}</details>")

    def snapshots(self, graph: GraphDump, prefixes: dict[int, str]) -> None:
        """Every FX graph of the dump, collapsed: its drawing and statistics."""
        self.add("<h3>Graphs at each hook</h3>")
        for s in graph.stages:
            if s.what not in ("dynamo", "hook", "pass") or s.scheduler:
                continue
            label = ("Dynamo's graph" if s.what == "dynamo" else
                     f"{s.kind} graph at the {s.hook} hook" if s.what == "hook" else f"{s.kind} graph after {s.pass_name}")
            nodes = f" ({len(s.record['nodes'])} nodes)" if s.record else ""
            self.add(f'<details class="snapshot" id="{prefixes[s.number]}-details"><summary>#{s.number:02d} '
                     f"{escape(label)}{nodes}</summary>{self.stats(s.record, prefixes[s.number])}"
                     f"{self.drawing(s.record, prefixes[s.number])}"
                     f"<details><summary>code</summary>{_pre(s.text)}</details></details>")

    def inductor(self, gid: str, graph: GraphDump, prefixes: dict[int, str]) -> None:
        """Per generated graph: IR before and after fusion beside the code, then its kernels with
        their provenance (post-grad nodes, linked to the graph's drawing, and source lines)."""
        for code in (s for s in graph.stages if s.what == "code"):
            kind = code.kind
            mine = [s for s in graph.stages if s.kind == kind and s.number < code.number]
            pre = next((s for s in mine if s.what == "hook" and s.hook == "pre_fusion"), None)
            post = next((s for s in mine if s.what == "hook" and s.hook == "post_fusion"), None)
            fx_graphs = [s for s in mine if s.what in ("hook", "pass") and not s.scheduler]
            post_grad = fx_graphs[-1] if fx_graphs else None
            prov = next((s for s in graph.stages if s.what == "provenance" and s.kind == kind
                         and s.number > code.number), None)
            provenance = prov.record if prov else {}
            self.add(f'<h3>Inductor: the {escape(kind)} graph</h3><div class="triple">'
                     f'<div><b>IR before fusion</b><div class="scroll">{_pre(pre.text if pre else "(not dumped)")}</div></div>'
                     f'<div><b>IR after fusion</b><div class="scroll">{_pre(post.text if post else "(not dumped)")}</div></div>'
                     f'<div><b>generated code</b><div class="scroll">{_pre(code.text)}</div></div></div>')
            self.kernels(gid, kind, kernel_calls(code.text, provenance), post_grad, prefixes)

    def kernels(self, gid: str, kind: str, calls, post_grad: Stage | None, prefixes: dict[int, str]) -> None:
        names = {n["name"] for n in post_grad.record["nodes"]} if post_grad and post_grad.record else set()
        target = prefixes[post_grad.number] if post_grad else ""
        rows = []
        for call in calls:
            node_links = ", ".join(
                f'<a class="node-link" href="#{_id(target, n)}"><code>{escape(n)}</code></a>' if n in names
                else f"<code>{escape(n)}</code>" for n in call.post_grad_nodes) or '<span class="muted">-</span>'
            lines = []
            for trace in call.stack_traces:
                line = graph_stats._last_frame(trace)
                if line and line not in lines:
                    lines.append(line)
            source = f"<details><summary>code</summary>{_pre(call.source)}</details>" if call.source else ""
            rows.append(f'<tr class="kernel" id="{_id(gid, kind, "kernel", call.handle)}"><td><code>'
                        f'{escape(call.name)}</code>{source}</td><td>{node_links}</td>'
                        f'<td><code>{escape(", ".join(call.source_nodes))}</code></td>'
                        f'<td><code>{escape(", ".join(call.aten_ops))}</code></td>'
                        f'<td>{"<br>".join(f"<code>{escape(x)}</code>" for x in lines)}</td></tr>')
        where = (f'post-grad nodes link to <a href="#{target}-details">#{post_grad.number:02d}</a>, '
                 f"the last graph of this kind fvcompile saw" if post_grad else "")
        self.add(f'<h4>Kernels ({len(calls)}) and where they came from</h4><p class="muted">{where}</p>'
                 '<table class="kernels"><tr><th>kernel</th><th>post-grad FX nodes</th><th>Dynamo nodes</th>'
                 '<th>ATen ops</th><th>source lines</th></tr>' + "".join(rows) + "</table>")

    # -- the OptimizeReport ---------------------------------------------------------------------

    def report(self, report: dict) -> None:
        graphs = report.get("graphs", [])
        rows = []
        for name in report.get("passes", []):
            runs = [r for g in graphs for r in g.get("pass_runs", []) if r.get("name") == name]
            rows.append(f"<tr><td>{escape(name)}</td><td>{'approximate' if name in report.get('approximate', []) else 'exact'}"
                        f"</td><td class='num'>{sum(len(r['result'].get('rewritten', [])) for r in runs)}</td>"
                        f"<td class='num'>{sum(len(r['result'].get('skipped', [])) for r in runs)}</td>"
                        f"<td class='num'>{len(runs)}</td></tr>")
        breaks = "".join(f"<li>x{count}: {escape(reason)}</li>" for reason, count in report.get("graph_breaks", {}).items())
        recompiles = "".join(f"<li>{escape(g.get('compile_id', '?'))}: {escape(g['recompile_reason'])}</li>"
                             for g in graphs if g.get("recompile_reason"))
        eager = (f"<p class='note'>{report.get('eager_calls')} call(s) ran eagerly: {escape(report.get('ran_eagerly', ''))}</p>"
                 if report.get("eager_calls") else "")
        self.add('<h2>OptimizeReport</h2><table class="report"><tr><th>pass</th><th>numerics</th><th>rewritten</th>'
                 '<th>skipped</th><th>runs</th></tr>' + "".join(rows) + "</table>"
                 f"<p>{len(graphs)} graph(s) compiled, {report.get('graph_calls', 0)} compiled call(s).</p>{eager}"
                 f"<h3>Graph breaks</h3>{f'<ul>{breaks}</ul>' if breaks else '<p>none</p>'}"
                 f"<h3>Recompilations</h3>{f'<ul>{recompiles}</ul>' if recompiles else '<p>none</p>'}"
                 f"<details><summary>report.json</summary>{_pre(json.dumps(report, indent=1))}</details>")


def render(dumps: list[Dump], title: str, max_nodes: int = MAX_DRAWN_NODES) -> str:
    """The whole page for one or more dumps (the ranks of one run)."""
    page = _Page(max_nodes)
    for dump in dumps:
        tag = "single" if dump.rank is None else f"rank{dump.rank}"
        if len(dumps) > 1 or dump.rank is not None:
            page.add(f"<h1>Rank {dump.rank} of {dump.world_size}</h1>")
        passes = ", ".join(dump.report.get("passes", [])) or "none"
        nav = " ".join(f'<a href="#{_id(tag, g.key)}">{escape(g.key)}</a>' for g in dump.graphs)
        page.add(f'<p class="muted">{escape(str(dump.folder))}: {len(dump.graphs)} graph(s); passes: '
                 f"{escape(passes)}</p><nav>{nav}</nav>")
        for graph in dump.graphs:
            page.graph(tag, graph)
        page.report(dump.report)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>" + "".join(page.parts)
            + f"<script>{SCRIPT}</script></body></html>")


def write_html_report(dump_dir: str | Path, out_dir: str | Path, *, rank: int | str = "all",
                      max_nodes: int = MAX_DRAWN_NODES, title: str | None = None) -> Path:
    """Read the dump(s) under `dump_dir` and write `out_dir/index.html`; returns its path."""
    from fvcompile.dump import select_dumps

    dumps = [read_dump(folder, r) for r, folder in select_dumps(dump_dir, rank).items()]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file: give a folder to write index.html into (--html OUT)")
    out.mkdir(parents=True, exist_ok=True)
    html = render(dumps, title or f"fvcompile report: {Path(dump_dir).resolve().name}", max_nodes)
    path = out / "index.html"
    path.write_text(html)
    return path
