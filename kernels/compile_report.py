"""
What a kernel compiles to on a GPU, read on any machine (no GPU needed): Triton compiles this folder's kernels
for a target (default Hopper, sm_90a), then ptxas reports registers and spills and the machine code says whether
the hot loop runs on the tensor cores the way the chip wants.

    python -m kernels.compile_report                 # every kernel, every tile config of the autotuner
    python -m kernels.compile_report --kernel=moe    # or attention; --dtype=fp16|bf16|fp32; --target=90 (sm_90a)

Per kernel and config it prints: registers per thread, spilled bytes (stores + loads to local memory: want 0),
shared memory, and counts of instructions in the machine code (SASS): HGMMA = Hopper's warpgroup matrix
multiply (wgmma; a kernel with only HMMA runs Ampere-style and reaches about half the rate), LDGSTS = asynchronous
global-to-shared copies (the software pipeline), LDL/STL = local-memory traffic.
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from kernels import moe

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def compile_kernel(kernel, signature, constexprs, num_warps, num_stages, capability):
    """signature: {arg: type}, a type like "*bf16", "*i32", "i32" or "i64", with ":16" where the value (a pointer,
    a stride) is a multiple of 16 bytes / elements, or the type 1 for an integer equal to 1 (a unit stride), as
    Triton's launcher specialises them at run time."""
    types = {k: str(v).split(":")[0] for k, v in signature.items()}
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if str(v).endswith(":16")}
    constexprs = {**{k: 1 for k, v in signature.items() if v == 1}, **constexprs}
    for k in constexprs:
        types[k] = "constexpr"
    src = triton.compiler.ASTSource(fn=kernel, signature={k: types[k] for k in kernel.arg_names}, constexprs=constexprs,
                                    attrs=attrs)
    target = GPUTarget("cuda", capability, 128 if capability < 100 else 64)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


def resources(compiled, capability):
    """Registers, spill bytes (ptxas -v) and instruction counts (cuobjdump -sass) of a compiled kernel."""
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        for ptxas in ("ptxas-blackwell", "ptxas"):          # the first that reads this Triton's PTX version
            run = subprocess.run([os.path.join(BIN, ptxas), f"-arch={arch}", "-v", "-o", os.devnull, ptx],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                break
        log = run.stderr
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    regs = re.findall(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    ops = collections.Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\d+\s+)?([A-Z0-9.]+)",
                                                                    sass, re.M))
    return {"regs": int(regs[-1]) if regs else None, "spill_bytes": spills[-1] if spills else None,
            "smem": compiled.metadata.shared, **{k: ops.get(k, 0) for k in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG",
                                                                           "LDL", "STL")}}


def moe_cases(dtype):
    t, i32 = TYPES[dtype], "i32"
    mm = {"x_ptr": t + ":16", "w_ptr": t + ":16", "y_ptr": t + ":16", "offsets_ptr": "*i32:16", "n_rows": "i32:16",
          "E": i32, "N": "i32:16", "K": "i32:16", "stride_xm": "i32:16", "stride_xk": 1, "stride_we": "i32:16",
          "stride_wk": "i32:16", "stride_wn": 1, "stride_ym": "i32:16", "stride_yn": 1, "rows_per_expert": "i32:16"}
    dx = {**mm, "stride_wk": 1, "stride_wn": "i32:16"}                          # dy @ w[e]ᵀ: w read transposed
    dw = {"x_ptr": t + ":16", "dy_ptr": t + ":16", "dw_ptr": t + ":16", "offsets_ptr": "*i32:16", "K": "i32:16",
          "N": "i32:16", "stride_xm": "i32:16", "stride_xk": 1, "stride_dym": "i32:16", "stride_dyn": 1,
          "stride_de": "i32:16", "stride_dk": "i32:16", "stride_dn": 1, "rows_per_expert": "i32:16"}
    size = 4 if dtype == "fp32" else 2
    for c in moe.mm_configs(size):
        yield "grouped_mm", moe._grouped_mm_kernel, mm, {**c.kwargs, "E_POW2": 16}, c
        yield "grouped_mm (dx)", moe._grouped_mm_kernel, dx, {**c.kwargs, "E_POW2": 16}, c
    for c in moe.dw_configs(size):
        yield "grouped_dw", moe._grouped_dw_kernel, dw, c.kwargs, c


