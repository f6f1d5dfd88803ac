"""MPDD (Jezek et al. 2021), and any dataset already in MVTec AD layout::

    <src>/<category>/train/good/*.png
    <src>/<category>/test/<defect>/*.png            (test/good: normal)
    <src>/<category>/ground_truth/<defect>/<stem>_mask.png
    <src>/<category>/validation/good/*.png          optional: the dataset's own held-out set

Such a set needs no conversion: ``--data-root`` reads it as it is. The ``mvtec`` format (alias
``mpdd``, the same reader) exists so that ``clbench data convert`` can also link it, e.g. to gather
categories of several sets under one root or record the format in the marker. The category is
validated by the loader itself (``load_category``: masks paired, sizes equal), so a set this format
accepts is exactly one a run accepts.
"""
from __future__ import annotations

from pathlib import Path

from clbench.data.dataset import DatasetError, list_categories, load_category
from clbench.data.formats._files import image_files, sniff_mask_values
from clbench.data.formats.base import FORMATS, CategoryPlan, DatasetFormat, TestImage, TrainImage


@FORMATS.register("mvtec")
class MVTecLayout(DatasetFormat):
    description = "any set in MVTec AD layout (MVTec AD, MPDD, ...): validated and linked as it is"

    def categories(self, src: Path) -> list[str]:
        found = list_categories(src)
        if not found:
            raise DatasetError(f"{src}: no category in MVTec layout found (expected <category>/train/good)")
        return found

    def plan(self, src: Path, category: str) -> CategoryPlan:
        folder = src / category
        loaded = load_category(src, category)  # raises the first layout fault, one line naming the file
        train = [TrainImage(p) for p in image_files(folder / "train" / "good")]
        validation_dir = folder / "validation" / "good"
        validation = [TrainImage(p) for p in image_files(validation_dir)] if validation_dir.is_dir() else []
        test = [TestImage(s.image, s.defect, (s.mask,) if s.mask else ()) for s in loaded.test]
        first_mask = next((s.mask for s in loaded.test if s.mask is not None), None)
        values = sniff_mask_values(first_mask) if first_mask else "no masks"
        return CategoryPlan(category, train, test, validation=validation,
                            mask_convention=f"suffix _mask.png, {values}, one file")


@FORMATS.register("mpdd")
class MPDD(MVTecLayout):
    description = "MPDD (Metal Parts Defect Detection): MVTec layout, the same reader as 'mvtec'"
