"""Denoising-difficulty timestep curriculum (Kim et al. 2024, arXiv 2403.10348).

Verified from the paper's abstract and Figure 3 caption: low-noise (low-t) denoising is hardest;
timesteps form clusters C_1 (hardest) ... C_N (easiest); training starts on C_N and accumulates
harder clusters (stage n samples the union of the n easiest); an adaptive pacing function moves on
once the loss stops improving within a maximum patience. Not read in the paper itself, only as
quoted by a third-party implementation: N = 20 uniform intervals and tau = 200 (our defaults), and
quantile clusters for EDM. Our choice: the loss tracker resets at each stage, since harder
timesteps raise the loss and an old best would cut the next stage short.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _check_sigmas(sigmas) -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not sigmas.is_floating_point() \
            or sigmas.numel() < 2:
        given = (f"shape {list(sigmas.shape)}, dtype {sigmas.dtype}"
                 if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__)
        raise ValueError(f"sigmas: expected a 1-D floating-point tensor of at least 2 noise levels, "
                         f"got {given}")
    grid = sigmas.detach().double().cpu()
    if not bool(torch.isfinite(grid).all()) or bool((grid < 0).any()):
        raise ValueError(f"sigmas: expected finite values >= 0, got min {grid.min().item()}, "
                         f"max {grid.max().item()}")
    steps = grid.diff()
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError("sigmas: expected a strictly ascending or strictly descending grid, got "
                         "repeated values or a change of direction")
    return grid


class TimestepCurriculum:
    """Easy-to-hard timestep sampler that unlocks lower-noise clusters as the loss plateaus.

    The ``num_train_timesteps`` positions form ``num_clusters`` contiguous clusters (sizes differ
    by at most one); stage ``s`` samples uniformly from the ``s`` noisiest, and the last stage
    (``done``) is the full range. With ``sigmas`` (a monotone noise-level grid, e.g. Karras) the
    positions are grid indices, ``num_train_timesteps`` is ignored, and clusters are SNR quantiles
    of the grid: equal shares ranked by SNR, which falls as sigma grows for EDM (1/sigma^2) and
    flow ((1-sigma)^2/sigma^2) alike. A grid of log-normal quantiles gives EDM's p(sigma).

    Pacing: ``update`` keeps an EMA of the loss (``ema`` = weight on the past) and reads it back
    every ``check_every`` steps (default ``max(1, patience // 4)``). The first reading of a stage
    sets the baseline; a reading below the best by more than ``min_delta`` restarts the patience
    window. The first check ``patience`` or more steps after the stage began or last improved
    unlocks the next cluster, so a flat loss unlocks exactly ``patience`` steps into a stage when
    ``check_every`` divides it. Tensor losses stay on their device and cost one host sync per
    check, not per step; a non-finite tensor loss is therefore reported at the next check, a
    non-finite float at once. Step ``n`` is the ``n``-th ``update`` call.
    """

    def __init__(self, num_train_timesteps: int = 1000, num_clusters: int = 20,
                 patience: int = 200, ema: float = 0.99, min_delta: float = 0.0, *,
                 sigmas: torch.Tensor | None = None, check_every: int | None = None) -> None:
        if sigmas is None:
            self.num_positions = _check_int("num_train_timesteps", num_train_timesteps, 1)
            self.sigmas = None
            noise_ascends = True
        else:
            grid = _check_sigmas(sigmas)
            self.num_positions = grid.numel()
            self.sigmas = sigmas.detach().clone()
            noise_ascends = bool(grid[-1] > grid[0])
        self.num_clusters = _check_int("num_clusters", num_clusters, 1)
        if num_clusters > self.num_positions:
            raise ValueError(f"num_clusters: expected at most {self.num_positions} (one position "
                             f"per cluster), got {num_clusters}")
        self.patience = _check_int("patience", patience, 1)
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
            raise ValueError(f"ema: expected a number in [0, 1), got {ema!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) \
                or not 0 <= min_delta < math.inf:
            raise ValueError(f"min_delta: expected a finite number >= 0, got {min_delta!r}")
        self.ema = float(ema)
        self.min_delta = float(min_delta)
        self.check_every = (max(1, patience // 4) if check_every is None
                            else _check_int("check_every", check_every, 1))
        self._noise_ascends = noise_ascends
        self._steps = 0
        self._stage = 1
        self._reset_tracker()

    def _reset_tracker(self) -> None:
        self._stage_start = self._steps
        self._last_improved = self._steps
        self._best: float | None = None
        self._loss_ema: torch.Tensor | None = None

    @property
    def stage(self) -> int:
        """Number of unlocked clusters, 1 ... ``num_clusters``."""
        return self._stage

    @property
    def done(self) -> bool:
        return self._stage == self.num_clusters

    @property
    def steps(self) -> int:
        """Number of ``update`` calls so far."""
        return self._steps

    @property
    def _unlocked_count(self) -> int:
        locked = (self.num_clusters - self._stage) * self.num_positions // self.num_clusters
        return self.num_positions - locked

    @property
    def low(self) -> int:
        """Inclusive lower bound of the positions sampled now."""
        return self.num_positions - self._unlocked_count if self._noise_ascends else 0

    @property
    def high(self) -> int:
        """Exclusive upper bound of the positions sampled now."""
        return self.num_positions if self._noise_ascends else self._unlocked_count

    def sample(self, batch_size: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Timesteps (or sigma-grid indices), int64, uniform over ``[low, high)``."""
        _check_int("batch_size", batch_size, 0)
        return torch.randint(self.low, self.high, (batch_size,), generator=generator,
                             dtype=torch.long, device=device)

    def update(self, loss: float | torch.Tensor) -> bool:
        """Record one training step's loss; True when this step unlocked a new cluster.

        After the last cluster is unlocked this only counts steps.
        """
        value = self._as_tensor(loss, self._steps + 1)
        self._steps += 1
        if self.done:
            return False
        if self._loss_ema is None:
            self._loss_ema = value.clone()
        else:
            if self._loss_ema.device != value.device:  # e.g. a CPU-restored EMA meeting CUDA losses
                self._loss_ema = self._loss_ema.to(value.device)
            self._loss_ema.lerp_(value, 1.0 - self.ema)
        if (self._steps - self._stage_start) % self.check_every:
            return False
        return self._check_plateau()

    def _as_tensor(self, loss: float | torch.Tensor, step: int) -> torch.Tensor:
        if isinstance(loss, torch.Tensor):
            if loss.ndim != 0:
                raise ValueError(f"loss: expected a float or a 0-dim tensor at step {step}, "
                                 f"got a tensor of shape {list(loss.shape)}")
            return loss.detach().float()
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"loss: expected a float or a 0-dim tensor at step {step}, "
                            f"got {type(loss).__name__}")
        if not math.isfinite(loss):
            raise ValueError(f"loss: expected a finite value, got {loss!r} at step {step}")
        device = None if self._loss_ema is None else self._loss_ema.device
        return torch.tensor(float(loss), dtype=torch.float32, device=device)

    def _check_plateau(self) -> bool:
        smoothed = self._loss_ema.item()
        if not math.isfinite(smoothed):
            self._loss_ema = None  # a caller that skips the bad steps can carry on
            raise ValueError(f"loss: expected finite values, got a loss EMA of {smoothed} at step "
                             f"{self._steps}: a loss of steps {self._steps - self.check_every + 1} "
                             f"to {self._steps} was non-finite")
        if self._best is None:
            self._best = smoothed
        elif smoothed < self._best - self.min_delta:
            self._best = smoothed
            self._last_improved = self._steps
        if self._steps - self._last_improved < self.patience:
            return False
        self._stage += 1
        self._reset_tracker()
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the EMA stays a tensor on its device)."""
        return {"num_positions": self.num_positions, "num_clusters": self.num_clusters,
                "steps": self._steps, "stage": self._stage, "stage_start": self._stage_start,
                "last_improved": self._last_improved, "best": self._best,
                "loss_ema": None if self._loss_ema is None else self._loss_ema.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_positions", "num_clusters"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict: expected {key}={getattr(self, key)} to match this "
                                 f"curriculum, got {state[key]}")
        self._steps = state["steps"]
        self._stage = state["stage"]
        self._stage_start = state["stage_start"]
        self._last_improved = state["last_improved"]
        self._best = state["best"]
        ema = state["loss_ema"]
        self._loss_ema = None if ema is None else ema.detach().clone()
