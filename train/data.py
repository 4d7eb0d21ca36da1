"""The dataset readers moved to :mod:`kiln.data` (core: eval, export and calibration read them too).

This name stays because ``make demo`` opens a dataset through it.
"""

from kiln.data import DataSpec, ImageDataset, open_dataset

__all__ = ["DataSpec", "ImageDataset", "open_dataset"]
