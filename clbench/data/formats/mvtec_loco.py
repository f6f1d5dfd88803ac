"""MVTec LOCO AD (logical and structural anomalies, 2022) as distributed::

    <root>/<category>/train/good/*.png
    <root>/<category>/validation/good/*.png                     its own held-out split
    <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/NNN.png
    <root>/<category>/ground_truth/<defect>/NNN/000.png, 001.png, ...   several masks per image

An image's masks (one per defect region; 255, or other non-zero values that LOCO's sPRO metric uses
as saturation levels) are merged into one 0/255 PNG, a pixel being a defect if any mask marks it (as
anomalib does); an image with one mask file is linked as it is. The validation split becomes
``validation/good``: the held-out set, with all of train/good trained on.
"""
from __future__ import annotations

from pathlib import Path

from clbench.data.dataset import DatasetError
from clbench.data.formats._files import categories_having, image_files, subfolders
from clbench.data.formats.base import FORMATS, CategoryPlan, DatasetFormat, TestImage, TrainImage


@FORMATS.register("mvtec_loco")
class MVTecLOCO(DatasetFormat):
    description = "MVTec LOCO AD: several masks per image (merged), logical/structural anomalies, validation split"

    def categories(self, src: Path) -> list[str]:
        return categories_having(src, "train/good", "MVTec LOCO AD category")

    def plan(self, src: Path, category: str) -> CategoryPlan:
        folder = src / category
        train = [TrainImage(p) for p in _images(folder / "train" / "good", required=True)]
        validation = [TrainImage(p) for p in _images(folder / "validation" / "good", required=False)]
        test_dir = folder / "test"
        if not test_dir.is_dir():
            raise DatasetError(f"{test_dir}: missing (every category needs a test folder)")
        test: list[TestImage] = []
        for defect_dir in subfolders(test_dir):
            defect = defect_dir.name
            for image in _images(defect_dir, required=True):
                if defect == "good":
                    test.append(TestImage(image, "good"))
                    continue
                mask_dir = folder / "ground_truth" / defect / image.stem
                if not mask_dir.is_dir():
                    raise DatasetError(f"{mask_dir}: missing (the mask folder of test image {image})")
                masks = tuple(image_files(mask_dir, (".png",)))
                if not masks:
                    raise DatasetError(f"{mask_dir}: no mask files (.png) for test image {image}")
                test.append(TestImage(image, defect, masks))
        notes = ["sPRO (LOCO's own metric, with per-defect saturation from defects_config.json) is not computed: "
                 "pixel metrics use the merged masks"]
        if not validation:
            notes.append("no validation/good folder: the held-out set is a sample of train/good")
        return CategoryPlan(
            name=category, train=train, test=test, validation=validation,
            mask_convention="folder per image (ground_truth/<defect>/<stem>/000.png, ...), non-zero = defect, "
                            "several files merged",
            notes=notes,
        )


def _images(folder: Path, required: bool) -> list[Path]:
    if not folder.is_dir():
        if required:
            raise DatasetError(f"{folder}: missing")
        return []
    images = image_files(folder)
    if required and not images:
        raise DatasetError(f"{folder}: no images")
    return images
