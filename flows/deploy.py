"""Deployments: the only place for schedules. ``fkd serve`` serves them from one long-running process."""

from __future__ import annotations

import datetime as dt

from prefect import serve

from flows.annotate import annotate
from flows.evaluate import evaluate
from flows.ingest import ingest
from flows.settings import FkdSettings
from flows.train import train


def build_deployments(settings: FkdSettings, interval: float | None = None) -> list:
    """A nightly incremental annotation of ``settings.nightly_source`` (when set) and on-demand deployments.

    ``interval`` (seconds) replaces the nightly cron, for trying the schedule out.
    """
    deployments = []
    if settings.nightly_source and settings.nightly_out:
        params = {
            "cfg": {
                "source": settings.nightly_source,
                "out": settings.nightly_out,
                "incremental": True,
                "model": settings.model,
                "shard_size": settings.shard_size,
                "workers": settings.workers,
                "dask_address": settings.dask_address,
                "max_pixels": settings.max_pixels,
            }
        }
        schedule = {"interval": dt.timedelta(seconds=interval)} if interval else {"cron": settings.nightly_cron}
        deployments.append(
            annotate.to_deployment(
                name="nightly-incremental",
                parameters=params,
                tags=["fkd", "nightly"],
                description="Annotate the images that arrived since the last run",
                **schedule,
            )
        )
    for fl, name in ((annotate, "on-demand"), (ingest, "on-demand"), (train, "on-demand"), (evaluate, "on-demand")):
        deployments.append(fl.to_deployment(name=name, tags=["fkd", "on-demand"]))
    return deployments


def serve_all(settings: FkdSettings, interval: float | None = None) -> None:  # pragma: no cover - blocks forever
    serve(*build_deployments(settings, interval))
