"""Synthetic-dataset profiles: ``mvtec`` has MVTec AD's counts and sizes; ``default`` is unchanged."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clbench.cli import main
from clbench.data import synth
from clbench.data.synth import profiles

# MVTec AD (Bergmann et al., CVPR 2019, Table 1): train good, test good, test defective, original side
MVTEC_AD = {
    "bottle": (209, 20, 63, 900), "cable": (224, 58, 92, 1024), "capsule": (219, 23, 109, 1000),
    "carpet": (280, 28, 89, 1024), "grid": (264, 21, 57, 1024), "hazelnut": (391, 40, 70, 1024),
    "leather": (245, 32, 92, 1024), "metal_nut": (220, 22, 93, 700), "pill": (267, 26, 141, 800),
    "screw": (320, 41, 119, 1024), "tile": (230, 33, 84, 840), "toothbrush": (60, 12, 30, 1024),
    "transistor": (213, 60, 40, 1024), "wood": (247, 19, 60, 1024), "zipper": (240, 32, 119, 1024),
}
MVTEC_GRAYSCALE = {"grid", "screw", "zipper"}

# sha256 over (path, mode, size, decoded pixels, marker) of synthesize(out, ["capsule", "screw"], size=64),
# computed with the code before profiles existed (git HEAD 30260f1): the quickstart's data must not change
DEFAULT_PIXELS_SHA256 = "3ea7f20b9b96bf0d244d88556017104f2e059702ddd48ddde764dfa077e357f7"


def _counts(category: Path) -> tuple[int, int, dict[str, int]]:
    """(train good, test good, {defect: n}) as on disk, checking every defect image has its mask."""
    defects = {}
    for folder in sorted((category / "test").iterdir()):
        if folder.name != "good":
            defects[folder.name] = len(list(folder.glob("*.png")))
            assert len(list((category / "ground_truth" / folder.name).glob("*_mask.png"))) == defects[folder.name]
    good = len(list((category / "test" / "good").glob("*.png")))
    return len(list((category / "train" / "good").glob("*.png"))), good, defects


def _pixels_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as im:
            h.update(f"{path.relative_to(root)} {im.mode} {im.size}".encode())
            h.update(np.asarray(im).tobytes())
    h.update(json.dumps(json.loads((root / synth.MARKER).read_text()), sort_keys=True).encode())
    return h.hexdigest()


def test_mvtec_profile_maps_every_category_onto_the_table_one_to_one() -> None:
    assert sorted(profiles.MVTEC) == sorted(synth.CATEGORY_NAMES)
    assert sorted(m.name for m in profiles.MVTEC.values()) == sorted(MVTEC_AD)
    train = test = 0
    for name in synth.CATEGORY_NAMES:
        real = profiles.MVTEC[name].name
        p = profiles.plan("mvtec", name, None, None)
        assert (p.n_train, p.n_test_good, sum(p.n_defect.values()), p.size) == MVTEC_AD[real], name
        assert set(p.n_defect) == set(synth.catalogue._SPECS[name].defects)
        assert max(p.n_defect.values()) - min(p.n_defect.values()) <= 1, name  # split evenly over defect types
        assert (name in synth.GRAYSCALE_CATEGORIES) == (real in MVTEC_GRAYSCALE), name
        train += p.n_train
        test += p.n_test_good + sum(p.n_defect.values())
    assert (train, test) == (3629, 1725)


def test_mvtec_profile_scaled_counts_on_disk_through_the_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mv"
    assert main(["data", "synth", "--out", str(out), "--profile", "mvtec", "--size", "32", "--count-scale", "0.05",
                 "--categories", "3", "--workers", "1"]) == 0
    # toothbrush 60/12/30, metal_nut 220/22/93, cable 224/58/92 at 0.05, rounded half up, at least 1
    assert _counts(out / "stripes") == (3, 1, {"scratch": 1, "color_spot": 1})
    assert _counts(out / "nut") == (11, 1, dict.fromkeys(["scratch", "hole", "missing_part", "print_error",
                                                          "contamination"], 1))
    assert _counts(out / "checker") == (11, 3, {"color_spot": 2, "crack": 1, "print_error": 1, "scratch": 1})
    with Image.open(next((out / "nut" / "train" / "good").iterdir())) as im:
        assert im.size == (32, 32)
    # the same command again finds everything up to date; another scale regenerates
    assert synth.synthesize(out, 3, size=32, profile="mvtec", count_scale=0.05, workers=1) == ["stripes", "nut", "checker"]
    synth.synthesize(out, ["stripes"], size=32, profile="mvtec", count_scale=0.1, workers=1)
    assert _counts(out / "stripes") == (6, 1, {"scratch": 1, "color_spot": 1, "hole": 1})


@pytest.mark.slow
def test_mvtec_profile_default_size_is_the_categorys_original(tmp_path: Path) -> None:
    synth.generate(tmp_path, ["nut", "screw"], profile="mvtec", count_scale=0.001, workers=1)
    with Image.open(tmp_path / "nut" / "train" / "good" / "000.png") as im:
        assert (im.size, im.mode) == ((700, 700), "RGB")  # metal_nut
    with Image.open(tmp_path / "screw" / "test" / "good" / "000.png") as im:
        assert (im.size, im.mode) == ((1024, 1024), "L")  # screw


def test_default_profile_is_unchanged(tmp_path: Path) -> None:
    synth.synthesize(tmp_path, ["capsule", "screw"], size=64, workers=1)
    assert _pixels_hash(tmp_path) == DEFAULT_PIXELS_SHA256
    assert _counts(tmp_path / "screw")[:2] == (40, 8)


@pytest.mark.parametrize("argv, message", [
    (["--profile", "nope"], "profile='nope' is unknown: choose from default, mvtec"),
    (["--profile", "mvtec", "--count-scale", "0"], "count_scale=0.0 must be a positive number"),
])
def test_cli_rejects_a_bad_profile_in_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"clbench: error: {message}\n"
    assert not (tmp_path / "x").exists()


def test_mvtec_profile_refuses_explicit_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_train=5: the mvtec profile sets its own counts"):
        synth.generate(tmp_path, 1, profile="mvtec", n_train=5)


@pytest.mark.slow
def test_full_mvtec_profile_at_tiny_size_has_the_tables_counts(tmp_path: Path) -> None:
    synth.synthesize(tmp_path, 15, size=32, profile="mvtec", workers=2)
    for name in synth.CATEGORY_NAMES:
        train, good, defects = _counts(tmp_path / name)
        assert (train, good, sum(defects.values())) == MVTEC_AD[profiles.MVTEC[name].name][:3], name
