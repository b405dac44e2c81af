"""``fewstep.train.Trainer``: runs any :class:`fewstep.distill.DistillationMethod` (see
docs/training.md for the whole contract).

One step, for each phase in ``method.phases_at(step)``: zero the phase's gradients; for each of
``grad_accum`` micro-batches, the method's loss under autocast and its backward (gradients averaged
across ranks on the last one only); unscale (fp16), clip over ``method.parameters_of(phase)``,
optimizer step, ``method.after_step(phase, step)``, then the phase's EMAs. The micro-batches of a
step are drawn once and shared by its phases. Nothing reads a value back from the device except at
log and checkpoint steps.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from typing import Callable, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from fewstep.distill.base import DistillationMethod
from fewstep.train import checkpoint as ckpt
from fewstep.train import distributed as dd
from fewstep.train.ema import EMA
from fewstep.train.logging import Reporter

MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
OptimizerFactory = Callable[[str, list, float], torch.optim.Optimizer]


def data_seed(seed: int, rank: int) -> int:
    """Seed of the generator handed to a callable ``data`` on ``rank`` (each rank draws its own batches)."""
    return _derived_seed(seed, rank, stream=1)


def _derived_seed(seed: int, rank: int, stream: int) -> int:
    # stream 0: the global RNGs the method draws its noise from; stream 1: the data generator
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729) % (2**63)


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _batch_size(batch: Mapping) -> Optional[int]:
    """Samples in a batch: the leading size of its first tensor ("x0", "noise", then the rest)."""
    for value in [batch.get("x0"), batch.get("noise"), *batch.values(), *dict(batch.get("cond") or {}).values()]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class Trainer:
    """Trains ``method`` for ``max_steps`` steps on ``data``.

    ``data``: an iterable of batches (dicts; restarted when it ends, if it can be), or a callable
    ``data(index, generator) -> batch`` where ``index`` counts the batches drawn so far and
    ``generator`` is a per-rank ``torch.Generator`` on the training device (seed
    :func:`data_seed`); only the callable form resumes exactly from any checkpoint.
    ``optimizers``: None (``torch.optim.AdamW`` per phase), "fused_adamw"
    (``fewstep.optim.FusedAdamW``, folding the EMA of a phase's module into its step) or a factory
    ``(phase, params, lr) -> Optimizer``; ``lr`` a float or ``{phase: lr}``.
    ``ema``: ``{name: (module, decay)}``, EMAs of modules the method trains (read them with
    :meth:`ema_state_dict`). ``parallel``: "auto" (DDP when launched by ``torchrun`` with more
    than one process), "ddp", "fsdp2" or "none". ``frozen``: the method's submodules that training
    never changes, left out of checkpoints (default: its "teacher"). ``seed`` seeds Python's,
    NumPy's and torch's global RNGs (the method's own noise) and the data generator, differently on
    each rank. Logs take the scalar tensors of ``method.loss``'s logs; other values are ignored.
    """

    def __init__(self, method: DistillationMethod, data, *, max_steps: int,
                 optimizers: Union[None, str, OptimizerFactory] = None, lr: Union[float, Mapping[str, float]] = 1e-4,
                 grad_accum: int = 1, clip_grad_norm: Optional[float] = None, mixed_precision: str = "bf16",
                 ema: Optional[Mapping[str, tuple[nn.Module, float]]] = None, log_every: int = 10,
                 checkpoint_every: Optional[int] = None, out_dir: Optional[str] = None, seed: int = 0,
                 progress: bool = True, parallel: str = "auto", device: Union[None, str, torch.device] = None,
                 frozen: Optional[Iterable[str]] = None, ddp_kwargs: Optional[dict] = None):
        if not isinstance(method, DistillationMethod):
            raise TypeError(f"method: expected a fewstep.distill.DistillationMethod, got {type(method).__name__}")
        for name, value, low in (("max_steps", max_steps, 1), ("grad_accum", grad_accum, 1),
                                 ("log_every", log_every, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if checkpoint_every is not None:
            if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
                raise ValueError(f"checkpoint_every: expected None or an int >= 1, got {checkpoint_every!r}")
            if out_dir is None:
                raise ValueError("out_dir: expected a directory for the checkpoints that checkpoint_every asks for, got None")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm: expected None or a positive number, got {clip_grad_norm!r}")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: expected one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")
        if parallel not in dd.PARALLEL_MODES:
            raise ValueError(f"parallel: expected one of {list(dd.PARALLEL_MODES)}, got {parallel!r}")
        if hasattr(data, "__iter__"):
            self._data_fn = None
        elif callable(data):
            self._data_fn = data
        else:
            raise TypeError(f"data: expected an iterable of batches or a callable (index, generator) -> batch, "
                            f"got {type(data).__name__}")

        self.method, self.data, self.max_steps, self.grad_accum = method, data, max_steps, grad_accum
        self.clip_grad_norm, self.log_every, self.checkpoint_every = clip_grad_norm, log_every, checkpoint_every
        self.out_dir, self.seed, self.progress = out_dir, seed, progress
        self.step = 0             # steps completed
        self.batches_drawn = 0    # the callable data's next index, or how far into the iterable

        # processes and devices
        if parallel == "auto":
            parallel = "ddp" if dd.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 else "none"
        if parallel != "none" and not (dd.launched_by_torchrun() or dd.dist.is_initialized()):
            raise RuntimeError(f"parallel: {parallel!r} needs a process group: launch with torchrun "
                               f"(RANK and WORLD_SIZE unset), or use parallel='none'")
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and device.index is None:  # this process's GPU: torchrun's LOCAL_RANK
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        self.device = device
        if parallel != "none":
            dd.init_from_env(self.device)
        self.parallel, self.rank, self.world_size = parallel, dd.rank(), dd.world_size()
        _seed_globals(_derived_seed(seed, self.rank, stream=0))
        self.data_generator = torch.Generator(self.device).manual_seed(data_seed(seed, self.rank))

        method.to(self.device)
        self._children = dict(method.named_children())  # before DDP replaces attributes by wrappers
        self.frozen = self._frozen_children(frozen)
        trainable = {id(p) for phase in method.phases for p in self._phase_params(phase)}
        self._wrapped, self._ddp = {}, {}
        if parallel != "none":
            self._wrapped = dd.parallel_units(method, trainable, exclude=self.frozen)
            self._ddp = dd.wrap(method, self._wrapped, parallel, self.device, ddp_kwargs)
            for follower in getattr(method, "fsdp_followers", dict)().values():  # e.g. an EMA target
                if parallel == "fsdp2":  # sharded like its student, so that it updates shard by shard;
                    # resharded after each (no-grad) forward, else FSDP2 keeps a root's gathered weights
                    # and the next forward would not see the update made to the shards
                    dd.shard_(follower, reshard_after_forward=True)
                else:  # rank 0's copy everywhere, as DDP does for the trained modules
                    dd.broadcast_module_(follower)
        self._params = {phase: self._phase_params(phase) for phase in method.phases}  # FSDP2 made new ones

        self.ema = {name: EMA(name, module, decay) for name, (module, decay) in (ema or {}).items()}
        self._ema_phase = {name: self._phase_holding(e) for name, e in self.ema.items()}
        self.optimizers = {phase: self._make_optimizer(optimizers, phase, self._lr(lr, phase))
                           for phase in method.phases}
        for name, e in self.ema.items():
            e.fold_into(self.optimizers[self._ema_phase[name]])

        self._autocast_dtype = MIXED_PRECISION[mixed_precision]
        self.scalers = ({phase: torch.amp.GradScaler(self.device.type) for phase in method.phases}
                        if mixed_precision == "fp16" else {})
        self._iterator = None
        self._ddp_checked: set[str] = set()
        self._reset_log_window()

    # ---- construction helpers -------------------------------------------------------------
    def _frozen_children(self, frozen) -> tuple[str, ...]:
        names = tuple(frozen) if frozen is not None else tuple(n for n in ("teacher",) if n in self._children)
        for name in names:
            if name not in self._children:
                raise ValueError(f"frozen: expected names of the method's submodules {list(self._children)}, got {name!r}")
        return names

    def _phase_params(self, phase: str) -> list[torch.Tensor]:
        params = list(self.method.parameters_of(phase))
        if not params:
            raise ValueError(f"method.parameters_of({phase!r}): expected trainable parameters, got none")
        owned = {id(p) for p in self.method.parameters()}
        for p in params:
            if id(p) not in owned or not p.requires_grad:
                raise ValueError(f"method.parameters_of({phase!r}): expected parameters of the method that require "
                                 f"grad, got one of shape {list(p.shape)} that "
                                 f"{'does not require grad' if id(p) in owned else 'is not among the method parameters'}")
        saved = {id(p) for name, child in self._children.items() if name not in self.frozen for p in child.parameters()}
        saved |= {id(p) for p in self.method.parameters(recurse=False)}
        if any(id(p) not in saved for p in params):
            raise ValueError(f"frozen: {list(self.frozen)} are neither checkpointed nor wrapped for data parallelism, "
                             f"but phase {phase!r} trains parameters that only they hold; pass frozen=() or the "
                             f"names of untrained submodules")
        return params

    def _lr(self, lr, phase: str) -> float:
        if isinstance(lr, Mapping):
            unknown = set(lr) - set(self.method.phases)
            if unknown or phase not in lr:
                raise ValueError(f"lr: expected a float or a learning rate for each phase {list(self.method.phases)}, "
                                 f"got keys {sorted(lr)}")
            lr = lr[phase]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"lr: expected a non-negative number for phase {phase!r}, got {lr!r}")
        return float(lr)

    def _phase_holding(self, ema: EMA) -> str:
        ids = {id(p) for p in ema.params}
        for phase, params in self._params.items():
            if ids <= {id(p) for p in params}:
                return phase
        raise ValueError(f"ema[{ema.name!r}]: expected a module whose trainable parameters one phase trains "
                         f"(method.parameters_of), got one no single phase of {list(self.method.phases)} covers")

    def _make_optimizer(self, optimizers, phase: str, lr: float) -> torch.optim.Optimizer:
        params = self._params[phase]
        if optimizers is None:
            return torch.optim.AdamW(params, lr=lr)
        if optimizers == "fused_adamw":
            from fewstep.optim import FusedAdamW  # a sibling package, imported only when asked for
            decays = [e.decay for name, e in self.ema.items() if self._ema_phase[name] == phase]
            return FusedAdamW(params, lr=lr, ema_decay=decays[0] if decays else None)
        if callable(optimizers):
            opt = optimizers(phase, params, lr)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizers: expected the factory to return a torch.optim.Optimizer for phase "
                                f"{phase!r}, got {type(opt).__name__}")
            return opt
        raise TypeError(f"optimizers: expected None, 'fused_adamw' or a factory (phase, params, lr) -> Optimizer, "
                        f"got {optimizers!r}")

    # ---- data -----------------------------------------------------------------------------
    def _draw(self):
        """The next raw batch, restarting a re-iterable ``data`` when it ends."""
        index = self.batches_drawn
        if self._data_fn is not None:
            batch = self._data_fn(index, self.data_generator)
        else:
            if self._iterator is None:
                self._iterator = iter(self.data)
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self._iterator is self.data:
                    raise RuntimeError(f"data: the iterator ended after {index} batches, before step "
                                       f"{self.max_steps}; pass an iterable that can restart or a callable") from None
                self._iterator = iter(self.data)  # next epoch
                batch = next(self._iterator, None)
                if batch is None:
                    raise RuntimeError("data: expected batches, got an empty iterable") from None
        self.batches_drawn += 1
        return batch

    def _next_batch(self) -> dict:
        batch = self._draw()
        if not isinstance(batch, Mapping):
            raise TypeError(f"data: expected each batch to be a dict (keys 'x0', 'cond', 'noise'), "
                            f"got {type(batch).__name__} at batch {self.batches_drawn - 1}")
        return _to_device(batch, self.device)

    # ---- training -------------------------------------------------------------------------
    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _train_phase(self, phase: str, batches: list[dict], step: int) -> None:
        optimizer, params, scaler = self.optimizers[phase], self._params[phase], self.scalers.get(phase)
        optimizer.zero_grad(set_to_none=True)
        forwards_before = {name: w.forwards for name, w in self._ddp.items()}
        for i, batch in enumerate(batches):
            with dd.gradient_sync(self._wrapped, self._ddp, self.parallel,
                                  sync=i == len(batches) - 1):
                with self._autocast():
                    loss, logs = self.method.loss(phase, batch, step)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise TypeError(f"method.loss({phase!r}, ...) at step {step}: expected a scalar tensor, got "
                                    f"{type(loss).__name__}{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                if not loss.requires_grad:
                    raise ValueError(f"method.loss({phase!r}, ...) at step {step}: expected a loss that depends on "
                                     f"the phase's parameters, got one that requires no grad")
                micro = loss / self.grad_accum
                (scaler.scale(micro) if scaler is not None else micro).backward()
            self._record(phase, loss, logs, step)
        if self._ddp and phase not in self._ddp_checked:
            self._check_ddp_used(phase, forwards_before)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.clip_grad_norm is not None:
            self._grad_norm[phase] = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.method.after_step(phase, step)
        for name, e in self.ema.items():
            if self._ema_phase[name] == phase:
                e.update()

    def _check_ddp_used(self, phase: str, forwards_before: dict[str, int]) -> None:
        """A method that reaches a wrapped module through another reference (one kept from before the
        wrap, say) trains it without averaging its gradients across ranks: refuse."""
        in_phase = {id(p) for p in self._params[phase]}
        for name, wrapper in self._ddp.items():
            got_grads = any(p.grad is not None for p in self._wrapped[name].parameters() if id(p) in in_phase)
            if got_grads and wrapper.forwards == forwards_before[name]:
                raise RuntimeError(f"parallel='ddp': method.{name} received gradients in phase {phase!r} without a "
                                   f"forward through its DDP wrapper, so they would not be averaged across ranks; "
                                   f"reach it as self.{name} in the loss (not by a reference kept from before the wrap)")
        self._ddp_checked.add(phase)

    def _record(self, phase: str, loss: torch.Tensor, logs: Mapping[str, torch.Tensor], step: int) -> None:
        """Sums losses and logs on the device for the next log step (no host sync here)."""
        loss = loss.detach().float()
        sums = self._sums.setdefault(phase, {})
        for key, value in {"loss": loss, **{k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}}.items():
            value = value.detach().float().mean() / self.grad_accum
            sums[key] = sums[key] + value if key in sums else value
        first = self._first_nonfinite.get(phase)
        if first is None:
            first = torch.full((), -1, dtype=torch.int64, device=loss.device)
        self._first_nonfinite[phase] = first.masked_fill(~torch.isfinite(loss) & (first < 0), step)

    def _reset_log_window(self) -> None:
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._phase_steps: dict[str, int] = {}
        self._grad_norm: dict[str, torch.Tensor] = {}
        self._first_nonfinite: dict[str, torch.Tensor] = {}
        self._samples = 0
        self._window_start = time.perf_counter()

    def train_step(self) -> list[str]:
        """One step (every phase of ``method.phases_at(step)``), without logging or checkpointing;
        returns the phases trained. :meth:`train` calls it ``max_steps`` times."""
        step = self.step
        batches = [self._next_batch() for _ in range(self.grad_accum)]
        self._samples += sum(_batch_size(b) or 0 for b in batches) * self.world_size
        self._grad_norm = {}
        phases = list(self.method.phases_at(step))
        for phase in phases:
            self.method.check_phase(phase)
            self._train_phase(phase, batches, step)
            self._phase_steps[phase] = self._phase_steps.get(phase, 0) + 1
        self.step += 1
        return phases

    def train(self) -> "Trainer":
        """Runs from the current step (0, or where :meth:`resume` left it) to ``max_steps``."""
        reporter = Reporter(self.out_dir, self.max_steps, self.step, self.progress) if self.rank == 0 else None
        if self.out_dir is not None and self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
        try:
            while self.step < self.max_steps:
                phases = self.train_step()
                if reporter is not None:
                    reporter.advance()
                done = self.step == self.max_steps
                if self.step % self.log_every == 0 or done:
                    self._log(reporter, phases)
                if self.checkpoint_every is not None and (self.step % self.checkpoint_every == 0 or done):
                    self.save_checkpoint()
        finally:
            if reporter is not None:
                reporter.close()
        return self

    def _check_finite(self, values: dict[str, int]) -> None:
        for phase, first in values.items():
            if first >= 0:
                raise FloatingPointError(f"method.loss({phase!r}, ...): the loss is not finite (NaN or inf) at "
                                         f"step {first}; training stopped before writing that state")

    def _log(self, reporter: Optional[Reporter], last_phases: list[str]) -> None:
        norms = {}
        for phase in last_phases:
            norm = self._grad_norm.get(phase)
            if norm is None:  # not clipped: the norm is computed only here, at log steps
                grads = [p.grad for p in self._params[phase] if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if norm is not None:
                norms[phase] = dd.full_tensor(norm)
        keys = [(phase, key) for phase, sums in self._sums.items() for key in sums]
        flags = list(self._first_nonfinite)
        packed = torch.stack([self._sums[p][k] / self._phase_steps[p] for p, k in keys]
                             + [norms[p].float() for p in norms] + [f.float() for f in self._first_nonfinite.values()])
        host = packed.tolist()  # the one device read of the window
        self._check_finite({p: int(v) for p, v in zip(flags, host[len(keys) + len(norms):])})
        seconds = time.perf_counter() - self._window_start
        record = {"step": self.step, "phases": {}, "seconds": seconds,
                  "samples_per_s": self._samples / seconds if self._samples else None}
        for (phase, key), value in zip(keys, host):
            record["phases"].setdefault(phase, {})[key] = value
        for phase, value in zip(norms, host[len(keys):]):
            record["phases"].setdefault(phase, {})["grad_norm"] = value
        for phase in record["phases"]:
            record["phases"][phase]["lr"] = self.optimizers[phase].param_groups[0]["lr"]
        if reporter is not None:
            reporter.log(record)
        self.last_log = record
        self._reset_log_window()

    # ---- weights ---------------------------------------------------------------------------
    def _model_state(self) -> dict[str, torch.Tensor]:
        """The method's weights and buffers by their unwrapped names, frozen submodules left out and
        a tensor held by two submodules (a LoRA student and its teacher) kept once, under its first
        name (live tensors: FSDP2 shards as DTensors)."""
        out, seen = {}, set()
        for key, tensor in self.method.state_dict().items():
            if key.partition(".")[0] in self.frozen:
                continue
            for path in self._ddp:  # "student.module.w" -> "student.w"
                if key.startswith(f"{path}.module."):
                    key = f"{path}.{key[len(path) + len('.module.'):]}"
            local = dd.local_tensor(tensor)
            alias = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.dtype)
            if local.numel() and alias in seen:
                continue
            seen.add(alias)
            out[key] = tensor
        return out

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's trained weights and buffers, whole (a collective under FSDP2: every rank calls it)."""
        return {k: dd.full_tensor(v) for k, v in self._model_state().items()}

    def ema_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """EMA weights of ``ema[name]`` by the module's parameter names (a collective under FSDP2)."""
        if name not in self.ema:
            raise KeyError(f"name: expected one of the trainer's EMAs {list(self.ema)}, got {name!r}")
        return self.ema[name].state_dict()

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Optional[str]:
        """Writes ``out_dir/checkpoint-<step>`` (rank 0) and points ``latest`` at it; every rank calls it."""
        if self.out_dir is None:
            raise ValueError("out_dir: expected a directory to write the checkpoint in, got None")
        if self._first_nonfinite:
            self._check_finite({p: int(f) for p, f in self._first_nonfinite.items()})
        model = self.model_state_dict()
        ema = {f"{name}/{key}": v for name, e in self.ema.items() for key, v in e.state_dict().items()}
        optimizers = {phase: self._optimizer_state(phase) for phase in self.optimizers}
        scalers = {phase: s.state_dict() for phase, s in self.scalers.items()}
        rng = dd.gather_to_all(ckpt.rng_state(self.data_generator))
        path = None
        if self.rank == 0:
            path = ckpt.write_checkpoint(self.out_dir, self.step, {
                "model.safetensors": model, "ema.safetensors": ema,
                "optimizers.pt": {"optimizers": optimizers, "scalers": scalers}, "rng.pt": rng,
                "trainer.json": {"step": self.step, "batches_drawn": self.batches_drawn,
                                 "world_size": self.world_size, "seed": self.seed}})
        dd.barrier()
        return path

    def _optimizer_state(self, phase: str) -> dict:
        if self.parallel != "fsdp2":
            return self.optimizers[phase].state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.method, self.optimizers[phase],
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, phase: str, state: dict) -> None:
        if self.parallel != "fsdp2":
            self.optimizers[phase].load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.method, self.optimizers[phase], optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    @torch.no_grad()
    def resume(self, path: str = "latest") -> "Trainer":
        """Restores a checkpoint (a directory, or "latest" in ``out_dir``): weights, EMAs, optimizer and
        scaler states, RNG states and the data position; :meth:`train` then continues from its step."""
        path = ckpt.resolve(path, self.out_dir)
        meta = ckpt.read(path, "trainer.json")
        saved = ckpt.read(path, "model.safetensors")
        live = self._model_state()
        if set(saved) != set(live):
            raise KeyError(f"path: checkpoint {path} does not fit this method: missing {sorted(set(live) - set(saved))}, "
                           f"unexpected {sorted(set(saved) - set(live))}")
        for key, tensor in live.items():
            dd.local_tensor(tensor).copy_(dd.shard_like(saved[key], tensor))
        states = ckpt.read(path, "optimizers.pt")
        for phase, state in states["optimizers"].items():
            self._load_optimizer_state(phase, state)
        for phase, state in states["scalers"].items():
            self.scalers[phase].load_state_dict(state)
        ema = ckpt.read(path, "ema.safetensors")
        for name, e in self.ema.items():
            if e.folded:  # the optimizer's load made new EMA tensors: follow them
                e.fold_into(self.optimizers[self._ema_phase[name]])
            prefix = f"{name}/"
            e.load_state_dict({k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)})
        rng = ckpt.read(path, "rng.pt")
        if len(rng) == self.world_size:
            ckpt.set_rng_state(rng[self.rank], self.data_generator)
        else:
            warnings.warn(f"resume: checkpoint {path} was written by {len(rng)} processes, this run has "
                          f"{self.world_size}; RNG streams restart from seeds derived from the step", stacklevel=2)
            _seed_globals(_derived_seed(self.seed + meta["step"], self.rank, stream=0))
            self.data_generator.manual_seed(data_seed(self.seed + meta["step"], self.rank))
        self.step, self.batches_drawn = meta["step"], meta["batches_drawn"]
        if self._data_fn is None:  # an iterable: skip what was consumed (exact for a deterministic one)
            self._iterator, self.batches_drawn = None, 0
            while self.batches_drawn < meta["batches_drawn"]:
                self._draw()
        self._reset_log_window()
        return self
