"""fvcompile's kernels. Importing the package registers every op (`torch.ops.fvcompile.*`)."""
from fvcompile.kernels import (sparse24, sparse24_backends, sparse24_cslt, sparse24_cutlass,  # noqa: F401
                               sparse24_fp8, sparse24_mm)
