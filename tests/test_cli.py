"""The CLI's data, memory and methods commands."""
from __future__ import annotations

from pathlib import Path

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


def test_methods_lists_registered_names(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "padim" in out and "sequential" in out and "joint" in out


def test_reproduce_names_an_unknown_profile(capsys) -> None:
    assert main(["reproduce", "nosuch", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "clbench: error: profile: unknown profile 'nosuch' (available: clad)"
