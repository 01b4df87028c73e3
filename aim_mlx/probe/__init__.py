"""Your own classifier: a head trained on a frozen AIM trunk's cached features.

`train` (training.py) turns a folder of labelled images into a head folder (head.py), using the
feature cache (features.py); `evaluate` (evaluate.py) measures it.
"""

from .data import ProbeError
from .head import attach, load_with_head
from .training import Settings, TrainResult, train

__all__ = ["ProbeError", "Settings", "TrainResult", "attach", "load_with_head", "train"]
