"""Triton kernels, each beside a plain PyTorch reference (this folder imports torch and triton only).

One backend switch for all of them: auto = the fastest exact path for the tensor's device (kernels/moe.py and
kernels/attention.py say which, per operation); triton = always this project's Triton kernels; torch = always the
plain PyTorch reference.

The same kernels run on a GPU compiled and on the CPU in Triton's interpreter (numpy, one program after another:
slow, for tests and for reading). No environment variable is needed: `launch` compiles for CUDA tensors and runs
an interpreted twin of the kernel for CPU tensors. The interpreter computes fp32 and fp16 exactly but reads bf16
wrongly, so CPU tensors in bf16 are refused with one clear error.
"""
import contextlib
import inspect
import sys

import torch

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError:  # macOS / Windows: the PyTorch paths still work
    triton = None

_backend = "auto"
autotune = True     # on a GPU, let Triton's autotuner pick each kernel's tile sizes (False: the files' FIXED_* sizes)


def set_backend(name):
    global _backend
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel backend must be auto, triton or torch, got {name!r}")
    if name == "triton" and triton is None:
        raise ValueError("--kernels=triton but triton is not installed; pip install triton (Linux) or use torch")
    _backend = name


def backend():
    return _backend


_twins = {}


def _twins_of(module):
    """(module, name, compiled, interpreted) for each @triton.jit function of a module."""
    if module.__name__ not in _twins:
        _twins[module.__name__] = [(module, name, f, InterpretedFunction(f.fn)) for name, f in vars(module).items()
                                   if isinstance(f, JITFunction)]
    return _twins[module.__name__]


@contextlib.contextmanager
def _interpreting(module):
    """Within the block, every @triton.jit function of `module` and of triton.language (tl.cdiv, tl.sum, ...) is
    its interpreted twin; the functions look each other up through their modules, so the calls between them
    follow."""
    triton.runtime.jit.mangle_type(0)    # its first call imports more of triton: let that happen unswapped
    language = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m]
    swaps = [t for m in [module, *language] for t in _twins_of(m)]
    for m, name, _, twin in swaps:
        setattr(m, name, twin)
    try:
        yield
    finally:
        for m, name, compiled, _ in swaps:
            setattr(m, name, compiled)


def _interpreter_takes_loop_bounds():
    """Triton's interpreter holds a scalar as a 1-element numpy array; up to Triton 3.6 it made a loop bound of one
    with int(array), which numpy >= 2.4 refuses (`range(0, K, BLOCK_K)` fails). Newer Triton squeezes the array
    first: do the same for an older one."""
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor
    if "squeeze" in inspect.getsource(patch_tensor):
        return

    def patch_tensor_squeezing(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patch_tensor_squeezing


if triton is not None:
    _interpreter_takes_loop_bounds()

_precompiling = False


@contextlib.contextmanager
def precompiling(workers):
    """Within the block, GPU launches only compile their kernel (every config the autotuner would try), on
    `workers` threads at once, and run nothing (outputs stay uninitialised): a benchmark warms up in seconds what
    the autotuner would otherwise compile one config at a time."""
    global _precompiling
    from concurrent.futures import ThreadPoolExecutor
    from triton.runtime._async_compile import AsyncCompileMode
    _precompiling = True
    try:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool):
            yield
    finally:
        _precompiling = False


def launch(kernel, grid, args, like, meta, tuned=None):
    """kernel[grid](*args): compiled when `like` (a tensor argument) is on a GPU, autotuned by `tuned` if given
    (else with the block sizes of `meta`); interpreted on the CPU, with the block sizes of `meta`."""
    compiled = isinstance(kernel, JITFunction)      # False when TRITON_INTERPRET=1 made every kernel interpreted
    if like.is_cuda and compiled:
        tuned = tuned if tuned is not None and autotune else None
        if _precompiling:
            return tuned.warmup(*args, grid=grid) if tuned is not None else kernel.warmup(*args, grid=grid, **meta)
        return tuned[grid](*args) if tuned is not None else kernel[grid](*args, **meta)
    if like.dtype == torch.bfloat16:
        raise ValueError("Triton's CPU interpreter reads bf16 wrongly: run the Triton kernels on CPU tensors in "
                         "float32 or float16, or on a GPU")
    if not compiled:
        return kernel[grid](*args, **meta)
    module = sys.modules[kernel.fn.__module__]
    with _interpreting(module):
        return getattr(module, kernel.fn.__name__)[grid](*args, **meta)
