"""CAINNFlow's attention blocks and coupling subnets against the equations of its paper (seed 000,
eqs. 6-12). CAINNFlow has no reference implementation, so the expected values are computed here,
independently of ``methods.flows.cainnflow``: by hand from literal weights (eqs. 7, 8) and with plain
numpy written from the equations (eq. 6, eqs. 9-12). Where the module follows a documented reading
of an ambiguous equation, the test also shows that the literal reading would give another value."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from methods.flows.cainnflow import CBAM, ChannelAttention, SpatialAttention, cbam_subnet

# F in R^{2 x 2 x 2}: channel 0 = [[1, 2], [3, 4]], channel 1 = [[-1, 0], [0, 5]]
F = np.array([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 5.0]]])
W0 = np.array([[0.5, -0.25]])  # C/r x C (C = 2, r = 16 -> 1 hidden unit)
W1 = np.array([[1.0], [-2.0]])  # C x C/r


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def set_weights(module: nn.Module, values: dict[str, np.ndarray]) -> None:
    """Set the named parameters (float64, the rest to zero)."""
    module.double()
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(tensor(values[name]).reshape(param.shape) if name in values else torch.zeros_like(param))


def run(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.double()(tensor(x)[None])[0].numpy()


# -- plain numpy, from the equations --------------------------------------------------------------
def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' cross-correlation: x (Cin, H, W), w (Cout, Cin, k, k), b (Cout,)."""
    k = w.shape[-1]
    pad = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    out = np.zeros((w.shape[0], x.shape[1], x.shape[2]))
    for o in range(w.shape[0]):
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                out[o, i, j] = b[o] + np.sum(w[o] * pad[:, i:i + k, j:j + k])
    return out


def channel_attention(f, w0, b0, w1, b1):
    """Eq. 7: sigma(W1 relu(W0 avg + b0) + b1 + W1 relu(W0 max + b0) + b1), shape (C, 1, 1)."""
    mlp = lambda d: w1 @ np.maximum(w0 @ d + b0, 0.0) + b1  # noqa: E731
    return sigmoid(mlp(f.mean(axis=(1, 2))) + mlp(f.max(axis=(1, 2))))[:, None, None]


def spatial_attention(f, w7, b):
    """Eq. 8: sigma(f7x7([mean_c F; max_c F])), shape (1, H, W)."""
    return sigmoid(conv2d(np.stack([f.mean(axis=0), f.max(axis=0)]), w7[None], np.array([b])))


def cbam(f, p):
    """Eq. 6: F' = M_c(F) * F; F'' = M_s(F') * F'."""
    f1 = channel_attention(f, *p["channel"]) * f
    return spatial_attention(f1, *p["spatial"]) * f1


# -- eq. 7 ----------------------------------------------------------------------------------------
def test_channel_attention_eq7_by_hand() -> None:
    module = ChannelAttention(2, reduction=16)
    set_weights(module, {"mlp.0.weight": W0, "mlp.2.weight": W1})
    # avg = [2.5, 1.0], max = [4, 5]; W0 avg = 1.0, W0 max = 0.75 (both > 0, ReLU passes);
    # W1 * 1.0 + W1 * 0.75 = [1.75, -3.5]
    expected = [1 / (1 + math.exp(-1.75)), 1 / (1 + math.exp(3.5))]
    assert run(module, F).reshape(2) == pytest.approx(expected, abs=1e-12)
    # biases (CBAM's reference MLP has them): b0 = -1.5 makes both hidden pre-activations negative,
    # the ReLU zeroes them, and the output bias b1 enters once per descriptor: sigma(2 * b1)
    set_weights(module, {"mlp.0.weight": W0, "mlp.0.bias": [-1.5], "mlp.2.weight": W1, "mlp.2.bias": [0.1, 0.2]})
    expected = [1 / (1 + math.exp(-0.2)), 1 / (1 + math.exp(-0.4))]
    assert run(module, F).reshape(2) == pytest.approx(expected, abs=1e-12)


# -- eq. 8 ----------------------------------------------------------------------------------------
def spatial_kernel() -> np.ndarray:
    """7x7 kernel over [mean; max]: centre taps 1 (mean) and -0.5 (max), and 2 on the mean map one
    column to the right of the centre (out[i, j] += 2 * mean[i, j + 1], zero padding)."""
    w = np.zeros((2, 7, 7))
    w[0, 3, 3], w[1, 3, 3], w[0, 3, 4] = 1.0, -0.5, 2.0
    return w


def test_spatial_attention_eq8_by_hand() -> None:
    module = SpatialAttention()
    set_weights(module, {"conv.weight": spatial_kernel(), "conv.bias": [0.25]})
    # mean_c F = [[0, 1], [1.5, 4.5]], max_c F = [[1, 2], [3, 5]]
    # (0,0): 0 - 0.5 + 2*1 + 0.25 = 1.75   (0,1): 1 - 1 + 0 + 0.25 = 0.25
    # (1,0): 1.5 - 1.5 + 2*4.5 + 0.25 = 9.25   (1,1): 4.5 - 2.5 + 0 + 0.25 = 2.25
    expected = [[1 / (1 + math.exp(-v)) for v in row] for row in ((1.75, 0.25), (9.25, 2.25))]
    assert run(module, F)[0] == pytest.approx(np.array(expected), abs=1e-12)


# -- eq. 6 ----------------------------------------------------------------------------------------
CBAM_PARAMS = {"channel": (W0, np.zeros(1), W1, np.zeros(2)), "spatial": (spatial_kernel(), 0.25)}
CBAM_WEIGHTS = {"channel.mlp.0.weight": W0, "channel.mlp.2.weight": W1,
                "spatial.conv.weight": spatial_kernel(), "spatial.conv.bias": [0.25]}


