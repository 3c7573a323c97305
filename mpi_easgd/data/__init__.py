"""Datasets in HDF5: the file layout, sharding, loading, built-in and converted datasets.

Layout of a dataset file (all arrays in C order)::

    /train/images   uint8 [N, C, H, W]  (or float32, already scaled)
    /train/labels   int64 [N]           values in [0, num_classes)
    /test/images    uint8 [M, C, H, W]
    /test/labels    int64 [M]
    attrs: format = "mpi_easgd-dataset", version = 1, name, num_classes,
           mean, std  (float32 [C], per channel, of train images scaled to [0, 1])

``python -m mpi_easgd.data convert|info|verify`` converts other formats and checks files.
"""

from mpi_easgd.data.builtin import BUILTIN, build_mnist5k, cache_dir, resolve_dataset
from mpi_easgd.data.layout import DataError, DatasetInfo, read_info, write_dataset
from mpi_easgd.data.loader import ShardLoader
from mpi_easgd.data.sharding import num_batches, shard_range, steps_per_epoch

__all__ = [
    "BUILTIN", "DataError", "DatasetInfo", "ShardLoader", "build_mnist5k", "cache_dir",
    "num_batches", "read_info", "resolve_dataset", "shard_range", "steps_per_epoch",
    "write_dataset",
]
