"""Every rank must issue the same collectives in the same order, or the job hangs.

A rank whose graph differs (a data-dependent branch, a recompilation on one rank only, a plan
computed from numbers that differ between ranks) would wait forever in a collective that no
other rank issues. Before Inductor schedules a graph, `check_ranks_agree` writes the graph's
collective sequence (`fsdp_collectives.signature`) into the process group's store and reads
every other rank's: a mismatch is an error on every rank naming the ranks and the first
collective that differs; a rank that never arrives is an error naming it, after a timeout.

The check uses the store, not a collective, so that it cannot itself hang. It is skipped with a
fake process group (one process stands for every rank) and without a process group.
"""
from __future__ import annotations

import datetime
import json

from torch import fx

from fvcompile.passes.base import PassContext
from fvcompile.passes.fsdp_collectives import signature

TIMEOUT = datetime.timedelta(seconds=300)  # a rank may still be compiling: Inductor can take minutes
_checked: dict[tuple[str, str], int] = {}  # (pass, graph kind) -> graphs checked so far in this process


class CollectiveMismatchError(RuntimeError):
    """The ranks would issue different collectives: the job would hang."""


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "fake":
        return None
    return dist.distributed_c10d._get_default_store()


def check_ranks_agree(graph: fx.Graph, ctx: PassContext, label: str, timeout: datetime.timedelta = TIMEOUT) -> bool:
    """Raise `CollectiveMismatchError` unless every rank's graph issues the same collectives.
    Returns whether the check ran (False without a real multi-rank process group)."""
    store = _store()
    if store is None:
        return False
    import torch.distributed as dist

    n = _checked.get((label, ctx.graph_kind), 0)
    _checked[(label, ctx.graph_kind)] = n + 1
    agree(signature(graph), store, dist.get_rank(), dist.get_world_size(),
          f"{ctx.graph_kind} graph #{n} after {label}", timeout)
    return True


def agree(seq: list[str], store, rank: int, world: int, what: str, timeout: datetime.timedelta = TIMEOUT) -> None:
    """Publish this rank's collective sequence for `what` in `store` and compare it with every
    other rank's; raise `CollectiveMismatchError` on a difference or a rank that never arrives."""
    keys = [f"fvcompile/collectives/{what}/{r}" for r in range(world)]
    store.set(keys[rank], json.dumps(seq))
    try:
        store.wait(keys, timeout)
    except Exception as e:  # the store's timeout: name the ranks that never wrote
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise CollectiveMismatchError(
            f"rank {rank}: rank(s) {missing} did not reach the {what} within {timeout.total_seconds():.0f} s: "
            "the ranks compiled different graphs (a graph break or a recompilation on some ranks only?) or a "
            "rank died. Compile with fullgraph=True and check that every rank runs the same code on "
            f"same-shaped inputs ({e})") from e
    for other in range(world):
        theirs = json.loads(store.get(keys[other]))
        if theirs != seq:
            raise CollectiveMismatchError(_difference(rank, seq, other, theirs, what))


def _difference(rank: int, mine: list[str], other: int, theirs: list[str], what: str) -> str:
    i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    show = lambda seq: seq[i] if i < len(seq) else "(nothing: the sequence ends)"  # noqa: E731
    return (f"rank {rank} and rank {other} would issue different collectives in the {what} "
            f"({len(mine)} vs {len(theirs)} collectives), which would hang the job; the first difference is "
            f"collective #{i}: rank {rank}: {show(mine)}; rank {other}: {show(theirs)}. Make every rank "
            "trace the same graph (same code, same input shapes, no rank-dependent branches) and plan buckets "
            "from numbers every rank shares (CostModel.measure agrees them across ranks)")
