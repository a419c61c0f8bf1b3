"""Where the files fkd ships (the trained checkpoint, the Haar cascades) are, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """``saved_models`` or ``detector_architectures``: inside the installed package when fkd was installed from a
    wheel (``pip install .``), else at the root of the checkout (an editable install, or the source tree)."""
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name
