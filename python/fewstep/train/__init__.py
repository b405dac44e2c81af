"""Training: :class:`Trainer` runs any :class:`fewstep.distill.DistillationMethod` (mixed precision,
gradient accumulation and clipping, EMA, JSONL logs, atomic checkpoints with exact resume, DDP and
FSDP2 through ``torchrun``). See docs/training.md."""
from fewstep.train.ema import fold_ema
from fewstep.train.trainer import Trainer, data_seed

__all__ = ["Trainer", "data_seed", "fold_ema"]
