"""What the trainer shows and records at log steps: a progress bar with the latest losses (tqdm
when installed, else one printed line per log step) and ``out_dir/log.jsonl``, one JSON object
per log step."""
from __future__ import annotations

import importlib.util
import json
import os
import sys


def _format(record: dict) -> str:
    parts = [f"{phase}/{key} {value:.4g}" for phase, values in record["phases"].items()
             for key, value in values.items() if key != "lr"]
    if record.get("samples_per_s") is not None:
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
    return "  ".join(parts)


class Reporter:
    """Progress display and JSONL log of one process (the trainer makes it on rank 0 only)."""

    def __init__(self, out_dir: str | None, total: int, initial: int, progress: bool):
        self.log_path = os.path.join(out_dir, "log.jsonl") if out_dir else None
        self.bar = None
        self.print_lines = False
        if progress:
            if importlib.util.find_spec("tqdm") is not None:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="fewstep train", dynamic_ncols=True)
            else:
                self.print_lines = True
        self.total = total

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, record: dict) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix_str(_format(record), refresh=False)
        elif self.print_lines:
            print(f"step {record['step']}/{self.total}  {_format(record)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
