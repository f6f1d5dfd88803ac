"""DRAEM vs anomalib 2.7.0 (``anomalib.models.image.draem``, sspcab off) and DRAEM's own loss code.

Same weights (clbench's full-width networks, 128 / 64, copied into anomalib's ``DraemModel`` by
key mapping), same images: reconstructions, logits, anomaly maps and image scores agree. Image
score: anomalib takes the plain max of the map; clbench (seed 003 section 1.6.3, DRAEM's
``test_DRAEM.py``) the max of the map mean-filtered sf x sf, so equality holds with
``mean_filter=1`` and the default is asserted to be DRAEM's filtered max instead.

Loss: anomalib's ``DraemLoss`` = MSE + 2 * kornia ``SSIMLoss`` + kornia ``FocalLoss(alpha=1)``.
The l2 term agrees; the SSIM term agrees with ``ssim_padding="reflect"`` (kornia's border) and the
default "zeros" agrees with DRAEM's own ``SSIM`` (copied below from DRAEM's ``loss.py``). The focal
term follows DRAEM (``FocalLoss()``, every pixel weighted 1, copied below) and kornia with
``alpha=None``; anomalib's ``alpha=1`` under kornia >= 0.7.1 weights class 0 (normal pixels) by
1 - alpha = 0 and halves the mean: a documented difference, asserted here.
"""
from __future__ import annotations

import re
from math import exp

import kornia
import pytest
import torch
import torch.nn.functional as F
from anomalib.models.image.draem.loss import DraemLoss
from anomalib.models.image.draem.torch_model import DraemModel

from clbench.features.backbones import BackbonePool
from clbench.data import Batch
from methods.base import MethodContext
from methods.draem.losses import draem_loss_terms, focal_loss, ssim, ssim_map
from methods.draem.model import DRAEM, draem_filter_size
from methods.draem.simulator import AnomalySource, synthesize_anomalies

SIZE = 32
TOL = 1e-4

_DISC_UP = ["up_b", "up1", "up2", "up3", "up4"]
_DISC_MERGE = ["db_b", "db1", "db2", "db3", "db4"]


