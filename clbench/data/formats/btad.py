"""BTAD (beanTech Anomaly Detection, Mishra et al. 2021) as distributed::

    <src>/01/train/ok/0000.bmp            products 01, 02, 03; images .bmp or .png (mixed)
    <src>/01/test/ok/0000.bmp             normal test images
    <src>/01/test/ko/0000.bmp             defective test images (one defect type: "ko")
    <src>/01/ground_truth/ko/0000.png     the mask: same stem as its image, .png or .bmp, 0/255

A mask is matched by stem, whatever the extension (anomalib's BTech reader does the same); the
conversion links it as ``<stem>_mask.png`` either way (images are decoded by content, not by name).
"""
from __future__ import annotations

from pathlib import Path

from clbench.data.dataset import DatasetError
from clbench.data.formats._files import categories_having, image_files, training_images
from clbench.data.formats.base import FORMATS, CategoryPlan, DatasetFormat, TestImage, TrainImage

EXTENSIONS = (".bmp", ".png")
DEFECT = "ko"


@FORMATS.register("btad")
class BTAD(DatasetFormat):
    description = "BTAD (beanTech): products 01/02/03 with train/ok, test/{ok,ko}, ground_truth/ko (bmp/png mixed)"

    def categories(self, src: Path) -> list[str]:
        return categories_having(src, "train/ok", "BTAD product")

    def plan(self, src: Path, category: str) -> CategoryPlan:
        folder = src / category
        train = [TrainImage(p) for p in training_images(folder / "train" / "ok", EXTENSIONS)]
        test = [TestImage(p, "good") for p in image_files(folder / "test" / "ok", EXTENSIONS)]
        masks = {p.stem: p for p in image_files(folder / "ground_truth" / DEFECT, EXTENSIONS)}
        for image in image_files(folder / "test" / DEFECT, EXTENSIONS):
            mask = masks.get(image.stem)
            if mask is None:
                expected = folder / "ground_truth" / DEFECT / f"{image.stem}.png"
                raise DatasetError(f"{expected}: mask missing for test image {image} (.png or .bmp, same stem)")
            test.append(TestImage(image, DEFECT, (mask,)))
        if not test:
            raise DatasetError(f"{folder / 'test'}: no test images (expected test/ok and test/ko)")
        return CategoryPlan(category, train, test, mask_convention="same stem .png or .bmp in ground_truth/ko, "
                                                                   "0/255, one file")
