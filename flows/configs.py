"""The flows' configs: each flow's parameters, their defaults, bounds and descriptions, in one place.

Plain pydantic over light library modules (no Prefect, no torch), so the CLI builds its options from them at
start-up (``flows/cli.py``) and a flow, a deployment and ``fkd <command>`` can never disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fkd_core.align import AlignPolicy
from fkd_core.recipe import INPUT_SIZE, AugmentConfig, FitConfig

from .settings import _OTHER_VARIABLES, SERVED_DETECTOR, SERVED_MODEL, FkdSettings, resolve_settings, setting_type

# Fields whose default is an operator setting (FKD_<NAME>, fkd.toml; flows/settings.py owns their bounds and
# defaults): None until resolve_settings fills them in where the config is built.
Model, Detector, ShardSize, Workers, DaskAddress, MaxPixels = (
    setting_type(n) for n in ("model", "detector", "shard_size", "workers", "dask_address", "max_pixels")
)


class AnnotateConfig(BaseModel):
    """Find every face in a set of images and put 68 keypoints on each."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Image directory, bucket prefix (s3://...), any fsspec URL, or one image")
    out: str = Field(description="Output directory or prefix: images/, faces/ and runs/ go under it")
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        max_length=100,  # it names files (runs/<id>.plan.parquet, run_id=<id>/): well within 255 bytes
        description="Run id; rerunning an existing one resumes it (default: a new id from the start time)",
    )
    SETTINGS: ClassVar[tuple[str, ...]] = ("model", "detector", "shard_size", "dask_address", "workers", "max_pixels")

    model: Model = Field(None, description=f"Checkpoint (.safetensors, its .json beside it); {SERVED_MODEL}")
    detector: Detector = Field(None, description=f"Face detector: {SERVED_DETECTOR}")
    shard_size: ShardSize = Field(None, description="Images per task")
    refine: bool = Field(
        True, description="Run a two-stage checkpoint's refining stage (off: first stage only, faster, less accurate)"
    )
    incremental: bool = Field(False, description="Only images not already in any run under `out`")
    follow_links_out: bool = Field(
        False, description="Read files that symbolic links in the source lead to outside it (off: listed as skipped)"
    )
    dask_address: DaskAddress = Field(None, description="Run shards on this Dask scheduler (tcp://host:port)")
    workers: Workers = Field(None, description="Shards at once with the local runner")
    max_pixels: MaxPixels = Field(None, description="Refuse images with more pixels (pixel bombs)")
    progress: bool = Field(False, description="Draw a progress bar on stderr (the CLI sets it on a terminal)")
    heartbeat_seconds: float = Field(
        30.0, ge=0.1, le=3600, description="How often the run record's heartbeat is rewritten while the run lives"
    )
    lease_seconds: float = Field(
        120.0, ge=1, le=3600, description="A dead run's locks in <out>/locks expire after this (renewed every third)"
    )

    _settings = model_validator(mode="after")(resolve_settings)


class IngestConfig(BaseModel):
    """Turn a keypoints CSV and its images into detector-consistent training crops."""

    model_config = ConfigDict(extra="forbid")

    csv: str = Field(description="Keypoints CSV: a header, then file name and x0, y0 ... x67, y67 per row")
    images: str = Field(description="Directory or bucket prefix that the CSV's file names are relative to")
    out: str = Field(description="Output directory or prefix for the examples Parquet dataset")
    split_by: str = Field("person", pattern="^(person|frame)$", description="Group the validation split by")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of persons (or frames) held out")
    seed: int = Field(0, description="Seed of the split hash")
    shard_size: int = Field(500, ge=1, le=100_000, description="Images per task")
    workers: int = Field(2, ge=1, le=64, description="Shards processed at once")
    follow_links_out: bool = Field(
        False, description="Read images that links in IMAGES lead to outside it (off: such rows are errors)"
    )


