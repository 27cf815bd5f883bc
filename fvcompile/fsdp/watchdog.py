"""`RankWatch`: when one rank of a training job dies or stops, the others stop too, within a
timeout, with an error that names it, instead of waiting in a collective.

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    with RankWatch(timeout_s=300) as watch:
        for step in range(start, steps):
            with watch.step(step):          # a RankFailure here names the rank that failed
                loss = train_step(...)
            if step % 100 == 0:
                save_checkpoint(model, path, optimizer)
                watch.checkpointed(path, step)  # the error then says where to restart from

Why this design:
- A collective cannot say who failed. Gloo reports a peer that died as "Connection reset (or
  closed) by peer" with an address, and a peer that hangs only as a timeout; NCCL does the same.
- So every rank tells the others that it lives: a daemon thread writes a heartbeat (a counter,
  the current step and whether it runs or finished) into the process group's store, which every
  rank reaches without a collective. A rank whose counter does not move during a window
  (`3 * heartbeat_s`, measured on the reader's own clock, so no two hosts' clocks are compared)
  is dead; a rank whose counter moves but whose step stays behind is alive and stuck.
- Two triggers. A step that raises a distributed error (`watch.step`) reads the heartbeats and
  raises `RankFailure` from the error. A step that runs past `timeout_s` is seen by a second
  daemon thread: the main thread is then blocked inside the collective, where nothing can
  interrupt it (`ProcessGroupGloo.abort()` does nothing; the process group's own timeout fires
  only later and names nobody), so when the heartbeats name a rank the thread prints the error
  and exits the process (`on_stall="exit"`; the launcher, torchrun or mp.spawn, then stops the
  job). When every rank is alive and at the same step (a long first compile), it only warns.
- `dist.monitored_barrier` (gloo) also names the ranks that miss it, but it is a collective
  every rank must enter: it checks only at the points where all ranks call it, and only after
  its own timeout. Heartbeats answer at any point, in a window of a few seconds.
- The store must outlive the dead rank. Under torchrun the elastic agent hosts it; with
  `init_method="env://"` outside torchrun, rank 0 hosts it, and when rank 0 dies the others can
  only report that the store stopped answering (that error says so).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

_DISTRIBUTED_WORDS = ("gloo", "nccl", "connection", "peer", "timed out", "timeout", "socket", "store")


class RankFailure(RuntimeError):
    """Another rank of the job died or is stuck; `ranks` lists them."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


@dataclass(frozen=True)
class PeerState:
    """What this rank knows of another rank from its heartbeat."""

    rank: int
    seen: bool  # it wrote a heartbeat
    step: int | None  # None: no step begun
    alive: bool  # its counter moved during the window, or it finished
    finished: bool  # it closed its watch (left its training loop)


