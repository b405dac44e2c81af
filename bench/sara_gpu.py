"""GPU benchmark of SaRA fine-tuning on an SD1.5-shaped UNet (diffusers' UNet2DConditionModel with
SD1.5's sizes, random weights): the sparse AdamW step against the dense and the official-style
sparse updates, state memory, and whole training steps against PEFT LoRA r=64 and full fine-tuning
with AdamW, at batch 1 and 8, bf16 autocast, 64x64 latents and 77x768 text states."""
from __future__ import annotations

import gc
import statistics

import torch
import torch.nn.functional as F

from common import gpu_median_ms, graph_replay_ms, host_median_ms
from fewstep.finetune import SaRA

GiB = 1 << 30
TRAINABLE_50M = 50_000_000
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel  # defaults are SD1.x's blocks; SD1.5 attends to 768-d text
    torch.manual_seed(0)
    with torch.device("cuda"):
        return UNet2DConditionModel(cross_attention_dim=768)


def _free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    left = torch.cuda.memory_allocated()
    if left > 64 << 20:
        print(f"sara_gpu: {left / GiB:.2f} GiB still allocated between configs", flush=True)


def _official_style_update(unet, threshold):
    """What SaRA's released code does per step: trainable values as separate leaves updated by
    torch's AdamW (foreach), then written back into each weight through its bool mask."""
    masks, values = [], []
    for p in unet.parameters():
        m = p.detach().abs() < threshold
        masks.append(m)
        values.append(torch.nn.Parameter(p.detach()[m].clone()))
    opt = torch.optim.AdamW(values, lr=1e-5, foreach=True)
    for v in values:
        v.grad = torch.randn_like(v)
    weights = [p.detach() for p in unet.parameters()]

    def step():
        opt.step()
        for w, m, v in zip(weights, masks, values):
            w.masked_scatter_(m, v.detach())
    return step


def _time_step(rec, opt, case: str, dtype: torch.dtype, bytes_per_entry: int, copy_gbps: float) -> None:
    """Host wall time of ``opt.step()`` and device time of its kernel, with the share of copy
    bandwidth that the compact traffic (``bytes_per_entry``) and the selection reads make."""
    opt._grad.normal_()
    rec.add("sara_step", case, "fewstep opt.step() host wall", dtype, host_median_ms(opt.step))
    ms = graph_replay_ms(opt.step)
    moved = opt.num_trainable * bytes_per_entry + opt._selection_data.numel() * 4 + opt._chunk_offsets.numel() * 4
    rec.add("sara_step", case, "fewstep sparse AdamW kernel", dtype, ms, "pct_of_copy_bw",
            100 * moved / (ms * 1e-3) / (copy_gbps * 1e9))


def bench_bf16_step(rec, copy_gbps):
    unet = sd15_unet().to(torch.bfloat16)
    total = sum(p.numel() for p in unet.parameters())
    opt = SaRA(unet, ratio=TRAINABLE_50M / total, lr=1e-5)
    # grad; m, v, master read+write; weight write
    _time_step(rec, opt, f"{opt.num_trainable / 1e6:.1f}M of {total / 1e6:.1f}M bf16", torch.bfloat16, 30, copy_gbps)
    del opt, unet
    _free()


def bench_optimizer_step(rec, copy_gbps):
    unet = sd15_unet()
    total = sum(p.numel() for p in unet.parameters())
    _free()
    before = torch.cuda.memory_allocated()
    opt = SaRA(unet, ratio=TRAINABLE_50M / total, lr=1e-5)
    state = torch.cuda.memory_allocated() - before
    case = f"{opt.num_trainable / 1e6:.1f}M of {total / 1e6:.1f}M fp32"
    _time_step(rec, opt, case, torch.float32, 28, copy_gbps)  # grad read; m, v, weight read+write
    rec.add("sara_memory", case, "fewstep state (sel+grad+m+v)", torch.float32, 0.0, "GB", state / 1e9)
    weights_gb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 1e9
    rec.add("sara_memory", case, "fewstep weights+grads+state", torch.float32, 0.0, "GB", weights_gb + state / 1e9)

    # gather cost: every tensor's hook on a gradient-sized input
    grads = [(p.detach(), opt._grad_views[i], s) for i, (p, s) in enumerate(zip(opt._weights, opt.selections.values()))]
    from fewstep.ops.sara import sara_gather_

    def gather_all():
        for g, out, s in grads:
            sara_gather_(g, out, s.data, s.chunk_offsets, s.format, 1.0)
    rec.add("sara_step", case, "fewstep gather, 686 hooks, host wall", torch.float32, host_median_ms(gather_all))
    rec.add("sara_step", case, "fewstep gather, 686 hooks, kernels", torch.float32, graph_replay_ms(gather_all))

    if opt._rank_candidates:
        rec.add("sara_step", case, "fewstep rank penalty (Newton-Schulz)", torch.float32,
                gpu_median_ms(opt._add_rank_penalty, warmup_ms=200, rep_ms=2000))
    theta = opt._entries[0][2]
    del opt, grads
    _free()
    dense = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    for p in unet.parameters():
        p.grad = torch.randn_like(p)
    rec.add("sara_step", f"dense {total / 1e6:.1f}M fp32", "torch AdamW fused", torch.float32,
            gpu_median_ms(dense.step))
    rec.add("sara_memory", f"dense {total / 1e6:.1f}M fp32", "full FT weights+grads+state", torch.float32, 0.0,
            "GB", torch.cuda.memory_allocated() / 1e9)
    del dense
    for p in unet.parameters():
        p.grad = None
    _free()
    before = torch.cuda.memory_allocated()
    official = _official_style_update(unet, theta)
    rec.add("sara_memory", case, "official-style state (bool masks+leaves+AdamW)", torch.float32, 0.0, "GB",
            weights_gb + (torch.cuda.memory_allocated() - before) / 1e9)
    rec.add("sara_step", case, "official-style AdamW+masked_scatter", torch.float32, gpu_median_ms(official))
    del official, unet
    _free()


