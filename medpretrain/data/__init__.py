"""Medical image data: spec strings -> decoded :class:`Source` -> split :class:`MedicalDataset`.

``build_dataset(cfg.data, split)`` is the one entry point every stage uses; spec strings are described
in :mod:`medpretrain.data.spec`, the formats' registry in :mod:`medpretrain.data.readers`, the readers'
scaling in their modules (``medmnist``, ``folder``, ``manifest``, ``segpairs``, ``dicom``, ``nifti``), splits
and label fractions in :mod:`medpretrain.data.splits`. Large sets: the on-disk cache (``data.cache``,
:mod:`medpretrain.data.cache`) or streaming from the files (``data.stream``, :mod:`medpretrain.data.stream`).
"""

from medpretrain.data.base import Decoded, Source, Task
from medpretrain.data.dataset import (
    MedicalDataset,
    build_dataset,
    clear_source_cache,
    data_stamp,
    fingerprint,
    read_source,
    split_indices,
)
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.readers import READERS, Reader, reader_for_file
from medpretrain.data.spec import DatasetSpec, data_root, parse_spec
from medpretrain.data.splits import make_splits, subsample_train
from medpretrain.data.transforms import Compose, MapImage, PairedRandomCrop, PairedRandomFlip

__all__ = [
    "READERS", "Compose", "DataError", "DatasetSpec", "Decoded", "MapImage", "MedicalDataset", "PairedRandomCrop",
    "PairedRandomFlip", "Reader", "SkipLog", "Source", "Task", "build_dataset", "clear_source_cache", "data_root",
    "data_stamp", "fingerprint", "make_splits", "parse_spec", "read_source", "reader_for_file", "split_indices",
    "subsample_train",
]