def test_cbam_eq6_channel_first_then_spatial() -> None:
    module = CBAM(2, reduction=16)
    set_weights(module, CBAM_WEIGHTS)
    expected = cbam(F, CBAM_PARAMS)
    assert run(module, F) == pytest.approx(expected, abs=1e-12)
    spatial_first = spatial_attention(F, *CBAM_PARAMS["spatial"]) * F
    spatial_first = channel_attention(spatial_first, *CBAM_PARAMS["channel"]) * spatial_first
    assert np.abs(spatial_first - expected).max() > 1e-3  # the order is observable with these weights


# -- eqs. 9-12 ------------------------------------------------------------------------------------
C_IN, C_OUT = 2, 4  # passive half ceil(C/2), s and t for the active half 2 * floor(C/2); hidden = C_IN
X = np.random.default_rng(0).normal(size=(C_IN, 3, 3))


def conv_weights(rng, c_out: int, c_in: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(scale=0.7, size=(c_out, c_in, 3, 3)), rng.normal(scale=0.3, size=c_out)


def cbam_weights(rng, channels: int):
    """Random CBAM parameters for the numpy equations, and the same values keyed as CBAM module weights."""
    hidden = max(1, channels // 16)
    p = {"channel": (rng.normal(size=(hidden, channels)), rng.normal(size=hidden),
                     rng.normal(size=(channels, hidden)), rng.normal(size=channels)),
         "spatial": (rng.normal(scale=0.3, size=(2, 7, 7)), rng.normal())}
    module = {"channel.mlp.0.weight": p["channel"][0], "channel.mlp.0.bias": p["channel"][1],
              "channel.mlp.2.weight": p["channel"][2], "channel.mlp.2.bias": p["channel"][3],
              "spatial.conv.weight": p["spatial"][0], "spatial.conv.bias": [p["spatial"][1]]}
    return p, module


def subnet_with_weights(variant: str, seed: int):
    """The module of one variant with random weights, and those weights as numpy arrays in order."""
    subnet = cbam_subnet(variant, hidden_ratio=1.0, reduction=16)(C_IN, C_OUT).double()
    rng = np.random.default_rng(seed)
    convs = [m for m in subnet if isinstance(m, nn.Conv2d)]
    attention = [m for m in subnet if isinstance(m, CBAM)]
    conv_params = [conv_weights(rng, m.out_channels, m.in_channels) for m in convs]
    for m, (w, b) in zip(convs, conv_params):
        set_weights(m, {"weight": w, "bias": b})
    cbam_params = None
    if attention:
        cbam_params, module_weights = cbam_weights(rng, attention[0].channel.mlp[0].in_channels)
        set_weights(attention[0], module_weights)
    return subnet, conv_params, cbam_params


def test_ca_eq9_conv_then_cbam() -> None:
    subnet, ((w, b),), p = subnet_with_weights("CA", 1)
    f1 = conv2d(X, w, b)  # F' = Con(F), C_IN -> C_OUT
    assert run(subnet, X) == pytest.approx(cbam(f1, p), abs=1e-10)  # F''' = CBAM(F')
    assert subnet[1].channel.mlp[0].in_channels == C_OUT


def test_ac_eq10_cbam_then_conv() -> None:
    subnet, ((w, b),), p = subnet_with_weights("AC", 2)
    assert run(subnet, X) == pytest.approx(conv2d(cbam(X, p), w, b), abs=1e-10)  # F''' = Con(CBAM(F))
    assert subnet[0].channel.mlp[0].in_channels == C_IN


def test_cac_eq11_conv_relu_cbam_conv() -> None:
    subnet, ((w1, b1), (w2, b2)), p = subnet_with_weights("CAC", 3)
    f1 = np.maximum(conv2d(X, w1, b1), 0.0)  # F' = Con(F); ReLU: our documented choice (FastFlow's subnet)
    f2 = channel_attention(f1, *p["channel"]) * f1  # F'' = M_c(F') * F'
    f3 = spatial_attention(f2, *p["spatial"]) * f2  # F''' = M_s(F'') * F'' (standard CBAM, eq. 6)
    expected = conv2d(f3, w2, b2)  # F(4) = Con(F''')
    assert run(subnet, X) == pytest.approx(expected, abs=1e-10)
    # eq. 11 as printed multiplies M_s(F'') onto F' instead of F''; we follow eq. 6 (documented)
    literal = conv2d(spatial_attention(f2, *p["spatial"]) * f1, w2, b2)
    assert np.abs(literal - expected).max() > 1e-3
    no_relu = conv2d(cbam(conv2d(X, w1, b1), p), w2, b2)
    assert np.abs(no_relu - expected).max() > 1e-3  # the ReLU is observable with these weights


def test_cc_eq12_two_convs() -> None:
    subnet, ((w1, b1), (w2, b2)), p = subnet_with_weights("CC", 4)
    assert p is None and not any(isinstance(m, (CBAM, ChannelAttention, SpatialAttention)) for m in subnet.modules())
    expected = conv2d(np.maximum(conv2d(X, w1, b1), 0.0), w2, b2)  # Con(ReLU(Con(F))), ReLU as FastFlow's
    assert run(subnet, X) == pytest.approx(expected, abs=1e-10)
    assert [m.kernel_size for m in subnet if isinstance(m, nn.Conv2d)] == [(3, 3), (3, 3)]
