"""Deployments: the only place for schedules. ``fkd serve`` serves them from one long-running process.

The same deployments, attached to a work pool, are declared in ``prefect.yaml`` under other names (``-pool``
suffix), so ``prefect deploy --all`` never takes over the served ones, nor ``fkd serve`` the pool's.
"""

from __future__ import annotations

import datetime as dt
import os

from .settings import FkdSettings

NIGHTLY = "nightly-incremental"
ON_DEMAND = "on-demand"
ZOMBIE_AUTOMATION = "fkd: crash flow runs whose heartbeat stopped"
# Served flow runs send a heartbeat event this often (seconds); a run silent for 3 beats is marked Crashed.
DEFAULT_HEARTBEAT_SECONDS = 30


def nightly_parameters(settings: FkdSettings) -> dict:
    """The nightly run's flat parameters: what it annotates and where to. The model, detector, shard size and
    the other settings are resolved where each run runs (``AnnotateConfig.SETTINGS``), like every run's."""
    return {"source": settings.nightly_source, "out": settings.nightly_out, "incremental": True}


def build_deployments(settings: FkdSettings, interval: float | None = None) -> list:
    """A nightly incremental annotation of ``settings.nightly_source`` (when set) and on-demand deployments.

    ``interval`` (seconds) replaces the nightly cron, for trying the schedule out. The nightly deployment has a
    concurrency limit of 1 with the ENQUEUE strategy: a run due while another is running waits in Prefect
    (state AwaitingConcurrencySlot), not as a process.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from .annotate import annotate
    from .evaluate import evaluate
    from .ingest import ingest
    from .train import train

    deployments = []
    if settings.nightly_source and settings.nightly_out:
        schedule = {"interval": dt.timedelta(seconds=interval)} if interval else {"cron": settings.nightly_cron}
        deployments.append(
            annotate.to_deployment(
                name=NIGHTLY,
                entrypoint_type=EntrypointType.MODULE_PATH,
                parameters=nightly_parameters(settings),
                tags=["fkd", "nightly"],
                description="Annotate the images that arrived since the last run",
                concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
                **schedule,
            )
        )
    for fl in (annotate, ingest, train, evaluate):
        deployments.append(
            fl.to_deployment(name=ON_DEMAND, tags=["fkd", "on-demand"], entrypoint_type=EntrypointType.MODULE_PATH)
        )
    return deployments


class DeploymentConflict(RuntimeError):
    """A deployment of the same name belongs to a work pool (``prefect deploy``): serving would take it over."""


def check_no_pool_deployments(deployments: list) -> None:
    """Refuse to serve a deployment whose name a work-pool deployment already uses on this server."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                raise DeploymentConflict(
                    f"deployment {d.flow_name}/{d.name} exists on work pool {existing.work_pool_name!r}; fkd serve "
                    f"will not take it over (delete it with `prefect deployment delete '{d.flow_name}/{d.name}'`)"
                )


def ensure_zombie_automation(heartbeat_seconds: int) -> None:
    """An automation that marks a flow run Crashed when its heartbeats stop (its process was killed).

    Prefect's documented zombie-flow detection: flow runs emit ``prefect.flow-run.heartbeat`` events; a run
    that sent one and then neither another nor a final state within three beats is set to Crashed, which also
    frees its deployment concurrency slot.
    """
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    automation = AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="fkd serve: a flow run that stopped sending heartbeats died with its process",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
                "prefect.flow-run.Scheduled",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=dt.timedelta(seconds=3 * heartbeat_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="No heartbeat: its process died")],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if existing and existing[0].trigger.within == automation.trigger.within:
            return
        for old in existing:
            client.delete_automation(old.id)
        client.create_automation(automation)


STOP_GRACE_SECONDS = 6.0  # SIGTERM to in-flight runs, then SIGKILL: all within Docker's 10 s stop timeout


def serve_all(settings: FkdSettings, interval: float | None = None, announce=None) -> None:  # pragma: no cover
    """Serve the deployments until SIGTERM or Ctrl-C.

    Flow runs started here send heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, 30 s unless set), which the
    zombie automation watches. On SIGTERM (``docker stop``) or Ctrl-C, :func:`stop` ends each in-flight run
    (its fkd run record says ``interrupted``), puts its flow run back to Scheduled and exits, within
    ``STOP_GRACE_SECONDS`` plus a moment; the next ``fkd serve`` runs it again and it resumes its fkd run.
    """
    import asyncio
    import signal

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(DEFAULT_HEARTBEAT_SECONDS))
    from prefect.runner import Runner

    deployments = build_deployments(settings, interval)
    check_no_pool_deployments(deployments)
    ensure_zombie_automation(int(os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]))
    if announce is not None:
        announce([f"{d.flow_name}/{d.name}" for d in deployments])
    runner = Runner(name="fkd-serve", pause_on_shutdown=False)
    for d in deployments:
        runner.add_deployment(d)
    # Prefect's own SIGTERM handling cancels in-flight runs (a rerun would start over) and waits on hooks;
    # Runner.start installs `runner.handle_sigterm`, so this replaces it.
    runner.handle_sigterm = lambda *_: stop(runner)
    signal.signal(signal.SIGINT, lambda *_: stop(runner))
    asyncio.run(runner.start())


def stop(runner) -> None:  # pragma: no cover - exercised by the served-deployment test in a real process
    """End in-flight flow runs so that they resume later, then exit the process at once."""
    import time

    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.logging import get_logger
    from prefect.states import Scheduled

    from ._common import logging_handlers

    log = get_logger("fkd.serve")
    manager = runner._process_manager  # the runner's map of flow run id -> child process
    handles = {fid: manager.get(fid) for fid in manager.flow_run_ids()}
    handles = {fid: h for fid, h in handles.items() if h is not None}
    log.info("stopping: %d flow run(s) in flight will be rescheduled and resume when served again", len(handles))
    for h in handles.values():
        h.graceful_kill()  # SIGTERM: the flow records its fkd run as interrupted and stops its shards
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while any(h.is_alive() for h in handles.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for fid, h in handles.items():
        if h.is_alive():
            log.warning("flow run %s did not stop in %.0f s: killing it", fid, STOP_GRACE_SECONDS)
            h.hard_kill()
    try:
        with get_client(sync_client=True) as client:
            for fid in handles:
                state = client.read_flow_run(fid).state
                # a run that completed, failed or was cancelled before the signal reached it stays so; the one
                # the signal stopped says Running or, as the engine reports a termination signal, Crashed
                if state is not None and state.type in (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED):
                    continue
                client.set_flow_run_state(
                    fid, Scheduled(message="fkd serve stopped; resumes when served again"), force=True
                )
    except Exception as e:  # the zombie automation marks them Crashed if this cannot
        log.warning("could not reschedule the interrupted flow runs: %s", e)
    for handler in logging_handlers():  # Prefect's API log handler sends its queue
        handler.flush()
    os._exit(0)
