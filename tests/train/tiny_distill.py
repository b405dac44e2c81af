"""A tiny two-phase DistillationMethod for the trainer's tests, and a script that trains it (run in a
subprocess or under torchrun by tests/train/test_trainer*.py).

The student (an MLP on (x_t, t)) regresses onto a fixed random teacher MLP, pulled slightly toward
a method-owned target network that ``after_step`` moves by EMA; a critic (a linear map on the
student's outputs) trains every other step, so the two phases have different schedules.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import signal
import sys

import torch
from torch import nn
from torch.nn import functional as F

import fewstep
import fewstep.train
from fewstep.distill import DistillationMethod

DIM, HIDDEN = 5, 12
SEED = 7  # the trainer's seed, from which each rank's data generator is seeded


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM + 1, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))


class TinyDistill(DistillationMethod):
    phases = ("student", "critic")

    def __init__(self, with_target: bool = True):
        super().__init__()
        self.teacher = mlp().requires_grad_(False)
        self.student = mlp()
        self.critic = nn.Linear(DIM, 1)
        self.target = copy.deepcopy(self.student).requires_grad_(False) if with_target else None
        self.register_buffer("target_updates", torch.zeros((), dtype=torch.int64))

    def phases_at(self, step):
        return self.phases if step % 2 == 0 else ("student",)

    def parameters_of(self, phase):
        self.check_phase(phase)
        return list((self.student if phase == "student" else self.critic).parameters())

    def loss(self, phase, batch, step):
        x0 = batch["x0"]
        noise = batch["noise"] if "noise" in batch else torch.randn_like(x0)   # global RNG: resume restores it
        t = batch["t"] if "t" in batch else torch.rand(x0.shape[0], 1, device=x0.device)
        x_t = (1 - t) * x0 + t * noise
        inp = torch.cat([x_t, t], dim=1)
        if phase == "student":
            pred = self.student(inp)
            mse = F.mse_loss(pred.float(), self.teacher(inp).float())
            loss = mse if self.target is None else mse + 0.1 * F.mse_loss(pred.float(), self.target(inp).float())
            return loss, {"mse": mse.detach()}
        with torch.no_grad():
            fake = self.student(inp)
        score = self.critic(fake).squeeze(1).float()
        return F.mse_loss(score, x0.pow(2).sum(1)), {}

    def fsdp_followers(self):
        return {} if self.target is None else {"target": self.target}

    def after_step(self, phase, step):
        if phase == "student" and self.target is not None:
            fewstep.ema_update_(self.target.parameters(), self.student.parameters(), 0.8)
            self.target_updates += 1

    @torch.no_grad()
    def sample(self, noise, steps=1, **cond):
        t = torch.ones(noise.shape[0], 1, device=noise.device)
        return self.student(torch.cat([noise, t], dim=1))


def make_data(batch: int, kill_at: int | None = None, ranks_in_one: int = 1):
    """Callable data: x0, noise and t from the trainer's generator. ``ranks_in_one`` > 1 makes one
    process's batch the concatenation of what ranks 0.. would draw (the DDP equivalence test);
    ``kill_at`` SIGKILLs the process when that batch is asked for (a crash after a checkpoint)."""
    own = []  # made on the first call, on the trainer's device: CPU and CUDA generators draw differently

    def draw(gen):
        return {"x0": torch.randn(batch, DIM, generator=gen, device=gen.device) * 0.7 + 0.3,
                "noise": torch.randn(batch, DIM, generator=gen, device=gen.device),
                "t": torch.rand(batch, 1, generator=gen, device=gen.device)}

    def data(index, generator):
        if index == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if ranks_in_one == 1:
            return draw(generator)
        if not own:
            own.extend(torch.Generator(generator.device).manual_seed(fewstep.train.data_seed(SEED, r))
                       for r in range(ranks_in_one))
        parts = [draw(g) for g in own]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return data


def build(args, parallel: str) -> fewstep.train.Trainer:
    torch.manual_seed(1234)  # the same initial weights in every process
    method = TinyDistill(with_target=not args.no_target)
    return fewstep.train.Trainer(
        method, make_data(args.batch, args.kill_at, args.ranks_in_one), max_steps=args.steps,
        grad_accum=args.grad_accum, clip_grad_norm=1.0, mixed_precision=args.mixed_precision,
        lr={"student": 3e-3, "critic": 1e-2}, ema={"student": (method.student, 0.9)}, log_every=2,
        checkpoint_every=args.checkpoint_every, out_dir=os.path.join(args.out, parallel), seed=SEED, progress=False,
        parallel=parallel)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="each run writes into OUT/<parallel>")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--ranks-in-one", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--parallel", default="auto", help="modes to run one after the other, comma-separated")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-target", action="store_true", help="no EMA target network")
    args = parser.parse_args(argv)
    for parallel in args.parallel.split(","):
        trainer = build(args, parallel)
        if args.resume:
            trainer.resume("latest")
        trainer.train()
        # every rank writes what it holds, so the test can compare ranks
        weights = {k: v.detach().clone() for k, v in trainer.model_state_dict().items()}
        weights.update({f"ema/{k}": v for k, v in trainer.ema_state_dict("student").items()})
        torch.save(weights, os.path.join(trainer.out_dir, f"weights-rank{trainer.rank}.pt"))
        # FSDP2 modules alive at interpreter exit made gloo abort the process in ~1 of 15 runs
        # ("terminate called without an active exception"): free them while the group exists.
        del trainer, weights
        gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
