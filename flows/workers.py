"""Dask workers that are ready before the work arrives: the model is loaded once per worker, off its event loop.

Kept free of heavy imports at module level: a worker unpickles this plugin on its event loop, so importing
torch, ONNX Runtime or Prefect there would stall its heartbeats for seconds. The plugin's ``setup`` does that
work in a thread instead.
"""

from __future__ import annotations

import asyncio
import hashlib

from distributed.diagnostics.plugin import WorkerPlugin


def _load(model: str, refine: bool, detector: str | None) -> str:
    from . import annotate  # noqa: F401 - the shard task's module: imported now, not when the first shard arrives
    from .preflight import predictor_of

    return predictor_of(model, refine, detector).model_id


class ModelOnWorkers(WorkerPlugin):
    """Builds the annotate predictor on every worker of the cluster, and on every worker that joins later.

    Registering it (``client.register_plugin``) returns once each current worker has loaded the model, so the
    first shard a worker takes finds the model built (``Predictor.from_checkpoint`` caches it per process).
    """

    def __init__(self, model: str, refine: bool = True, detector: str | None = None):
        self.model, self.refine, self.detector = model, refine, detector
        # one plugin per checkpoint, stage and detector choice: registering the same again replaces it
        self.name = "fkd-model-" + hashlib.sha256(f"{model}|{refine}|{detector}".encode()).hexdigest()[:12]

    async def setup(self, worker) -> None:
        loop = asyncio.get_running_loop()
        model_id = await loop.run_in_executor(None, _load, self.model, self.refine, self.detector)
        worker.log_event("fkd", {"action": "model-loaded", "model_id": model_id, "worker": worker.address})
