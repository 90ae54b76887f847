"""Training a segmentation network on labelled imagery: labels, chips, metrics and the loop."""

from geoseg.training.checkpoint import working_dir
from geoseg.training.labels import crs_equivalent, load_classes, open_labels, read_labels
from geoseg.training.loop import TrainConfig, TrainInputs, TrainResult, prepare, train
from geoseg.training.metrics import Metrics, confusion_ids, restrict_confusion

__all__ = [
    "Metrics",
    "TrainConfig",
    "TrainInputs",
    "TrainResult",
    "confusion_ids",
    "crs_equivalent",
    "load_classes",
    "open_labels",
    "prepare",
    "read_labels",
    "restrict_confusion",
    "train",
    "working_dir",
]
