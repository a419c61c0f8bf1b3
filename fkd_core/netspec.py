"""NaimishNet's shape as plain values (no torch): what a checkpoint records of each stage and what inference needs.

``fkd_core.model`` builds the PyTorch network from these; ONNX Runtime runs the exported graphs without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fkd_core.recipe import INPUT_SIZE
from fkd_core.types import NUM_KEYPOINTS

# (out channels, kernel, dropout) of the four conv blocks; each conv is followed by ELU, MaxPool 2x2, Dropout.
CONV_BLOCKS = ((32, 4, 0.1), (64, 3, 0.2), (128, 2, 0.3), (256, 1, 0.4))
DENSE_DROPOUT = (0.5, 0.6)
DENSE_WIDTH = 1000  # the two hidden dense layers; the last one's output is what the trust heads read


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


def flattened_size(input_size: int) -> int:
    """Length of the flattened feature vector after the conv blocks."""
    s = input_size
    for _, k, _ in CONV_BLOCKS:
        s = (s - k + 1) // 2
    if s < 1:
        raise ValueError(f"input_size {input_size} is too small for NaimishNet")
    return CONV_BLOCKS[-1][0] * s * s


def parameter_shapes(cfg: NaimishNetConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor of ``fkd_core.model.NaimishNet(cfg)`` by its PyTorch name, with its shape: what a checkpoint's
    weights must hold for a stage (checked without building the network)."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_ch = 1
    for i, (out_ch, k, _) in enumerate(CONV_BLOCKS):  # conv, ELU, pool, dropout: the convs are modules 0, 4, 8, 12
        shapes[f"features.{4 * i}.weight"] = (out_ch, in_ch, k, k)
        shapes[f"features.{4 * i}.bias"] = (out_ch,)
        in_ch = out_ch
    # flatten, linear, ELU, dropout, linear, dropout, linear: the linear layers are modules 1, 4 and 6
    dense = ((1, flattened_size(cfg.input_size), DENSE_WIDTH), (4, DENSE_WIDTH, DENSE_WIDTH))
    for i, n_in, n_out in (*dense, (6, DENSE_WIDTH, 2 * cfg.num_keypoints)):
        shapes[f"head.{i}.weight"] = (n_out, n_in)
        shapes[f"head.{i}.bias"] = (n_out,)
    return shapes
