from fkd_flows._common import chunks, markdown_table


def test_chunks_and_markdown_table():
    assert list(chunks(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    assert markdown_table([{"a": 1, "b": 0.5}]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5000 |"]


def test_io_tasks_retry_what_can_heal_and_fail_at_once_on_what_cannot():
    """The storage tasks' retry policy, run by Prefect for real (delays set to 0 to keep the test short)."""
    import errno

    from prefect import flow, task
    from prefect.context import get_run_context

    from fkd_flows._common import IO_RETRY

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
