"""Small helpers shared by the flows (no numerics)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TypeVar

from fkd_core.checkpoint import LoadedModel, config_uri, load_checkpoint
from fkd_core.parquet_io import read_json
from fkd_core.predict import Predictor

T = TypeVar("T")

# (retries, delays) for tasks that touch storage.
IO_RETRIES = (3, [2, 5, 15])


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(empty)_"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


FIRST_STAGE_SUFFIX = "+first-stage"


def cached_predictor(model: str, refine: bool = True) -> tuple[Predictor, LoadedModel]:
    """One predictor per checkpoint and process (and per long-lived Dask worker), built on first use.

    Keyed by a digest of the checkpoint's JSON (which names the weights' sha256 and holds the detector settings)
    as well as the path, so a checkpoint retrained or re-configured in place is picked up instead of the stale
    cached one.

    With ``refine=False`` a two-stage checkpoint runs its first stage only (faster, less accurate); its model id
    then ends in ``+first-stage``, so its keypoints are never mistaken for the full pipeline's.
    """
    doc = read_json(config_uri(model)) or {}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return _predictor(model, digest, refine)


@lru_cache(maxsize=4)
def _predictor(model: str, config_digest: str, refine: bool = True) -> tuple[Predictor, LoadedModel]:
    loaded = load_checkpoint(model)
    if not refine and loaded.refine is not None:
        loaded = dataclasses.replace(loaded, refine=None, align=None, model_id=loaded.model_id + FIRST_STAGE_SUFFIX)
    return Predictor(loaded.model, loaded.policy, refine=loaded.refine, align=loaded.align), loaded
