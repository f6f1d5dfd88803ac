"""clbench.interop.avalanche: a clbench stream as an Avalanche benchmark, checked against clbench's
own loaders and decoding, the files on disk, and sklearn's AUROC."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

pytest.importorskip("avalanche")

from clbench.data import ImageStore, list_categories, load_category  # noqa: E402
from clbench.interop.avalanche import MISSING, as_benchmark, evaluate_experience, evaluate_maps  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from clbench.data.synth import generate

    root = tmp_path_factory.mktemp("avalanche")
    generate(root, categories=3, size=SIZE, seed=0, n_train=4, n_test_good=2, n_test_per_defect=1)
    return root


@pytest.fixture(scope="module")
def benchmark(root: Path):
    return as_benchmark(root, image_size=SIZE)


def _mask_on_disk(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 0  # generated at SIZE: no resize involved


def test_one_experience_per_category_in_order_with_step_task_labels(root: Path, benchmark) -> None:
    names = list_categories(root)
    assert benchmark.schedule == [(name,) for name in names]
    assert set(benchmark.streams) == {"train", "test"}  # val_fraction 0: no held-out images, no valid stream
    for stream in (benchmark.train_stream, benchmark.test_stream):
        assert len(stream) == 3
        for step, experience in enumerate(stream):
            assert experience.current_experience == step and experience.task_label == step
            assert list(experience.dataset.targets_task_labels) == [step] * len(experience.dataset)
            assert experience.dataset[0][-1] == step  # Avalanche's mb_task_id sits last


def test_train_images_are_the_stores_pixels(root: Path, benchmark) -> None:
    store = ImageStore(SIZE, decode_workers=0)  # an independent store: same decoding, no shared cache
    for name, experience in zip(list_categories(root), benchmark.train_stream):
        category = load_category(root, name, val_fraction=0.0)
        assert len(experience.dataset) == len(category.train) == 4
        for sample, (image, label, mask, _) in zip(category.train, experience.dataset):
            assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
            assert torch.equal(image, store.image(sample))
            assert label == 0 and not mask.any()
        assert list(experience.dataset.targets) == [0] * 4


def test_test_labels_and_masks_match_the_files(root: Path, benchmark) -> None:
    for name, experience in zip(list_categories(root), benchmark.test_stream):
        category = load_category(root, name, val_fraction=0.0)
        assert len(experience.dataset) == len(category.test)
        defects = 0
        for sample, (_, label, mask, _) in zip(category.test, experience.dataset):
            assert label == (0 if sample.image.parent.name == "good" else 1)
            expected = np.zeros((SIZE, SIZE), bool) if sample.mask is None else _mask_on_disk(sample.mask)
            assert mask.dtype == torch.bool and np.array_equal(mask.numpy(), expected)
            defects += label
        assert defects >= 1 and list(experience.dataset.targets) == [s.label for s in category.test]


def test_protocol_steps_and_held_out_stream(root: Path) -> None:
    bm = as_benchmark(root, "1-2", image_size=SIZE, crop_size=24, val_fraction=0.25)
    names = list_categories(root)
    assert bm.schedule == [(names[0],), (names[1], names[2])]
    assert [len(e.dataset) for e in bm.train_stream] == [3, 6]  # 4 good each, 1 held out per category
    assert [len(e.dataset) for e in bm.valid_stream] == [1, 2]
    assert [e.task_label for e in bm.valid_stream] == [0, 1]
    assert bm.test_stream[1].dataset[0][0].shape == (3, 24, 24)
    assert set(bm.test_stream[1].dataset.targets_task_labels) == {1}


def test_dataloader_batches(benchmark) -> None:
    dataset = benchmark.test_stream[1].dataset
    images, labels, masks, tasks = next(iter(DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert masks.shape == (4, SIZE, SIZE) and masks.dtype == torch.bool
    assert labels.tolist() == list(dataset.targets)[:4] and tasks.tolist() == [1] * 4


def test_mean_difference_strategy_scored_like_sklearn(benchmark) -> None:
    """A trivial strategy (a mean good image per task) over the stream; the helper's AUROCs equal
    sklearn's on the same flattened maps."""
    means = {}
    for experience in benchmark.train_stream:
        images = torch.stack([item[0] for item in experience.dataset]).float()
        means[experience.task_label] = images.mean(0)

    def predict(images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        reference = torch.stack([means[int(t)] for t in tasks])
        return (images.float() - reference).abs().mean(1)

    for experience in benchmark.test_stream:
        result = evaluate_experience(predict, experience, batch_size=3)
        items = list(experience.dataset)
        maps = predict(torch.stack([i[0] for i in items]), torch.tensor([i[3] for i in items])).numpy()
        masks = np.stack([i[2].numpy() for i in items])
        labels = np.array([i[1] for i in items])
        assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
        assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, maps.reshape(len(maps), -1).max(1)),
                                                      abs=1e-12)
        assert result["pixel_auroc"] > 0.5  # synthetic defects differ from the mean good image


def test_evaluate_maps_accepts_batches_and_needs_scores_with_labels() -> None:
    rng = np.random.default_rng(0)
    maps, masks = rng.random((2, 4, 8, 8)), rng.random((2, 4, 8, 8)) > 0.8
    whole = evaluate_maps(maps.reshape(8, 8, 8), masks.reshape(8, 8, 8))
    batched = evaluate_maps([torch.from_numpy(maps[0]), torch.from_numpy(maps[1])], [masks[0], masks[1]])
    assert whole == batched
    assert whole["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert "image_auroc" not in whole
    with pytest.raises(ValueError, match="both scores and labels"):
        evaluate_maps(maps[0], masks[0], scores=np.zeros(4))


def test_missing_avalanche_is_one_line(root: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "avalanche", None)  # import avalanche -> ImportError
    with pytest.raises(ModuleNotFoundError) as err:
        as_benchmark(root, image_size=SIZE)
    assert str(err.value) == MISSING == "avalanche-lib is not installed: pip install 'clbench[avalanche]'"
