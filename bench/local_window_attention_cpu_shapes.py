"""CPU wall time of fewstep.local_window_attention (forward, and forward + backward) against dense SDPA
with CLEAR's boolean mask, the op a CPU user would otherwise call, over grids where the mask admits
from half of the pairs down to a tenth; fp32, batch 1, median of 7 runs after a warm-up, at one
thread and at torch's thread count.
Run: ``python bench/local_window_attention_cpu_shapes.py OUT.json`` with the extension installed."""
import json
import sys

import torch
from common import cpu_median_ms

import fewstep
from fewstep.reference.local_window_attention import local_window_mask

SHAPES = [  # (grid, n_text, heads, head_dim, radius)
    ((32, 32), 77, 8, 64, 16.0),
    ((32, 32), 77, 8, 64, 8.0),
    ((48, 48), 77, 8, 64, 8.0),
    ((64, 64), 128, 4, 64, 8.0),
    ((32, 32), 77, 4, 128, 8.0),
]


def forward_backward(attention, q, k, v, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.autograd.grad(attention(*leaves), leaves, grad_out)


def main(out_path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for grid, n_text, heads, head_dim, radius in SHAPES:
        n = n_text + grid[0] * grid[1]
        q, k, v, grad_out = (torch.randn(1, heads, n, head_dim, generator=gen) for _ in range(4))
        mask = local_window_mask(grid, n_text, radius=radius)

        def local(q, k, v):
            with fewstep.backend("cpu"):
                return fewstep.local_window_attention(q, k, v, grid=grid, radius=radius, n_text=n_text)

        def masked_sdpa(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        torch.testing.assert_close(local(q, k, v), masked_sdpa(q, k, v), rtol=1e-4, atol=1e-5)
        for threads in sorted({1, torch.get_num_threads()}):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                row = {"grid": list(grid), "n_text": n_text, "heads": heads, "head_dim": head_dim, "radius": radius,
                       "useful": mask.float().mean().item(), "threads": threads}
                for name, attention in (("fewstep", local), ("sdpa_masked", masked_sdpa)):
                    row[f"{name}_forward_ms"] = cpu_median_ms(lambda: attention(q, k, v))
                    row[f"{name}_forward_backward_ms"] = cpu_median_ms(
                        lambda: forward_backward(attention, q, k, v, grad_out))
            finally:
                torch.set_num_threads(previous)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump({"torch": torch.__version__, "build_info": fewstep.build_info(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
