import os

import torch

# Triton reads TRITON_INTERPRET when a kernel's @triton.jit runs: set it before any test imports
# a kernel, so that kernels run in the interpreter on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _waits_on_children(item) -> bool:
    module = getattr(item, "module", None)
    return hasattr(module, "start_in_background") and item.originalname == getattr(module, "TEST_NAME", None)


def _slow_first(item) -> int:
    """0 for the longest tests (the children's work, run inline), then those that spawn processes
    or compile with Inductor, then the rest."""
    if _waits_on_children(item):
        return 0
    return 1 if item.get_closest_marker("distributed") or item.get_closest_marker("inductor") else 2


def pytest_collection_modifyitems(session, config, items):
    """One process: the tests that wait on children (below) run last, so that their children have
    the whole run to finish. Under pytest-xdist: the slowest tests run first, so that the workers
    end together (longest first) instead of one of them finishing a long test alone."""
    if hasattr(config, "workerinput"):
        items.sort(key=_slow_first)
    else:
        items.sort(key=_waits_on_children)  # stable: the order is kept within each group


def pytest_collection_finish(session):
    """Slow work that runs in child processes starts now, beside the rest of the run: a test
    module with `start_in_background(config, items)` gets it called with its selected items of
    the test named by its `TEST_NAME` (the sm80/sm90 compile, the real-Inductor model parity).
    The children run at low priority on the core that the mostly single-threaded run leaves idle;
    each test waits for its children's verdict at the end of the run. Under pytest-xdist (`make
    test` runs `-n auto`) the workers run those tests themselves, on every core."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return  # nothing to run; or a pytest-xdist worker, which runs only some of the items
    by_module = {}
    for item in session.items:
        if _waits_on_children(item):
            by_module.setdefault(item.module, []).append(item)
    for module, items in by_module.items():
        module.start_in_background(session.config, items)
