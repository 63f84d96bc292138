"""Fashion-MNIST: where the files are, reading them, and batching them.

dataset.py   finding the folder and loading the splits (load, locate)
idx.py       reading and checking one IDX file
download.py  fetching the files into the cache folder
batches.py   normalisation, augmentation and the epoch's batch plan
"""

from .dataset import (
    CLASSES,
    DATA_ENV,
    MEAN,
    MIRROR_ENV,
    STD,
    SYSTEM_DIRS,
    FashionMNIST,
    cache_dir,
    load,
    load_split,
    locate,
)
from .idx import DataError

__all__ = [
    "CLASSES",
    "DATA_ENV",
    "MEAN",
    "MIRROR_ENV",
    "STD",
    "SYSTEM_DIRS",
    "DataError",
    "FashionMNIST",
    "cache_dir",
    "load",
    "load_split",
    "locate",
]
