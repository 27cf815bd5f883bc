import os

import torch

# Triton reads TRITON_INTERPRET when a kernel's @triton.jit runs: set it before any test imports
# a kernel, so that kernels run in the interpreter on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_finish(session):
    """Slow work that runs in child processes starts now, beside the rest of the run: a test
    module with `start_in_background(config, items)` gets it called with its selected items of
    the test named by its `TEST_NAME` (the sm80/sm90 compile, the real-Inductor model parity).
    The children run at low priority on the core that the mostly single-threaded run leaves idle;
    each test waits for its children's verdict where it runs."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return  # nothing to run; or a pytest-xdist worker, which runs only some of the items
    by_module = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_in_background") and item.originalname == getattr(module, "TEST_NAME", None):
            by_module.setdefault(module, []).append(item)
    for module, items in by_module.items():
        module.start_in_background(session.config, items)
