"""fvcompile's kernels. Importing the package registers every op (`torch.ops.fvcompile.*`)."""
from fvcompile.kernels import sparse24, sparse24_cslt, sparse24_cutlass, sparse24_fp8  # noqa: F401
