import os

# Triton reads this when a kernel's @triton.jit runs: set it before anything imports a kernel,
# so that kernels run in the interpreter on machines without a GPU.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
