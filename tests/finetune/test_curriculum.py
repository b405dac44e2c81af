"""Timestep curriculum: cluster order, pacing, SNR-quantile sigma clusters, resume, lazy readback."""
from __future__ import annotations

import io

import pytest
import torch
from fewstep.finetune.curriculum import TimestepCurriculum


def _karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _run_flat(curriculum: TimestepCurriculum, steps: int) -> list[int]:
    """Feed a constant loss; return the (1-based) steps at which a cluster was unlocked."""
    return [step for step in range(1, steps + 1) if curriculum.update(1.0)]


def test_first_stage_samples_only_the_highest_timestep_cluster():
    curriculum = TimestepCurriculum(1000, num_clusters=20)
    t = curriculum.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (20_000,)
    assert (curriculum.stage, curriculum.low, curriculum.high) == (1, 950, 1000)
    assert (t.min().item(), t.max().item()) == (950, 999)


def test_clusters_unlock_from_high_to_low_timesteps_every_patience_steps_of_a_flat_loss():
    curriculum = TimestepCurriculum(1000, num_clusters=20, patience=40)  # checks every 10 steps
    ranges = [(curriculum.low, curriculum.high)]
    unlocked_at = []
    for step in range(1, 20 * 40 + 1):
        if curriculum.update(1.0):
            unlocked_at.append(step)
            ranges.append((curriculum.low, curriculum.high))
    assert unlocked_at == [40 * k for k in range(1, 20)]
    assert ranges == [(1000 - 50 * k, 1000) for k in range(1, 21)]
    assert curriculum.done and curriculum.stage == 20


def test_a_loss_that_keeps_improving_never_unlocks():
    curriculum = TimestepCurriculum(1000, num_clusters=20, patience=50)
    assert not any(curriculum.update(torch.tensor(1.0 / step)) for step in range(1, 2001))
    assert curriculum.stage == 1


def test_patience_counts_from_the_last_check_that_saw_an_improvement():
    # No smoothing so the readings are exact: improving until step 120, flat afterwards.
    curriculum = TimestepCurriculum(1000, 20, patience=100, ema=0.0, check_every=25)
    losses = [1.0 / min(step, 120) for step in range(1, 400)]
    unlocked_at = [step for step, loss in enumerate(losses, 1) if curriculum.update(loss)]
    # Check at 125 still sees the drop from step 100; the window then ends 100 steps later.
    assert unlocked_at[0] == 225


def test_improvements_smaller_than_min_delta_do_not_count():
    curriculum = TimestepCurriculum(1000, 20, patience=40, ema=0.0, min_delta=1e-3, check_every=10)
    unlocked_at = [step for step in range(1, 41) if curriculum.update(1.0 - 1e-5 * step)]
    assert unlocked_at == [40]


def test_flat_loss_unlocks_at_the_first_check_after_patience():
    curriculum = TimestepCurriculum(1000, 20, patience=100, check_every=30)
    assert _run_flat(curriculum, 240) == [120, 240]


def test_after_all_stages_the_full_range_is_sampled():
    curriculum = TimestepCurriculum(1000, num_clusters=4, patience=8)
    assert _run_flat(curriculum, 100) == [8, 16, 24]
    assert curriculum.done and (curriculum.low, curriculum.high) == (0, 1000)
    t = curriculum.sample(50_000, generator=torch.Generator().manual_seed(1))
    assert (t.min().item(), t.max().item()) == (0, 999)
    assert curriculum.stage == 4 and curriculum.steps == 100


def test_uneven_cluster_sizes_differ_by_at_most_one():
    curriculum = TimestepCurriculum(10, num_clusters=3, patience=1)  # unlocks at every step
    lows = [curriculum.low]
    for _ in range(2):
        assert curriculum.update(1.0)
        lows.append(curriculum.low)
    assert lows == [6, 3, 0]


def test_a_single_cluster_is_the_full_range_from_the_start():
    curriculum = TimestepCurriculum(1000, num_clusters=1)
    assert curriculum.done and (curriculum.low, curriculum.high) == (0, 1000)
    assert not curriculum.update(1.0)


@pytest.mark.parametrize("descending", [False, True])
def test_sigma_grid_clusters_are_snr_quantiles_with_lowest_snr_first(descending):
    sigmas = _karras_sigmas(1000)  # rho=7: very uneven spacing in sigma
    if not descending:
        sigmas = sigmas.flip(0)
    snr = sigmas.pow(-2)
    curriculum = TimestepCurriculum(num_clusters=10, patience=4, sigmas=sigmas)
    generator = torch.Generator().manual_seed(2)
    for stage in range(1, 11):
        assert curriculum.stage == stage
        unlocked = torch.zeros(1000, dtype=torch.bool)
        unlocked[curriculum.low:curriculum.high] = True
        # The unlocked positions are exactly the stage/10 share of the grid with the lowest SNR.
        assert unlocked.sum() == 100 * stage
        assert snr[unlocked].max() <= torch.quantile(snr, stage / 10)
        if stage < 10:
            assert snr[unlocked].max() < snr[~unlocked].min()
        drawn = curriculum.sample(5000, generator=generator)
        assert drawn.min() >= curriculum.low and drawn.max() < curriculum.high
        _run_flat(curriculum, 4)
    assert curriculum.done and (curriculum.low, curriculum.high) == (0, 1000)


