"""Checkpoints: weights in safetensors (never pickle) beside a JSON of config, crop policy and metrics."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fkd_core.detect import DetectorConfig
from fkd_core.errors import CheckpointError
from fkd_core.geometry import CropPolicy
from fkd_core.model import NaimishNet, NaimishNetConfig
from fkd_core.parquet_io import read_json, write_json

FORMAT = "fkd-naimishnet/1"
SAVED_MODELS = Path(__file__).resolve().parent.parent / "saved_models"
DEFAULT_MODEL = SAVED_MODELS / "naimishnet.safetensors"


@dataclass
class LoadedModel:
    model: NaimishNet
    policy: CropPolicy
    detector: DetectorConfig
    model_id: str  # "<name>-<first 12 hex of the weights' sha256>"
    meta: dict = field(default_factory=dict)


def config_uri(weights_uri: str) -> str:
    """The JSON beside a ``.safetensors`` checkpoint."""
    if not weights_uri.endswith(".safetensors"):
        raise CheckpointError(f"weights must be a .safetensors file, got {weights_uri!r}")
    return weights_uri[: -len(".safetensors")] + ".json"


def save_checkpoint(
    model: NaimishNet,
    weights_uri: str,
    *,
    policy: CropPolicy,
    detector: DetectorConfig,
    meta: dict,
    dtype: torch.dtype = torch.float16,
) -> str:
    """Write ``<name>.safetensors`` and ``<name>.json``; returns the model id."""
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    blob = st_save(tensors, metadata={"format": FORMAT})
    digest = hashlib.sha256(blob).hexdigest()
    name = weights_uri.rsplit("/", 1)[-1][: -len(".safetensors")]
    fs, path = fsspec.core.url_to_fs(config_uri(weights_uri))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fsspec.open(weights_uri, "wb") as f:
        f.write(blob)
    detector_d = asdict(detector)
    # Store the cascade by file name so the checkpoint is portable; it is resolved against detector_architectures/.
    detector_d["cascade"] = Path(detector.cascade).name
    doc = {
        "format": FORMAT,
        "name": name,
        "model_id": f"{name}-{digest[:12]}",
        "weights_sha256": digest,
        "dtype": str(dtype).removeprefix("torch."),
        "model": model.cfg.to_dict(),
        "crop_policy": asdict(policy),
        "detector": detector_d,
        **meta,
    }
    write_json(doc, config_uri(weights_uri))
    return doc["model_id"]


def load_checkpoint(weights_uri: str | Path = DEFAULT_MODEL) -> LoadedModel:
    """Rebuild a model from its checkpoint; refuses anything but safetensors and any config mismatch."""
    weights_uri = str(weights_uri)
    doc = read_json(config_uri(weights_uri))
    if doc is None:
        raise CheckpointError(f"checkpoint config not found: {config_uri(weights_uri)}")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{weights_uri}: unknown checkpoint format {doc.get('format')!r}, expected {FORMAT!r}")
    try:
        blob = fsspec.open(weights_uri, "rb").open().read()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint weights not found: {weights_uri}") from e
    digest = hashlib.sha256(blob).hexdigest()
    if doc.get("weights_sha256") and doc["weights_sha256"] != digest:
        raise CheckpointError(f"{weights_uri}: weights sha256 {digest[:12]} does not match the config's")
    try:
        cfg = NaimishNetConfig.from_dict(doc["model"])
        policy = CropPolicy(**doc["crop_policy"])
        det = dict(doc["detector"])
        # stored by file name (see save_checkpoint): resolve it next to the default cascade
        default = Path(DetectorConfig().cascade)
        det["cascade"] = str(default.parent / Path(det.get("cascade") or default.name).name)
        detector = DetectorConfig(**det)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{weights_uri}: invalid checkpoint config: {e}") from e
    try:
        tensors = st_load(blob)
    except Exception as e:
        raise CheckpointError(f"{weights_uri}: not a valid safetensors file: {e}") from e
    model = NaimishNet(cfg)
    expected = model.state_dict()
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"{weights_uri}: weight names differ from NaimishNet: missing {sorted(set(expected) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(expected))}"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{weights_uri}: weight {k!r} has shape {tuple(v.shape)} but the config "
                f"(input_size={cfg.input_size}) needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.eval()
    return LoadedModel(model, policy, detector, doc.get("model_id", f"{doc.get('name')}-{digest[:12]}"), doc)