class RankWatch:
    """Heartbeats in the store, and the diagnosis of a failed or stalled step (see the module's
    docstring). Start it after `init_process_group`, on every rank, e.g. as a context manager.

    timeout_s: how long one step may run before the watch looks for a dead or stuck rank;
        longer than a step can take, the first (compiling) step included.
    heartbeat_s: the heartbeat period; a rank is dead when its heartbeat stops for 3 periods.
    on_stall: "exit" (print the error and exit the process with status 1 when a stalled step's
        diagnosis names a rank) or "warn" (print it only).
    store, rank, world_size: default to the default process group's.
    """

    def __init__(self, timeout_s: float = 300.0, *, heartbeat_s: float = 1.0, on_stall: str = "exit",
                 store: dist.Store | None = None, rank: int | None = None, world_size: int | None = None,
                 prefix: str = "fvcompile/rankwatch"):
        if timeout_s <= 0 or heartbeat_s <= 0:
            raise ValueError(f"RankWatch takes positive timeout_s and heartbeat_s, got {timeout_s}, {heartbeat_s}")
        if on_stall not in ("exit", "warn"):
            raise ValueError(f"RankWatch's on_stall is 'exit' or 'warn', got {on_stall!r}")
        if store is None and not dist.is_initialized():
            raise RuntimeError("RankWatch reads the other ranks' heartbeats from the process group's store: "
                               "start it after torch.distributed.init_process_group (or pass store=, rank=, world_size=)")
        self.timeout_s, self.heartbeat_s, self.on_stall = timeout_s, heartbeat_s, on_stall
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.prefix = prefix
        self.current_step: int | None = None
        self._step_started: float | None = None  # time.monotonic() when the current step began
        self._checkpoint: tuple[str, int] | None = None
        self._count = 0
        self.last_peers: list[PeerState] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifetime -----------------------------------------------------------------------------

    def start(self) -> "RankWatch":
        self._beat(finished=False)
        for target in (self._beat_loop, self._stall_loop):
            thread = threading.Thread(target=target, name=f"RankWatch-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop the threads and tell the others this rank finished (it is not dead)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        with contextlib.suppress(Exception):  # a store that no longer answers: nothing to tell
            self._beat(finished=True)

    def __enter__(self) -> "RankWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the training loop tells it ------------------------------------------------------

    @contextlib.contextmanager
    def step(self, step: int):
        """Run one training step under the watch: a distributed error raised inside becomes a
        `RankFailure` naming the dead or stuck rank(s) (the error itself when every rank lives)."""
        self.current_step, self._step_started = step, time.monotonic()
        try:
            yield
        except Exception as error:
            if not _is_distributed(error):
                raise
            failure = self.diagnose(cause=_first_sentence(error))
            if failure is None:
                error.add_note(f"RankWatch: every rank's heartbeat is alive ({self._steps_text(self.last_peers)})")
                raise
            raise failure from error
        finally:
            self._step_started = None

    def checkpointed(self, checkpoint_id: str, step: int) -> None:
        """Record the last checkpoint (saved after `step` steps), for the error's advice."""
        self._checkpoint = (checkpoint_id, step)

    # -- diagnosis ------------------------------------------------------------------------------

    def peers(self) -> list[PeerState]:
        """The other ranks' states: two readings of their heartbeats, a window apart."""
        first = self._read_all()
        time.sleep(3 * self.heartbeat_s)
        second = self._read_all()
        states = []
        for rank in self._others():
            before, after = first.get(rank), second.get(rank)
            if after is None:
                states.append(PeerState(rank, seen=False, step=None, alive=False, finished=False))
                continue
            count, step, finished = after
            alive = finished or before is None or before[0] != count
            states.append(PeerState(rank, seen=True, step=step, alive=alive, finished=finished))
        return states

    def diagnose(self, cause: str) -> RankFailure | None:
        """A `RankFailure` naming the dead ranks, else those behind this rank's step (alive but
        stuck, or gone from their loop); None when every rank is alive at this step or beyond.
        The states read are kept in `last_peers`."""
        try:
            peers = self.last_peers = self.peers()
        except Exception as error:  # the store itself is gone
            return RankFailure(
                f"rank {self.rank} at step {self.current_step}: {cause}; the process group's store stopped "
                f"answering ({error}), so the rank that failed is unknown: the rank or agent hosting the store "
                f"(rank 0, or the torchrun agent) died. {self._advice()}", ranks=[])
        dead = [p for p in peers if not p.alive]
        behind = [p for p in peers if p.alive and p.step is not None and self.current_step is not None
                  and p.step < self.current_step]
        culprits = dead or behind
        if not culprits:
            return None
        what = "; ".join(_describe(p) for p in culprits)
        what = what[0].upper() + what[1:]
        return RankFailure(f"rank {self.rank} at step {self.current_step}: {cause}. {what}. {self._advice(culprits)}",
                           ranks=[p.rank for p in culprits])

    def _advice(self, culprits: list[PeerState] = ()) -> str:
        restart = "restart every rank from the last checkpoint"
        if self._checkpoint is None:
            restart += " (none recorded: RankWatch.checkpointed(path, step) records it)"
        else:
            path, step = self._checkpoint
            restart += f", {path!r} (after step {step}); fvcompile.fsdp.load_checkpoint loads it on any number of ranks"
        if not culprits:
            return restart[0].upper() + restart[1:] + "."
        if len(culprits) == 1:
            return f"Read the log of rank {culprits[0].rank} for its own error, then {restart}."
        return f"Read the logs of ranks {', '.join(str(p.rank) for p in culprits)} for their errors, then {restart}."

    def _steps_text(self, peers: list[PeerState]) -> str:
        return ", ".join([f"rank {self.rank} at step {self.current_step}"] +
                         [f"rank {p.rank} at step {p.step}" for p in peers])

    # -- heartbeats ------------------------------------------------------------------------------

    def _others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    def _beat(self, finished: bool) -> None:
        self._count += 1
        step = -1 if self.current_step is None else self.current_step
        self.store.set(self._key(self.rank), f"{self._count},{step},{int(finished)}")

    def _read_all(self) -> dict[int, tuple[int, int | None, bool]]:
        """{rank: (counter, step, finished)} of the ranks that wrote a heartbeat."""
        found = {}
        for rank in self._others():
            if not self.store.check([self._key(rank)]):  # get() would wait for the key
                continue
            count, step, finished = self.store.get(self._key(rank)).decode().split(",")
            found[rank] = (int(count), None if step == "-1" else int(step), finished == "1")
        return found

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(Exception):  # a store gone: the diagnosis reports it
                self._beat(finished=False)

    def _stall_loop(self) -> None:
        warned_step = None
        while not self._stop.wait(self.heartbeat_s):
            started, step = self._step_started, self.current_step
            if started is None or time.monotonic() - started < self.timeout_s or warned_step == step:
                continue
            failure = self.diagnose(cause=f"the step has run for more than {self.timeout_s:g} s")
            if self._step_started != started:  # the step ended meanwhile
                continue
            warned_step = step
            if failure is None:
                print(f"RankWatch (rank {self.rank}): step {step} has run for more than {self.timeout_s:g} s "
                      f"and every rank is alive ({self._steps_text(self.last_peers)}): a long compile, or ranks "
                      "that issue different collectives", file=sys.stderr, flush=True)
            elif self.on_stall == "exit":
                print(f"RankFailure: {failure}\nRankWatch: exiting rank {self.rank}, blocked in a collective "
                      "that cannot be interrupted", file=sys.stderr, flush=True)
                os._exit(1)
            else:
                print(f"RankFailure: {failure}", file=sys.stderr, flush=True)


def _describe(peer: PeerState) -> str:
    if not peer.seen:
        return f"rank {peer.rank} never started its watch (it died early, or does not run RankWatch)"
    if not peer.alive:
        where = "before its first step" if peer.step is None else f"last at step {peer.step}"
        return (f"rank {peer.rank} stopped its heartbeat ({where}): its process died "
                "or its host is unreachable")
    if peer.finished:
        return f"rank {peer.rank} left its training loop at step {peer.step}: it ran fewer steps"
    return (f"rank {peer.rank} is alive but still at step {peer.step}: stuck outside the collectives "
            "(data loading, a deadlock, another code path)")


def _first_sentence(error: BaseException) -> str:
    """"Connection closed by peer [addr]:port" out of gloo's "[file.cc:553] Connection closed by peer
    [addr]:port. This is typically caused by ... GLHF!" (the whole text stays in the chained error)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.splitlines()[0])
    return text.split(". ")[0].rstrip(".")


def _is_distributed(error: BaseException) -> bool:
    """A collective's or the store's error (gloo and NCCL raise RuntimeError or DistError)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in _DISTRIBUTED_WORDS)
