import json
from pathlib import Path

import pytest
import torch

from fkd_core.checkpoint import load_checkpoint, save_checkpoint
from fkd_core.detect import DetectorConfig
from fkd_core.errors import CheckpointError
from fkd_core.geometry import CropPolicy
from fkd_core.model import NaimishNet, NaimishNetConfig


def _save(tmp_path, dtype=torch.float32):
    model = NaimishNet().eval()
    uri = str(tmp_path / "m.safetensors")
    mid = save_checkpoint(
        model, uri, policy=CropPolicy(1.4, 0.1), detector=DetectorConfig(min_neighbors=4), meta={"seed": 3}, dtype=dtype
    )
    return model, uri, mid


def test_round_trip_keeps_weights_policy_and_detector(tmp_path):
    model, uri, mid = _save(tmp_path)
    loaded = load_checkpoint(uri)
    assert loaded.model_id == mid and mid.startswith("m-") and len(mid) == 2 + 12
    assert loaded.policy == CropPolicy(1.4, 0.1)
    assert loaded.detector.min_neighbors == 4 and loaded.detector.cascade.endswith(
        "haarcascade_frontalface_default.xml"
    )
    x = torch.rand(2, 1, 96, 96)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.meta["seed"] == 3
    assert loaded.detector.fallback_min_neighbors == 3
    # a checkpoint written before the fallback pass existed loads without it (as it was measured)
    cfg = tmp_path / "m.json"
    doc = json.loads(cfg.read_text())
    del doc["detector"]["fallback_min_neighbors"]
    cfg.write_text(json.dumps(doc))
    assert load_checkpoint(uri).detector.fallback_min_neighbors == 0
    doc["detector"]["fallback_min_neighbors"] = 4  # not below min_neighbors
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="fallback_min_neighbors"):
        load_checkpoint(uri)


def test_float16_checkpoint_is_close(tmp_path):
    model, uri, _ = _save(tmp_path, torch.float16)
    x = torch.rand(2, 1, 96, 96)
    assert torch.allclose(load_checkpoint(uri).model(x), model(x), atol=1e-2)


def test_mismatched_config_is_refused_with_a_clear_error(tmp_path):
    _, uri, _ = _save(tmp_path)
    cfg_path = tmp_path / "m.json"
    doc = json.loads(cfg_path.read_text())
    doc["model"]["input_size"] = 224
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(
        CheckpointError,
        match=r"weight 'head.1.weight' has shape \(1000, 6400\) but the config "
        r"\(input_size=224\) needs \(1000, 43264\)",
    ):
        load_checkpoint(uri)


def test_tampered_or_unknown_files_are_refused(tmp_path):
    _, uri, _ = _save(tmp_path)
    with pytest.raises(CheckpointError, match="must be a .safetensors"):
        load_checkpoint(str(tmp_path / "m.pt"))
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(uri)
    # a missing model is named as the user gave it, not by the JSON beside it
    with pytest.raises(CheckpointError, match=r"^model .*/other\.safetensors does not exist$"):
        load_checkpoint(str(tmp_path / "other.safetensors"))
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match=r"m\.safetensors has no config beside it \(.*m\.json does not exist"):
        load_checkpoint(uri)


def test_unknown_model_fields_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        NaimishNetConfig.from_dict({"input_size": 96, "depth": 5})


def test_onnx_runtime_path_equals_eager_torch():
    import numpy as np

    from fkd_core.predict import Predictor

    model = NaimishNet().eval()
    crops = np.random.default_rng(0).integers(0, 255, size=(70, 96, 96), dtype=np.uint8)  # > one batch of 64
    fast = Predictor(model, CropPolicy(), backend="onnx").predict_crops(crops)
    eager = Predictor(model, CropPolicy(), backend="torch").predict_crops(crops)
    assert fast.shape == (70, 68, 2)
    assert np.abs(fast - eager).max() < 1e-3
    with pytest.raises(ValueError, match="backend"):
        Predictor(model, CropPolicy(), backend="tensorrt")


