"""Dask workers that are ready before the work arrives: the model is loaded once per worker, off its event loop.

Kept free of heavy imports at module level: a worker unpickles this plugin on its event loop, so importing
torch, ONNX Runtime or Prefect there would stall its heartbeats for seconds. The plugin's ``setup`` does that
work in a thread instead.
"""

from __future__ import annotations

import asyncio
import hashlib

from distributed.diagnostics.plugin import WorkerPlugin


def _load(model: str, refine: bool) -> str:
    import flows.annotate  # noqa: F401 - the shard task's module: imported now, not when the first shard arrives
    from fkd_core.predict import Predictor

    return Predictor.from_checkpoint(model, refine=refine).model_id


class ModelOnWorkers(WorkerPlugin):
    """Builds the annotate predictor on every worker of the cluster, and on every worker that joins later.

    Registering it (``client.register_plugin``) returns once each current worker has loaded the model, so the
    first shard a worker takes finds the model built (``Predictor.from_checkpoint`` caches it per process).
    """

    def __init__(self, model: str, refine: bool = True):
        self.model, self.refine = model, refine
        # one plugin per checkpoint and stage choice: registering the same again replaces it instead of stacking
        self.name = "fkd-model-" + hashlib.sha256(f"{model}|{refine}".encode()).hexdigest()[:12]

    async def setup(self, worker) -> None:
        loop = asyncio.get_running_loop()
        model_id = await loop.run_in_executor(None, _load, self.model, self.refine)
        worker.log_event("fkd", {"action": "model-loaded", "model_id": model_id, "worker": worker.address})
