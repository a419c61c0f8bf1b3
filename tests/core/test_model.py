import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fkd_core.model import NaimishNet, NaimishNetConfig, count_parameters, flattened_size


def test_layer_table_of_design_md():
    m = NaimishNet()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (32, (4, 4), (0, 0)),
        (64, (3, 3), (0, 0)),
        (128, (2, 2), (0, 0)),
        (256, (1, 1), (0, 0)),
    ]
    seq = list(m.features)
    # each conv: ELU, MaxPool 2x2 stride 2, Dropout p
    for i, p in zip(range(0, 16, 4), (0.1, 0.2, 0.3, 0.4), strict=True):
        assert isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.ELU)
        assert isinstance(seq[i + 2], nn.MaxPool2d) and seq[i + 2].kernel_size == 2 and seq[i + 2].stride == 2
        assert isinstance(seq[i + 3], nn.Dropout) and seq[i + 3].p == p
    head = list(m.head)
    kinds = [type(mod).__name__ for mod in head]
    assert kinds == ["Flatten", "Linear", "ELU", "Dropout", "Linear", "Dropout", "Linear"]
    assert head[3].p == 0.5 and head[5].p == 0.6
    assert [(mod.in_features, mod.out_features) for mod in head if isinstance(mod, nn.Linear)] == [
        (256 * 5 * 5, 1000),
        (1000, 1000),
        (1000, 136),
    ]


def test_parameter_count_matches_the_table():
    conv = (32 * 1 * 16 + 32) + (64 * 32 * 9 + 64) + (128 * 64 * 4 + 128) + (256 * 128 + 256)
    dense = (6400 * 1000 + 1000) + (1000 * 1000 + 1000) + (1000 * 136 + 136)
    assert count_parameters(NaimishNet()) == conv + dense == 7_623_096


def test_flattened_size_for_other_inputs():
    assert flattened_size(96) == 256 * 5 * 5
    assert flattened_size(224) == 256 * 13 * 13
    assert NaimishNet(NaimishNetConfig(input_size=224))(torch.zeros(1, 1, 224, 224)).shape == (1, 136)
    with pytest.raises(ValueError):
        flattened_size(16)


def test_init_is_uniform_and_glorot():
    m = NaimishNet()
    conv = m.features[0].weight
    bound = 1 / np.sqrt(16)
    assert conv.abs().max() <= bound and conv.abs().max() > 0.9 * bound
    lin = m.head[1]
    glorot = np.sqrt(6 / (6400 + 1000))
    assert lin.weight.abs().max() <= glorot and lin.weight.abs().max() > 0.99 * glorot


def test_forward_backward():
    m = NaimishNet()
    x = torch.rand(4, 1, 96, 96)
    out = m(x)
    assert out.shape == (4, 136) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    assert torch.equal(m(x), m(x))  # dropout off in eval


def test_fkd_core_does_not_import_prefect():
    code = "import sys, fkd_core, fkd_core.annotate, fkd_core.ingest, fkd_core.train; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
