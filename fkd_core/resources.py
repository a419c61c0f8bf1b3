"""Where the files fkd ships (the trained checkpoint, the Haar cascades) are, installed or in a checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped_dir(name: str) -> Path:
    """``saved_models`` or ``detector_architectures``: the package data of an installed fkd (``pip install .`` puts
    them inside ``fkd_core``), else the directory at the root of the checkout (an editable install, or the source
    tree). OpenCV and safetensors need real files, and a wheel installs them as such."""
    installed = files("fkd_core").joinpath(name)
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / name


SAVED_MODELS = shipped_dir("saved_models")
DEFAULT_MODEL = SAVED_MODELS / "naimishnet.safetensors"  # the packaged checkpoint
