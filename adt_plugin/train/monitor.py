"""What a run shows: a tqdm bar, TensorBoard scalars and images, and scalars.jsonl.

Only the main process writes. scalars.jsonl (one JSON object per logged step)
is always written, so a run can be read back without TensorBoard; it is strict
JSON: a NaN or infinite value is written as null (TensorBoard gets the value).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping, Optional

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# shown on the bar; `ft_steps`: the compute spent so far (this run and what it resumed), in
# plain fine-tuning steps (denoiser forward-equivalents / 3, strategies/base.py `Cost`)
POSTFIX = {"loss/diff": "loss", "loss/D": "D", "D/real": "real", "D/fake": "fake", "cost/total_ft_steps": "ft_steps"}


class Monitor:
    def __init__(self, log_dir: Path, total: int, initial: int, main: bool, tensorboard: bool, echo=print):
        self.main = main
        self.echo = echo
        self.writer = None
        self.jsonl = None
        self.bar = tqdm(total=total, initial=initial, disable=not main, unit="step", dynamic_ncols=True, smoothing=0.1)
        if not main:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(log_dir / "scalars.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(log_dir))
            except Exception as err:  # noqa: BLE001 - tensorboard missing or broken: keep training
                echo(
                    f"TensorBoard logging is off ({type(err).__name__}: {err}); `pip install tensorboard` to get it. "
                    f"Scalars still go to {log_dir / 'scalars.jsonl'}"
                )

    def write(self, message: str) -> None:
        if self.main:
            with self.bar.external_write_mode():  # the bar steps aside, then redraws
                self.echo(message)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.main:
            return
        row = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def image(self, step: int, tag: str, image) -> None:
        if self.main and self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def advance(self, values: Optional[Mapping[str, float]] = None) -> None:
        if values:
            self.bar.set_postfix(
                {short: f"{values[k]:.4g}" for k, short in POSTFIX.items() if k in values}, refresh=False
            )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