def _save_two(tmp_path, first=None) -> tuple[str, str, NaimishNet, NaimishNet]:
    """A two-stage float32 checkpoint at tmp_path/two.safetensors (``first``, or a new first stage, and a new
    second stage): (uri, model id, first, second)."""
    from fkd_core.align import AlignPolicy

    first, second = (first or NaimishNet()).eval(), NaimishNet().eval()
    uri = str(tmp_path / "two.safetensors")
    mid = save_checkpoint(
        first,
        uri,
        policy=CropPolicy(),
        detector=DetectorConfig(),
        meta={"seed": 5},
        dtype=torch.float32,
        refine=second,
        align=AlignPolicy(side=3.5, context_size=160),
    )
    return uri, mid, first, second


def test_two_stage_checkpoint_round_trip(tmp_path):
    from fkd_core.align import AlignPolicy

    uri, mid, first, second = _save_two(tmp_path)
    loaded = load_checkpoint(uri)
    x = torch.rand(2, 1, 96, 96)
    assert torch.equal(loaded.model(x), first(x)) and torch.equal(loaded.refine(x), second(x))
    assert loaded.align == AlignPolicy(side=3.5, context_size=160) and loaded.model_id == mid
    # the id covers both stages: another second stage is another model
    (tmp_path / "other").mkdir()
    assert _save_two(tmp_path / "other", first)[1] != mid
    # one-stage checkpoints load without a refining stage
    _, one, _ = _save(tmp_path)
    assert load_checkpoint(one).refine is None and load_checkpoint(one).align is None


def test_a_two_stage_config_that_does_not_fit_its_tensors_is_refused_naming_them(tmp_path):
    _, one, _ = _save(tmp_path)
    # a config that claims a second stage the file does not hold is refused, naming the missing tensors
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["refine"] = {"model": {"input_size": 96, "num_keypoints": 68}, "align": {"side": 3.8}}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"missing \['refine.features.0.bias'"):
        load_checkpoint(one)
    # a second stage whose config does not fit its tensors is refused naming the tensor
    uri, _, first, second = _save_two(tmp_path)
    doc = json.loads((tmp_path / "two.json").read_text())
    doc["refine"]["model"]["input_size"] = 224
    (tmp_path / "two.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"weight 'refine.head.1.weight' has shape \(1000, 6400\)"):
        load_checkpoint(uri)
    doc["refine"]["model"]["input_size"] = 96
    doc["refine"]["align"]["sharpness"] = 2
    (tmp_path / "two.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="invalid checkpoint config.*sharpness"):
        load_checkpoint(uri)
    with pytest.raises(ValueError, match="align policy"):
        save_checkpoint(first, uri, policy=CropPolicy(), detector=DetectorConfig(), meta={}, refine=second)


def test_a_new_checkpoint_is_named_by_its_weights_and_never_overwrites_one(tmp_path):
    from fkd_core.checkpoint import pack_checkpoint, save_new_checkpoint

    torch.manual_seed(0)
    packed = pack_checkpoint(NaimishNet(), "retrained", policy=CropPolicy(), detector=DetectorConfig(), meta={})
    assert packed.model_id == "retrained-" + packed.doc["weights_sha256"][:12]
    assert packed.load().model_id == packed.model_id  # what disk would give back, before anything is written
    uri = save_new_checkpoint(packed, str(tmp_path / "models"))
    assert uri == str(tmp_path / "models" / f"{packed.model_id}.safetensors")
    assert load_checkpoint(uri).model_id == packed.model_id
    # the same name and weights again (a deterministic rerun) must not replace the file a server may be reading
    other = pack_checkpoint(NaimishNet(), "retrained", policy=CropPolicy(), detector=DetectorConfig(), meta={"x": 1})
    clash = pack_checkpoint(
        load_checkpoint(uri).model,
        "retrained",
        policy=CropPolicy(),
        detector=DetectorConfig(),
        meta={"seed": 9},
    )
    assert clash.model_id == packed.model_id and other.model_id != packed.model_id
    before = (tmp_path / "models" / f"{packed.model_id}.json").read_text()
    with pytest.raises(CheckpointError, match="never overwrites a model"):
        save_new_checkpoint(clash, str(tmp_path / "models"))
    assert (tmp_path / "models" / f"{packed.model_id}.json").read_text() == before
    save_new_checkpoint(clash, str(tmp_path / "models"), force=True)
    assert load_checkpoint(uri).meta["seed"] == 9
    assert save_new_checkpoint(other, str(tmp_path / "models")) != uri  # new weights: a file of their own


def test_every_stage_s_onnx_graph_is_written_beside_the_weights_and_named_with_its_sha256(tmp_path):
    import hashlib

    import numpy as np

    from fkd_core.checkpoint import graph_uri
    from fkd_core.predict import Predictor

    uri, mid, first, _ = _save_two(tmp_path)
    doc = json.loads((tmp_path / "two.json").read_text())
    assert set(doc["onnx"]) == {"first", "refine"}
    for stage in ("first", "refine"):
        path = tmp_path / doc["onnx"][stage]["file"]
        assert str(path) == graph_uri(uri, stage) and path.name == f"two.{stage}.onnx"
        assert doc["onnx"][stage]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint(uri)
    assert loaded.graphs["first"] == (tmp_path / "two.first.onnx").read_bytes()
    # the shipped graph computes what the network does (float16 weights stored, float32 arithmetic)
    crops = np.random.default_rng(0).integers(0, 255, size=(5, 96, 96), dtype=np.uint8)
    from_graph = Predictor.from_checkpoint(uri, refine=False).predict_crops(crops)
    eager = Predictor(first, CropPolicy(), backend="torch").predict_crops(crops)
    assert np.abs(from_graph - eager).max() < 1e-3


def test_an_altered_or_missing_graph_is_refused(tmp_path):
    uri, _, _, _ = _save_two(tmp_path)
    graph = tmp_path / "two.refine.onnx"
    good = graph.read_bytes()
    graph.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=r"two\.refine\.onnx: sha256 does not match .*altered graph"):
        load_checkpoint(uri)
    graph.unlink()
    with pytest.raises(CheckpointError, match=r"its refine graph .*two\.refine\.onnx does not exist"):
        load_checkpoint(uri)
    # a copy under another name carries its graphs under that name too
    for suffix in (".safetensors", ".json", ".first.onnx"):
        (tmp_path / f"copy{suffix}").write_bytes((tmp_path / f"two{suffix}").read_bytes())
    (tmp_path / "copy.refine.onnx").write_bytes(good)
    assert load_checkpoint(str(tmp_path / "copy.safetensors")).graphs["refine"] == good


def test_weights_without_a_recorded_digest_are_refused(tmp_path):
    _, uri, _ = _save(tmp_path)
    doc = json.loads((tmp_path / "m.json").read_text())
    del doc["weights_sha256"]
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="records no weights_sha256"):
        load_checkpoint(uri)


