"""Small helpers shared by the flows (no numerics)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import TypeVar

from pydantic import BaseModel

from fkd_core.errors import is_transient

T = TypeVar("T")


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only if its error can heal (fkd_core.errors.is_transient).

    A missing path, model or bucket, a bad config or a bug fails at once instead of three times over 22 s.
    """
    try:
        state.result()
    except Exception as e:  # the failed task's own exception, classified below
        return is_transient(e)
    return False


# Options of every task that touches storage: three retries, spaced out, of transient failures only.
IO_RETRY = {"retries": 3, "retry_delay_seconds": [2, 5, 15], "retry_condition_fn": retry_if_transient}


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


def logging_handlers(kind: type[logging.Handler] = logging.Handler) -> list[logging.Handler]:
    """Every handler of type ``kind`` attached to any logger of this process, each once."""
    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    found: dict[int, logging.Handler] = {}
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, kind):
                found.setdefault(id(h), h)
    return list(found.values())


class _NoUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for a user error the message alone says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from fkd_core.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def console_handlers() -> list[logging.Handler]:
    """Prefect's console log handlers (each prints through a rich console of its own)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    return logging_handlers(PrefectConsoleHandler)


def hide_user_error_tracebacks() -> None:
    """Let Prefect's console log handlers print a user error (a missing path, model or bucket) as its one line:
    on the CLI, and in a served flow run's process, whose output `fkd serve` shows."""
    for handler in console_handlers():
        if not any(isinstance(f, _NoUserErrorTracebacks) for f in handler.filters):
            handler.addFilter(_NoUserErrorTracebacks())


def flat_parameters(cfg_cls: type[BaseModel]):
    """Give a flow that works on one validated config flat parameters: the config's fields, one by one.

    ``prefect deployment run 'annotate/on-demand' --param source=... --param out=...`` then works, the Prefect UI
    shows each field with its description, and a call from Python reads ``annotate(source=..., out=...)``. The
    config class stays the one place where fields, defaults and their checks are written; a bad value is
    refused by it naming the field.
    """

    def decorate(impl):
        params = [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=inspect.Parameter.empty if f.is_required() else f.default,
                annotation=f.annotation,
            )
            for name, f in cfg_cls.model_fields.items()
        ]
        sig = inspect.Signature(params, return_annotation=dict)

        @functools.wraps(impl)
        def fn(*args, **kwargs):
            hide_user_error_tracebacks()  # a served run's process has no CLI in front of it to do this
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return impl(cfg_cls(**bound.arguments))

        del fn.__wrapped__  # inspect.signature must see the flat signature, not impl's
        fn.__signature__ = sig
        fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": dict}
        args_doc = "\n".join(f"    {name}: {f.description or ''}".rstrip() for name, f in cfg_cls.model_fields.items())
        fn.__doc__ = f"{(impl.__doc__ or '').strip()}\n\nArgs:\n{args_doc}\n"
        return fn

    return decorate


def _read_csv_task():
    from prefect import task

    from fkd_core.ingest import read_labelled_csv

    return task(name="read_csv", **IO_RETRY)(read_labelled_csv)


read_csv = _read_csv_task()  # a keypoints CSV (ingest, evaluate), retried like every storage call
