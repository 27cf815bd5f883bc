"""What every fvcompile graph pass is: a small object with a name, a uuid and a call.

A pass runs at one hook, named in `fvcompile.hooks.HOOKS` ("joint", "joint_post",
"post_grad_pre", "post_grad", "pre_fusion", "post_fusion"): at the joint hooks it sees the joint
forward+backward graph in training and the single inference graph under `no_grad`; at the
post-grad hooks the forward and the backward graph (one call each) or the inference graph; at
the scheduler hooks Inductor's scheduler nodes, a list the pass may reorder in place.

A pass edits the graph in place and returns a `PassResult`: the sites it rewrote and the
sites it skipped, each with the reason. It never changes numerics beyond what it promises:
where a site does not fit, it leaves it as it was and says why. A pass that needs Inductor
settings declares them in `config_patches()`; fvcompile applies them to that compile only.
"""
from __future__ import annotations

import fnmatch
import inspect
import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx
from torch._inductor.custom_graph_pass import get_hash_for_files


@dataclass
class Site:
    """One place in a graph a pass looked at: structured fields for tools and tests, and a
    sentence for people."""

    node: str  # the FX node that anchors the site
    module: str = ""  # the nn.Module path it came from, when the graph records it
    detail: str = ""  # what was rewritten, or why not, in words
    kind: str = ""  # what the site is, in the pass's vocabulary (e.g. "relu2_ffn")
    reason: str = ""  # why a skipped site was skipped, a short snake_case code (e.g. "excluded")
    ops: dict[str, int] = field(default_factory=dict)  # op name -> how many the rewrite added (-: removed)


@dataclass
class PassResult:
    rewritten: list[Site] = field(default_factory=list)
    skipped: list[Site] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # pass-wide remarks (e.g. "emulated on CPU")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassContext:
    """What a pass knows about the graph it is given."""

    graph_kind: str  # "joint", "inference", "forward" or "backward"
    device: torch.device  # the device of the graph's inputs
    include: tuple[str, ...] = ()  # module-name globs; empty means everything
    exclude: tuple[str, ...] = ()
    hook: str = ""  # the hook the pass runs at (fvcompile.hooks.HOOKS)
    # The rank and world size of the graph's collectives, and the process groups they use
    # (their names); rank 0 of 1 and no groups on one device.
    rank: int = 0
    world_size: int = 1
    process_groups: tuple[str, ...] = ()
    # One dict per compile, shared by every hook call of it (the forward and the backward graph):
    # what a pass decides on one graph, it finds again on the other (key it by the pass's name).
    store: dict = field(default_factory=dict)

    @property
    def is_inference(self) -> bool:
        """An inference graph (no backward), as Inductor or AOTAutograd says (not guessed)."""
        return self.graph_kind == "inference"

    def module_allowed(self, module: str) -> bool:
        """Whether a site in module `module` may be rewritten (include/exclude globs)."""
        if self.include and not any(_matches(module, p) for p in self.include):
            return False
        return not any(_matches(module, p) for p in self.exclude)


def _matches(module: str, pattern: str) -> bool:
    # "layers.0" selects that module and everything inside it; globs too ("layers.*.ffn").
    return fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, pattern + ".*")


class GraphPass:
    """Base class: subclasses set `name`, `hook`, `exact` and implement `run`."""

    name: ClassVar[str]
    hook: ClassVar[str] = "post_grad"  # a name of fvcompile.hooks.HOOKS
    exact: ClassVar[bool] = True  # keeps outputs equal to eager within dtype tolerance
    helpers: ClassVar[tuple] = ()  # modules with more of the pass's code: their source is in the uuid too

    def options(self) -> dict[str, Any]:
        """Every option that changes the pass's output; part of the uuid."""
        return {}

    def config_patches(self) -> dict[str, Any]:
        """Inductor config this pass needs, applied to the compiles it runs in (never globally).
        Two passes that need one key set to different values are an error naming both. Not part
        of the uuid: Inductor's cache key holds its config already."""
        return {}

    def pays_off_on(self, device: torch.device) -> bool:
        """Whether `passes="auto"` should apply this (exact) pass on `device`."""
        return True

    def wanted(self, gm: fx.GraphModule, example_inputs) -> bool:
        """Whether to install the pass for this Dynamo graph at all; one that is not wanted adds no
        config patch and is not in the cache key (e.g. the FSDP passes without distributed tensors)."""
        return True

    def applies_to(self, ctx: PassContext) -> bool:
        """Whether the pass looks at this graph at all (a pass that does not is not in the report):
        e.g. the FSDP passes only at graphs holding collectives."""
        return True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite `gm` in place. At a scheduler hook, `gm` is the list of scheduler nodes
        instead: reorder or replace its items in place."""
        raise NotImplementedError

    def uuid(self) -> str:
        source = inspect.getsourcefile(type(self))
        # Options must be plain JSON values: text of an arbitrary object (a tensor's abbreviated
        # print, an address) could make two different options look the same, or never match.
        try:
            extra = json.dumps({"name": self.name, "options": self.options()}, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"pass {self.name!r}: options() must return JSON values (numbers, "
                            f"strings, bools, lists, dicts) so that they key Inductor's cache: {e}") from e
        files = (source, __file__, *(inspect.getsourcefile(m) for m in self.helpers))
        return get_hash_for_files(files, extra).hex()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
