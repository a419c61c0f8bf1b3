"""The training recipe fkd ships, as plain values: no torch, no OpenCV, so configs and the CLI import it cheaply.

``fkd_core.train.fit`` takes a :class:`FitConfig`; the train flow's config and ``fkd train``'s options take
their defaults from it, so there is one recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INPUT_SIZE = 96  # the model's input side S, chosen by measurement (docs/experiments.md)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random jitter (uniform in +-range unless stated). The defaults are the shipped recipe:
    brightness and contrast only. Geometric jitter and flips are there to be asked for, but both cost validation
    NME on this data (docs/experiments.md, "Augmentation, by measurement"): every crop, in training and at
    inference, comes from the same cascade's box, and the labels are not mirror-symmetric."""

    scale: float = 0.0  # square side x U(1 - scale, 1 + scale)
    shift: float = 0.0  # centre moves by up to this fraction of the side, each axis
    rotate_deg: float = 0.0
    flip: float = 0.0  # probability
    brightness: float = 0.15  # added, in [0, 1] intensity units
    contrast: float = 0.25  # multiplied: U(1 - contrast, 1 + contrast)

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class FitConfig:
    """The training recipe. The defaults are the one fkd ships (docs/model-card.md): Adam with the paper's values,
    a cosine decay to ``min_lr``, an exponential moving average of the weights, brightness and contrast jitter
    only. The train flow's config and the CLI take their defaults from here."""

    epochs: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    patience: int = 20  # epochs without a better validation NME before stopping
    lr_patience: int = 8  # plateau schedule: epochs without improvement before the learning rate is halved
    min_lr: float = 1e-6
    schedule: str = "cosine"  # "cosine": decay to min_lr over the epochs; "plateau": halve on a validation plateau
    # > 0: validate an exponential moving average of the weights (per step) as well, and keep the better.
    # Measured (docs/experiments.md): it smooths the +-0.01 epoch-to-epoch swing of validation NME.
    ema_decay: float = 0.998
    # Warm the average's decay up from 0 (timm's ModelEmaV3), so a short run is not the average of its start.
    ema_warmup: bool = True
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
