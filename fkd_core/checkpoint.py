"""Checkpoints: weights in safetensors (never pickle), each stage's ONNX graph, and a JSON of config, crop policy and
metrics beside them.

Loading (:func:`load_checkpoint`) needs neither torch nor onnx: it checks every file against the sha256 its JSON
records and reads the weights as numpy arrays. The PyTorch networks (``LoadedModel.model``, ``.refine``) are built
on first use, for training; inference runs the ONNX graphs. Writing (:func:`pack_checkpoint`,
:func:`write_checkpoint`, :func:`add_graphs`) needs torch and onnx (``pip install 'fkd[train]'``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fkd_core.align import AlignPolicy
from fkd_core.detect import (
    Detector,
    DetectorConfig,
    DetectorMapping,
    LandmarkStart,
    detector_from_record,
    detector_name,
)
from fkd_core.errors import CheckpointError, ImageError
from fkd_core.geometry import CropPolicy
from fkd_core.netspec import NaimishNetConfig, parameter_shapes
from fkd_core.resources import DEFAULT_MODEL as DEFAULT_MODEL  # re-exported: the packaged checkpoint
from fkd_core.storage import exists, read_bytes, read_json, write_bytes, write_json
from fkd_core.trust import TRUST_PREFIX, TrustHeads

if TYPE_CHECKING:
    from fkd_core.model import NaimishNet

FORMAT = "fkd-naimishnet/1"
MAX_CHECKPOINT_BYTES = 2 << 30  # far above two float32 stages at S = 224 (357 MB)
REFINE_PREFIX = "refine."  # tensor names of the optional second (refining) stage in the same file
STAGES = ("first", "refine")  # the ONNX graphs: <stem>.first.onnx and, for a two-stage checkpoint, <stem>.refine.onnx


@dataclass(frozen=True)
class AlternateDetector:
    """Another detector a checkpoint's model runs behind: its settings, the map from its boxes to the boxes the model
    was trained on (its crops are then the crops training saw), where its detections carry landmarks the map from
    them to the 68 points the refining stage starts from (instead of the first stage's), and trust heads fitted on
    its own signals (its score and boxes are not the trained detector's). Stored in the JSON's ``detectors``
    section, the heads as ``trust.<name>.*`` tensors."""

    detector: Detector
    mapping: DetectorMapping
    trust: TrustHeads | None = None
    fitted: dict = field(default_factory=dict)  # how the mapping (and heads) were fitted: data, counts, figures
    start: LandmarkStart | None = None

    def record(self) -> dict:
        doc = {"detector": self.detector.to_record(), "box_mapping": self.mapping.to_dict(), "fitted": self.fitted}
        if self.start is not None:
            doc["landmark_start"] = self.start.to_dict()
        if self.trust is not None:
            doc["trust"] = {"face_threshold": self.trust.face_threshold}
        return doc


@dataclass
class LoadedModel:
    """A checkpoint as read and checked: its settings, its stages' weights (numpy, as stored) and ONNX graphs.

    ``model`` and ``refine`` (the PyTorch networks, for training) are built from the weights on first use, so
    only code that trains imports torch.
    """

    cfg: NaimishNetConfig  # the first stage
    policy: CropPolicy
    detector: Detector  # the detector the model was trained behind
    model_id: str  # "<name>-<first 12 hex of the weights' sha256>"
    meta: dict = field(default_factory=dict)
    refine_cfg: NaimishNetConfig | None = None  # the second stage, on crops aligned to the first stage's keypoints
    align: AlignPolicy | None = None  # how those crops are made (set with ``refine_cfg``)
    trust: TrustHeads | None = None  # face_prob and quality heads over the refining stage (fkd_core.trust)
    tensors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # stage weights by PyTorch name
    graphs: dict[str, bytes] = field(default_factory=dict, repr=False)  # "first"/"refine" ONNX graphs, checked
    detectors: dict[str, AlternateDetector] = field(default_factory=dict)  # other detectors, by name

    @property
    def two_stage(self) -> bool:
        return self.refine_cfg is not None

    @cached_property
    def model(self) -> NaimishNet:
        """The first stage as a PyTorch network in evaluation mode (imports torch)."""
        return _network(self.cfg, self.tensors, "")

    @cached_property
    def refine(self) -> NaimishNet | None:
        """The refining stage as a PyTorch network, or None for a one-stage checkpoint (imports torch)."""
        return _network(self.refine_cfg, self.tensors, REFINE_PREFIX) if self.refine_cfg else None

    @classmethod
    def of(cls, model: NaimishNet, refine: NaimishNet | None = None, **fields) -> LoadedModel:
        """An uncheckpointed model pair as a ``LoadedModel`` (tools and tests): ``fields`` as the dataclass's."""
        fields.setdefault("policy", CropPolicy())
        fields.setdefault("detector", DetectorConfig())
        fields.setdefault("model_id", "uncheckpointed")
        loaded = cls(model.cfg, refine_cfg=refine.cfg if refine is not None else None, **fields)
        loaded.__dict__.update(model=model, refine=refine)
        return loaded


def _network(cfg: NaimishNetConfig, tensors: dict[str, np.ndarray], prefix: str) -> NaimishNet:
    import torch

    from fkd_core.model import NaimishNet

    net = NaimishNet(cfg)
    n = len(prefix)
    state = {k[n:]: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items() if k.startswith(prefix)}
    if not prefix:
        state = {k: v for k, v in state.items() if not k.startswith(REFINE_PREFIX)}
    net.load_state_dict(state)
    return net.eval()


def config_uri(weights_uri: str) -> str:
    """The JSON beside a ``.safetensors`` checkpoint."""
    return _stem(weights_uri) + ".json"


def graph_uri(weights_uri: str, stage: str) -> str:
    """The ONNX graph of ``stage`` (``first`` or ``refine``) beside a ``.safetensors`` checkpoint."""
    return f"{_stem(weights_uri)}.{stage}.onnx"


def _stem(weights_uri: str) -> str:
    if not weights_uri.endswith(".safetensors"):
        raise CheckpointError(f"weights must be a .safetensors file, got {weights_uri!r}")
    return weights_uri[: -len(".safetensors")]


@dataclass(frozen=True)
class PackedCheckpoint:
    """A checkpoint assembled in memory: the safetensors bytes and the JSON beside them (its graphs are exported when
    it is written)."""

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
    detector: Detector,
    meta: dict,
    dtype=None,
    refine: NaimishNet | None = None,
    align: AlignPolicy | None = None,
    trust: TrustHeads | None = None,
    detectors: dict[str, AlternateDetector] | None = None,
) -> PackedCheckpoint:
    """Assemble a checkpoint in memory; its model id is ``<name>-<first 12 hex of the weights' sha256>``.

    ``dtype`` (a torch dtype) is float16 unless given. With ``refine`` (and its ``align`` policy) the file also
    holds a second stage, its tensors named ``refine.<name>``; the sha256, and so the model id, covers both
    stages. With ``trust`` (which needs the refining stage) it also holds the trust heads as float32 ``trust.*``
    tensors, covered by the sha256 too, and so are each of the other ``detectors``' heads (``trust.<name>.*``).
    """
    import torch

    dtype = torch.float16 if dtype is None else dtype
    if (refine is None) != (align is None):
        raise ValueError("a refining stage needs its align policy, and an align policy needs the stage")
    tensors = {k: v.detach().to(dtype).cpu().numpy() for k, v in model.state_dict().items()}
    if refine is not None:
        tensors |= {REFINE_PREFIX + k: v.detach().to(dtype).cpu().numpy() for k, v in refine.state_dict().items()}
    refine_cfg = refine.cfg if refine is not None else None
    return _assemble(tensors, name, model.cfg, refine_cfg, policy, detector, align, trust, detectors or {}, meta)


# what a checkpoint's JSON says of its structure, rebuilt by every pack; the rest is its record (training, fits)
_STRUCTURE = ("format", "name", "model_id", "weights_sha256", "dtype", "model", "crop_policy", "detector", "refine")
_KEEP = object()


def repack(
    loaded: LoadedModel,
    *,
    name: str | None = None,
    record: dict | None = None,
    trust: TrustHeads | None | object = _KEEP,
    detectors: dict[str, AlternateDetector] | object = _KEEP,
    align: AlignPolicy | object = _KEEP,
    detector: Detector | object = _KEEP,
) -> PackedCheckpoint:
    """A checkpoint's stages, unchanged to the bit, packed again with other trust heads, detectors, align policy or
    settings of its own detector, its record updated with ``record`` (tools that fit the heads, a detector's mapping
    or the refining rule). Needs no torch."""
    meta = {k: v for k, v in loaded.meta.items() if k not in (*_STRUCTURE, "detectors", "onnx")} | (record or {})
    return _assemble(
        dict(loaded.tensors),
        name or loaded.meta.get("name") or loaded.model_id.rsplit("-", 1)[0],
        loaded.cfg,
        loaded.refine_cfg,
        loaded.policy,
        loaded.detector if detector is _KEEP else detector,
        loaded.align if align is _KEEP else align,
        loaded.trust if trust is _KEEP else trust,
        loaded.detectors if detectors is _KEEP else detectors,
        meta,
    )


def _assemble(
    tensors: dict[str, np.ndarray],
    name: str,
    cfg: NaimishNetConfig,
    refine_cfg: NaimishNetConfig | None,
    policy: CropPolicy,
    detector: Detector,
    align: AlignPolicy | None,
    trust: TrustHeads | None,
    detectors: dict[str, AlternateDetector],
    meta: dict,
) -> PackedCheckpoint:
    from safetensors.numpy import save as st_save

    if (refine_cfg is None) != (align is None):
        raise ValueError("a refining stage needs its align policy, and an align policy needs the stage")
    if (trust is not None or any(d.trust for d in detectors.values())) and refine_cfg is None:
        raise ValueError("trust heads read the refining stage: a checkpoint with them needs one")
    if detector_name(detector) in detectors:
        raise ValueError(f"{detector_name(detector)} is the checkpoint's own detector, not another one")
    tensors = dict(tensors)
    heads = {TRUST_PREFIX: trust} | {f"{TRUST_PREFIX}{n}.": d.trust for n, d in detectors.items()}
    for prefix, h in heads.items():
        if h is not None:
            tensors |= {k: np.ascontiguousarray(v, np.float32) for k, v in h.to_tensors(prefix).items()}
    blob = st_save(tensors, metadata={"format": FORMAT})
    digest = hashlib.sha256(blob).hexdigest()
    doc = {
        "format": FORMAT,
        "name": name,
        "model_id": f"{name}-{digest[:12]}",
        "weights_sha256": digest,
        "dtype": str(next(v.dtype for k, v in tensors.items() if not k.startswith(TRUST_PREFIX))),
        "model": cfg.to_dict(),
        "crop_policy": asdict(policy),
        "detector": detector.to_record(),
        **{k: v for k, v in meta.items() if k not in (*_STRUCTURE, "detectors", "onnx")},
    }
    if refine_cfg is not None:
        doc["refine"] = {"model": refine_cfg.to_dict(), "align": align.to_dict()}
    if trust is not None:
        doc["trust"] = {**doc.get("trust", {}), "face_threshold": trust.face_threshold}
    else:
        doc.pop("trust", None)
    if detectors:
        doc["detectors"] = {n: d.record() for n, d in detectors.items()}
    return PackedCheckpoint(blob, doc)


def write_checkpoint(packed: PackedCheckpoint, weights_uri: str, *, force: bool = False) -> str:
    """Write ``packed`` as ``weights_uri`` (``.safetensors``), each stage's ONNX graph and the JSON beside them (last,
    naming each graph with its sha256); returns ``weights_uri``.

    Refuses to replace an existing checkpoint unless ``force``: a served model may be reading it.
    """
    loaded = packed.load()
    files = [weights_uri, config_uri(weights_uri), *(graph_uri(weights_uri, s) for s in _stages(loaded))]
    if not force:
        for uri in files:
            if exists(uri):
                raise CheckpointError(f"model {uri} exists; fkd never overwrites a model unless forced (--force)")
    write_bytes(packed.blob, weights_uri)
    _write_graphs_and_config(loaded, packed.doc, weights_uri)
    return weights_uri


def add_graphs(weights_uri: str | Path, *, force: bool = False) -> dict[str, str]:
    """Export the ONNX graphs of an existing checkpoint and name them in its JSON (a checkpoint written before
    graphs were, such as one from an older fkd); returns each stage's graph URI. The weights are not touched, so
    the model id stays. Refuses to replace existing graphs unless ``force``."""
    weights_uri = str(weights_uri)
    loaded = load_checkpoint(weights_uri)
    if not force:
        for s in _stages(loaded):
            if exists(graph_uri(weights_uri, s)):
                raise CheckpointError(f"{graph_uri(weights_uri, s)} exists; fkd never overwrites a model unless forced")
    doc = {k: v for k, v in loaded.meta.items() if k != "onnx"}
    _write_graphs_and_config(loaded, doc, weights_uri)
    return {s: graph_uri(weights_uri, s) for s in _stages(loaded)}


def _stages(loaded: LoadedModel) -> tuple[str, ...]:
    return STAGES if loaded.two_stage else STAGES[:1]


def _write_graphs_and_config(loaded: LoadedModel, doc: dict, weights_uri: str) -> None:
    from fkd_core.export import stage_graph

    networks = {"first": loaded.model, "refine": loaded.refine}
    onnx = {}
    for s in _stages(loaded):
        graph = stage_graph(networks[s])
        write_bytes(graph, graph_uri(weights_uri, s))
        onnx[s] = {"file": graph_uri(weights_uri, s).rsplit("/", 1)[-1], "sha256": hashlib.sha256(graph).hexdigest()}
    write_json({**doc, "onnx": onnx}, config_uri(weights_uri))


def save_new_checkpoint(packed: PackedCheckpoint, out_dir: str, *, force: bool = False) -> str:
    """Write ``packed`` under ``out_dir`` named by its model id (``<name>-<sha256 head>.safetensors``), so a retrain
    never takes the name of a model that is being served; returns the weights' URI."""
    return write_checkpoint(packed, f"{out_dir.rstrip('/')}/{packed.model_id}.safetensors", force=force)


def save_checkpoint(model: NaimishNet, weights_uri: str, **pack) -> str:
    """``pack_checkpoint(model, <file stem>, **pack)`` written as ``weights_uri``, its graphs and its JSON, replacing
    them if present; returns the model id. For tools and tests that name their own file; the train flow never
    replaces a checkpoint (:func:`save_new_checkpoint`)."""
    packed = pack_checkpoint(model, weights_uri.rsplit("/", 1)[-1][: -len(".safetensors")], **pack)
    write_checkpoint(packed, weights_uri, force=True)
    return packed.model_id


def load_checkpoint(weights_uri: str | Path = DEFAULT_MODEL) -> LoadedModel:
    """A checkpoint read and checked: refuses anything but safetensors, weights or graphs whose sha256 is not the one
    the JSON records, and any config that does not fit the weights. Needs neither torch nor onnx."""
    weights_uri = str(weights_uri)
    json_uri = config_uri(weights_uri)
    if not exists(weights_uri):
        raise CheckpointError(f"model {weights_uri} does not exist")
    doc = read_json(json_uri)
    if doc is None:
        raise CheckpointError(f"model {weights_uri} has no config beside it ({json_uri} does not exist)")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{weights_uri}: unknown checkpoint format {doc.get('format')!r}, expected {FORMAT!r}")
    loaded = _from_blob(_read(weights_uri, "weights"), doc, weights_uri)
    for stage, entry in (doc.get("onnx") or {}).items():
        if stage not in _stages(loaded) or not isinstance(entry, dict) or "sha256" not in entry:
            raise CheckpointError(f"{json_uri}: invalid onnx entry {stage!r}: {entry!r}")
        uri = graph_uri(weights_uri, stage)  # named like the weights, as the JSON is: a renamed copy renames all
        if not exists(uri):
            raise CheckpointError(f"{weights_uri}: its {stage} graph {uri} does not exist")
        graph = _read(uri, f"{stage} graph")
        if hashlib.sha256(graph).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{uri}: sha256 does not match the one {json_uri} records; refusing an altered graph")
        loaded.graphs[stage] = graph
    return loaded


def _read(uri: str, what: str) -> bytes:
    try:
        return read_bytes(uri, max_bytes=MAX_CHECKPOINT_BYTES)
    except ImageError as e:
        raise CheckpointError(f"checkpoint {what} {uri}: {e}") from e


def _from_blob(blob: bytes, doc: dict, weights_uri: str) -> LoadedModel:
    """A checkpoint's model from its weights' bytes and its JSON (``weights_uri`` names it in errors)."""
    from safetensors.numpy import load as st_load

    digest = hashlib.sha256(blob).hexdigest()
    if not doc.get("weights_sha256"):
        raise CheckpointError(f"{weights_uri}: its config records no weights_sha256, so its weights cannot be checked")
    if doc["weights_sha256"] != digest:
        raise CheckpointError(f"{weights_uri}: weights sha256 {digest[:12]} does not match the config's")
    try:
        cfg = NaimishNetConfig.from_dict(doc["model"])
        refine_doc = doc.get("refine")
        refine_cfg = NaimishNetConfig.from_dict(refine_doc["model"]) if refine_doc else None
        align = AlignPolicy(**refine_doc["align"]) if refine_doc else None
        policy = CropPolicy(**doc["crop_policy"])
        detector = detector_from_record(doc["detector"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{weights_uri}: invalid checkpoint config: {e}") from e
    try:
        tensors = st_load(blob)
    except Exception as e:
        raise CheckpointError(f"{weights_uri}: not a valid safetensors file: {e}") from e
    trust = _trust_heads(tensors, doc.get("trust"), TRUST_PREFIX, weights_uri)
    detectors = {}
    for name, d in (doc.get("detectors") or {}).items():
        try:
            detectors[name] = AlternateDetector(
                detector_from_record(d["detector"]),
                DetectorMapping.from_dict(d["box_mapping"]),
                _trust_heads(tensors, d.get("trust"), f"{TRUST_PREFIX}{name}.", weights_uri),
                d.get("fitted") or {},
                LandmarkStart.from_dict(d["landmark_start"]) if d.get("landmark_start") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{weights_uri}: invalid detectors entry {name!r}: {e}") from e
    tensors = {k: v for k, v in tensors.items() if not k.startswith(TRUST_PREFIX)}
    expected = {k: (v, cfg) for k, v in parameter_shapes(cfg).items()}
    if refine_cfg is not None:
        expected |= {REFINE_PREFIX + k: (v, refine_cfg) for k, v in parameter_shapes(refine_cfg).items()}
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"{weights_uri}: weight names differ from NaimishNet: missing {sorted(set(expected) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(expected))}"
        )
    for k, v in tensors.items():
        want, want_cfg = expected[k]
        if tuple(v.shape) != want:
            raise CheckpointError(
                f"{weights_uri}: weight {k!r} has shape {tuple(v.shape)} but the config "
                f"(input_size={want_cfg.input_size}) needs {want}"
            )
    model_id = doc.get("model_id", f"{doc.get('name')}-{digest[:12]}")
    return LoadedModel(cfg, policy, detector, model_id, doc, refine_cfg, align, trust, tensors, {}, detectors)


def _trust_heads(tensors: dict[str, np.ndarray], doc: dict | None, prefix: str, weights_uri: str) -> TrustHeads | None:
    """The trust heads stored under ``prefix``, if the JSON section ``doc`` says there are some."""
    if doc is None:
        return None
    try:
        t = {k: v.astype(np.float32) for k, v in tensors.items() if k.startswith(prefix)}
        return TrustHeads.from_tensors(t, float(doc["face_threshold"]), prefix)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{weights_uri}: invalid trust heads: {e}") from e
