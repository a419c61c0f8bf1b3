import torch

from fkd_core.checkpoint import save_checkpoint
from fkd_core.detect import DetectorConfig
from fkd_core.geometry import CropPolicy
from fkd_core.model import NaimishNet
from flows._common import cached_predictor, chunks, markdown_table


def test_cached_predictor_reloads_a_checkpoint_retrained_in_place(tmp_path):
    path = str(tmp_path / "m.safetensors")
    torch.manual_seed(1)
    a = save_checkpoint(NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    assert cached_predictor(path)[1].model_id == a
    assert cached_predictor(path)[0] is cached_predictor(path)[0]  # built once
    torch.manual_seed(2)
    b = save_checkpoint(NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    assert a != b and cached_predictor(path)[1].model_id == b
    # the same weights with other detector settings in the JSON are picked up too
    torch.manual_seed(2)
    assert b == save_checkpoint(
        NaimishNet(), path, policy=CropPolicy(), detector=DetectorConfig(fallback_min_neighbors=0), meta={}
    )
    assert cached_predictor(path)[1].detector.fallback_min_neighbors == 0


def test_chunks_and_markdown_table():
    assert list(chunks(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    assert markdown_table([{"a": 1, "b": 0.5}]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5000 |"]


def test_io_tasks_retry_what_can_heal_and_fail_at_once_on_what_cannot():
    """The storage tasks' retry policy, run by Prefect for real (delays set to 0 to keep the test short)."""
    import errno

    from prefect import flow, task
    from prefect.context import get_run_context

    from flows._common import IO_RETRY

    attempts = {"flaky": 0, "missing": 0}

    @task(**{**IO_RETRY, "retry_delay_seconds": 0})
    def flaky() -> int:
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return get_run_context().task_run.run_count

    @task(**{**IO_RETRY, "retry_delay_seconds": 0})
    def missing() -> None:
        attempts["missing"] += 1
        raise FileNotFoundError(errno.ENOENT, "no such file", "/nowhere/x.jpg")

    @flow
    def both():
        return flaky(), missing(return_state=True)

    run_count, state = both()
    assert run_count == 3 and attempts["flaky"] == 3  # two transient failures retried, then success
    assert state.is_failed() and attempts["missing"] == 1  # a missing file is not retried
