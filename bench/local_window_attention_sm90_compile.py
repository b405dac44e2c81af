"""Compiles every Triton kernel of local-window attention for sm_90a on a machine without a GPU and
prints ptxas's register spills: the check behind the tile sizes of ``kernel_tiles`` (see
docs/attention.md). Usage: ``python bench/local_window_attention_sm90_compile.py [--dtypes bf16,fp32]
[--head-dims 64,128]``. Slow on a small machine (seconds to a minute per kernel)."""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fewstep.triton import _local_window_attention_kernels as kernels  # noqa: E402
from fewstep.triton.local_window_attention import kernel_tiles  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")


def spills(ptx: str) -> str:
    """ptxas -v's spill line for the PTX of one kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    return "; ".join(line.split("info    :")[-1].strip() for line in log.splitlines()
                     if "spill" in line or "registers" in line)


def compile_kernel(fn, pointer_type: str, constexprs: dict, num_warps: int, num_stages: int) -> str:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        elif name[0].isupper() or name.startswith("d"):  # tensors: Q, K, ..., dO, dK, ...
            signature[name] = pointer_type
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return spills(compiled.asm["ptx"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="32,64,128,256")
    args = parser.parse_args()
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for head_dim in map(int, args.head_dims.split(",")):
            forward, kv_grad, q_grad = kernel_tiles(head_dim, dtype)
            common = dict(HEAD_DIM=head_dim, CIRCLE=True, HAS_TEXT=True,
                          PRECISION="ieee" if dtype == torch.float32 else "tf32")
            for fn, tiles, extra in ((kernels.forward_kernel, forward, dict(HAS_EXTRA=True)),
                                     (kernels.kv_grad_kernel, kv_grad, {}),
                                     (kernels.q_grad_kernel, q_grad, dict(HAS_EXTRA=True))):
                constexprs = dict(common, TY=tiles.ty, TX=tiles.tx, KY=tiles.ky, KX=tiles.kx, **extra)
                report = compile_kernel(fn, "*" + dtype_name, constexprs, tiles.num_warps, tiles.num_stages)
                print(f"{fn.__name__:15s} {dtype_name} D={head_dim:3d} {tiles}: {report}", flush=True)


if __name__ == "__main__":
    main()
