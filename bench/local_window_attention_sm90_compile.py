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


def _descriptor_type(name: str, dtype_name: str, tiles, head_dim: int) -> str:
    """Signature of a descriptor argument: q_/o_/do_/dq_ blocks are query blocks, k_/v_/dk_/dv_ key
    blocks; *_img are [1, rows, cols, D] tiles, the others [1, block, D] row blocks."""
    query = name.split("_")[0] in ("q", "o", "do", "dq")
    rows, cols = (tiles.ty, tiles.tx) if query else (tiles.ky, tiles.kx)
    block = [1, rows, cols, head_dim] if name.endswith("_img") else [1, rows * cols, head_dim]
    return f"tensordesc<{dtype_name}[{','.join(map(str, block))}]>"


def compile_kernel(fn, dtype_name: str, tiles, constexprs: dict) -> str:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        elif "_" in name and name.split("_")[-1] in ("txt", "seq", "img", "ext"):
            signature[name] = _descriptor_type(name, dtype_name, tiles, constexprs["HEAD_DIM"])
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    return spills(compiled.asm["ptx"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="32,64,128,256")
    args = parser.parse_args()
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for head_dim in map(int, args.head_dims.split(",")):
            for fn, tiles in zip((kernels.forward_kernel, kernels.kv_grad_kernel, kernels.q_grad_kernel),
                                 kernel_tiles(head_dim, dtype)):
                constexprs = dict(HEAD_DIM=head_dim, CIRCLE=True, TY=tiles.ty, TX=tiles.tx, KY=tiles.ky,
                                  KX=tiles.kx, PRECISION="ieee" if dtype == torch.float32 else "tf32")
                report = compile_kernel(fn, dtype_name, tiles, constexprs)
                print(f"{fn.__name__:15s} {dtype_name} D={head_dim:3d} {tiles}: {report}", flush=True)

if __name__ == "__main__":
    main()