def test_flow_sigma_grid_starts_at_the_noisiest_levels():
    sigmas = torch.linspace(1.0, 1e-3, 1000)  # flow matching: SNR = ((1 - sigma) / sigma)^2
    curriculum = TimestepCurriculum(num_clusters=20, sigmas=sigmas, num_train_timesteps=7)
    assert (curriculum.low, curriculum.high) == (0, 50)
    assert sigmas[curriculum.sample(1000)].min() >= sigmas[49]


def _noisy_losses(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(1.0 + 0.1 * torch.randn(n, generator=generator))


def test_state_dict_round_trip_continues_identically():
    original = TimestepCurriculum(1000, num_clusters=8, patience=20, ema=0.9)
    for loss in _noisy_losses(137, seed=0):  # stop mid-stage, between checks
        original.update(loss)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = TimestepCurriculum(1000, num_clusters=8, patience=20, ema=0.9)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for loss in _noisy_losses(400, seed=1):
        assert original.update(loss) == resumed.update(loss)
        assert torch.equal(original.sample(16, generator=gen_a), resumed.sample(16, generator=gen_b))
        assert (original.stage, original.steps) == (resumed.stage, resumed.steps)
    assert original.stage > 1


def test_load_state_dict_rejects_a_different_layout():
    state = TimestepCurriculum(1000, num_clusters=8).state_dict()
    with pytest.raises(ValueError, match=r"state_dict: expected num_clusters=10 .*, got 8"):
        TimestepCurriculum(1000, num_clusters=10).load_state_dict(state)


def test_tensor_losses_are_read_back_only_at_checks(monkeypatch):
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    curriculum = TimestepCurriculum(1000, 20, patience=200, check_every=50)
    for step in range(1, 1001):
        curriculum.update(torch.tensor(1.0))
        assert len(reads) == step // 50


def test_tensor_losses_between_checks_need_no_readback_of_any_kind():
    # A meta tensor has no data: item(), float(), bool() or tolist() on it would raise.
    curriculum = TimestepCurriculum(1000, 20, patience=200, check_every=50)
    for _ in range(49):
        assert not curriculum.update(torch.tensor(1.0, device="meta"))
    with pytest.raises(RuntimeError, match="meta"):
        curriculum.update(torch.tensor(1.0, device="meta"))  # step 50 is a check


def test_non_finite_float_loss_raises_naming_the_step():
    curriculum = TimestepCurriculum()
    curriculum.update(1.0)
    curriculum.update(1.0)
    with pytest.raises(ValueError, match=r"loss: expected a finite value, got nan at step 3"):
        curriculum.update(float("nan"))


def test_non_finite_tensor_loss_raises_at_the_next_check_naming_the_steps():
    curriculum = TimestepCurriculum(1000, 20, patience=40, check_every=10)
    for _ in range(12):
        curriculum.update(torch.tensor(1.0))
    curriculum.update(torch.tensor(float("inf")))
    for _ in range(6):
        curriculum.update(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"loss EMA of (inf|nan) at step 20: a loss of steps 11 to 20"):
        curriculum.update(torch.tensor(1.0))
    curriculum.update(torch.tensor(1.0))  # the EMA restarted, so training can carry on
    assert curriculum.stage == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"num_clusters": 0}, r"num_clusters: expected an int >= 1, got 0"),
    ({"num_clusters": 1001}, r"num_clusters: expected at most 1000 .*, got 1001"),
    ({"num_train_timesteps": 0}, r"num_train_timesteps: expected an int >= 1, got 0"),
    ({"patience": 0}, r"patience: expected an int >= 1, got 0"),
    ({"patience": 2.5}, r"patience: expected an int >= 1, got 2\.5"),
    ({"ema": 1.0}, r"ema: expected a number in \[0, 1\), got 1\.0"),
    ({"ema": -0.1}, r"ema: expected a number in \[0, 1\), got -0\.1"),
    ({"min_delta": -1.0}, r"min_delta: expected a finite number >= 0, got -1\.0"),
    ({"check_every": 0}, r"check_every: expected an int >= 1, got 0"),
    ({"sigmas": torch.ones(2, 3)}, r"sigmas: expected a 1-D floating-point tensor .*, got shape \[2, 3\]"),
    ({"sigmas": torch.tensor([3.0, 1.0, 2.0])}, r"sigmas: expected a strictly ascending or strictly"),
    ({"sigmas": torch.tensor([1.0, 1.0, 2.0])}, r"sigmas: expected a strictly ascending or strictly"),
    ({"sigmas": torch.tensor([-1.0, 1.0])}, r"sigmas: expected finite values >= 0, got min -1\.0"),
    ({"sigmas": torch.tensor([1.0, float("inf")])}, r"sigmas: expected finite values >= 0"),
    ({"sigmas": torch.linspace(1, 2, 5), "num_clusters": 6}, r"num_clusters: expected at most 5"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimestepCurriculum(**kwargs)


def test_bad_losses_raise_naming_the_step():
    curriculum = TimestepCurriculum()
    with pytest.raises(ValueError, match=r"loss: expected a float or a 0-dim tensor at step 1, got a "
                                         r"tensor of shape \[2\]"):
        curriculum.update(torch.ones(2))
    with pytest.raises(TypeError, match=r"loss: expected a float or a 0-dim tensor at step 1, got str"):
        curriculum.update("1.0")
    assert curriculum.steps == 0  # rejected calls are not counted
