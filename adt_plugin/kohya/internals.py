"""Every place the sd-scripts plugin reaches into private parts of accelerate, in one module.

sd-scripts itself is used through the trainer methods it calls on its own subclasses
(see trainer.py); what it does not hand over is the optimizer it prepared, and what a
skipped optimizer step must still do inside accelerate. Read from accelerate 1.6.0
(the version sd-scripts main @ 48d368fa557731ad0488c07304dfeba8c07910eb pins):

  accelerator.py   `Accelerator._optimizers`: the AcceleratedOptimizers `prepare` returned
  optimizer.py     `AcceleratedOptimizer.scaler` (a torch GradScaler with fp16) and
                   `_is_overflow`, set by `step()` and read by `step_was_skipped`, which
                   sd-scripts' LR scheduler wrapper checks before stepping
"""

from __future__ import annotations

from typing import Any, Callable

UPSTREAM = "accelerate 1.6.0, as pinned by kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb"


def prepared_optimizer(accelerator: Any) -> Any:
    """The optimizer sd-scripts passed to `accelerator.prepare` (there is exactly one)."""
    optimizers = list(getattr(accelerator, "_optimizers", None) or [])
    if len(optimizers) != 1:
        raise RuntimeError(
            f"ADT: expected the one optimizer sd-scripts prepares, found {len(optimizers)} "
            "(accelerate's Accelerator._optimizers); this accelerate version is not supported"
        )
    return optimizers[0]


def skipped_step_cleanup(accelerated_optimizer: Any) -> Callable[[], None]:
    """What a skipped step must still do on an accelerate `AcceleratedOptimizer`.

    With fp16, `clip_grad_norm_` has already called `scaler.unscale_` for this
    step; a later unscale_ would fail until `scaler.update()`. `update(new_scale=
    current scale)` clears that per-step state and keeps the scale (a plain
    `update()` asserts when no gradient was checked). `_is_overflow` is cleared so
    that `step_was_skipped` is false and the LR scheduler advances with every iteration."""

    def cleanup() -> None:
        scaler = getattr(accelerated_optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled() and getattr(scaler, "_scale", None) is not None:
            scaler.update(new_scale=scaler.get_scale())
        if hasattr(accelerated_optimizer, "_is_overflow"):
            accelerated_optimizer._is_overflow = False

    return cleanup


__all__ = ["UPSTREAM", "prepared_optimizer", "skipped_step_cleanup"]