class EvaluateConfig(BaseModel):
    """Score a checkpoint end to end (Haar + NaimishNet) on labelled images."""

    model_config = ConfigDict(extra="forbid")

    csv: str = Field(description="Keypoints CSV (same format as ingest)")
    images: str = Field(description="Directory or bucket prefix of the CSV's images")
    out: str = Field(description="Where metrics.json, faces.parquet, worst.png and risk_coverage.png are written")
    SETTINGS: ClassVar[tuple[str, ...]] = ("model", "detector")

    model: Model = Field(None, description=f"Checkpoint (.safetensors); {SERVED_MODEL}")
    detector: Detector = Field(None, description=f"Face detector: {SERVED_DETECTOR}")
    split: str = Field("all", pattern="^(all|train|val)$", description="Score all rows, or the train or val split")
    split_by: str | None = Field(
        None, pattern="^(person|frame)$", description="How rows split: person or frame (default: the checkpoint's)"
    )
    val_fraction: float | None = Field(
        None, ge=0, lt=1, description="Share held out for val, 0-1 (default: the checkpoint's)"
    )
    seed: int | None = Field(None, description="Split seed (default: the checkpoint's)")
    shard_size: int = Field(500, ge=1, description="Labelled rows per task")
    workers: int = Field(2, ge=1, le=64, description="Shards scored at once")
    worst: int = Field(12, ge=0, le=100, description="Faces in the worst-case montage")
    follow_links_out: bool = Field(
        False, description="Read images that links in IMAGES lead to outside it (off: such rows are errors)"
    )

    _settings = model_validator(mode="after")(resolve_settings)


_RECIPE, _AUGMENT = FitConfig(), AugmentConfig()  # the shipped recipe: every default below comes from it


class TrainConfig(BaseModel):
    """Train NaimishNet on an examples dataset made by the ingest flow."""

    model_config = ConfigDict(extra="forbid")

    examples: str = Field(description="Examples dataset (the ingest flow's <out>/examples)")
    out_dir: str = Field(
        "models", description="Where <name>-<sha256 head>.safetensors, .json and _loss.png are written"
    )
    name: str = Field(
        "naimishnet", pattern=r"^[A-Za-z0-9_.-]+$", description="Checkpoint name; the weights' sha256 head is appended"
    )
    force: bool = Field(False, description="Replace a checkpoint of the same name and weights (never done otherwise)")
    input_size: int = Field(INPUT_SIZE, ge=32, le=256, description="Model input S (S x S pixels)")
    epochs: int = Field(_RECIPE.epochs, ge=1, le=10_000, description="Maximum epochs")
    batch_size: int = Field(_RECIPE.batch_size, ge=1, le=4096, description="Examples per step")
    patience: int = Field(_RECIPE.patience, ge=1, description="Early stopping: epochs without a better validation NME")
    seed: int = Field(_RECIPE.seed, description="Seed: same seed and data give the same weights")
    lr: float = Field(_RECIPE.lr, gt=0, le=1, description="Adam's initial learning rate (the paper's 0.001)")
    schedule: Literal["plateau", "cosine"] = Field(
        _RECIPE.schedule,
        description="cosine: decay the rate to min_lr over the epochs; plateau: halve it when validation stalls",
    )
    min_lr: float = Field(_RECIPE.min_lr, ge=0, description="Lowest learning rate of either schedule")
    ema_decay: float = Field(
        _RECIPE.ema_decay, ge=0, lt=1, description="> 0: also validate an exponential moving average of the weights"
    )
    ema_warmup: bool = Field(_RECIPE.ema_warmup, description="Warm the average's decay up from 0 (short runs)")
    augment: bool = Field(True, description="Augment: brightness/contrast, plus the jitter, rotation and flip below")
    brightness: float = Field(_AUGMENT.brightness, ge=0, le=1, description="Brightness jitter, +- this")
    contrast: float = Field(_AUGMENT.contrast, ge=0, lt=1, description="Contrast jitter: x U(1 - c, 1 + c)")
    shift: float = Field(_AUGMENT.shift, ge=0, le=0.5, description="Box jitter: centre moves up to this x the side")
    scale: float = Field(_AUGMENT.scale, ge=0, lt=1, description="Box jitter: side times U(1 - scale, 1 + scale)")
    rotate: float = Field(_AUGMENT.rotate_deg, ge=0, le=90, description="Rotation up to +- this many degrees")
    flip: float = Field(_AUGMENT.flip, ge=0, le=1, description="Probability of a horizontal flip")
    max_train: int | None = Field(None, ge=1, description="Use only the first N training examples (smoke runs)")
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: all cores)")
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$", description="Where the model trains: cpu, or cuda[:N] on a GPU"
    )
    init: str | None = Field(None, description="Start from this checkpoint's weights (fine-tuning, continuing)")
    refine_of: str | None = Field(
        None,
        description="Train a refining second stage for this first-stage checkpoint (on crops aligned to its "
        "keypoints; starts from its weights unless `init` is given); the checkpoint written holds both stages",
    )
    align_side: float = Field(
        AlignPolicy().side, gt=1, le=10, description="Refining stage: crop side in RMS radii of the keypoints"
    )
    resume: bool = Field(
        True,
        description="Go on from the last finished epoch of this same run (same options and data) if it was stopped; "
        "its state is kept under <out_dir>/.train-state/ until the checkpoint is saved",
    )

    def params(self) -> FitConfig:
        """The library's recipe with this config's choices."""
        augment = (
            AugmentConfig(
                scale=self.scale,
                shift=self.shift,
                rotate_deg=self.rotate,
                flip=self.flip,
                brightness=self.brightness,
                contrast=self.contrast,
            )
            if self.augment
            else AugmentConfig.none()
        )
        return dataclasses.replace(
            _RECIPE,
            epochs=self.epochs,
            batch_size=self.batch_size,
            patience=self.patience,
            seed=self.seed,
            lr=self.lr,
            schedule=self.schedule,
            min_lr=self.min_lr,
            ema_decay=self.ema_decay,
            ema_warmup=self.ema_warmup,
            augment=augment,
        )


