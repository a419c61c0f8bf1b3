"""Where a training run keeps its state after each epoch, so that a stopped run goes on where it stopped.

The state (:func:`fkd_core.train.training_state`) is written atomically to
``<out_dir>/.train-state/<name>-<key hash>.pt`` after every epoch, and removed once the checkpoint is saved. The
key is everything that decides the result (the recipe, the network, the data's fingerprint, the start
checkpoints): the same ``fkd train`` command run again after a kill resumes; any other command starts afresh.
The file holds tensors, numbers and strings only and is loaded with ``torch.load(weights_only=True)``: no pickled
code runs. Needs torch (the train extra).
"""

from __future__ import annotations

import hashlib
import io
import json

from fkd_core.storage import exists, read_bytes, url_to_fs, write_bytes

MAX_STATE_BYTES = 2 * 1024**3


def state_uri(out_dir: str, name: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{out_dir.rstrip('/')}/.train-state/{name}-{digest}.pt"


def save_state(uri: str, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(buf.getvalue(), uri)


def load_state(uri: str) -> tuple[dict | None, str | None]:
    """The state saved at ``uri`` and None, or None and why there is none to resume from (absent, unreadable)."""
    import torch

    if not exists(uri):
        return None, None
    try:
        state = torch.load(io.BytesIO(read_bytes(uri, max_bytes=MAX_STATE_BYTES)), weights_only=True)
    except Exception as e:  # a state that cannot be read is started over, never fatal
        return None, f"the saved state {uri} cannot be read ({type(e).__name__}: {e}); starting over"
    if not isinstance(state, dict) or "epoch" not in state:
        return None, f"the saved state {uri} is not a training state; starting over"
    return state, None


def remove_state(uri: str) -> None:
    fs, path = url_to_fs(uri)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
