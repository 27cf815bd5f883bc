"""fvcompile: a compiler-centric torch.compile toolkit.

`fvcompile.optimize(model)` or `torch.compile(model, backend="fvcompile")` lowers a plain
`nn.Module` through TorchInductor with fvcompile's graph passes.
"""
# First, before the modules that import from them: passes/, models/ and kernels/ get what an
# __init__.py would give them (they have none; see _subpackages).
import fvcompile._subpackages  # noqa: F401
from fvcompile.api import optimize
from fvcompile.backend import fvcompile_backend, last_report, register_backend, reset
from fvcompile.generate import Generation, generate  # the function takes the module's name here
from fvcompile.passes.base import GraphPass, PassContext, PassResult, Site
from fvcompile.report import OptimizeReport

register_backend()

__all__ = ["Generation", "GraphPass", "OptimizeReport", "PassContext", "PassResult", "Site", "fvcompile_backend",
           "generate", "last_report", "optimize", "reset"]
