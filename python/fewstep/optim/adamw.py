"""``fewstep.optim.FusedAdamW``: torch.optim.AdamW in one multi-tensor launch, optionally keeping an
EMA of the parameters that is updated in the same pass over memory."""
from __future__ import annotations

import math
from itertools import chain
from typing import Iterable, Optional

import torch

from fewstep.ops.adamw import adamw_step_
from fewstep.ops.ema import ema_update_

_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """Moments and EMA are fp32, fp64 for fp64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _check_number(name: str, value, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok or math.isnan(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")


def _loaded_state_value(key: str, value, p: torch.Tensor):
    if key == "step":  # an int here; a tensor in torch.optim.AdamW's state, read once at load
        return int(value)
    if isinstance(value, torch.Tensor):
        return value.to(p.device, _state_dtype(p), copy=True)
    return value


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, bias corrections, ``maximize=False``,
    ``amsgrad=False``) with every parameter of a group updated by one kernel launch per 512
    parameters (``fewstep.ops.adamw_step_``).

    With ``ema_decay`` (per group, like the other hyperparameters), the optimizer also keeps an EMA
    of each parameter, ``ema <- lerp(ema, param, 1 - ema_decay)`` after every step (what
    ``fewstep.ema_update_`` computes), in the same pass over memory: the step then reads
    parameter, gradient, both moments and the EMA once and writes them once, instead of a second
    pass for the EMA. The EMA starts as a copy of the parameters at construction.

    Dtypes: parameters fp16/bf16/fp32/fp64 (contiguous), gradients of the parameter's dtype;
    moments and EMA are fp32 (fp64 for fp64 parameters). fp16/bf16 parameters are updated in fp32
    and rounded once per step; no fp32 master copy is kept, so updates smaller than half a unit in
    the last place of a bf16 weight are lost, as with torch.optim.AdamW on bf16 parameters (whose
    moments would be bf16 too). Parameters whose ``grad`` is None are not updated (their EMA still
    moves towards them). Each parameter counts its own steps (a Python int in its state, so no
    host-device sync), as torch.optim.AdamW does. Gradient clipping is the caller's, before
    :meth:`step` (``torch.nn.utils.clip_grad_norm_``).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, ema_decay: Optional[float] = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ema_decay=ema_decay)
        self._ema_swapped_out: Optional[list[torch.Tensor]] = None  # the parameters while swap_ema() is in force
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(len(self.param_groups) - 1)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a rejected group is not added
            raise
        self._start_emas(self.param_groups[-1])

    def _check_group(self, index: int) -> None:
        group = self.param_groups[index]
        _check_number(f"param_groups[{index}]['lr']", group["lr"], 0, math.inf, high_open=True)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"param_groups[{index}]['betas']: expected a pair of floats, got {betas!r}")
        for k, beta in enumerate(betas):
            _check_number(f"param_groups[{index}]['betas'][{k}]", beta, 0, 1, high_open=True)
        _check_number(f"param_groups[{index}]['eps']", group["eps"], 0, math.inf, low_open=True, high_open=True)
        _check_number(f"param_groups[{index}]['weight_decay']", group["weight_decay"], 0, math.inf, high_open=True)
        if group["ema_decay"] is not None:
            _check_number(f"param_groups[{index}]['ema_decay']", group["ema_decay"], 0, 1)
        for k, p in enumerate(group["params"]):
            name = f"param_groups[{index}]['params'][{k}]"
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"{name}: expected dtype in {[str(d) for d in _PARAM_DTYPES]}, got {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous parameter, got strides {p.stride()} for shape "
                                 f"{list(p.shape)}")

    def _ema_of(self, p: torch.Tensor) -> torch.Tensor:
        """p's EMA, started as a copy of p when its group gets an ema_decay."""
        state = self.state[p]
        if "ema" not in state:
            state["ema"] = p.detach().to(_state_dtype(p), copy=True)
        return state["ema"]

    def _start_emas(self, group: dict) -> None:
        if group["ema_decay"] is not None:
            for p in group["params"]:
                self._ema_of(p)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter that has a gradient, and the EMA update if enabled.
        Every gradient is checked before anything is updated."""
        if self._ema_swapped_out is not None:
            raise RuntimeError("step: the parameters hold their EMA (swap_ema() was called); call swap_ema() "
                               "again to put the trained weights back first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, *self._collect(index, group)) for index, group in enumerate(self.param_groups)]
        for group, launches, without_grad in work:
            beta1, beta2 = group["betas"]
            ema_decay = group["ema_decay"]
            for (_, step), (ps, grads, exp_avgs, exp_avg_sqs, emas, states) in launches.items():
                for state in states:
                    state["step"] = step
                adamw_step_(ps, grads, exp_avgs, exp_avg_sqs, emas, step=step, lr=group["lr"], beta1=beta1,
                            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                            ema_decay=0.0 if ema_decay is None else ema_decay)
            for emas, ps in without_grad.values():
                ema_update_(emas, ps, ema_decay)
        return loss

    def _collect(self, index: int, group: dict) -> tuple[dict, dict]:
        """The group's launches, keyed by (device, step count after this step): lists of
        parameters, gradients, moments, EMAs and states; and, per device, the EMAs and parameters
        of the parameters without a gradient."""
        ema_decay = group["ema_decay"]
        launches: dict[tuple[torch.device, int], tuple[list, list, list, list, list, list]] = {}
        without_grad: dict[torch.device, tuple[list, list]] = {}
        for k, p in enumerate(group["params"]):
            state = self.state[p]
            grad = p.grad
            if grad is None:
                if ema_decay is not None:
                    emas, ps = without_grad.setdefault(p.device, ([], []))
                    emas.append(state["ema"] if "ema" in state else self._ema_of(p))
                    ps.append(p)
                continue
            if grad.layout != torch.strided:
                raise TypeError(f"param_groups[{index}]['params'][{k}].grad: expected a dense gradient, got "
                                f"layout {grad.layout} (FusedAdamW does not support sparse gradients)")
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p))
            lists = launches.setdefault((p.device, state.get("step", 0) + 1), ([], [], [], [], [], []))
            lists[0].append(p)
            lists[1].append(grad.contiguous())  # a no-op for the gradients autograd writes
            lists[2].append(state["exp_avg"])
            lists[3].append(state["exp_avg_sq"])
            if ema_decay is not None:
                lists[4].append(state["ema"] if "ema" in state else self._ema_of(p))
            lists[5].append(state)
        return launches, without_grad

    def _ema_pairs(self, caller: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = [(p, self._ema_of(p)) for group in self.param_groups if group["ema_decay"] is not None
                 for p in group["params"]]
        if not pairs:
            raise ValueError(f"{caller}: this optimizer keeps no EMA (construct it with ema_decay=...)")
        return pairs

    def ema_parameters(self) -> list[torch.Tensor]:
        """The EMA tensors (fp32, fp64 for fp64 parameters), in parameter order, of every group that
        keeps one. They are the optimizer's state: modify them only through the optimizer."""
        return [ema for _, ema in self._ema_pairs("ema_parameters")]

    @torch.no_grad()
    def copy_ema_to(self, module_params: Iterable[torch.Tensor]) -> None:
        """Copies the EMA into ``module_params`` (for example ``ema_model.parameters()`` of a copy of
        the model), in parameter order, rounding to their dtypes."""
        emas = self.ema_parameters()
        targets = list(module_params)
        if len(targets) != len(emas):
            raise ValueError(f"module_params: expected {len(emas)} tensors (one per EMA tensor), got {len(targets)}")
        for k, (t, ema) in enumerate(zip(targets, emas)):
            if t.shape != ema.shape:
                raise ValueError(f"module_params[{k}]: expected shape {list(ema.shape)} (the shape of its EMA), "
                                 f"got {list(t.shape)}")
        for t, ema in zip(targets, emas):
            t.copy_(ema)

    @torch.no_grad()
    def swap_ema(self) -> None:
        """Puts the EMA into the parameters (to evaluate or save the averaged model); the next call
        puts the trained weights back exactly. The EMA itself is left unchanged, and :meth:`step`
        refuses to run in between. Holds one copy of the parameters meanwhile."""
        pairs = self._ema_pairs("swap_ema")
        if self._ema_swapped_out is None:
            self._ema_swapped_out = [p.detach().clone() for p, _ in pairs]
            for p, ema in pairs:
                p.copy_(ema)
        else:
            for (p, _), trained in zip(pairs, self._ema_swapped_out):
                p.copy_(trained)
            self._ema_swapped_out = None

    def load_state_dict(self, state_dict: dict) -> None:
        """Resumes from :meth:`state_dict` bit for bit: moments and EMA keep their fp32/fp64 dtype
        (torch.optim.Optimizer would cast them to the parameters' dtype). Also loads
        torch.optim.AdamW's state; hyperparameters it lacks (ema_decay) keep their current values."""
        for index, saved in enumerate(state_dict["param_groups"]):
            if saved.get("amsgrad") or saved.get("maximize"):
                raise ValueError(f"state_dict['param_groups'][{index}]: uses amsgrad or maximize, which FusedAdamW "
                                 "does not implement")
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, current):
            for key, value in before.items():
                group.setdefault(key, value)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            if pid in state_dict["state"]:
                self.state[p] = {key: _loaded_state_value(key, value, p)
                                 for key, value in state_dict["state"][pid].items()}
        for group in self.param_groups:  # an EMA missing from the saved state starts at the parameters
            self._start_emas(group)
