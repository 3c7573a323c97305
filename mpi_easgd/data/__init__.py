"""Datasets: HDF5 files (the layout, loading, built-in and converted datasets) and a user's
own ``torch.utils.data.Dataset`` s (``--dataset package.module:factory``), sharded alike.

The file layout is documented in :mod:`mpi_easgd.data.layout`.
``python -m mpi_easgd.data convert|info|verify`` converts other formats and checks files.
"""

from mpi_easgd.data.builtin import BUILTIN, TEXT, build_mnist5k, cache_dir, resolve_dataset
from mpi_easgd.data.layout import DataError, DatasetInfo, read_info, write_dataset
from mpi_easgd.data.loader import ShardLoader
from mpi_easgd.data.sharding import num_batches, rank_batch, shard_range, steps_per_epoch


def open_dataset(name: str) -> DatasetInfo:
    """``--dataset``: a built-in name, an HDF5 file, or a user's ``package.module:factory``."""
    if name in TEXT:
        from mpi_easgd.data.builtin import pystdlib
        from mpi_easgd.data.factory import describe

        return describe(name, *pystdlib())
    if ":" in name and not name.startswith(("/", ".")):
        from mpi_easgd.data.factory import open_factory

        return open_factory(name)
    return read_info(resolve_dataset(name))


def shard_loader(info: DatasetInfo, split: str, index: int = 0, count: int = 1, **options):
    """Mini-batches of one shard of ``split``: a :class:`ShardLoader` for an HDF5 file, a
    :class:`~mpi_easgd.data.factory.DatasetLoader` for a user's datasets."""
    if info.datasets is not None:
        from mpi_easgd.data.factory import DatasetLoader

        return DatasetLoader(info, split, index, count, **options)
    return ShardLoader(info, split, index, count, **options)

__all__ = [
    "BUILTIN", "DataError", "DatasetInfo", "ShardLoader", "build_mnist5k", "cache_dir",
    "num_batches", "open_dataset", "rank_batch", "read_info", "resolve_dataset", "shard_loader", "shard_range",
    "steps_per_epoch",
    "write_dataset",
]
