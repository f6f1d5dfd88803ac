"""The benchmark paper's profile (`clbench reproduce clad`): the dry run lists every cell with its resolved
settings, outside inputs and random init are refused with one line before anything is written, and a
short slice of the profile runs on the synthetic data and reports the paper's table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clbench.cli import main
from clbench.reporting.profile import load_profile
from clbench.engine.tasks import PAPER_ORDER

CELLS = ["padim-sequential-seed0", "patchcore-sequential-seed0", "cfa-replay-seed0", "stfpm-replay-seed0",
         "efficientad-replay-seed0", "draem-replay-seed0", "fastflow-replay-seed0", "cainnflow-replay-seed0"]


@pytest.fixture
def no_weight_caches(tmp_path: Path, monkeypatch) -> None:
    """Empty HF hub / torch hub caches: weights resolve the same on every machine (imagenet -> download)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """An MVTec-shaped root with the paper's 10 category folders (no images: nothing is read) and the
    outside inputs as empty stand-ins of the right kind."""
    root = tmp_path / "mvtec"
    for name in PAPER_ORDER:
        (root / name / "train" / "good").mkdir(parents=True)
        (root / name / "test").mkdir()
    (tmp_path / "dtd").mkdir()
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "teacher.pth").write_bytes(b"")
    return {"--data-root": root, "--dtd": tmp_path / "dtd", "--imagenet": tmp_path / "imagenet",
            "--teacher": tmp_path / "teacher.pth"}


def argv(inputs: dict[str, Path], out: Path, *extra: str, drop: str | None = None) -> list[str]:
    args = ["reproduce", "clad", "--output", str(out)]
    for flag, path in inputs.items():
        if flag != drop:
            args += [flag, str(path)]
    return args + list(extra)


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The dry run's markdown table as {cell: {column: value}}."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        values = [v.strip() for v in line.strip("|").split("|")]
        rows[values[0]] = dict(zip(headers, values))
    return rows


def test_paper10_is_the_paper_codes_order() -> None:
    """clad src/datasets.py: MVTEC_CLASS_NAMES with task_order [0..9] in every configuration."""
    assert PAPER_ORDER == ("hazelnut", "bottle", "cable", "capsule", "metal_nut", "pill", "toothbrush", "transistor",
                           "zipper", "screw")
    profile = load_profile("clad")
    assert profile.sweep["base"]["tasks"] == "paper10" and profile.methods == [c.split("-")[0] for c in CELLS]


