"""An FX graph record (fvcompile.graph_stats.graph_record) drawn as inline SVG, with no external binary.

Nodes are laid out by networkx: each node's layer is its topological generation (a node sits one
row below the lowest of its inputs' rows), and `multipartite_layout` spreads each layer across
its row. Every node is a box with its name and op; its tooltip (`<title>`) holds the target,
shape, dtype, FLOPs, bytes and source line. Changed nodes are highlighted; each node's `<g>` has
an id (`<prefix>-<name>`) so that other parts of the page (the kernels' provenance) link to it.
"""
from __future__ import annotations

from html import escape

from fvcompile.graph_stats import to_networkx

BOX_W, BOX_H, GAP_X, GAP_Y = 128, 30, 14, 26

STYLE = {  # fill, stroke
    "changed": ("#ffd27f", "#c47a00"),
    "removed": ("#ffb3b3", "#b30000"),
    "placeholder": ("#e8eef7", "#7f95b3"),
    "output": ("#e8eef7", "#7f95b3"),
    "fvcompile": ("#e3d4ff", "#6a3fc1"),
    "default": ("#ffffff", "#888888"),
}


def _style(node: dict, changed: set[str], removed: set[str]) -> tuple[str, str]:
    if node["name"] in changed:
        return STYLE["changed"]
    if node["name"] in removed:
        return STYLE["removed"]
    if node["op"] in ("placeholder", "output"):
        return STYLE[node["op"]]
    if node["target"].startswith("fvcompile."):
        return STYLE["fvcompile"]
    return STYLE["default"]


def _label(node: dict) -> str:
    if node["op"] in ("placeholder", "output", "get_attr"):
        return node["op"]
    target = node["target"]
    parts = target.split(".")
    # aten.mm.default -> mm; fvcompile.sparse24_relu.default -> fvcompile.sparse24_relu
    if parts[0] == "aten" and len(parts) >= 2:
        return parts[1]
    if len(parts) >= 3 and parts[-1] == "default":
        return ".".join(parts[:-1])
    return target


def _short(text: str, chars: int = 19) -> str:
    return text if len(text) <= chars else text[:chars - 1] + "\u2026"


def _tooltip(node: dict) -> str:
    lines = [f"{node['name']}: {node['target']}"]
    if node.get("shape") is not None:
        lines.append(f"shape {node['shape']} {node.get('dtype') or ''}")
    if node.get("flops"):
        lines.append(f"{node['flops']:,} FLOPs")
    if node.get("bytes"):
        lines.append(f"{node['bytes']:,} bytes out")
    if node.get("source"):
        lines.append(node["source"])
    return "\n".join(lines)


def layout(record: dict) -> dict[str, tuple[float, float]]:
    """Pixel centre of each node: one row per topological generation (networkx), nodes of a row
    spread by `multipartite_layout` in graph order."""
    import networkx as nx

    g = to_networkx(record)
    generations = [list(names) for names in nx.topological_generations(g)]
    for layer, names in enumerate(generations):
        for name in names:
            g.nodes[name]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=1.0, center=(0, 0))
    xs = [p[0] for p in pos.values()]
    left, span = min(xs), (max(xs) - min(xs)) or 1.0
    width = max(len(names) for names in generations) * (BOX_W + GAP_X)
    return {name: (GAP_X + BOX_W / 2 + (p[0] - left) / span * max(width - BOX_W - 2 * GAP_X, 0),
                   GAP_Y + BOX_H / 2 + g.nodes[name]["layer"] * (BOX_H + GAP_Y))
            for name, p in pos.items()}


def graph_svg(record: dict, *, prefix: str, changed: set[str] = frozenset(), removed: set[str] = frozenset(),
              max_nodes: int = 1000) -> str | None:
    """The graph as an `<svg>` element, or None when it has more than `max_nodes` nodes (too large
    to read drawn: the report summarizes it instead)."""
    nodes = record["nodes"]
    if len(nodes) > max_nodes or not nodes:
        return None
    pos = layout(record)
    width = max(x for x, _ in pos.values()) + BOX_W / 2 + GAP_X
    height = max(y for _, y in pos.values()) + BOX_H / 2 + GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}">',
             '<g class="edges" stroke="#9aa5b1" stroke-width="1" fill="none">']
    for node in nodes:
        x2, y2 = pos[node["name"]]
        for name in node["inputs"]:
            if name in pos:
                x1, y1 = pos[name]
                mid = (y1 + y2) / 2
                parts.append(f'<path d="M{x1:.0f},{y1 + BOX_H / 2:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} '
                             f'{x2:.0f},{y2 - BOX_H / 2:.0f}"/>')
    parts.append("</g>")
    for node in nodes:
        x, y = pos[node["name"]]
        fill, stroke = _style(node, changed, removed)
        width_px = 2.5 if node["name"] in changed or node["name"] in removed else 1
        parts.append(
            f'<g class="node" id="{escape(prefix)}-{escape(node["name"])}">'
            f"<title>{escape(_tooltip(node))}</title>"
            f'<rect x="{x - BOX_W / 2:.0f}" y="{y - BOX_H / 2:.0f}" width="{BOX_W}" height="{BOX_H}" rx="4" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{width_px}"/>'
            f'<text x="{x:.0f}" y="{y - 3:.0f}" text-anchor="middle" font-size="10" font-weight="bold">'
            f"{escape(_short(node['name']))}</text>"
            f'<text x="{x:.0f}" y="{y + 10:.0f}" text-anchor="middle" font-size="9" fill="#444">'
            f"{escape(_short(_label(node), 22))}</text></g>")
    parts.append("</svg>")
    return "".join(parts)