def attention_cases(dtype, D=128):
    from kernels import attention as at, attention_bwd as bwd
    t, i32 = TYPES[dtype], "i32"
    ptr = lambda kind: kind + ":16"
    common = {"H": i32, "T": "i32:16", "n_init": i32, "n_local": i32, "qk_scale": "fp32"}
    strides = lambda *names: {f"stride_{n}{x}": ("i32:16" if x != "t" else "i32:16") for n in names for x in "bht"}
    plan = {"sep_ptr": "*u8:16", "cols_ptr": "*i32:16", "kb_ptr": "*i32:16"}
    rows = {"lse_ptr": "*fp32:16", "delta_ptr": "*fp32:16", "sa_ptr": "*fp32:16", "arg_ptr": "*i32:16"}
    fwd = {"q_ptr": ptr(t), "k_ptr": ptr(t), "v_ptr": ptr(t), "o_ptr": ptr(t), "lse_ptr": "*fp32:16",
           "o1_ptr": ptr(t), "ab_ptr": "*fp32:16", "arg_ptr": "*i32:16", **plan, **common, **strides("q", "k", "v", "o")}
    dq = {"q_ptr": ptr(t), "k_ptr": ptr(t), "v_ptr": ptr(t), "do_ptr": ptr(t), "dq_ptr": ptr(t), **rows, **plan,
          **common, "sm_scale": "fp32", **strides("q", "k", "v", "d", "o")}
    cols = {"q_ptr": ptr(t), "k_ptr": ptr(t), "v_ptr": ptr(t), "do_ptr": ptr(t), **rows, "dkc_ptr": "*fp32:16",
            "dvc_ptr": "*fp32:16", "cols_ptr": "*i32:16", "kb_ptr": "*i32:16", "H": i32, "T": "i32:16",
            "n_local": i32, "qk_scale": "fp32", "sm_scale": "fp32", **strides("q", "k", "v", "d")}
    window = {"q_ptr": ptr(t), "k_ptr": ptr(t), "v_ptr": ptr(t), "do_ptr": ptr(t), **rows, "dk_ptr": ptr(t),
              "dv_ptr": ptr(t), "dkc_ptr": "*fp32:16", "dvc_ptr": "*fp32:16", "sep_ptr": "*u8:16",
              "kb_ptr": "*i32:16", **common, "sm_scale": "fp32", **strides("q", "k", "v", "d", "o")}
    for name, kernel, sig, table in (("attn fwd", at._fwd_kernel, fwd, at.FWD_CONFIGS),
                                     ("attn dq", bwd._dq_kernel, dq, bwd.DQ_CONFIGS),
                                     ("attn dkdv cols", bwd._dkdv_cols_kernel, cols, bwd.DKDV_CONFIGS),
                                     ("attn dkdv window", bwd._dkdv_window_kernel, window, bwd.DKDV_CONFIGS)):
        for c in at.attention_configs(table):
            yield f"{name} D={D}", kernel, sig, {**c.kwargs, "D": D, "SCORE": 0}, c


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=("all", "moe", "attention"), default="all")
    p.add_argument("--dtype", choices=tuple(TYPES), default="bf16")
    p.add_argument("--target", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    args = p.parse_args()
    cases = []
    if args.kernel in ("all", "moe"):
        cases += list(moe_cases(args.dtype))
    if args.kernel in ("all", "attention"):
        cases += list(attention_cases(args.dtype))
    print(f"target sm_{args.target}, {args.dtype}, triton {triton.__version__}\n")
    print("| kernel | config | warps | stages | regs | spill bytes | smem KB | HGMMA | HMMA | LDGSTS | LDL+STL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, kernel, sig, constexprs, cfg in cases:
        try:
            r = resources(compile_kernel(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages, args.target),
                          args.target)
        except Exception as e:  # a config that does not fit (shared memory, registers): say so, go on
            print(f"| {name} | {cfg.kwargs} | {cfg.num_warps} | {cfg.num_stages} | failed: {str(e).splitlines()[0][:80]} |")
            continue
        print(f"| {name} | {' '.join(f'{k}={v}' for k, v in cfg.kwargs.items())} | {cfg.num_warps} | "
              f"{cfg.num_stages} | {r['regs']} | {r['spill_bytes']} | {r['smem'] / 1024:.0f} | {r['HGMMA']} | "
              f"{r['HMMA']} | {r['LDGSTS']} | {r['LDL'] + r['STL']} |")


if __name__ == "__main__":
    main()
