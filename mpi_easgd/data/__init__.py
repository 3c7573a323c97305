"""Datasets in HDF5: the file layout, sharding, loading, built-in and converted datasets.

The file layout is documented in :mod:`mpi_easgd.data.layout`.
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
