"""NaimishNet (Agarwal et al. 2017), exactly as the layer table in docs/design.md."""

from __future__ import annotations

import torch
from torch import nn

# the network's shape lives in the torch-free netspec (inference reads it without torch); re-exported here
from fkd_core.netspec import CONV_BLOCKS as CONV_BLOCKS
from fkd_core.netspec import DENSE_DROPOUT as DENSE_DROPOUT
from fkd_core.netspec import DENSE_WIDTH as DENSE_WIDTH
from fkd_core.netspec import NaimishNetConfig as NaimishNetConfig
from fkd_core.netspec import flattened_size as flattened_size


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
