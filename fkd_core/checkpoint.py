"""Checkpoints: weights in safetensors (never pickle) beside a JSON of config, crop policy and metrics."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fkd_core.align import AlignPolicy
from fkd_core.detect import DetectorConfig
from fkd_core.errors import CheckpointError, ImageError
from fkd_core.geometry import CropPolicy
from fkd_core.model import NaimishNet, NaimishNetConfig
from fkd_core.resources import DEFAULT_MODEL as DEFAULT_MODEL  # re-exported: the packaged checkpoint
from fkd_core.storage import exists, read_bytes, read_json, write_bytes, write_json
from fkd_core.trust import TRUST_PREFIX, TrustHeads

FORMAT = "fkd-naimishnet/1"
MAX_CHECKPOINT_BYTES = 2 << 30  # far above two float32 stages at S = 224 (357 MB)
REFINE_PREFIX = "refine."  # tensor names of the optional second (refining) stage in the same file


@dataclass
class LoadedModel:
    model: NaimishNet
    policy: CropPolicy
    detector: DetectorConfig
    model_id: str  # "<name>-<first 12 hex of the weights' sha256>"
    meta: dict = field(default_factory=dict)
    refine: NaimishNet | None = None  # second stage on crops aligned to the first stage's keypoints
    align: AlignPolicy | None = None  # how those crops are made (set with ``refine``)
    trust: TrustHeads | None = None  # face_prob and quality heads over the refining stage (fkd_core.trust)


def config_uri(weights_uri: str) -> str:
    """The JSON beside a ``.safetensors`` checkpoint."""
    if not weights_uri.endswith(".safetensors"):
        raise CheckpointError(f"weights must be a .safetensors file, got {weights_uri!r}")
    return weights_uri[: -len(".safetensors")] + ".json"


@dataclass(frozen=True)
class PackedCheckpoint:
    """A checkpoint assembled in memory: the safetensors bytes and the JSON beside them."""

    blob: bytes
    doc: dict

    @property
    def model_id(self) -> str:
        return self.doc["model_id"]

    def load(self) -> LoadedModel:
        """The model as :func:`load_checkpoint` would read it back from disk (dtype round trip included)."""
        return _from_blob(self.blob, self.doc, self.model_id)


def pack_checkpoint(
    model: NaimishNet,
    name: str,
    *,
    policy: CropPolicy,
    detector: DetectorConfig,
    meta: dict,
    dtype: torch.dtype = torch.float16,
    refine: NaimishNet | None = None,
    align: AlignPolicy | None = None,
    trust: TrustHeads | None = None,
) -> PackedCheckpoint:
    """Assemble a checkpoint in memory; its model id is ``<name>-<first 12 hex of the weights' sha256>``.

    With ``refine`` (and its ``align`` policy) the file also holds a second stage, its tensors named
    ``refine.<name>``; the sha256, and so the model id, covers both stages. With ``trust`` (which needs the
    refining stage) it also holds the trust heads as float32 ``trust.*`` tensors, covered by the sha256 too.
    """
    if (refine is None) != (align is None):
        raise ValueError("a refining stage needs its align policy, and an align policy needs the stage")
    if trust is not None and refine is None:
        raise ValueError("trust heads read the refining stage: a checkpoint with them needs one")
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if refine is not None:
        tensors |= {REFINE_PREFIX + k: v.detach().to(dtype).contiguous() for k, v in refine.state_dict().items()}
    if trust is not None:
        tensors |= {k: torch.from_numpy(v.astype("float32")).contiguous() for k, v in trust.to_tensors().items()}
    blob = st_save(tensors, metadata={"format": FORMAT})
    digest = hashlib.sha256(blob).hexdigest()
    doc = {
        "format": FORMAT,
        "name": name,
        "model_id": f"{name}-{digest[:12]}",
        "weights_sha256": digest,
        "dtype": str(dtype).removeprefix("torch."),
        "model": model.cfg.to_dict(),
        "crop_policy": asdict(policy),
        "detector": detector.to_record(),
        **meta,
    }
    if refine is not None:
        doc["refine"] = {"model": refine.cfg.to_dict(), "align": align.to_dict()}
    if trust is not None:
        doc["trust"] = {"face_threshold": trust.face_threshold, **doc.get("trust", {})}
    return PackedCheckpoint(blob, doc)


def write_checkpoint(packed: PackedCheckpoint, weights_uri: str, *, force: bool = False) -> str:
    """Write ``packed`` as ``weights_uri`` (``.safetensors``) and the JSON beside it; returns ``weights_uri``.

    Refuses to replace an existing checkpoint unless ``force``: a served model may be reading it.
    """
    json_uri = config_uri(weights_uri)
    if not force:
        for uri in (weights_uri, json_uri):
            if exists(uri):
                raise CheckpointError(f"model {uri} exists; fkd never overwrites a model unless forced (--force)")
    write_bytes(packed.blob, weights_uri)
    write_json(packed.doc, json_uri)
    return weights_uri


def save_new_checkpoint(packed: PackedCheckpoint, out_dir: str, *, force: bool = False) -> str:
    """Write ``packed`` under ``out_dir`` named by its model id (``<name>-<sha256 head>.safetensors``), so a retrain
    never takes the name of a model that is being served; returns the weights' URI."""
    return write_checkpoint(packed, f"{out_dir.rstrip('/')}/{packed.model_id}.safetensors", force=force)


