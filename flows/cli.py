"""The ``fkd`` command line: runs the flows, queries and draws their output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fkd: facial keypoints at pipeline scale.")


def _print(doc: dict) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))


def _fail(message: str, code: int = 2) -> None:
    """A user error: one line on stderr naming what and where, exit status 2, no traceback."""
    typer.echo(f"fkd: {message}", err=True)
    raise typer.Exit(code)


def _run(name: str, cfg) -> dict:
    """Run flow ``name`` on a validated config. What cannot heal (a missing path, model or bucket...) is checked
    first (``preflight``), before Prefect is even imported, and ends in one line and exit 2; so does a user error
    the flow itself finds. A store that does not answer the checks is one line and exit 1 (it may heal: try again).
    """
    import importlib

    from fkd_core.errors import UserError, is_transient

    from . import preflight
    from .tempserver import check_prefect_home

    try:
        getattr(preflight, name)(cfg)
        check_prefect_home()
    except UserError as e:
        _fail(str(e))
    except Exception as e:
        if not is_transient(e):
            raise
        _fail(f"the store did not answer ({type(e).__name__}: {e}); it may be down or the address wrong "
              "(AWS_ENDPOINT_URL): try again", code=1)  # fmt: skip
    from ._common import hide_user_error_tracebacks
    from .tempserver import temporary_server

    flow = getattr(importlib.import_module(f"{__package__}.{name}"), name)
    hide_user_error_tracebacks()
    try:
        with temporary_server():  # without PREFECT_API_URL: one that ends with this process, however it ends
            return flow(**cfg.model_dump())
    except UserError as e:
        _fail(str(e))


def _config(cls, command: str | None = None, **fields):
    """Build a flow's config, turning validation errors into a message that names each field: its flag, and its
    environment variable where that is set (exit 2)."""
    import os

    from pydantic import ValidationError

    try:
        return cls(**fields)
    except ValidationError as e:
        for err in e.errors():
            name = ".".join(str(p) for p in err["loc"])
            where = f"--{name.replace('_', '-')}"
            if command is not None:
                from .configs import env_var

                env = env_var(command, name)
                where += f" or {env}" if env in os.environ else ""
            typer.echo(f"fkd: invalid {name} ({where}): {err['msg']}", err=True)
        raise typer.Exit(2) from None


def _cli_type(annotation):
    """The type typer gets for a config field: Literal choices travel as str (pydantic checks them)."""
    import types
    import typing

    if typing.get_origin(annotation) is typing.Annotated:  # bounds: pydantic checks them
        return _cli_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is typing.Literal:
        return str
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _cli_type(inner[0]) | None
    return annotation


def flow_command(name: str):
    """Register ``fkd <name>`` from its flow's pydantic config (``fkd_flows.configs.COMMANDS``): the config's argument
    fields become positional arguments and every other field an option, with the field's description, default and
    environment variable, so the CLI, the flow and a deployment can never disagree. The decorated function gets
    the validated config."""
    import inspect

    from pydantic_core import PydanticUndefined

    from .configs import COMMANDS, HIDDEN, SETTINGS_BACKED, env_var

    cfg_cls, arguments = COMMANDS[name]
    settings = SETTINGS_BACKED.get(name, ())

    def parameter(field: str) -> inspect.Parameter:
        f = cfg_cls.model_fields[field]
        if field in arguments:
            annotation = Annotated[_cli_type(f.annotation), typer.Argument(help=f.description, metavar=field.upper())]
            return inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
        env = env_var(name, field)
        if field in settings:
            # resolved by load_settings (flag > FKD_* > fkd.toml > default), which names the culprit of a bad value
            from .settings import FkdSettings

            default_value = FkdSettings.model_fields[field].default
            # model's and detector's descriptions say their defaults; an unset one has none to show
            shown = "" if field in ("model", "detector") or default_value is None else f"; default: {default_value}"
            option = typer.Option(help=f"{f.description} (env var: {env}, or the settings file{shown})")
            typ, default = _cli_type(f.annotation) | None, None
        else:
            option = typer.Option(help=f.description, envvar=env, show_envvar=True)
            typ, default = _cli_type(f.annotation), (None if f.default is PydanticUndefined else f.default)
        return inspect.Parameter(
            field, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[typ, option], default=default
        )

    def decorate(run):
        fields = [
            *arguments,
            *(f for f in cfg_cls.model_fields if f not in arguments and f not in HIDDEN.get(name, ())),
        ]

        def command(**values):
            if settings:
                s = _settings(**{k: values[k] for k in settings})  # warns about misspelt FKD_* variables too
                values |= {k: getattr(s, k) for k in settings}
            else:
                _warn_unknown_variables()
            run(_config(cfg_cls, name, **values))

        command.__signature__ = inspect.Signature([parameter(f) for f in fields])
        command.__doc__ = run.__doc__
        command.__name__ = name
        app.command(name)(command)
        return run

    return decorate


@flow_command("annotate")
def annotate(cfg) -> None:
    """Find every face under SOURCE and write 68 keypoints per face to OUT (Parquet)."""
    cfg.progress = sys.stderr.isatty()
    doc = _run("annotate", cfg)
    keys = ("run_id", "status", "model_id", "images_planned", "skipped_existing", "skipped_files", "counts", "seconds")
    keys += ("warnings",)
    _print({k: doc[k] for k in keys if k in doc})


@app.command()
def serve(
    interval: Annotated[float | None, typer.Option(help="Run the nightly deployment every N seconds instead")] = None,
) -> None:
    """Serve the deployments (nightly incremental annotation from FKD_NIGHTLY_SOURCE, and on-demand flows)."""
    from fkd_core.errors import UserError

    from .deploy import DeploymentConflict, serve_all
    from .tempserver import check_prefect_home

    s = _settings()
    try:
        check_prefect_home()
    except UserError as e:
        _fail(str(e))
    if not (s.nightly_source and s.nightly_out):
        typer.echo("FKD_NIGHTLY_SOURCE / FKD_NIGHTLY_OUT not set: serving on-demand deployments only", err=True)
    try:
        serve_all(s, interval, announce=lambda names: typer.echo("fkd serve: serving " + ", ".join(names), err=True))
    except DeploymentConflict as e:
        _fail(str(e))


def _warn_unknown_variables() -> None:
    from .configs import unknown_variables

    for warning in unknown_variables():
        typer.echo(f"fkd: {warning}", err=True)


def _settings(**overrides):
    from .settings import SettingsError, load_settings

    _warn_unknown_variables()
    try:
        return load_settings(**overrides)
    except SettingsError as e:
        _fail(str(e))


@flow_command("ingest")
def ingest(cfg) -> None:
    """Turn a keypoints CSV and its images into the training examples Parquet."""
    doc = _run("ingest", cfg)
    _print({k: v for k, v in doc.items() if k != "refused"} | {"refused (first 20)": doc["refused"][:20]})


@flow_command("train")
def train(cfg) -> None:
    """Train NaimishNet into a new checkpoint <out-dir>/<name>-<sha256 head>.safetensors + .json + _loss.png.

    The served model never changes: point FKD_MODEL (or --model) at the new file to promote it.
    """
    _print(_run("train", cfg))


@flow_command("evaluate")
def evaluate(cfg) -> None:
    """End-to-end metrics of a checkpoint on labelled images."""
    _print(_run("evaluate", cfg))


@app.command("export-onnx")
def export_onnx(
    model: Annotated[str, typer.Argument(help="A checkpoint (.safetensors) written without its ONNX graphs")],
    force: Annotated[bool, typer.Option(help="Replace graphs that exist")] = False,
) -> None:
    """Write a checkpoint's ONNX graphs beside it and name them in its JSON, so it annotates without torch (a
    one-off step for a checkpoint from an fkd that did not write them; needs the train extra)."""
    from fkd_core.errors import UserError

    try:
        from fkd_core.checkpoint import add_graphs

        for stage, uri in add_graphs(model, force=force).items():
            typer.echo(f"{stage}: {uri}")
    except ImportError:
        _fail("writing ONNX graphs needs torch and onnx: pip install 'fkd[train]'")
    except UserError as e:
        _fail(str(e))


@app.command()
def runs(
    out: Annotated[str, typer.Argument(help="An annotate output directory or prefix")],
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
) -> None:
    """List the annotate runs under OUT with their status (running, completed, failed, interrupted) and counts."""
    from fkd_core.errors import UserError
    from fkd_core.runs import list_runs

    try:
        rows = list_runs(out)
    except UserError as e:
        _fail(str(e))
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo(f"no runs under {out}")
        return
    cols = (
        "run_id",
        "status",
        "attempts",
        "started_at",
        "planned",
        "images",
        "ok",
        "no_face",
        "error",
        "faces",
        "note",
    )
    table = []
    for r in rows:
        counts = r.get("counts") or {}
        note = r.get("error") or ""
        table.append(
            [
                r.get("run_id", ""),
                r.get("status", ""),
                r.get("attempts", ""),
                (r.get("started_at") or "")[:19],
                r.get("images_planned", ""),
                *(counts.get(k, "") for k in ("images", "ok", "no_face", "error", "faces")),
                (note[:60] + "...") if len(note) > 60 else note,
            ]
        )
    widths = [max(len(str(c)), *(len(str(row[i])) for row in table)) for i, c in enumerate(cols)]
    for row in [list(cols), *table]:
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@app.command()
def settings(
    get: Annotated[str | None, typer.Option(help="Print this one setting's value (fails if it is not set)")] = None,
) -> None:
    """Show the fkd settings in force (FKD_* variables over fkd.toml over defaults), or one of them."""
    s = _settings()
    if get is None:
        _print(s.model_dump())
        return
    if get not in type(s).model_fields:
        _fail(f"--get: no setting {get!r}; settings are {', '.join(type(s).model_fields)}")
    value = getattr(s, get)
    if value is None:
        _fail(f"{get} is not set (set FKD_{get.upper()} or {get} in the settings file)")
    typer.echo(value)


@app.command()
def query(
    out: Annotated[str, typer.Argument(help="An annotate output directory or prefix")],
    sql: Annotated[str, typer.Argument(help="SQL over the views `images` and `faces`")],
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Run SQL (DuckDB) over annotate output."""
    from fkd_core.query import connect

    try:
        rel = connect(out).sql(sql)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="OUT") from e
    except Exception as e:  # duckdb's errors: show the message, not a traceback
        typer.echo(f"query failed: {e}", err=True)
        raise typer.Exit(1) from e
    if rel is None:
        return
    if fmt == "csv":
        import pyarrow.csv as pa_csv

        sys.stdout.flush()
        pa_csv.write_csv(rel.to_arrow_table(), sys.stdout.buffer, pa_csv.WriteOptions(quoting_style="needed"))
    elif fmt == "json":
        typer.echo(json.dumps(rel.to_arrow_table().to_pylist(), default=_json_value))
    else:
        rel.show(max_rows=1000, max_width=200)


