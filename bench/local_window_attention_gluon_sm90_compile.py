"""Compiles the Gluon kernels of local-window attention for sm_90a on a machine without a GPU and
prints ptxas's registers and spills, the shared memory per program and the number of wgmma and TMA
instructions: the check behind the Gluon kernels' ring sizes (docs/attention.md, "Gluon kernels on
Hopper"; three programs per SM need at most 168 registers and about 76 KB of shared memory).

Needs a Triton version the kernels are written for (``GLUON_TRITON_VERSIONS``; Gluon's API changes
between releases), e.g. ``python -m venv /tmp/tri36 && /tmp/tri36/bin/pip install triton==3.6.0
torch safetensors numpy`` then ``PYTHONPATH=python /tmp/tri36/bin/python
bench/local_window_attention_gluon_sm90_compile.py [--head-dims 64,128]``."""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from fewstep.triton import _local_window_attention_gluon as kernels  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    return "; ".join(line.split("info    :")[-1].strip() for line in log.splitlines()
                     if "spill" in line or "registers" in line)


def descriptor_type(block: list) -> str:
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return f"tensordesc<bf16[{','.join(map(str, block))}],{layout!r}>"


def compile_kernel(fn, head_dim: int, extra_tokens: bool):
    signature, constexprs = {}, {"HEAD_DIM": head_dim, "CIRCLE": True}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        elif name.endswith("_ext") and not extra_tokens:
            signature[name], constexprs[name] = "constexpr", None
        elif name.endswith("_img"):
            signature[name] = descriptor_type([1, 8, 8, head_dim])
        elif name.split("_")[-1] in ("txt", "seq", "ext"):
            signature[name] = descriptor_type([1, 64, head_dim])
        else:
            signature[name] = "i32"
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", default="64,128")
    args = parser.parse_args()
    for head_dim in map(int, args.head_dims.split(",")):
        for fn in (kernels.forward_kernel_sm90, kernels.kv_grad_kernel_sm90, kernels.q_grad_kernel_sm90):
            compiled = compile_kernel(fn, head_dim, extra_tokens=False)
            ptx = compiled.asm["ptx"]
            print(f"{fn.__name__:20s} bf16 D={head_dim:3d}: {ptxas_report(ptx)}; shared {compiled.metadata.shared} B; "
                  f"wgmma {ptx.count('wgmma.mma_async')}, TMA {ptx.count('cp.async.bulk.tensor')}", flush=True)


if __name__ == "__main__":
    main()