def save_checkpoint(model: NaimishNet, weights_uri: str, **pack) -> str:
    """``pack_checkpoint(model, <file stem>, **pack)`` written as ``weights_uri`` and its JSON, replacing them if
    present; returns the model id. For tools and tests that name their own file; the train flow never replaces
    a checkpoint (:func:`save_new_checkpoint`)."""
    packed = pack_checkpoint(model, weights_uri.rsplit("/", 1)[-1][: -len(".safetensors")], **pack)
    write_checkpoint(packed, weights_uri, force=True)
    return packed.model_id


def load_checkpoint(weights_uri: str | Path = DEFAULT_MODEL) -> LoadedModel:
    """Rebuild a model from its checkpoint; refuses anything but safetensors and any config mismatch."""
    weights_uri = str(weights_uri)
    json_uri = config_uri(weights_uri)
    if not exists(weights_uri):
        raise CheckpointError(f"model {weights_uri} does not exist")
    doc = read_json(json_uri)
    if doc is None:
        raise CheckpointError(f"model {weights_uri} has no config beside it ({json_uri} does not exist)")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{weights_uri}: unknown checkpoint format {doc.get('format')!r}, expected {FORMAT!r}")
    try:
        blob = read_bytes(weights_uri, max_bytes=MAX_CHECKPOINT_BYTES)
    except ImageError as e:
        raise CheckpointError(f"checkpoint weights {weights_uri}: {e}") from e
    return _from_blob(blob, doc, weights_uri)


def _from_blob(blob: bytes, doc: dict, weights_uri: str) -> LoadedModel:
    """A checkpoint's model from its weights' bytes and its JSON (``weights_uri`` names it in errors)."""
    digest = hashlib.sha256(blob).hexdigest()
    if doc.get("weights_sha256") and doc["weights_sha256"] != digest:
        raise CheckpointError(f"{weights_uri}: weights sha256 {digest[:12]} does not match the config's")
    try:
        cfg = NaimishNetConfig.from_dict(doc["model"])
        refine_doc = doc.get("refine")
        refine_cfg = NaimishNetConfig.from_dict(refine_doc["model"]) if refine_doc else None
        align = AlignPolicy(**refine_doc["align"]) if refine_doc else None
        policy = CropPolicy(**doc["crop_policy"])
        detector = DetectorConfig.from_record(doc["detector"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{weights_uri}: invalid checkpoint config: {e}") from e
    try:
        tensors = st_load(blob)
    except Exception as e:
        raise CheckpointError(f"{weights_uri}: not a valid safetensors file: {e}") from e
    trust = None
    if doc.get("trust") is not None:
        try:
            trust = TrustHeads.from_tensors(
                {k: v.float().numpy() for k, v in tensors.items() if k.startswith(TRUST_PREFIX)},
                float(doc["trust"]["face_threshold"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{weights_uri}: invalid trust heads: {e}") from e
    tensors = {k: v for k, v in tensors.items() if not k.startswith(TRUST_PREFIX)}
    model = NaimishNet(cfg)
    refine = NaimishNet(refine_cfg) if refine_cfg else None
    expected = {k: (v, cfg) for k, v in model.state_dict().items()}
    if refine is not None:
        expected |= {REFINE_PREFIX + k: (v, refine_cfg) for k, v in refine.state_dict().items()}
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"{weights_uri}: weight names differ from NaimishNet: missing {sorted(set(expected) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(expected))}"
        )
    for k, v in tensors.items():
        want, want_cfg = expected[k]
        if tuple(v.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{weights_uri}: weight {k!r} has shape {tuple(v.shape)} but the config "
                f"(input_size={want_cfg.input_size}) needs {tuple(want.shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in tensors.items() if not k.startswith(REFINE_PREFIX)})
    model.eval()
    if refine is not None:
        n = len(REFINE_PREFIX)
        refine.load_state_dict({k[n:]: v.float() for k, v in tensors.items() if k.startswith(REFINE_PREFIX)})
        refine.eval()
    model_id = doc.get("model_id", f"{doc.get('name')}-{digest[:12]}")
    return LoadedModel(model, policy, detector, model_id, doc, refine, align, trust)
