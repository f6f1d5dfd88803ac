"""MVTec AD 2 (Heckler-Kram et al. 2025) as distributed::

    <src>/<category>/train/good/*.png
    <src>/<category>/validation/good/*.png                     the dataset's own held-out normal images
    <src>/<category>/test_public/{good,bad}/*.png
    <src>/<category>/test_public/ground_truth/bad/<stem>_mask.png   (0/255)
    <src>/<category>/test_private/*.png, test_private_mixed/*.png    no ground truth

The validation images become the plan's validation split (``validation/good``: the held-out set, so
no training image is held back). Only ``test_public`` has masks: the private test sets are scored by
MVTec's evaluation server, so asking for one (``split=test_private``) is refused with one line.
"""
from __future__ import annotations

from pathlib import Path

from clbench.data.dataset import DatasetError
from clbench.data.formats._files import categories_having, image_files, training_images
from clbench.data.formats.base import FORMATS, CategoryPlan, DatasetFormat, TestImage, TrainImage

PUBLIC = "test_public"
PRIVATE = ("test_private", "test_private_mixed")
EXTENSIONS = (".png",)


@FORMATS.register("mvtec_ad2")
class MVTecAD2(DatasetFormat):
    description = "MVTec AD 2: train/good, validation/good, test_public/{good,bad} with ground_truth/bad"
    options_help = {"split": f"test set to convert: {PUBLIC} (default; the only one with masks)"}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        split = str(self.options.get("split", PUBLIC))
        if split in PRIVATE:
            raise DatasetError(f"format 'mvtec_ad2': split={split} has no masks (MVTec does not publish the private "
                               "test sets' ground truth) and pixel metrics need them: use split=test_public, and "
                               "evaluate the private sets on MVTec's evaluation server")
        if split != PUBLIC:
            raise DatasetError(f"format 'mvtec_ad2': unknown split '{split}' "
                               f"(known: {PUBLIC}; {', '.join(PRIVATE)} have no masks)")
        self.split = split

    def categories(self, src: Path) -> list[str]:
        return categories_having(src, "train/good", "MVTec AD 2 category")

    def plan(self, src: Path, category: str) -> CategoryPlan:
        folder = src / category
        train = [TrainImage(p) for p in training_images(folder / "train" / "good", EXTENSIONS)]
        validation_dir = folder / "validation" / "good"
        validation = [TrainImage(p) for p in image_files(validation_dir, EXTENSIONS)] if validation_dir.is_dir() else []
        test_dir = folder / self.split
        test = [TestImage(p, "good") for p in image_files(test_dir / "good", EXTENSIONS)]
        mask_dir = test_dir / "ground_truth" / "bad"
        for image in image_files(test_dir / "bad", EXTENSIONS):
            mask = mask_dir / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"{mask}: mask missing for test image {image}")
            test.append(TestImage(image, "bad", (mask,)))
        notes = [] if validation else [f"{validation_dir}: missing: the held-out set is a sample of train/good"]
        return CategoryPlan(category, train, test, validation=validation,
                            mask_convention="suffix _mask.png in test_public/ground_truth/bad, 0/255, one file",
                            notes=notes)
