"""Data parallelism for the trainer: process group from ``torchrun``'s environment, DDP or FSDP2
wrapping of a method's trainable submodules, and the few collectives the trainer needs."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fewstep.denoiser import Denoiser

PARALLEL_MODES = ("auto", "ddp", "fsdp2", "none")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: torch.device) -> None:
    """Joins the process group ``torchrun`` describes (gloo for CPU, nccl for CUDA), once."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_to_all(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_(module: nn.Module) -> None:
    """Gives every rank rank 0's parameters and buffers (FSDP2 shards what each rank holds, so the
    ranks must start equal; DDP does this itself)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor, src=0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank calls it); ``t`` otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (what its optimizer and EMA update); ``t`` otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class _DDP(DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped module (methods read e.g.
    ``self.student.config``) and counts its forwards, so the trainer can tell a method that
    bypasses the wrapper (its gradients would then never be averaged across ranks)."""

    def __init__(self, module: nn.Module, **kwargs):
        super().__init__(module, **kwargs)
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return super().forward(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def parallel_units(method: nn.Module, trainable: set[int], exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """What gets wrapped for data parallelism, by dotted path: each direct submodule of the method
    that holds trainable parameters (ids in ``trainable``), except those in ``exclude``; for a
    ``fewstep.Denoiser`` its inner ``model``, whose output is a plain tensor that DDP and FSDP2
    can follow (a Denoiser returns a ``Prediction``)."""
    direct = [name for name, p in method.named_parameters(recurse=False) if id(p) in trainable]
    if direct:
        raise ValueError(f"method: data parallel training wraps submodules, but the method holds trainable "
                         f"parameters {direct} directly; move them into a submodule")
    units = {}
    for name, child in method.named_children():
        if name in exclude or not any(id(p) in trainable for p in child.parameters()):
            continue
        if isinstance(child, Denoiser) and isinstance(child.model, nn.Module):
            units[f"{name}.model"] = child.model
        else:
            units[name] = child
    return units


def wrap(method: nn.Module, units: dict[str, nn.Module], mode: str, device: torch.device,
         ddp_kwargs: dict | None = None) -> dict[str, nn.Module]:
    """Wraps ``units`` (dotted paths in ``method``) for ``mode``: "ddp" replaces each attribute by
    its DDP wrapper, "fsdp2" shards each in place with ``fully_shard``. Returns the DDP wrappers."""
    wrappers = {}
    for path, unit in units.items():
        if mode == "ddp":
            parent_path, _, attr = path.rpartition(".")
            ids = [device.index] if device.type == "cuda" else None
            wrappers[path] = _DDP(unit, device_ids=ids, **(ddp_kwargs or {}))
            setattr(method.get_submodule(parent_path), attr, wrappers[path])
        elif mode == "fsdp2":
            shard_(unit)
    return wrappers


def shard_(module: nn.Module, reshard_after_forward: Optional[bool] = None) -> None:
    """Rank 0's weights on every rank, then sharded in place with FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard
    broadcast_module_(module)
    fully_shard(module, reshard_after_forward=reshard_after_forward)


def gradient_sync(units: dict[str, nn.Module], ddp_wrappers: dict[str, nn.Module], mode: str,
                  sync: bool) -> contextlib.AbstractContextManager:
    """A context in which backward passes average gradients across ranks only when ``sync`` (the
    last micro-batch of an accumulation), so accumulation communicates once per step."""
    stack = contextlib.ExitStack()
    if mode == "ddp" and not sync:
        for wrapper in ddp_wrappers.values():
            stack.enter_context(wrapper.no_sync())
    elif mode == "fsdp2":
        for unit in units.values():
            unit.set_requires_gradient_sync(sync)
    return stack


def gather_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor from this rank's ``local`` part laid out like the FSDP2 parameter ``param``
    (a collective); ``local`` itself for a plain parameter."""
    if not hasattr(param, "full_tensor"):
        return local
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor()


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` for the FSDP2 parameter ``param``; ``whole`` for a plain one."""
    if not hasattr(param, "full_tensor"):
        return whole
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements).to_local()