def anomalib_key(key: str) -> str:
    """clbench's DRAEM state-dict key -> anomalib's ``DraemModel`` key."""
    net, _, rest = key.partition(".")
    if net == "reconstructive":
        rest = re.sub(r"^encoder\.(\d+)\.", lambda m: f"encoder.block{int(m[1]) + 1}.", rest)
        rest = re.sub(r"^decoder\.(\d+)\.0\.", lambda m: f"decoder.up{int(m[1]) + 1}.", rest)
        rest = re.sub(r"^decoder\.(\d+)\.1\.", lambda m: f"decoder.db{int(m[1]) + 1}.", rest)
        rest = re.sub(r"^out\.", "decoder.fin_out.0.", rest)
        return f"reconstructive_subnetwork.{rest}"
    if net == "discriminative":
        rest = re.sub(r"^encoder\.(\d+)\.", lambda m: f"encoder_segment.block{int(m[1]) + 1}.", rest)
        rest = re.sub(r"^up\.(\d+)\.", lambda m: f"decoder_segment.{_DISC_UP[int(m[1])]}.", rest)
        rest = re.sub(r"^merge\.(\d+)\.", lambda m: f"decoder_segment.{_DISC_MERGE[int(m[1])]}.", rest)
        rest = re.sub(r"^out\.", "decoder_segment.fin_out.0.", rest)
        return f"discriminative_subnetwork.{rest}"
    raise KeyError(key)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def models() -> tuple[DRAEM, DraemModel]:
    """clbench's DRAEM at DRAEM's widths with calibrated BatchNorm statistics, and anomalib's
    ``DraemModel`` holding a copy of the same weights."""
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=SIZE, seed=0, progress=False)
    ours = DRAEM(context, base_width=128, disc_base_width=64)
    # running statistics from real activations, so eval-mode outputs are far from the trivial 0.5 map
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = None  # cumulative average
    ours.train()
    with torch.no_grad():
        ours(torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(100)))
    for m in norms:
        m.momentum = 0.1
    ours.eval()
    state = {anomalib_key(k): v.clone() for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        reference = DraemModel(sspcab=False)
    reference.load_state_dict(state, strict=True, assign=True)
    reference.eval()
    return ours, reference


def images() -> torch.Tensor:
    """Two fixed uint8 images: a smooth gradient with a bright square, and noise."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    first = torch.stack([x * 6, y * 6, (x + y) * 3]).clamp(0, 255)
    first[:, 8:14, 18:26] = 250
    second = torch.randint(0, 256, (3, SIZE, SIZE), generator=torch.Generator().manual_seed(7))
    return torch.stack([first, second]).to(torch.uint8)


def batch_of(pixels: torch.Tensor) -> Batch:
    n = len(pixels)
    return Batch(pixels=pixels, keys=[f"img{i}" for i in range(n)], labels=torch.zeros(n, dtype=torch.int64),
                 masks=torch.zeros(n, SIZE, SIZE, dtype=torch.bool))


# -- DRAEM's own loss code (github.com/VitjanZ/DRAEM loss.py, as copied in the benchmark paper's
#    src/models/draem_add/loss.py): the reference for the default SSIM and focal terms -------------
def draem_ssim_loss(img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11, val_range: float | None = None) -> torch.Tensor:
    gauss = torch.tensor([exp(-((x - window_size // 2) ** 2) / float(2 * 1.5**2)) for x in range(window_size)])
    g = (gauss / gauss.sum()).unsqueeze(1)
    channel = img1.shape[1]
    window = g.mm(g.t()).float().unsqueeze(0).unsqueeze(0).expand(channel, 1, window_size, window_size).contiguous()
    window = window.to(img1.dtype)
    if val_range is None:  # DRAEM guesses the range from img1 (its reconstruction)
        max_val = 255 if torch.max(img1) > 128 else 1
        min_val = -1 if torch.min(img1) < -0.5 else 0
        L = max_val - min_val
    else:
        L = val_range
    padd = window_size // 2
    mu1 = F.conv2d(img1, window, padding=padd, groups=channel)
    mu2 = F.conv2d(img2, window, padding=padd, groups=channel)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = F.conv2d(img1 * img1, window, padding=padd, groups=channel) - mu1_sq
    sigma2_sq = F.conv2d(img2 * img2, window, padding=padd, groups=channel) - mu2_sq
    sigma12 = F.conv2d(img1 * img2, window, padding=padd, groups=channel) - mu1_mu2
    C1, C2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    v1 = 2.0 * sigma12 + C2
    v2 = sigma1_sq + sigma2_sq + C2
    ssim_map = ((2 * mu1_mu2 + C1) * v1) / ((mu1_sq + mu2_sq + C1) * v2)
    return 1.0 - ssim_map.mean()


def draem_focal_loss(logit: torch.Tensor, target: torch.Tensor, gamma: float = 2, smooth: float = 1e-5) -> torch.Tensor:
    """DRAEM's ``FocalLoss()(softmax(out_mask), anomaly_mask)``: alpha None (all ones), smoothing 1e-5."""
    num_class = logit.shape[1]
    logit = logit.view(logit.size(0), logit.size(1), -1).permute(0, 2, 1).contiguous().view(-1, num_class)
    target = torch.squeeze(target, 1).reshape(-1, 1)
    alpha = torch.ones(num_class, 1)
    idx = target.cpu().long()
    one_hot_key = torch.zeros(target.size(0), num_class).scatter_(1, idx, 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    logpt = pt.log()
    alpha = torch.squeeze(alpha[idx])
    return (-1 * alpha * torch.pow((1 - pt), gamma) * logpt).mean()


# -- inference ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_maps_and_scores_match_anomalib(models, monkeypatch) -> None:
    ours, reference = models
    pixels = images()
    x = pixels.float() / 255  # DRAEM and anomalib: [0, 1] images, no ImageNet normalisation
    with torch.no_grad():
        expected = reference(x)
    assert float(expected.anomaly_map.std()) > 0.01  # a map with structure, not the flat 0.5 of a dead network

    monkeypatch.setattr(ours, "filter_size", 1)  # mean_filter=1: anomalib's plain max
    plain = ours.predict(batch_of(pixels))
    assert plain.maps.shape == expected.anomaly_map.shape == (2, SIZE, SIZE)
    assert rel_diff(plain.maps, expected.anomaly_map) <= TOL
    assert rel_diff(plain.scores, expected.pred_score) <= TOL

    # clbench's default: DRAEM's score, max of the sf x sf mean-filtered map (sf = 3 at 32 px)
    sf = draem_filter_size(SIZE)
    monkeypatch.setattr(ours, "filter_size", sf)
    filtered = ours.predict(batch_of(pixels))
    assert torch.equal(filtered.maps, plain.maps)
    draem_score = F.avg_pool2d(expected.anomaly_map.unsqueeze(1), sf, stride=1, padding=sf // 2).amax(dim=(1, 2, 3))
    assert rel_diff(filtered.scores, draem_score) <= TOL
    assert (expected.pred_score - filtered.scores > 1e-4).all()  # the intended difference: smoothed peak < raw peak


# -- one training step --------------------------------------------------------------------------
@pytest.mark.slow
def test_training_step_outputs_and_loss_match_anomalib(models) -> None:
    ours, reference = models
    clean = images().float() / 255
    augmented, masks = synthesize_anomalies(clean, AnomalySource(None, SIZE), torch.Generator().manual_seed(3), p_anomalous=1.0)
    assert masks.sum() > 0
    ours.train()
    reference.train()
    try:
        with torch.no_grad():
            rec_ref, logits_ref = reference(augmented)
            rec, logits = ours(augmented)
    finally:
        ours.eval()
        reference.eval()
    assert rel_diff(rec, rec_ref) <= TOL and rel_diff(logits, logits_ref) <= TOL

    criterion = DraemLoss()
    loss_ref = criterion(clean, rec_ref, masks, logits_ref)
    focal_ref = criterion.focal_loss(logits_ref, masks.squeeze(1).long())
    terms = draem_loss_terms(clean, rec, logits, masks)  # clbench's defaults (DRAEM's code)
    terms_reflect = draem_loss_terms(clean, rec, logits, masks, ssim_padding="reflect")
    total = terms["l2"] + terms["ssim"] + terms["focal"]
    assert float(total) == pytest.approx(float(ours.loss(clean, rec, logits, masks)), rel=1e-6)

    # l2 and SSIM: equal to anomalib's terms (SSIM with kornia's reflect border)
    assert float(terms["l2"]) == pytest.approx(float(criterion.l2_loss(rec_ref, clean)), rel=1e-5)
    assert float(terms_reflect["ssim"]) == pytest.approx(float(2 * criterion.ssim_loss(rec_ref, clean)), rel=1e-5)
    # anomalib's loss is exactly clbench's with the reflect border and anomalib's focal term
    assert float(terms_reflect["l2"] + terms_reflect["ssim"] + focal_ref) == pytest.approx(float(loss_ref), rel=1e-5)
    # the default zero border is DRAEM's SSIM (its own code) and differs from kornia's at the border
    # (DRAEM's SSIM takes L = 2 when its reconstruction dips below -0.5, as this random one does;
    # clbench keeps L = 1, the images' range, as kornia: compared at L = 1)
    assert float(terms["ssim"]) == pytest.approx(float(draem_ssim_loss(rec, clean, val_range=1.0)), rel=1e-5)
    assert abs(float(terms["ssim"] - terms_reflect["ssim"])) > 1e-6
    # focal: DRAEM's (every pixel), not anomalib's (anomalous pixels only, halved)
    assert float(terms["focal"]) == pytest.approx(float(draem_focal_loss(torch.softmax(logits, 1), masks)), rel=1e-5)
    assert float(focal_ref) < float(terms["focal"])


# -- the loss terms on small tensors: kornia and DRAEM's code as references -----------------------
def test_focal_loss_is_draems_and_kornias_unweighted_focal() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 2, 9, 7, generator=g)
    target = torch.randint(0, 2, (2, 9, 7), generator=g)
    pixels = target.numel()
    # default smoothing 1e-5: DRAEM's FocalLoss; no smoothing: kornia's unweighted focal loss
    draem = draem_focal_loss(torch.softmax(logits, 1), target[:, None])
    assert float(focal_loss(logits, target, smooth=1e-5)) == pytest.approx(float(draem), rel=1e-6)
    kornia_none = kornia.losses.focal_loss(logits, target, alpha=None, gamma=2.0, reduction="sum") / pixels
    assert float(focal_loss(logits, target)) == pytest.approx(float(kornia_none), rel=1e-6)
    assert abs(float(draem - kornia_none)) > 1e-3  # these logits reach p_t < 1e-5, where smoothing bounds the loss
    ce = F.cross_entropy(logits, target)  # gamma 0: the cross-entropy
    assert float(focal_loss(logits, target, gamma=0.0)) == pytest.approx(float(ce), rel=1e-6)
    # anomalib 2.7.0's kornia FocalLoss(alpha=1): normal pixels (class 0) weigh nothing, mean over 2 channels
    anomalib_focal = DraemLoss().focal_loss
    normal = torch.zeros_like(target)
    assert float(anomalib_focal(logits, normal)) == 0.0 and float(focal_loss(logits, normal)) > 0.1
    anomalous_only = kornia.losses.focal_loss(logits, target, alpha=None, gamma=2.0, reduction="none")[:, 1].sum() / (2 * pixels)
    assert float(anomalib_focal(logits, target)) == pytest.approx(float(anomalous_only), rel=1e-5)


def test_ssim_is_draems_and_kornias_in_the_interior() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 24, 20, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-12)
    # zero border: DRAEM's SSIM; reflect border: kornia's (anomalib's SSIMLoss = (1 - SSIM) / 2)
    assert float(1 - ssim(a, b)) == pytest.approx(float(draem_ssim_loss(a, b)), rel=1e-6)  # its window is float32
    kornia_map = kornia.metrics.ssim(a, b, 11, eps=0.0)
    assert float(ssim(a, b, padding="reflect")) == pytest.approx(float(kornia_map.mean()), rel=1e-6)
    assert float(1 - ssim(a, b, padding="reflect")) == pytest.approx(float(2 * kornia.losses.ssim_loss(a, b, 11)), rel=1e-6)
    # the two borders agree away from the border (11x11 window: 5 px) and differ at it
    zeros, reflect = ssim_map(a, b), ssim_map(a, b, padding="reflect")
    valid = kornia.metrics.ssim(a, b, 11, eps=0.0, padding="valid")
    torch.testing.assert_close(zeros[..., 5:-5, 5:-5], valid, rtol=1e-6, atol=1e-9)
    assert (zeros - reflect).abs().max() > 1e-3
    with pytest.raises(ValueError, match="padding 'wrap'"):
        ssim(a, b, padding="wrap")
