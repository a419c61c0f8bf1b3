"""fkd_core: the Prefect-free library behind fkd (image I/O, detection, crops, NaimishNet, training, Parquet)."""

from fkd_core.annotate import AnnotateSettings as AnnotateSettings
from fkd_core.annotate import run_shard as run_shard
from fkd_core.checkpoint import DEFAULT_MODEL as DEFAULT_MODEL
from fkd_core.checkpoint import LoadedModel as LoadedModel
from fkd_core.checkpoint import load_checkpoint as load_checkpoint
from fkd_core.checkpoint import save_checkpoint as save_checkpoint
from fkd_core.detect import DetectorConfig as DetectorConfig
from fkd_core.detect import detect_faces as detect_faces
from fkd_core.errors import CheckpointError as CheckpointError
from fkd_core.errors import FkdError as FkdError
from fkd_core.errors import ImageError as ImageError
from fkd_core.errors import RowError as RowError
from fkd_core.geometry import CropPolicy as CropPolicy
from fkd_core.geometry import crop_square as crop_square
from fkd_core.geometry import square_from_box as square_from_box
from fkd_core.image_io import decode_gray as decode_gray
from fkd_core.image_io import list_images as list_images
from fkd_core.image_io import read_gray as read_gray
from fkd_core.model import NaimishNet as NaimishNet
from fkd_core.model import NaimishNetConfig as NaimishNetConfig
from fkd_core.predict import Face as Face
from fkd_core.predict import Predictor as Predictor
from fkd_core.types import NUM_KEYPOINTS as NUM_KEYPOINTS
from fkd_core.types import Box as Box

__version__ = "0.1.0"
