"""Triton kernels, each beside a plain PyTorch reference. One backend switch for all of them:
auto = Triton for CUDA tensors and the PyTorch path elsewhere; triton = always Triton (on the CPU only under
TRITON_INTERPRET=1); torch = always the PyTorch reference."""
try:
    import triton
except ImportError:  # macOS / Windows: the PyTorch paths still work
    triton = None

_backend = "auto"


def set_backend(name):
    global _backend
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel backend must be auto, triton or torch, got {name!r}")
    if name == "triton" and triton is None:
        raise ValueError("--kernels=triton but triton is not installed; pip install triton (Linux) or use torch")
    _backend = name


def backend():
    return _backend


def use_triton(x):
    """Whether the Triton path should run for tensor x under the current backend."""
    return _backend == "triton" or (_backend == "auto" and x.is_cuda and triton is not None)