# The CLI: each flow is a command whose positional arguments are these fields and whose options are the others.
COMMANDS: dict[str, tuple[type[BaseModel], tuple[str, ...]]] = {
    "annotate": (AnnotateConfig, ("source", "out")),
    "ingest": (IngestConfig, ("csv", "images", "out")),
    "train": (TrainConfig, ("examples",)),
    "evaluate": (EvaluateConfig, ("csv", "images", "out")),
}
HIDDEN = {"annotate": ("progress",)}  # set by the CLI itself (a bar only on a terminal)
# options whose default is an operator setting: FKD_<FIELD> or fkd.toml (each config's SETTINGS)
SETTINGS_BACKED = {name: cls.SETTINGS for name, (cls, _) in COMMANDS.items() if getattr(cls, "SETTINGS", ())}


def env_var(command: str, field: str) -> str:
    """The environment variable of ``fkd <command> --<field>``: the operator setting's (``FKD_SHARD_SIZE``) where
    the option is one, else ``FKD_<COMMAND>_<FIELD>`` (``FKD_TRAIN_EPOCHS``)."""
    if field in SETTINGS_BACKED.get(command, ()):
        return f"FKD_{field.upper()}"
    return f"FKD_{command.upper()}_{field.upper()}"


def command_variables() -> set[str]:
    """Every option's environment variable, for the warning about misspelt ``FKD_*`` variables."""
    return {
        env_var(name, f)
        for name, (cls, args) in COMMANDS.items()
        for f in cls.model_fields
        if f not in args and f not in HIDDEN.get(name, ())
    }


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """A warning for each ``FKD_*`` variable that is no setting (a typo is otherwise silently ignored)."""
    known = {f"FKD_{name.upper()}" for name in FkdSettings.model_fields} | _OTHER_VARIABLES | command_variables()
    warnings = []
    for name in sorted(environ if environ is not None else os.environ):
        if name.upper().startswith("FKD_") and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; fkd settings are {', '.join(sorted(known))}"
            warnings.append(f"warning: {name} is not an fkd setting and is ignored{hint}")
    return warnings
