"""Dense warm-up schedules of the sparse24 ops: step counters owned by the pass that made them.

A `WarmupSchedule` belongs to one `Sparse24(warmup_steps=N)` pass object. The ops of a rewritten
site carry a key, "<token>:<site>" (`schedule.key(site)`), and find the schedule by its token in a
weak registry: the counters live as long as the pass does, can be read (`steps_counted`,
`counters`) and reset, and go when the pass goes. A site's counting op (its sparse relu in a
training graph) opens step i = the steps counted so far and counts it; every other op of the site
(its matmuls, forward and backward, and its ops in inference graphs) belongs to the last counted
step, or to step 0 before any. Step i runs dense while i < N.
"""
from __future__ import annotations

import uuid
import weakref

_LIVE: weakref.WeakValueDictionary[str, WarmupSchedule] = weakref.WeakValueDictionary()  # token -> schedule


class WarmupSchedule:
    """N dense training steps, counted per site, before the sites' ops switch to 2:4."""

    def __init__(self, dense_steps: int):
        if dense_steps < 0:
            raise ValueError(f"dense_steps must be >= 0, got {dense_steps}")
        self.dense_steps = dense_steps
        self.token = uuid.uuid4().hex[:12]
        self._steps: dict[str, int] = {}  # site -> training steps counted so far
        _LIVE[self.token] = self

    def key(self, site: str) -> str:
        """The schedule argument of the ops of `site` (e.g. "layers.0.ffn#0")."""
        return f"{self.token}:{site}"

    def steps_counted(self, site: str) -> int:
        """How many training steps `site` has counted."""
        return self._steps.get(site, 0)

    def counters(self) -> dict[str, int]:
        """Every site's count of training steps (a copy)."""
        return dict(self._steps)

    def reset(self) -> None:
        """Start over: every site runs its dense steps again."""
        self._steps.clear()

    def dense_now(self, site: str, count_step: bool) -> bool:
        """Whether an op of `site` runs dense now; a counting op (count_step) counts its step."""
        if count_step:
            step = self._steps.get(site, 0)
            self._steps[site] = step + 1
        else:
            step = max(self._steps.get(site, 0) - 1, 0)
        return step < self.dense_steps

    def __repr__(self) -> str:
        return f"WarmupSchedule(dense_steps={self.dense_steps}, token={self.token!r}, counters={self._steps})"


def in_dense_warmup(schedule: str, count_step: bool = False) -> bool:
    """Whether an op given `schedule` ("": none, or a `WarmupSchedule.key`) runs dense now."""
    if not schedule:
        return False
    token, _, site = schedule.partition(":")
    owner = _LIVE.get(token)
    if owner is None:
        raise RuntimeError(f"sparse24 warm-up schedule {token!r} is gone: the Sparse24 pass that compiled this "
                           "graph was freed, and with it the step counts of its dense warm-up")
    return owner.dense_now(site, count_step)
