"""The CLI: data, memory, methods and reproduce commands, run flags, and plot's warnings."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clbench.cli import main


def test_data_check_prints_a_table(tiny_root: Path, capsys) -> None:
    assert main(["data", "check", str(tiny_root)]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "beta" in out and "spot" in out and "40x40" in out
    assert "2 categories OK" in out


def test_data_check_names_the_fault(tiny_root: Path, capsys) -> None:
    (tiny_root / "beta" / "ground_truth" / "spot" / "000_mask.png").unlink()
    assert main(["data", "check", str(tiny_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{tiny_root / 'beta' / 'ground_truth' / 'spot' / '000_mask.png'}: mask missing for test image "
                        f"{tiny_root / 'beta' / 'test' / 'spot' / '000.png'}")


def test_data_synth_writes_a_checkable_dataset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--categories", "2", "--size", "32"]) == 0
    assert main(["data", "check", str(out)]) == 0
    assert "2 categories OK" in capsys.readouterr().out


def test_memory_reproduces_padim_figure(capsys) -> None:
    assert main(["memory", "--method", "padim", "--backbone", "wide_resnet50_2", "--image-size", "224"]) == 0
    out = capsys.readouterr().out
    assert "1,541,030,400 B" in out and "1541.0 MB" in out


def test_memory_of_a_strategy_for_a_method(capsys) -> None:
    """Latent replay's buffer is the backbone's feature maps: ResNet18 layers 1-3 at 64 px are
    64*16*16 + 128*8*8 + 256*4*4 = 28672 values, 2 B each in float16, for each of 10 images; the
    measured bytes equal this formula in every run (tests/test_contract.py)."""
    assert main(["memory", "--method", "fastflow", "--backbone", "resnet18", "--image-size", "64",
                 "--strategy", "latent_replay", "--strategy-param", "buffer_size=10"]) == 0
    out = capsys.readouterr().out
    assert "strategy latent_replay for fastflow at 64px" in out and f"{10 * 28672 * 2:,d} B" in out
    assert main(["memory", "--replay", "3", "--strategy", "ewc"]) != 0
    assert "memory: --strategy needs --method" in capsys.readouterr().err


def test_methods_lists_registered_names(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "padim" in out and "sequential" in out and "joint" in out


def test_reproduce_names_an_unknown_profile(capsys) -> None:
    assert main(["reproduce", "nosuch", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "clbench: error: profile: unknown profile 'nosuch' (available: clad)"


@pytest.mark.slow
def test_run_synthetic_flag_sets_the_config_key(tmp_path: Path, capsys) -> None:
    """``--synthetic true`` generates at a new --data-root (without it: 'not found'); a bad value is
    argparse's one line naming it."""
    root, out = tmp_path / "new-root", tmp_path / "out"
    run = ["run", "--method", "padim", "--tasks", "1", "--image-size", "32", "--weights", "none", "--device", "cpu",
           "--no-progress", "--param", "n_features=8", "--data-root", str(root), "--output", str(out)]
    assert main([*run, "--synthetic", "false"]) == 2
    assert "not found" in capsys.readouterr().err and not root.exists()
    assert main([*run, "--synthetic", "true"]) == 0
    config = yaml.safe_load(next(out.glob("*/config.yaml")).read_text())
    assert config["synthetic"] is True and len([p for p in root.iterdir() if (p / "train" / "good").is_dir()]) == 1
    with pytest.raises(SystemExit) as exit_info:
        main([*run, "--synthetic", "maybe"])
    assert exit_info.value.code == 2 and "--synthetic: invalid choice: 'maybe'" in capsys.readouterr().err


def test_plot_prints_warnings_as_one_line_each(tmp_path: Path, capsys) -> None:
    """`clbench plot` left warnings to Python's format (file:line: UserWarning + a source line)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,trained_task,eval_task,metric,value\n0,01,01,pixel_auroc,0.9\n"
                                     "1,02,01,pixel_auroc,0.8\n1,02,02,pixel_auroc,0.7\n")
    assert main(["plot", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: 'image_auroc' not in {run / 'metrics.csv'}; skipping its plots",
        f"warning: memory.csv not found: {run / 'memory.csv'}; skipping the memory plot"]
    assert captured.out.splitlines() == [str(run / "plots" / f"{kind}_pixel_auroc.png") for kind in ("heatmap", "forgetting")]
