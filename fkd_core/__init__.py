"""fkd_core: the Prefect-free library behind fkd (image I/O, detection, crops, NaimishNet, training, Parquet).

The names below are imported on first use, so that importing one light module (``fkd_core.recipe``) does not
pull in torch, OpenCV and ONNX Runtime.
"""

from importlib import import_module

_EXPORTS = {
    "ShardConfig": "fkd_core.annotate",
    "annotate_to_tables": "fkd_core.annotate",
    "DEFAULT_MODEL": "fkd_core.checkpoint",
    "LoadedModel": "fkd_core.checkpoint",
    "load_checkpoint": "fkd_core.checkpoint",
    "save_checkpoint": "fkd_core.checkpoint",
    "DetectorConfig": "fkd_core.detect",
    "YunetConfig": "fkd_core.detect",
    "detect_faces": "fkd_core.detect",
    "CheckpointError": "fkd_core.errors",
    "FkdError": "fkd_core.errors",
    "ImageError": "fkd_core.errors",
    "RowError": "fkd_core.errors",
    "CropPolicy": "fkd_core.geometry",
    "crop_square": "fkd_core.geometry",
    "square_from_box": "fkd_core.geometry",
    "decode_gray": "fkd_core.image_io",
    "list_images": "fkd_core.image_io",
    "read_gray": "fkd_core.image_io",
    "NaimishNet": "fkd_core.model",
    "NaimishNetConfig": "fkd_core.model",
    "Face": "fkd_core.predict",
    "Predictor": "fkd_core.predict",
    "NUM_KEYPOINTS": "fkd_core.types",
    "Box": "fkd_core.types",
}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fkd_core' has no attribute {name!r}")
