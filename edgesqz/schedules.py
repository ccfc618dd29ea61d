"""Learning-rate schedules that Keras lacks, registered so a saved training state loads again (``--resume``)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="edgesqz")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then ``peak * gamma**k`` after the k-th boundary.

    pytorch-cifar100's schedule: ``WarmUpLR`` for the first epoch, then ``MultiStepLR(milestones, gamma)``.
    """

    def __init__(self, peak: float, warmup_steps: int, boundaries: list[int], gamma: float = 0.2) -> None:
        super().__init__()
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = [int(b) for b in boundaries]
        self.gamma = float(gamma)

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        decays = sum((ops.cast(step >= b, "float32") for b in self.boundaries), ops.zeros(()))
        rate = self.peak * ops.power(self.gamma, decays)
        if self.warmup_steps <= 0:
            return rate
        warm = self.peak * (step + 1.0) / float(self.warmup_steps)
        return ops.where(step < self.warmup_steps, warm, rate)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "boundaries": self.boundaries,
                "gamma": self.gamma}
