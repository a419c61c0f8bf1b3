import torch

from fkd_core.checkpoint import save_checkpoint
from fkd_core.detect import DetectorConfig
from fkd_core.geometry import CropPolicy
from fkd_core.model import NaimishNet
from flows._common import cached_predictor, chunks, markdown_table


def test_cached_predictor_reloads_a_checkpoint_retrained_in_place(tmp_path):
    path = str(tmp_path / "m.safetensors")
    torch.manual_seed(1)
    a = save_checkpoint(NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    assert cached_predictor(path)[1].model_id == a
    assert cached_predictor(path)[0] is cached_predictor(path)[0]  # built once
    torch.manual_seed(2)
    b = save_checkpoint(NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    assert a != b and cached_predictor(path)[1].model_id == b
    # the same weights with other detector settings in the JSON are picked up too
    torch.manual_seed(2)
    assert b == save_checkpoint(
        NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(fallback_min_neighbors=0), meta={}
    )
    assert cached_predictor(path)[1].detector.fallback_min_neighbors == 0


def test_chunks_and_markdown_table():
    assert list(chunks(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    assert markdown_table([{"a": 1, "b": 0.5}]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5000 |"]
