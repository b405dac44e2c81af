"""Checkpoint files: written into a temporary directory and moved into place with ``os.replace``, so
a run killed mid-write never leaves a half checkpoint under a final name; ``latest`` is a one-line
file naming the newest complete checkpoint, replaced the same way.

``out_dir/checkpoint-<step>/``:
  ``model.safetensors``   the method's weights and buffers (its frozen teacher left out)
  ``ema.safetensors``     the trainer's EMA weights, keys ``<ema name>/<parameter name>``
  ``optimizers.pt``       per phase: optimizer state and the fp16 GradScaler's state
  ``rng.pt``              per rank: python, numpy, torch CPU, CUDA and data-generator RNG states
  ``trainer.json``        step, batches drawn, world size
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import safetensors.torch
import torch

LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def save_weights(tensors: dict[str, torch.Tensor], path: str) -> None:
    # copies on the host: safetensors refuses tensors that share memory (tied or LoRA base weights)
    safetensors.torch.save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}, path)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def write_checkpoint(out_dir: str, step: int, files: dict[str, object]) -> str:
    """Writes ``files`` (name -> dict of tensors for ``.safetensors``, JSON-able for ``.json``,
    anything ``torch.save`` takes otherwise) as ``out_dir/checkpoint-<step>`` and points ``latest``
    at it. Returns the checkpoint's path."""
    final = os.path.join(out_dir, checkpoint_name(step))
    tmp = os.path.join(out_dir, f".tmp-{checkpoint_name(step)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, content in files.items():
        path = os.path.join(tmp, name)
        if name.endswith(".safetensors"):
            save_weights(content, path)
        elif name.endswith(".json"):
            with open(path, "w") as f:
                json.dump(content, f)
        else:
            torch.save(content, path)
    if os.path.exists(final):  # a rerun of the same step: the old copy goes only once the new one is whole
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _write_atomically(os.path.join(out_dir, LATEST), checkpoint_name(step) + "\n")
    return final


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve(path: str, out_dir: str | None) -> str:
    """The checkpoint directory ``path`` names: a directory, or "latest" (in ``out_dir``)."""
    if path == LATEST:
        if out_dir is None:
            raise ValueError("path: 'latest' needs the trainer's out_dir, got out_dir=None")
        pointer = os.path.join(out_dir, LATEST)
        if not os.path.isfile(pointer):
            raise FileNotFoundError(f"path: expected a checkpoint pointer at {pointer}, found none "
                                    f"(no checkpoint written in {out_dir} yet)")
        with open(pointer) as f:
            path = os.path.join(out_dir, f.read().strip())
    if not os.path.isfile(os.path.join(path, "trainer.json")):
        raise FileNotFoundError(f"path: expected a checkpoint directory containing trainer.json, got {path!r}")
    return path


def read(path: str, name: str):
    full = os.path.join(path, name)
    if name.endswith(".safetensors"):
        return load_weights(full)
    if name.endswith(".json"):
        with open(full) as f:
            return json.load(f)
    return torch.load(full, map_location="cpu", weights_only=True)


def rng_state(data_generator: torch.Generator) -> dict:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` reads back."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": data_generator.get_state()}


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])
