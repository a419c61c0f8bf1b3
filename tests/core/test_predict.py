"""Predictor.from_checkpoint: one thread-safe way to a predictor that owns the checkpoint's detector and stages."""

import threading

import cv2
import numpy as np
import torch

from fkd_core.checkpoint import save_checkpoint
from fkd_core.detect import DetectorConfig, detect_faces
from fkd_core.geometry import CropPolicy
from fkd_core.model import NaimishNet
from fkd_core.predict import Predictor


def _at_once(fn, n: int = 4) -> tuple[list, list[BaseException]]:
    """Call ``fn`` from ``n`` threads released together; their results and errors."""
    gate = threading.Barrier(n)
    results, errors = [], []

    def run():
        gate.wait()
        try:
            results.append(fn())
        except BaseException as e:  # collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_predictors_built_in_threads_at_once_all_work():
    """torch.onnx.export keeps global state: unguarded, two threads exporting at once failed about half the time
    (AssertionError: GLOBALS.in_onnx_export must be True)."""
    model = NaimishNet().eval()
    crops = np.random.default_rng(0).integers(0, 255, size=(3, 96, 96), dtype=np.uint8)
    for _ in range(3):
        results, errors = _at_once(lambda: Predictor(model, CropPolicy(), backend="onnx").predict_crops(crops))
        assert not errors, errors
        assert all(np.array_equal(r, results[0]) for r in results)


def test_from_checkpoint_builds_once_for_every_thread_and_reloads_a_changed_checkpoint(tmp_path):
    path = str(tmp_path / "m.safetensors")
    torch.manual_seed(1)
    a = save_checkpoint(NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    results, errors = _at_once(lambda: Predictor.from_checkpoint(path))
    assert not errors, errors
    assert all(p is results[0] for p in results) and results[0].model_id == a
    torch.manual_seed(2)
    b = save_checkpoint(NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    assert a != b and Predictor.from_checkpoint(path).model_id == b  # retrained in place: not the stale one
    # the same weights with other detector settings in the JSON are picked up too
    torch.manual_seed(2)
    assert b == save_checkpoint(
        NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(fallback_min_neighbors=0), meta={}
    )
    assert Predictor.from_checkpoint(path).detector.fallback_min_neighbors == 0


def test_predict_finds_faces_with_the_checkpoints_detector_settings(tmp_path, sample_dir):
    """The old predict_image used the default detector whatever the checkpoint said."""
    gray = cv2.imread(str(sample_dir / "photos" / "obamas.jpg"), cv2.IMREAD_GRAYSCALE)
    strict = DetectorConfig(min_size=300, fallback_min_neighbors=0)
    assert len(detect_faces(gray, DetectorConfig())) == 2 and detect_faces(gray, strict) == []
    path = str(tmp_path / "strict.safetensors")
    save_checkpoint(NaimishNet(), path, policy=CropPolicy(), detector=strict, meta={})
    assert Predictor.from_checkpoint(path).predict([gray]) == [[]]
    faces = Predictor.from_checkpoint(path).predict([gray], [detect_faces(gray, DetectorConfig())])[0]
    assert len(faces) == 2 and all(f.keypoints.shape == (68, 2) for f in faces)


def test_first_stage_only_is_named_apart(tmp_path, model_path):
    from fkd_core.align import AlignPolicy

    path = str(tmp_path / "two.safetensors")
    mid = save_checkpoint(
        NaimishNet(),
        path,
        policy=CropPolicy(),
        detector=DetectorConfig(),
        meta={},
        refine=NaimishNet(),
        align=AlignPolicy(),
    )
    both, first = Predictor.from_checkpoint(path), Predictor.from_checkpoint(path, refine=False)
    assert both.refines and not first.refines
    assert both.model_id == mid and first.model_id == mid + "+first-stage"
    # why neither has trust columns, in words that name the cause the user can act on
    assert "no trust heads" in both.why_untrusted and "--no-refine" in first.why_untrusted
    one = str(tmp_path / "one.safetensors")
    save_checkpoint(NaimishNet(), one, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    why = Predictor.from_checkpoint(one).why_untrusted
    assert "no refining stage" in why and "--refine-of" in why and "--no-refine" not in why
    assert Predictor.from_checkpoint(model_path).why_untrusted is None  # the shipped model has its heads
