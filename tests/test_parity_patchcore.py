"""PatchCore vs anomalib 2.7.0's ``PatchcoreModel``, and its clad options vs the paper's code.

resnet18 layer2+3, random init (copied into anomalib's feature extractor), 64 px, one task of 12
images kept whole (budget above the 768 patches: no coreset), 4 test images. anomalib upsamples
its map with ``F.interpolate``'s default (nearest): equal with ``upsample_mode="nearest"``, not
with clbench's default bilinear. The ``clad`` options are checked against a line-by-line
transcription of the paper's code (clad ``src/trainer/trainer_patchcore.py``: ``train_epoch`` and
``evaluate_data``), which cannot be imported.
"""
from __future__ import annotations

import pytest
import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from clbench.features.backbones import BackbonePool
from clbench.data import Batch, normalize
from methods.base import MethodContext, TaskData
from methods.patchcore import PatchCore
from helpers import InMemoryStream
from test_parity_padim import SIZE, rel, train_and_test


@pytest.fixture(scope="module")
def data():
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=SIZE, seed=0, progress=False)
    train, batch = train_and_test()
    return context, train, batch.pixels, batch


def fitted(context: MethodContext, train: Batch, **params) -> PatchCore:
    model = PatchCore(context, backbone="resnet18", budget=100_000, **params)
    model.fit_task(TaskData(0, ("a",), InMemoryStream(train), val=None))
    return model


@pytest.fixture(scope="module")
def anomalib_model(data):
    """anomalib's model with clbench's backbone weights; its training embeddings are returned too."""
    context, train, _, _ = data
    ours = fitted(context, train)
    ref = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False, num_neighbors=9)
    ref.feature_extractor.feature_extractor.load_state_dict(ours.backbone.model.state_dict())
    ref.train()
    with torch.no_grad():
        embeddings = ref(normalize(train.pixels))  # (N * P, D): what anomalib would put in its bank
    ref.eval()
    return ref, embeddings, ours


def test_bank_is_anomalib_embedding(anomalib_model) -> None:
    _, embeddings, ours = anomalib_model
    assert ours.memory_bank.shape == (12 * 8 * 8, 128 + 256)
    assert torch.equal(ours.memory_bank, embeddings)


@pytest.mark.parametrize("k", [3, 9])
def test_maps_and_scores_match_anomalib(data, anomalib_model, k: int) -> None:
    context, train, test, batch = data
    ref, _, ours = anomalib_model
    ref.memory_bank = ours.memory_bank.clone()
    ref.num_neighbors = k
    with torch.no_grad():
        out = ref(normalize(test))
    ours.params.update(num_neighbors=k, upsample_mode="nearest")
    prediction = ours.predict(batch)
    assert rel(prediction.maps, out.anomaly_map.squeeze(1)) <= 1e-4
    assert rel(prediction.scores, out.pred_score.flatten()) <= 1e-4
    ours.params["upsample_mode"] = "bilinear"  # clbench's default: a documented difference
    assert rel(ours.predict(batch).maps, out.anomaly_map.squeeze(1)) > 1e-3


def test_neighbourhood_size_moves_the_score(data, anomalib_model) -> None:
    """3 (seed 003, clad) and 9 (anomalib) are different settings, not the same number."""
    _, _, _, batch = data
    _, _, ours = anomalib_model
    scores = {}
    for k in (3, 9):
        ours.params["num_neighbors"] = k
        scores[k] = ours.predict(batch).scores
    assert rel(scores[3], scores[9]) > 1e-2


# -- the paper's code (clad), transcribed ------------------------------------------------------------
def clad_embedding(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """``train_epoch``: ``resize(average(fmap))`` per layer, concatenated, one image at a time."""
    average = torch.nn.AvgPool2d(3, stride=1)
    resize = torch.nn.AdaptiveAvgPool2d(feature_maps[0].shape[-2:])
    rows = []
    for i in range(feature_maps[0].shape[0]):  # the code runs with batch_size 1
        patch = torch.cat([resize(average(fmap[i : i + 1])) for fmap in feature_maps], 1)
        rows.append(patch.reshape(patch.shape[1], -1).T)
    return torch.cat(rows)


def clad_score(patch: torch.Tensor, bank: torch.Tensor, n_reweight: int = 3) -> torch.Tensor:
    """``evaluate_data`` for one image against one bank: s = w * s*."""
    dist = torch.cdist(patch, bank)
    min_val, min_idx = torch.min(dist, dim=1)
    s_idx = torch.argmax(min_val)
    s_star = torch.max(min_val)
    m_test = patch[s_idx].unsqueeze(0)
    m_star = bank[min_idx[s_idx]].unsqueeze(0)
    w_dist = torch.cdist(m_star, bank)
    _, nn_idx = torch.topk(w_dist, k=n_reweight, largest=False)
    m_star_knn = torch.linalg.norm(m_test - bank[nn_idx[0, 1:]], dim=1)
    D = torch.sqrt(torch.tensor(patch.shape[1]))
    w = 1 - (torch.exp(s_star / D) / (torch.sum(torch.exp(m_star_knn / D))))
    return w * s_star


def test_clad_options_match_the_papers_code(data) -> None:
    context, train, test, batch = data
    ours = fitted(context, train, aggregation="clad", score_weighting="clad")
    features = ours.backbone.model(normalize(train.pixels))
    torch.testing.assert_close(ours.memory_bank, clad_embedding(features), rtol=1e-5, atol=1e-6)
    patches = clad_embedding(ours.backbone.model(normalize(test)))
    expected = torch.stack([clad_score(p, ours.memory_bank) for p in patches.split(64)])
    scores = ours.predict(batch).scores
    assert rel(scores, expected) <= 1e-4
    ours.params["score_weighting"] = "softmax"
    assert rel(ours.predict(batch).scores, expected) > 1e-2  # eq. 7 as written is another number
