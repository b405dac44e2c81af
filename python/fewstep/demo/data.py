"""The demo's datasets: small enough to distill on two CPU cores, real enough to measure.

- ``mixture2d``: a class-conditional 2-D Gaussian mixture (8 modes on a ring plus a ninth in the
  centre, unequal weights and widths), generated on the spot; unlimited held-out data.
- ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes; shipped inside
  scikit-learn, no download), scaled to [-1, 1]; a fixed split holds out a third.

Each dataset gives training data, class labels and two disjoint held-out halves of equal size:
the metric compares generated samples with one half; the *floor* is the same metric between the
two halves — the distance that finite samples of the true distribution already have.
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class Dataset:
    name: str
    train_x: torch.Tensor        # [n, dim] float32
    train_y: torch.Tensor        # [n] int64 class labels
    heldout_x: torch.Tensor      # [2m, dim]: halves [:m] and [m:]
    heldout_y: torch.Tensor      # [2m]
    num_classes: int
    image_shape: tuple[int, ...] | None = None  # for pictures of samples (digits: (8, 8))

    @property
    def dim(self) -> int:
        return self.train_x.shape[1]

    @property
    def eval_size(self) -> int:
        return self.heldout_x.shape[0] // 2

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.eval_size
        return self.heldout_x[:m], self.heldout_x[m:2 * m]

    def eval_labels(self) -> torch.Tensor:
        """Labels of the first held-out half: generated samples use them, so classes match."""
        return self.heldout_y[:self.eval_size]


def _mixture2d_sample(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.cat([torch.stack([angles.cos(), angles.sin()], 1) * 1.6, torch.zeros(1, 2)])
    stds = torch.tensor([0.08, 0.12, 0.08, 0.16, 0.08, 0.12, 0.08, 0.16, 0.25], dtype=torch.float64)
    weights = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 2], dtype=torch.float64)
    y = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=gen)
    x = means[y] + stds[y, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.float(), y


def mixture2d(train_size: int = 20000, eval_size: int = 4000, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = _mixture2d_sample(train_size, gen)
    held_x, held_y = _mixture2d_sample(2 * eval_size, gen)
    return Dataset("mixture2d", train_x, train_y, held_x, held_y, num_classes=9)


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's digits; raises ImportError when scikit-learn is not installed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    held = perm[: 2 * (x.shape[0] // 6)]  # a third held out, in two equal halves
    train = perm[held.numel():]
    return Dataset("digits", x[train], y[train], x[held], y[held], num_classes=10, image_shape=(8, 8))


def sliced_wasserstein2(a: torch.Tensor, b: torch.Tensor, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets [n, dim].

    The root of the mean, over random unit directions, of the squared W2 distance between the 1-D
    projections (which is exact for equal sizes: sort and match). Fixed directions per seed, so two
    calls compare like with like.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein2: expected point sets of equal shape, got {list(a.shape)} "
                         f"and {list(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a.double().cpu() @ dirs).sort(dim=0).values
    pb = (b.double().cpu() @ dirs).sort(dim=0).values
    return float((pa - pb).square().mean().sqrt())


DATASETS = {"mixture2d": mixture2d, "digits": digits}


def load(name: str, seed: int = 0) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {name!r}")
    return DATASETS[name](seed=seed)
