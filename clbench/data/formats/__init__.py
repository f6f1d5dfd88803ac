"""Dataset formats as distributed (VisA, MVTec LOCO AD, MVTec AD 2, BTAD, Real-IAD, MPDD, ...), and
``convert`` that lays one out in MVTec layout by links (``clbench data convert FORMAT SRC DST``).

Each format is one module that registers itself in ``FORMATS`` (``@FORMATS.register("visa")``); the
registry finds it in the source (``clbench.registry``: an ``ast`` index) and imports it when asked."""
from clbench.data.formats.base import FORMATS, CategoryPlan, DatasetFormat, TestImage, TrainImage
from clbench.data.formats.convert import MARKER, convert_dataset, read_conversion_marker

__all__ = ["FORMATS", "MARKER", "CategoryPlan", "DatasetFormat", "TestImage", "TrainImage", "convert_dataset",
           "read_conversion_marker"]
