"""GPU check (session 16 draft, compiled for sm_90a, not yet run): two 8x8 image key tiles as one
[128, D] wgmma operand. Each tile's two 64-column halves go by TMA into a [4, 64, 64] buffer (index
chunk*2 + tile), which is the byte order of the [128, 128] NVMMA tile (each 128-byte column chunk
holds all 128 rows), reinterpreted as that tile: S = Q K^T of both tiles is one m64n128 product
instead of two m64n64 ones (docs/attention.md, Next steps 1). Prints the largest difference from
torch's product; ``python bench/variants/gluon_pair_tile_probe.py``."""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def pair_scores(q_desc, k_img, out_ptr, y0, x0, y1, x1):
    dtype: gl.constexpr = gl.bfloat16
    half_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], dtype)
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 128], dtype)
    pair_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 128], dtype)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16])
    q_smem = gl.allocate_shared_memory(dtype, [64, 128], tile_layout)
    kbuf = gl.allocate_shared_memory(dtype, [4, 64, 64], half_layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, (64 * 128 + 128 * 128) * 2)
    tma.async_copy_global_to_shared(q_desc, [0, 0, 0], bar, q_smem.reshape([1, 64, 128]))
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(k_img, [0, y0, x0, c * 64], bar, kbuf.index(c * 2).reshape([1, 8, 8, 64]))
        tma.async_copy_global_to_shared(k_img, [0, y1, x1, c * 64], bar, kbuf.index(c * 2 + 1).reshape([1, 8, 8, 64]))
    mbarrier.wait(bar, 0)
    mbarrier.invalidate(bar)
    k_pair = kbuf._reinterpret(dtype, [128, 128], pair_layout)
    s = warpgroup_mma(q_smem, k_pair.permute((1, 0)), gl.zeros([64, 128], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, 128, layout=gl.SliceLayout(0, s_layout))
    gl.store(out_ptr + rows[:, None] * 128 + cols[None, :], s)


def main():
    torch.manual_seed(0)
    grid, d = 24, 128
    q = torch.randn(1, 64, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, grid, grid, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full((64, 128), float("nan"), device="cuda")
    q_desc = TensorDescriptor.from_tensor(q, [1, 64, d], gl.NVMMASharedLayout.get_default_for([1, 64, d], gl.bfloat16))
    k_desc = TensorDescriptor.from_tensor(k, [1, 8, 8, 64], gl.NVMMASharedLayout.get_default_for([1, 8, 8, 64],
                                                                                               gl.bfloat16))
    (y0, x0), (y1, x1) = (3, 5), (13, 2)  # two tiles anywhere on the grid, not 8-aligned
    pair_scores[(1,)](q_desc, k_desc, out, y0, x0, y1, x1, num_warps=4)
    keys = torch.cat([k[0, y0:y0 + 8, x0:x0 + 8].reshape(64, d), k[0, y1:y1 + 8, x1:x1 + 8].reshape(64, d)])
    ref = q[0].float() @ keys.float().T
    print(f"max |S - torch| = {(out - ref).abs().max().item():.3e} (largest |S| {ref.abs().max().item():.1f})")


if __name__ == "__main__":
    main()
