"""Latent replay (strategies/latent_replay.py): in float32 it is replay exactly, in float16 it stores
half the bytes, and methods that train on pixels are refused (its resume: tests/test_contract.py)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.params import ConfigError
from helpers import engine_run

FAST = {"method_params": {"backbone": "resnet18"}}  # 2 tasks: step 1 trains on 6 replayed rows


@pytest.fixture(scope="module")
def fastflow_float32(synthetic_root: Path, tmp_path_factory) -> Path:
    """FastFlow under float32 latent replay, shared by the tests below."""
    out = tmp_path_factory.mktemp("latent32")
    return engine_run("fastflow", "latent_replay", {"buffer_size": 6, "dtype": "float32"}, synthetic_root, out, **FAST)


def _final(run: Path) -> tuple[pd.DataFrame, dict[str, torch.Tensor], pd.DataFrame]:
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    memory = pd.read_csv(run / "memory.csv").pivot(index="step", columns="component", values="bytes")
    return pd.read_csv(run / "metrics.csv"), checkpoint["method"], memory


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastflow", "cfa"])
def test_float32_latent_replay_trains_as_image_replay(method: str, synthetic_root: Path, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """Same kept images, same batches, the replayed rows' features from the buffer instead of the
    backbone: the trained weights and every metric equal image replay's."""
    latent = request.getfixturevalue("fastflow_float32") if method == "fastflow" else engine_run(
        method, "latent_replay", {"buffer_size": 6, "dtype": "float32"}, synthetic_root, tmp_path / "latent", **FAST)
    images = engine_run(method, "replay", {"buffer_size": 6}, synthetic_root, tmp_path / "images", **FAST)
    (metrics_l, state_l, memory_l), (metrics_i, state_i, memory_i) = _final(latent), _final(images)
    assert state_l.keys() == state_i.keys()
    for key in state_l:
        torch.testing.assert_close(state_l[key], state_i[key], rtol=1e-5, atol=1e-6, msg=key)
    pd.testing.assert_series_equal(metrics_l["value"], metrics_i["value"], rtol=1e-5)
    # the buffer holds features, not images: 64 + 128 + 256 channels at 1/4, 1/8, 1/16 of 64 px, fp32
    per_image = (64 * 16 * 16 + 128 * 8 * 8 + 256 * 4 * 4) * 4
    assert memory_l.replay_buffer.iloc[-1] == 6 * per_image and memory_i.replay_buffer.iloc[-1] == 6 * 3 * 64 * 64
    strategy = torch.load(latent / "checkpoint.pt", weights_only=True)["strategy"]["buffer"]
    assert strategy["keys"] == torch.load(images / "checkpoint.pt", weights_only=True)["strategy"]["buffer"]["keys"]


@pytest.mark.slow
def test_float16_latent_replay_halves_the_buffer(synthetic_root: Path, tmp_path: Path, fastflow_float32: Path) -> None:
    run = engine_run("fastflow", "latent_replay", {"buffer_size": 6}, synthetic_root, tmp_path / "half", **FAST)
    full = fastflow_float32
    half_bytes, full_bytes = (_final(r)[2].replay_buffer.iloc[-1] for r in (run, full))
    assert half_bytes * 2 == full_bytes
    metrics = _final(run)[0]
    assert metrics["value"].notna().all() and len(metrics) == len(_final(full)[0])
    buffer = torch.load(run / "checkpoint.pt", weights_only=True)["strategy"]["buffer"]
    assert buffer["items"].dtype == torch.float16 and buffer["codec"]["layout"][0][2] == [64, 16, 16]


@pytest.mark.parametrize("method", ["stfpm", "draem", "padim"])
def test_methods_that_train_on_pixels_are_refused(method: str, synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"strategy 'latent_replay' replays frozen-backbone features; '{method}' trains on"):
        engine_run(method, "latent_replay", {}, synthetic_root, tmp_path / method)


def test_a_backbone_names_its_features_the_same_in_every_process() -> None:
    """The buffer's layout (in the checkpoint) names features by ``latent_key``: a resumed run in a new
    process must compute the same key, channel selection included (``hash`` of None is per process)."""
    import subprocess
    import sys

    from clbench.features.backbones import BackbonePool

    code = ("import torch; from clbench.features.backbones import BackbonePool; "
            "pool = BackbonePool('none', torch.device('cpu'), 0, cache_bytes=1, spill_dir=None); "
            "print(pool.get('resnet18', ['layer1', 'layer2'], channels=[None, [1, 2]]).latent_key)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1, spill_dir=None)
    here = pool.get("resnet18", ["layer1", "layer2"], channels=[None, [1, 2]]).latent_key
    assert other == here and here.startswith("resnet18[layer1,layer2]#")
