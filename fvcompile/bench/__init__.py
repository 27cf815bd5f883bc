"""`fvcompile bench`: what fvcompile buys on the registered models, and what it costs.

The grid is models x tasks (inference, training) x variants (eager, stock Inductor, fvcompile
with each pass set). Per cell: whether it compiled, ran and matched eager (the pass rate), its
speedup against eager and against Inductor (medians of interleaved rounds, with their spread),
its cold and warm compile time (each variant in a fresh Inductor cache), its peak memory against
eager's, its graph breaks and recompilations. Summary rows are geometric means; the ablation of
each pass set that rewrote something says which pass bought what. Failures are rows.

One file per job:

- grid.py: variants, settings, the model and pass names a run may use;
- steps.py: the model, inputs, compiled variant and step of one cell;
- cold.py: cold compiles in a fresh interpreter and cache; caches per variant;
- measure.py: interleaved timing, peak memory, Dynamo's graph breaks and recompilations;
- check.py: the check against eager;
- runner.py: one (model, task) group, every variant of it (`bench_model`);
- records.py: a cell's fields; metrics.py: summary and attribution rows;
- outputs.py: JSON, CSV, markdown and console tables; plots.py: PNGs; compare.py: two runs.
"""
from fvcompile.bench.env import device_description
from fvcompile.bench.grid import MODES, TASKS, Settings, Variant
from fvcompile.bench.records import CellResult
from fvcompile.bench.runner import bench_model


def validate_passes(passes) -> None:
    """Raise ValueError (one line, listing the known passes) for a pass name we do not have."""
    from fvcompile.bench.grid import check_pass_set

    check_pass_set(passes)


__all__ = ["MODES", "TASKS", "CellResult", "Settings", "Variant", "bench_model", "device_description",
           "validate_passes"]
