"""PaDiM vs anomalib 2.7.0's ``PadimModel`` on the same images, backbone weights and channels.

resnet18 layer1-3, random init (copied into anomalib's feature extractor), 100 channels (clbench's
``channel_index`` copied into anomalib's ``idx``), 64 px, one task of 12 images, 4 test images.
anomalib regularises with 0.01 + 1e-5 (its ``MultiVariateGaussian`` adds a 1e-5 "stabiliser");
with that epsilon clbench agrees to float tolerance, with its default 0.01 it differs slightly.
"""
from __future__ import annotations

import pytest
import torch
from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.padim.torch_model import PadimModel

from clbench.features.backbones import BackbonePool
from clbench.data import Batch, normalize
from methods.base import MethodContext, TaskData
from methods.padim import PaDiM
from helpers import InMemoryStream, smooth_batch

SIZE = 64
ANOMALIB_EPSILON = 0.01 + 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max elementwise relative difference of a from the reference b."""
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


def train_and_test() -> tuple[Batch, Batch]:
    """The images PaDiM and PatchCore are compared on: 12 to fit, 4 to score (smooth fields plus fine noise)."""
    return smooth_batch(12, 0, SIZE, task="a", noise=0.1), smooth_batch(4, 1, SIZE, task="a", noise=0.1)


@pytest.fixture(scope="module")
def setup():
    """clbench fitted with anomalib's epsilon and with its own; anomalib fitted on the same images."""
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=SIZE, seed=0, progress=False)
    train, batch = train_and_test()
    models = {}
    for name, epsilon in (("matched", ANOMALIB_EPSILON), ("default", 0.01)):
        model = PaDiM(context, backbone="resnet18", n_features=100, batch_size=5, epsilon=epsilon)
        model.fit_task(TaskData(0, ("a",), InMemoryStream(train), val=None))
        models[name] = model
    ours = models["matched"]
    ref = PadimModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100)
    ref.feature_extractor.feature_extractor.load_state_dict(ours.backbone.model.state_dict())
    ref.idx.copy_(ours.channel_index)
    ref.train()
    with torch.no_grad():
        ref(normalize(train.pixels))
    ref.fit()
    ref.eval()
    with torch.no_grad():
        out = ref(normalize(batch.pixels))
    return models, ref, out, batch, train.pixels, batch.pixels


def test_embedding_and_gaussian_match_anomalib(setup) -> None:
    models, ref, _, batch, train, _ = setup
    ours = models["matched"]
    with torch.no_grad():
        theirs = ref.generate_embedding(ref.feature_extractor(normalize(batch.pixels)))  # (B, d, H, W)
    assert torch.equal(ours.embed(batch), theirs.flatten(2).transpose(1, 2))
    mean = ref.gaussian.mean.t()  # anomalib (d, P) -> (P, d)
    assert rel(ours.mean, mean) < 1e-4 or float((ours.mean - mean).abs().max()) < 1e-6
    inverse = ref.gaussian.inv_covariance  # (P, d, d); entries near 0 make elementwise ratios meaningless
    assert float((ours.precision - inverse).abs().max() / inverse.abs().max()) < 1e-5
    with torch.no_grad():  # covariance: anomalib's own np.cov-like estimator on its embeddings
        emb = ref.generate_embedding(ref.feature_extractor(normalize(train))).flatten(2)  # (N, d, P)
    for p in (0, 37, emb.shape[-1] - 1):
        expected = ref.gaussian._cov(emb[:, :, p], rowvar=False) + ANOMALIB_EPSILON * torch.eye(100)
        torch.testing.assert_close(ours.covariance[p], expected, rtol=1e-4, atol=1e-6)


def test_maps_and_scores_match_anomalib(setup) -> None:
    models, _, out, batch, _, _ = setup
    prediction = models["matched"].predict(batch)
    assert prediction.maps.shape == (4, SIZE, SIZE)
    assert rel(prediction.maps, out.anomaly_map.squeeze(1)) <= 1e-4
    assert rel(prediction.scores, out.pred_score.flatten()) <= 1e-4


def test_default_epsilon_differs_from_anomalib_only_by_its_stabiliser(setup) -> None:
    """clbench's default is PaDiM's plain 0.01: a small, documented difference from anomalib."""
    models, _, out, batch, _, _ = setup
    prediction = models["default"].predict(batch)
    assert 1e-5 < rel(prediction.maps, out.anomaly_map.squeeze(1)) < 1e-2
    assert bool((prediction.maps > out.anomaly_map.squeeze(1)).all())  # smaller epsilon: larger distances


def test_patch_image_score_is_the_raw_distance_maximum(setup) -> None:
    """``image_score="patch"`` (clad): the max of anomalib's own patch distances, before upsampling."""
    models, ref, out, batch, _, _ = setup
    ours = models["matched"]
    with torch.no_grad():
        embedding = ref.generate_embedding(ref.feature_extractor(normalize(batch.pixels)))
        raw = AnomalyMapGenerator.compute_distance(embedding, [ref.gaussian.mean, ref.gaussian.inv_covariance])
    ours.params["image_score"] = "patch"
    try:
        scores = ours.predict(batch).scores
    finally:
        ours.params["image_score"] = "map"
    assert rel(scores, raw.flatten(1).amax(1)) <= 1e-4
    assert bool((scores > out.pred_score.flatten()).all())  # upsampling and blur lower the maximum
