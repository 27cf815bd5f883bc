"""fvcompile: a compiler-centric torch.compile toolkit.

`fvcompile.optimize(model)` or `torch.compile(model, backend="fvcompile")` lowers a plain
`nn.Module` through TorchInductor with fvcompile's graph passes.
"""
from fvcompile.api import optimize
from fvcompile.backend import fvcompile_backend, last_report, register_backend, reset
from fvcompile.passes.base import GraphPass, PassContext, PassResult, Site
from fvcompile.report import OptimizeReport

register_backend()

__all__ = ["GraphPass", "OptimizeReport", "PassContext", "PassResult", "Site", "fvcompile_backend",
           "last_report", "optimize", "reset"]
