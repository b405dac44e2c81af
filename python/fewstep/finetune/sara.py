"""SaRA (Hu et al. 2024): fine-tune only the smallest-magnitude entries of every weight.

``SaRA(model, threshold=θ)`` is a ``torch.optim.Optimizer`` over the model's ordinary
parameters. As each parameter's gradient is accumulated during backward, a hook gathers the
selected entries into one flat fp32 buffer and frees the dense gradient, so no dense
gradient outlives its layer's backward. ``step()`` is one fused AdamW launch over the
selected entries of all tensors (fp32 moments, and fp32 master values for fp16/bf16
weights). Nothing in a step reads a device value on the host.
"""
from __future__ import annotations

import random
import weakref
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from fewstep import _checks, _dispatch
from fewstep.finetune.selection import (TensorSelection, magnitude_mask, smallest_magnitude_threshold)
from fewstep.ops.sara import sara_adamw_step_, sara_gather_
from fewstep.reference.sara import LAYOUT_COLS

_TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
THRESHOLD_PREFIX = "__sara_threshold__."


def _check_unit_interval(name: str, value: float, *, closed_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and (0 <= value < 1 if closed_low else 0 < value < 1)
    if not ok:
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")


def _check_nonnegative(name: str, value: float, *, strict: bool = False) -> None:
    _checks.check_finite(name, value)
    if value < 0 or (strict and value == 0):
        raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} 0, got {value!r}")


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _resolve_params(model: torch.nn.Module, params) -> list[tuple[str, torch.nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        return [(n, p) for n, p in named if p.requires_grad and p.dtype in _TRAINABLE_DTYPES]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    chosen = []
    for i, entry in enumerate(params):
        if isinstance(entry, str):
            if entry not in by_name:
                raise ValueError(f"params[{i}]: expected a parameter name of the model, got {entry!r}")
            chosen.append((entry, by_name[entry]))
        elif isinstance(entry, torch.Tensor) and id(entry) in by_id:
            chosen.append((by_id[id(entry)], entry))
        else:
            raise ValueError(f"params[{i}]: expected a parameter of the model or its name, got {type(entry).__name__}")
    for name, p in chosen:
        if p.dtype not in _TRAINABLE_DTYPES:
            raise TypeError(f"params: expected parameters of dtype in {[str(d) for d in _TRAINABLE_DTYPES]}, "
                            f"got {name} of dtype {p.dtype}")
    return chosen


# Newton-Schulz quintics x <- a x + b (x x^T) x + c (x x^T)^2 x. The first ones (coefficients tuned
# for fast growth of small singular values, as in the Muon optimizer) bring every singular value
# of the normalized matrix into about [0.7, 1.2]; the classical quintic then converges them to 1.
_POLAR_STEPS = [(3.4445, -4.7750, 2.0315)] * 8 + [(15 / 8, -10 / 8, 3 / 8)] * 3


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of ``a = U S Vᵀ`` (the nuclear norm's subgradient), by matmuls only: unlike
    ``torch.linalg.svd`` it never waits for the device, and it is fast on GPUs. Singular
    values below ~1e-4 of the Frobenius norm are not resolved (any subgradient may map them)."""
    x = a.float()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / (torch.linalg.matrix_norm(x) + 1e-30)  # Frobenius >= spectral norm: all σ <= 1
    for ca, cb, cc in _POLAR_STEPS:
        gram = x @ x.T
        x = ca * x + (cb * gram + cc * (gram @ gram)) @ x
    return x if wide else x.T


class SaRA(torch.optim.Optimizer):
    """Sparse AdamW over the entries with |w| < θ (or the smallest ``ratio``) of each parameter.

    Args:
        model: the module to fine-tune; its parameters are updated in place.
        threshold / ratio: exactly one. ``ratio`` picks the smallest fraction of entries,
            over all tensors (``per_tensor=False``) or in each tensor.
        params: parameters (or names) to consider; default every float parameter that
            requires grad. Considered parameters without selected entries are frozen.
        lambda_rank: weight of the nuclear-norm penalty on one random selected matrix
            (min side > ``rank_min_dim``) per step; its subgradient U Vᵀ of the masked
            matrix (:func:`polar_factor`) is added to the gradient of the selected entries.
        progressive_step: at this step, keep only the entries still below their threshold
            (new selection = old ∧ |w| < θ); their Adam state carries over.
        process_group: gradients are averaged over it in ``step()`` when torch.distributed is
            initialized (only the k selected values travel); do not also wrap the model in DDP.

    The gradient gather's backend (``fewstep.backend``) is chosen when the optimizer is built.
    """

    def __init__(self, model: torch.nn.Module, *, threshold: Optional[float] = None, ratio: Optional[float] = None,
                 per_tensor: bool = False, params: Optional[Iterable[Union[str, torch.Tensor]]] = None,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, lambda_rank: float = 0.0, rank_min_dim: int = 64,
                 progressive_step: Optional[int] = None, process_group=None, seed: int = 0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if (threshold is None) == (ratio is None):
            raise ValueError(f"threshold, ratio: expected exactly one of them, got threshold={threshold!r}, "
                             f"ratio={ratio!r}")
        if threshold is not None:
            _check_nonnegative("threshold", threshold, strict=True)
        else:
            _check_unit_interval("ratio", ratio, closed_low=False)
        _check_nonnegative("lr", lr)
        _check_unit_interval("betas[0]", betas[0])
        _check_unit_interval("betas[1]", betas[1])
        _check_nonnegative("eps", eps, strict=True)
        _check_nonnegative("weight_decay", weight_decay)
        _check_nonnegative("lambda_rank", lambda_rank)
        if progressive_step is not None and (not isinstance(progressive_step, int) or progressive_step < 1):
            raise ValueError(f"progressive_step: expected None or an int >= 1, got {progressive_step!r}")

        named = _resolve_params(model, params)
        if not named:
            raise ValueError("model: expected at least one float parameter that requires grad, got none")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"model: expected all trainable parameters on one device, got {sorted(map(str, devices))}")
        for name, p in named:
            if not p.is_contiguous():
                raise ValueError(f"model: expected contiguous parameters, got {name} with strides {p.stride()}")

        tensors = [p for _, p in named]
        if threshold is not None:
            thresholds = [_float32(threshold)] * len(named)
        elif per_tensor:
            thresholds = [smallest_magnitude_threshold([p], ratio) for p in tensors]
        else:
            thresholds = [smallest_magnitude_threshold(tensors, ratio)] * len(named)
        selections = [TensorSelection.from_mask(magnitude_mask(p, t)) for p, t in zip(tensors, thresholds)]
        if sum(s.k for s in selections) == 0:
            rule = f"|w| < {threshold!r}" if threshold is not None else f"ratio={ratio!r}"
            raise ValueError(f"model: no entry satisfies {rule} in any of its {len(named)} parameters; "
                             "raise the threshold")

        self._entries = [(n, p, t, s) for (n, p), t, s in zip(named, thresholds, selections)]
        kept = [e for e in self._entries if e[3].k > 0]
        for _, p, _, sel in self._entries:
            if sel.k == 0:
                p.requires_grad_(False)
        super().__init__([e[1] for e in kept], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.lambda_rank = float(lambda_rank)
        self.rank_min_dim = int(rank_min_dim)
        self.progressive_step = progressive_step
        self._process_group = process_group
        self._rng = random.Random(seed)
        self._step = 0
        self._synced = False
        self._install(kept, carry=None)
        # The gather runs once per parameter per backward: its backend is chosen here, once.
        self._gather = sara_gather_
        if _dispatch.select("sara_gather_", tensors[0].device, has_triton=False) != "reference":
            self._gather = torch.ops.fewstep.sara_gather_.default
        self._hooks: dict[int, object] = {}
        self._hook_active()

    # -- layout -----------------------------------------------------------------------------
    def _install(self, entries, carry) -> None:
        """Lay the selections out in flat buffers; ``carry`` = (keep masks, old buffers) or None."""
        device = entries[0][1].device
        rows, compact, master, sel_len, chunk_len = [], 0, 0, 0, 0
        for _, p, _, s in entries:
            low_precision = p.dtype != torch.float32
            rows.append([s.format, s.numel, s.k, compact, master if low_precision else -1, sel_len, chunk_len])
            compact += s.k
            master += s.k if low_precision else 0
            sel_len += s.data.numel()
            chunk_len += s.chunk_offsets.numel()
        if compact >= 2 ** 31:
            raise ValueError(f"model: expected fewer than 2^31 selected entries, got {compact}")
        self._layout = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), LAYOUT_COLS)
        self._selection_data = torch.cat([s.data for *_, s in entries])
        self._chunk_offsets = torch.cat([s.chunk_offsets for *_, s in entries])
        for row, (*_, s) in zip(rows, entries):  # selections become views of the flat buffers
            s.data = self._selection_data[row[5]: row[5] + s.data.numel()]
            s.chunk_offsets = self._chunk_offsets[row[6]: row[6] + s.chunk_offsets.numel()]
        if carry is None:
            self._exp_avg = torch.zeros(compact, dtype=torch.float32, device=device)
            self._exp_avg_sq = torch.zeros(compact, dtype=torch.float32, device=device)
            self._master = torch.empty(master, dtype=torch.float32, device=device)
            for row, (_, p, _, s) in zip(rows, entries):
                if row[4] >= 0:
                    self._master[row[4]: row[4] + s.k] = p.detach().reshape(-1)[s.indices()].float()
        else:
            keeps, (exp_avg, exp_avg_sq, old_master) = carry
            self._exp_avg = torch.cat([exp_avg[i][keep] for i, keep in enumerate(keeps)])
            self._exp_avg_sq = torch.cat([exp_avg_sq[i][keep] for i, keep in enumerate(keeps)])
            masters = [old_master[i][keep] for i, keep in enumerate(keeps) if old_master[i] is not None]
            self._master = torch.cat(masters) if masters else torch.empty(0, dtype=torch.float32, device=device)
        self._grad = torch.zeros(compact, dtype=torch.float32, device=device)
        self._active = entries
        self._slot = {id(p): i for i, (_, p, _, _) in enumerate(entries)}
        self._grad_views = [self._grad[r[3]: r[3] + r[2]] for r in rows]
        self._weights = [p for _, p, _, _ in entries]
        self._rank_candidates = [i for i, (_, p, _, _) in enumerate(entries)
                                 if p.dim() >= 2 and min(p.shape[0], p.numel() // p.shape[0]) > self.rank_min_dim]
        self.param_groups[0]["params"] = list(self._weights)

    def _hook_active(self) -> None:
        # The hook holds the optimizer weakly: a parameter -> hook -> optimizer -> parameter cycle
        # through autograd's C++ hook storage is invisible to the garbage collector.
        this = weakref.ref(self)

        def gather(p: torch.Tensor) -> None:
            opt = this()
            if opt is not None:
                opt._gather_hook(p)

        for p in self._weights:
            if id(p) not in self._hooks:
                self._hooks[id(p)] = p.register_post_accumulate_grad_hook(gather)

    def _compact_slices(self, buffer: torch.Tensor, col: int):
        return [buffer[r[col]: r[col] + r[2]] if r[col] >= 0 else None for r in self._layout.tolist()]

    @property
    def num_trainable(self) -> int:
        """Number of selected (trainable) entries over all tensors."""
        return int(self._grad.numel())

    @property
    def selections(self) -> dict[str, TensorSelection]:
        return {name: s for name, _, _, s in self._active}

    # -- gradients --------------------------------------------------------------------------
    def _gather_hook(self, p: torch.Tensor) -> None:
        grad, p.grad = p.grad, None  # the dense gradient dies here
        i = self._slot.get(id(p))
        if grad is None or i is None:
            return
        s = self._active[i][3]
        self._gather(grad, self._grad_views[i], s.data, s.chunk_offsets, s.format, 1.0)
        self._synced = False

    def _sync_grads(self) -> None:
        if self._synced:
            return
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(self._process_group)
            if world > 1:
                dist.all_reduce(self._grad, group=self._process_group)
                self._grad.div_(world)
        self._synced = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad.zero_()  # dense gradients are already gone: the hook frees each one

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the selected entries' gradient to ``max_norm``; returns the norm (no host sync)."""
        _check_nonnegative("max_norm", max_norm, strict=True)
        self._sync_grads()
        total = torch.linalg.vector_norm(self._grad, norm_type)
        self._grad.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    @torch.no_grad()
    def _add_rank_penalty(self) -> None:
        if not self._rank_candidates:
            return
        i = self._rank_candidates[self._rng.randrange(len(self._rank_candidates))]
        _, p, _, s = self._active[i]
        rows = p.shape[0]
        masked = p.detach().reshape(rows, -1).float() * s.dense_mask().view(rows, -1)
        sara_gather_(polar_factor(masked), self._grad_views[i], s.data, s.chunk_offsets, s.format, self.lambda_rank)

    # -- update -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_grads()
        if self.lambda_rank > 0:
            self._add_rank_penalty()
        self._step += 1
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        sara_adamw_step_(self._weights, self._exp_avg, self._exp_avg_sq, self._master, self._grad, self._layout,
                         self._selection_data, self._chunk_offsets, lr=group["lr"], beta1=beta1, beta2=beta2,
                         eps=group["eps"], weight_decay=group["weight_decay"], step=self._step)
        self._synced = False
        if self.progressive_step is not None and self._step == self.progressive_step:
            self.reselect()
        return loss

    @torch.no_grad()
    def reselect(self) -> None:
        """Progressive re-selection: keep the selected entries whose |w| is still below θ."""
        old = (self._compact_slices(self._exp_avg, 3), self._compact_slices(self._exp_avg_sq, 3),
               self._compact_slices(self._master, 4))
        keeps, entries = [], []
        for name, p, theta, s in self._active:
            idx = s.indices()
            keep = magnitude_mask(p.reshape(-1)[idx], theta)
            mask = torch.zeros(s.numel, dtype=torch.bool, device=p.device)
            mask[idx[keep]] = True
            entries.append((name, p, theta, TensorSelection.from_mask(mask)))
            keeps.append(keep)
        self._replace(entries, keeps, old)

    def _replace(self, entries, keeps, old) -> None:
        alive = [i for i, e in enumerate(entries) if e[3].k > 0]
        if not alive:
            raise ValueError("reselect: no selected entry is below its threshold any more; nothing left to train")
        for _, p, _, s in entries:
            if s.k == 0:
                p.requires_grad_(False)
        carry = ([keeps[i] for i in alive], tuple([buf[i] for i in alive] for buf in old))
        self._install([entries[i] for i in alive], carry)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {
            "step": self._step, "param_group": group, "rng": self._rng.getstate(),
            "names": [n for n, *_ in self._active], "thresholds": [t for _, _, t, _ in self._active],
            "selections": [s.to_state() for *_, s in self._active],
            "initial": [(n, t, s.to_state()) for n, _, t, s in self._entries],
            "exp_avg": self._exp_avg, "exp_avg_sq": self._exp_avg_sq, "master": self._master,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict` (taken from an optimizer over the same model)."""
        by_name = {n: p for n, p, _, _ in self._entries}
        missing = [n for n, _, _ in state_dict["initial"] if n not in by_name]
        if missing:
            raise ValueError(f"state_dict: names {missing[:3]} are not parameters this optimizer considers")
        device = self._grad.device
        initial = {n: (t, TensorSelection.from_state(s, device)) for n, t, s in state_dict["initial"]}
        self._entries = [(n, p, *initial[n]) for n, p, _, _ in self._entries if n in initial]
        entries = [(n, by_name[n], t, TensorSelection.from_state(s, device))
                   for n, t, s in zip(state_dict["names"], state_dict["thresholds"], state_dict["selections"])]
        for n, p, _, s in entries:
            if s.numel != p.numel():
                raise ValueError(f"state_dict: selection of {n} covers {s.numel} entries, the parameter has "
                                 f"{p.numel()}")
        active = {n for n, *_ in entries}
        for n, p, _, _ in self._entries:
            p.requires_grad_(n in active)  # the rest stay frozen, as after a re-selection
        self._install(entries, carry=None)
        self._hook_active()
        for name, buf in (("exp_avg", self._exp_avg), ("exp_avg_sq", self._exp_avg_sq), ("master", self._master)):
            src = state_dict[name]
            if src.shape != buf.shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {list(buf.shape)}, got {list(src.shape)}")
            buf.copy_(src)
        self.param_groups[0].update(state_dict["param_group"])
        self._step = int(state_dict["step"])
        self._rng.setstate(state_dict["rng"])


@torch.no_grad()
def sara_state_dict(optimizer: SaRA, path: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Values-only checkpoint: the trained values of the initially selected entries and each
    tensor's threshold. Base weights + thresholds recreate the selection. Written as
    safetensors when ``path`` is given."""
    if not isinstance(optimizer, SaRA):
        raise TypeError(f"optimizer: expected a fewstep.finetune.SaRA, got {type(optimizer).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, p, theta, s in optimizer._entries:
        if s.k == 0:
            continue
        out[name] = p.detach().reshape(-1)[s.indices()].clone()
        out[THRESHOLD_PREFIX + name] = torch.tensor(theta, dtype=torch.float32)
    if path is not None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous().cpu() for k, v in out.items()}, path)
    return out


@torch.no_grad()
def load_sara_state_dict(model: torch.nn.Module, state_dicts, alpha: Union[float, Sequence[float]] = 1.0) -> None:
    """Apply one or several values-only checkpoints to a model holding the base weights.

    Each selection is recomputed from the base weights before any is applied;
    w = base + Σ alpha_i (values_i - base) on each checkpoint's entries (exact copy for a
    single checkpoint with alpha 1)."""
    if isinstance(state_dicts, (str, dict)):
        state_dicts = [state_dicts]
    alphas = [alpha] * len(state_dicts) if isinstance(alpha, (int, float)) else list(alpha)
    if len(alphas) != len(state_dicts):
        raise ValueError(f"alpha: expected one value per state dict ({len(state_dicts)}), got {len(alphas)}")
    for i, a in enumerate(alphas):
        _checks.check_finite(f"alpha[{i}]", a)
    params = dict(model.named_parameters())
    plans = []
    for j, sd in enumerate(state_dicts):
        if isinstance(sd, str):
            from safetensors.torch import load_file
            sd = load_file(sd)
        for name, values in sd.items():
            if name.startswith(THRESHOLD_PREFIX):
                continue
            if name not in params:
                raise ValueError(f"state_dicts[{j}]: {name!r} is not a parameter of the model")
            key = THRESHOLD_PREFIX + name
            if key not in sd:
                raise ValueError(f"state_dicts[{j}]: expected a threshold {key!r} for {name!r}")
            p = params[name]
            if not p.is_contiguous():
                raise ValueError(f"model: expected contiguous parameters, got {name} with strides {p.stride()}")
            idx = magnitude_mask(p, float(sd[key])).reshape(-1).nonzero().squeeze(1)
            if idx.numel() != values.numel():
                raise ValueError(f"state_dicts[{j}][{name!r}]: the base weights select {idx.numel()} entries "
                                 f"with threshold {float(sd[key])!r}, the checkpoint has {values.numel()} values; "
                                 "is the model holding the base weights?")
            base = p.reshape(-1)[idx].clone()
            plans.append((p, idx, base, values.to(p.device), alphas[j]))
    if len(plans) == len({id(p) for p, *_ in plans}) and all(a == 1 for *_, a in plans):
        for p, idx, _, values, _ in plans:  # one checkpoint per tensor at alpha 1: exact copy
            p.view(-1)[idx] = values.to(p.dtype)
        return
    merged: dict[int, torch.Tensor] = {}
    for p, idx, base, values, a in plans:
        acc = merged.setdefault(id(p), p.detach().reshape(-1).float())
        acc.index_add_(0, idx, a * (values.float() - base.float()))
    for p, *_ in plans:
        if id(p) in merged:
            p.view(-1).copy_(merged.pop(id(p)))