def test_dry_run_lists_every_cell_with_its_settings(inputs, no_weight_caches, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(argv(inputs, out, "--dry-run")) == 0
    text = capsys.readouterr().out
    rows = table_rows(text)
    assert list(rows) == CELLS
    assert not out.exists()  # nothing written
    assert "tasks (10): hazelnut, bottle, cable, capsule, metal_nut, pill, toothbrush, transistor, zipper, screw" in text
    padim, patchcore, cfa = rows["padim-sequential-seed0"], rows["patchcore-sequential-seed0"], rows["cfa-replay-seed0"]
    assert (padim["strategy"], padim["backbone"], padim["layers"]) == ("sequential", "wide_resnet50_2 (tv_in1k, download)", "1+2+3")
    assert padim["features"] == "1792 (256+512+1024) @ 56x56 -> 350" and padim["size"] == "256 -> crop 224"
    assert (patchcore["layers"], patchcore["features"], patchcore["size"]) == ("2+3", "1536 (512+1024) @ 28x28", "256 -> crop 224")
    assert (cfa["strategy"], cfa["epochs"].split()[0], cfa["batch"], cfa["size"]) == ("replay 300 (balanced)", "30", "4+4", "256 -> crop 224")
    stfpm = rows["stfpm-replay-seed0"]
    assert (stfpm["backbone"], stfpm["features"], stfpm["size"], stfpm["batch"]) == (
        "resnet18 (tv_in1k, download)", "448 (64+128+256) @ 64x64", "256", "8+8")
    assert stfpm["epochs"].startswith("100 (early stop")
    efficientad = rows["efficientad-replay-seed0"]
    assert (efficientad["backbone"], efficientad["epochs"].split()[0], efficientad["batch"]) == ("PDN medium (teacher)", "70", "1+1")
    assert efficientad["inputs"] == "teacher_weights=teacher.pth, penalty_dir=imagenet"
    draem = rows["draem-replay-seed0"]
    assert (draem["epochs"], draem["batch"], draem["inputs"]) == ("50", "4+4", "anomaly_source=dtd")
    for name in ("fastflow-replay-seed0", "cainnflow-replay-seed0"):
        assert (rows[name]["backbone"], rows[name]["epochs"], rows[name]["batch"]) == (
            "wide_resnet50_2 (tv_in1k, download)", "15", "32+32")
    assert "  [cainnflow] CAINNFlow is not in the paper" in text
    assert "  [padim] continual update: the covariance is averaged" in text
    assert "  [cfa, stfpm, efficientad, draem, fastflow, cainnflow] replay storage: balanced" in text
    assert f"--dtd {inputs['--dtd'].resolve()} (draem)" in text


@pytest.mark.parametrize("flag, fragment", [
    ("--dtd", "does not exist (the Describable Textures Dataset, needed by DRAEM)"),
    ("--teacher", "does not exist (EfficientAD-M's pretrained PDN teacher"),
    ("--data-root", "does not exist (MVTec AD in its original layout"),
])
def test_a_missing_input_is_one_line_naming_flag_and_path(inputs, no_weight_caches, tmp_path: Path, capsys,
                                                          flag: str, fragment: str) -> None:
    inputs[flag] = tmp_path / "nowhere" / flag.strip("-")
    out = tmp_path / "out"
    assert main(argv(inputs, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"clbench: error: {flag}: {inputs[flag]} {fragment}" or err.startswith(f"clbench: error: {flag}: {inputs[flag]} {fragment}")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_category_missing_from_the_data_root_is_one_line_naming_the_root(inputs, no_weight_caches, tmp_path: Path,
                                                                         capsys) -> None:
    """The profile resolved its tasks without root=: the error did not say which folder lacks them."""
    root = inputs["--data-root"]
    (root / "screw" / "train" / "good").rmdir()  # a folder without train/good: not a category
    assert main(argv(inputs, tmp_path / "out", "--dry-run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clbench: error: --data-root: ") and len(err.splitlines()) == 1
    assert f"in {root}" in err and "screw" in err and "train/good" in err


def test_an_input_not_given_names_its_flag_unless_its_methods_are_left_out(inputs, no_weight_caches, tmp_path: Path, capsys) -> None:
    assert main(argv(inputs, tmp_path / "out", "--dry-run", drop="--dtd")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clbench: error: --dtd: missing (the Describable Textures Dataset, needed by DRAEM)")
    assert "--dtd procedural" in err and len(err.splitlines()) == 1
    assert main(argv(inputs, tmp_path / "out", "--dry-run", "--only", "padim,stfpm", drop="--dtd")) == 0
    assert list(table_rows(capsys.readouterr().out)) == ["padim-sequential-seed0", "stfpm-replay-seed0"]
    assert main(argv(inputs, tmp_path / "out", "--dry-run", "--only", "draem", "--dtd", "procedural", drop="--dtd")) == 0
    text = capsys.readouterr().out
    assert table_rows(text)["draem-replay-seed0"]["inputs"] == "anomaly_source=stand-in"
    assert "stand-in --dtd procedural: clbench's procedural textures instead of the DTD" in text


def test_random_init_needs_allow_random_init(inputs, no_weight_caches, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(argv(inputs, out, "--only", "padim", "--set", "weights=none")) == 2
    err = capsys.readouterr().err.strip()
    assert "padim-sequential-seed0: backbone 'wide_resnet50_2': weights 'none' resolve to random init" in err
    assert "--allow-random-init" in err and len(err.splitlines()) == 1 and not out.exists()
    assert main(argv(inputs, out, "--only", "padim", "--set", "weights=none", "--allow-random-init", "--dry-run")) == 0
    text = capsys.readouterr().out
    assert table_rows(text)["padim-sequential-seed0"]["backbone"] == "wide_resnet50_2 (random init)"
    assert "  [padim] --allow-random-init: a backbone without pretrained weights runs random-init" in text
    assert "  [padim] --set weights=none (profile: imagenet)" in text
    # a local weights file for the cells of one backbone counts as pretrained (no random init, no flag needed)
    local = tmp_path / "wrn50.pth"
    local.write_bytes(b"")
    assert main(argv(inputs, out, "--only", "padim,stfpm", "--weights", f"wide_resnet50_2={local}", "--dry-run")) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["padim-sequential-seed0"]["backbone"] == "wide_resnet50_2 (file)"
    assert rows["stfpm-replay-seed0"]["backbone"] == "resnet18 (tv_in1k, download)"
    # a --set no cell takes, and a key the profile owns, are refused
    assert main(argv(inputs, out, "--only", "padim", "--set", "method_params.epochs=3", "--dry-run")) == 2
    assert "--set method_params.epochs: no cell of profile clad takes it" in capsys.readouterr().err
    assert main(argv(inputs, out, "--set", "seed=3", "--dry-run")) == 2
    assert "use --seeds" in capsys.readouterr().err


def _pngs(folder: Path, n: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.slow
def test_a_slice_of_the_profile_runs_and_reports_the_paper_table(synthetic_root: Path, tmp_path: Path, capsys,
                                                                 no_weight_caches) -> None:
    """PaDiM (crop, its own CL update), DRAEM (--dtd) and EfficientAD (--teacher, --imagenet) on 2 synthetic
    tasks at 72 -> 64 px, 1 epoch, random init allowed; inputs made here (the teacher with distill-teacher)."""
    dtd = _pngs(tmp_path / "dtd" / "banded", 3, 48, 0)
    imagenet = _pngs(tmp_path / "imagenet", 4, 48, 1)
    teacher = tmp_path / "teacher.pth"
    assert main(["distill-teacher", "--backbone", "resnet18", "--weights", "none", "--images", str(imagenet),
                 "--out", str(teacher), "--model-size", "small", "--image-size", "64", "--epochs", "1",
                 "--batch-size", "4", "--no-progress"]) == 0
    out = tmp_path / "out"
    command = ["reproduce", "clad", "--data-root", str(synthetic_root), "--dtd", str(dtd.parent), "--imagenet", str(imagenet),
               "--teacher", str(teacher), "--only", "padim,draem,efficientad", "--executor", "serial",
               "--allow-random-init", "--output", str(out),
               "--set", "tasks=2", "--set", "image_size=72", "--set", "crop_size=64", "--set", "max_epochs=1",
               "--set", "device=cpu", "--set", "weights=none", "--set", "method_params.backbone=resnet18",
               "--set", "method_params.n_features=20", "--set", "method_params.model_size=small",
               "--set", "method_params.base_width=16", "--set", "method_params.disc_base_width=16"]
    assert main(command) == 0
    capsys.readouterr()
    sweep = out / "clad"
    env = json.loads((sweep / "runs" / "padim-sequential-seed0" / "env.json").read_text())
    differences = env["paper_profile"]["differences"]
    assert env["paper_profile"]["name"] == "clad" and env["require_pretrained"] is False
    assert "--set tasks=2 (profile: paper10)" in differences and "--set crop_size=64 (profile: 224)" in differences
    assert "--allow-random-init: a backbone without pretrained weights runs random-init" in differences
    assert any(d.startswith("continual update: the covariance is averaged") for d in differences)
    assert env["data"]["eval_size"] == 64 and env["weights"]["pretrained"] is False
    draem = yaml.safe_load((sweep / "runs" / "draem-replay-seed0" / "config.yaml").read_text())
    assert draem["method_params"]["anomaly_source"] == str(dtd.parent.resolve())
    assert draem["strategy_params"] == {"buffer_size": 300, "policy": "balanced"}
    efficientad = yaml.safe_load((sweep / "runs" / "efficientad-replay-seed0" / "config.yaml").read_text())
    assert efficientad["method_params"]["teacher_weights"] == str(teacher.resolve())
    assert efficientad["method_params"]["penalty_dir"] == str(imagenet.resolve())

    assert main(["report", str(sweep)]) == 0
    text = capsys.readouterr().out
    assert "## The paper's table: clad" in text
    header = next(line for line in text.splitlines() if line.startswith("|") and "PaDiM" in line)
    assert [h.strip() for h in header.strip("|").split("|")] == ["", "DRAEM", "PaDiM", "EfficientAD"]
    for label in ("pixel AUROC", "image AUROC", "AUPRO", "pixel F1", "avg forgetting (%)", "extra memory (MB)"):
        assert any(line.startswith(f"| {label}") for line in text.splitlines()), label
    assert "(0.73, " in text and "(1541, " in text and "these runs also differ from the paper in: --set tasks=2" in text