def _setup(kind: str, weight_dtype: torch.dtype):
    unet = sd15_unet()
    total = sum(p.numel() for p in unet.parameters())
    if kind == "full":
        return unet, torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True), total
    unet.to(weight_dtype)
    if kind == "lora":  # as diffusers' LoRA scripts: frozen base in weight_dtype, fp32 adapters
        from peft import LoraConfig
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return unet, torch.optim.AdamW(params, lr=1e-4, fused=True), sum(p.numel() for p in params)
    scope, trainable = kind.split(":")
    names = None
    if scope == "sara-attn":  # the layers LoRA adapts, for a like-for-like comparison
        names = [n for n, _ in unet.named_parameters()
                 if n.endswith(".weight") and any(f".{t}." in n for t in LORA_TARGETS)]
        unet.requires_grad_(False)
        for n, p in unet.named_parameters():
            p.requires_grad_(n in set(names))
        total = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    opt = SaRA(unet, ratio=int(trainable) / total, params=names, lr=1e-5)  # fp32 master values for bf16 weights
    return unet, opt, opt.num_trainable


CONFIGS = [("full", torch.float32), ("lora", torch.float32), ("sara:lora", torch.float32),
           ("sara-attn:lora", torch.float32), (f"sara:{TRAINABLE_50M}", torch.float32),
           ("lora", torch.bfloat16), ("sara:lora", torch.bfloat16), ("sara-attn:lora", torch.bfloat16),
           (f"sara:{TRAINABLE_50M}", torch.bfloat16)]


BATCHES = (1, 8)


def _measure_training(kind: str, weight_dtype: torch.dtype, batch: int, steps: int, warmup: int):
    """(median step ms, peak GiB above what was allocated before, trainable count) of one config;
    everything it allocates dies with its frame."""
    _free()
    baseline = torch.cuda.memory_allocated()
    unet, opt, trainable = _setup(kind, weight_dtype)
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(batch, 4, 64, 64, device="cuda", generator=gen)
    noise = torch.randn(batch, 4, 64, 64, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    text = torch.randn(batch, 77, 768, device="cuda", generator=gen)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(x, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - baseline) / GiB, trainable


def bench_training(rec, steps=12, warmup=3):
    lora_trainable = None
    for batch in BATCHES:
        for kind, weight_dtype in CONFIGS:
            kind = kind.replace(":lora", f":{lora_trainable}")
            ms, peak, trainable = _measure_training(kind, weight_dtype, batch, steps, warmup)
            if kind == "lora":
                lora_trainable = trainable
            name = {"full": "full FT (AdamW fused)", "lora": "PEFT LoRA r=64"}.get(
                kind, "fewstep SaRA, attention q/k/v/out" if kind.startswith("sara-attn") else "fewstep SaRA, all layers")
            base = "fp32" if weight_dtype == torch.float32 else "bf16"
            case = f"batch {batch}, {base} weights, {trainable / 1e6:.1f}M trainable"
            rec.add("sara_train", case, name, torch.bfloat16, ms, "peak_GiB", peak)
    _free()


def run(rec, copy_gbps):
    bench_optimizer_step(rec, copy_gbps)
    bench_bf16_step(rec, copy_gbps)
    bench_training(rec)