def _json_value(v):
    """Query results JSON cannot hold as they are: times and dates in ISO 8601, anything else as text."""
    return v.isoformat() if hasattr(v, "isoformat") else str(v)


@app.command()
def show(
    out: Annotated[str, typer.Argument(help="An annotate output directory or prefix")],
    image: Annotated[str, typer.Argument(help="The image (its URI, or any unique suffix of it)")],
    png: Annotated[Path | None, typer.Option(help="Where to write the picture")] = None,
    run_id: Annotated[str | None, typer.Option(help="Only this run's keypoints")] = None,
    max_side: Annotated[int, typer.Option(min=0, help="Longest side of the picture in pixels (0: the image's)")] = 2048,
) -> None:
    """Draw an image's boxes and keypoints from OUT to a PNG, each face coloured by its quality (green: keypoints
    likely right, through yellow, to red: P(NME > 0.10) of 0.5 or more) and labelled with quality and face_prob."""
    from fkd_core.image_io import read_gray
    from fkd_core.plots import draw_faces, png_bytes
    from fkd_core.query import NoSuchImage, image_faces

    try:
        found = image_faces(out, image, run_id)
    except NoSuchImage as e:
        raise typer.BadParameter(str(e), param_hint="IMAGE") from None
    except FileNotFoundError as e:  # not an annotate output, as `fkd query` says
        raise typer.BadParameter(str(e), param_hint="OUT") from None
    img = draw_faces(
        read_gray(found.uri).gray, found.boxes, found.keypoints, quality=found.quality, labels=found.labels(),
        max_side=max_side,
    )  # fmt: skip
    target = png or Path(found.uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] + "_keypoints.png")
    target.write_bytes(png_bytes(img))
    typer.echo(f"{target}: {len(found.boxes)} face(s) from run {found.run_id}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
