"""The demo's datasets: small enough to distill on two CPU cores, real enough to measure.

- ``mixture2d``: a 2-D Gaussian mixture (8 modes on a ring plus a ninth in the centre, unequal
  weights and widths) with 3 classes — the even ring modes, the odd ones, the centre — so a class
  is itself multimodal and one denoising step (its conditional mean) cannot reach it; generated
  on the spot, unlimited held-out data.
- ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes; shipped inside
  scikit-learn, no download), scaled to [-1, 1]; a fixed split holds out a third.

Each dataset gives training data, class labels and two disjoint held-out halves of equal size with
the same class counts: the metric compares generated samples (drawn with the first half's labels)
with the first half; the *floor* is the same metric between the two halves — the distance that
finite samples of the true distribution, class counts matched, already have.
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


_ANGLES = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
_MEANS = torch.cat([torch.stack([_ANGLES.cos(), _ANGLES.sin()], 1) * 1.6, torch.zeros(1, 2, dtype=torch.float64)])
_STDS = torch.tensor([0.08, 0.12, 0.08, 0.16, 0.08, 0.12, 0.08, 0.16, 0.25], dtype=torch.float64)
_WEIGHTS = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 2], dtype=torch.float64)
_CLASS_OF_MODE = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2])


def _mixture2d_modes(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(_WEIGHTS / _WEIGHTS.sum(), n, replacement=True, generator=gen)


def _mixture2d_points(modes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(modes.shape[0], 2, generator=gen, dtype=torch.float64)
    return (_MEANS[modes] + _STDS[modes, None] * noise).float()


def mixture2d(train_size: int = 20000, eval_size: int = 10000, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    train_modes = _mixture2d_modes(train_size, gen)
    # Both held-out halves draw the same modes (so the same classes), with fresh points.
    held_modes = _mixture2d_modes(eval_size, gen).repeat(2)
    return Dataset("mixture2d", _mixture2d_points(train_modes, gen), _CLASS_OF_MODE[train_modes],
                   _mixture2d_points(held_modes, gen), _CLASS_OF_MODE[held_modes], num_classes=3)


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's digits; raises ImportError when scikit-learn is not installed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    # A third held out, class by class in pairs, so both halves have the same class counts.
    halves, train = ([], []), []
    for c in range(10):
        members = perm[y[perm] == c]
        pairs = members.shape[0] // 6
        halves[0].append(members[:pairs])
        halves[1].append(members[pairs:2 * pairs])
        train.append(members[2 * pairs:])
    held = torch.cat([torch.cat(halves[0]), torch.cat(halves[1])])
    train = torch.cat(train)
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
