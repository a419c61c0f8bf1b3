"""NaimishNet (Agarwal et al. 2017), exactly as the layer table in docs/design.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fkd_core.recipe import INPUT_SIZE
from fkd_core.types import NUM_KEYPOINTS


@dataclass(frozen=True)
class NaimishNetConfig:
    """Everything needed to rebuild the network; travels inside every checkpoint."""

    input_size: int = INPUT_SIZE
    num_keypoints: int = NUM_KEYPOINTS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NaimishNetConfig:
        unknown = set(d) - {"input_size", "num_keypoints"}
        if unknown:
            raise ValueError(f"unknown NaimishNetConfig fields: {sorted(unknown)}")
        return cls(**d)


# (out channels, kernel, dropout) of the four conv blocks; each conv is followed by ELU, MaxPool 2x2, Dropout.
CONV_BLOCKS = ((32, 4, 0.1), (64, 3, 0.2), (128, 2, 0.3), (256, 1, 0.4))
DENSE_DROPOUT = (0.5, 0.6)
DENSE_WIDTH = 1000


def flattened_size(input_size: int) -> int:
    """Length of the flattened feature vector after the conv blocks."""
    s = input_size
    for _, k, _ in CONV_BLOCKS:
        s = (s - k + 1) // 2
    if s < 1:
        raise ValueError(f"input_size {input_size} is too small for NaimishNet")
    return CONV_BLOCKS[-1][0] * s * s


class NaimishNet(nn.Module):
    """Input (B, 1, S, S) grayscale in [0, 1]; output (B, 2K) keypoints ``x0, y0, x1, y1 ...`` in [-1, 1]."""

    def __init__(self, cfg: NaimishNetConfig = NaimishNetConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch, k, p in CONV_BLOCKS:
            layers += [nn.Conv2d(in_ch, out_ch, k), nn.ELU(), nn.MaxPool2d(2, 2), nn.Dropout(p)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flattened_size(cfg.input_size), DENSE_WIDTH),
            nn.ELU(),
            nn.Dropout(DENSE_DROPOUT[0]),
            nn.Linear(DENSE_WIDTH, DENSE_WIDTH),  # linear activation, as in the paper
            nn.Dropout(DENSE_DROPOUT[1]),
            nn.Linear(DENSE_WIDTH, 2 * cfg.num_keypoints),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # "weights uniform random": U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the classic LeCun-uniform bound.
                bound = 1.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # Glorot uniform
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, S, S) -> (B, 256, s, s) -> (B, 2K)
        return self.head(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