def test_graphs_are_added_once_to_a_checkpoint_written_without_them(tmp_path):
    """The one-off step for a checkpoint from before graphs were shipped: its weights, and so its id, stay."""
    from fkd_core.checkpoint import add_graphs

    uri, mid, _, _ = _save_two(tmp_path)
    weights = (tmp_path / "two.safetensors").read_bytes()
    doc = json.loads((tmp_path / "two.json").read_text())
    del doc["onnx"]
    (tmp_path / "two.json").write_text(json.dumps(doc))
    for stage in ("first", "refine"):
        (tmp_path / f"two.{stage}.onnx").unlink()
    assert load_checkpoint(uri).graphs == {}
    written = add_graphs(uri)
    assert sorted(written) == ["first", "refine"] and all(Path(p).is_file() for p in written.values())
    loaded = load_checkpoint(uri)
    assert set(loaded.graphs) == {"first", "refine"} and loaded.model_id == mid
    assert (tmp_path / "two.safetensors").read_bytes() == weights
    with pytest.raises(CheckpointError, match="two.first.onnx exists"):
        add_graphs(uri)


def test_a_repacked_checkpoint_keeps_its_stages_to_the_bit(tmp_path):
    import dataclasses

    from fkd_core.checkpoint import repack, write_checkpoint

    uri, mid, _, _ = _save_two(tmp_path)
    loaded = load_checkpoint(uri)
    policy = dataclasses.replace(loaded.align, repeat_above=0.08)
    packed = repack(loaded, align=policy, record={"note": "rule fitted"})
    assert packed.model_id == mid  # the same weights: the same id
    out = write_checkpoint(packed, str(tmp_path / "again.safetensors"))
    again = load_checkpoint(out)
    assert again.align == policy and again.meta["note"] == "rule fitted"
    assert again.meta["seed"] == 5 and "onnx" in again.meta  # the record kept, graphs of its own
    assert all((again.tensors[k] == v).all() and again.tensors[k].dtype == v.dtype for k, v in loaded.tensors.items())
