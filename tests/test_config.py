"""Config loading and validation: one clear error per bad key or value, from YAML and the CLI."""
from __future__ import annotations

from pathlib import Path

import pytest

from clbench.engine import config as cfg
from clbench.cli import main


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: padim\ntasks: [a, b]\nimage_size: 64\n")
    c = cfg.load(path, {"seed": 3, "image_size": None})
    assert (c.method, c.tasks, c.image_size, c.seed, c.strategy) == ("padim", ["a", "b"], 64, 3, "sequential")


@pytest.mark.parametrize(
    "text, message",
    [
        ("methd: padim\n", "unknown key 'methd'"),
        ("image_size: -5\n", "image_size=-5 is not an integer >= 32"),
        ("image_size: 16\n", "image_size=16 is not an integer >= 32"),
        ("image_size: 64\ncrop_size: 72\n", "need crop_size <= image_size, got crop_size=72, image_size=64"),
        ("crop_size: 16\n", "crop_size=16 is not an integer >= 32 or null"),
        ("crop_size: 5.5\n", "crop_size=5.5 is not an integer >= 32 or null"),
        ("require_pretrained: maybe\n", "require_pretrained='maybe' is not true or false"),
        ("paper_profile: clad\n", "paper_profile='clad' is not a mapping or null"),
        ("val_fraction: 1.5\n", "val_fraction=1.5 is not a number in [0, 1)"),
        ("seed: -1\n", "seed=-1 is not an integer >= 0"),
        ("tasks: {a: 1}\n", "tasks={'a': 1} is not a list of categories, all, a count or a preset"),
        ("device: tpu\n", "device='tpu' is not one of auto, cpu, cuda, cuda:N"),
        ("[1, 2]\n", "expected a mapping"),
        ("a: [\n", "invalid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_cli_reports_one_line_errors(tmp_path: Path, tiny_root: Path, capsys) -> None:
    common = ["run", "--data-root", str(tiny_root), "--output", str(tmp_path / "r"), "--no-progress"]
    cases = [
        (["--method", "nosuch"], "unknown method 'nosuch' (available: "),
        (["--tasks", "alpha,gamma"], "unknown category 'gamma'"),
        (["--image-size", "-3"], "image_size=-3 is not an integer >= 32"),
        (["--param", "n_featurs=3"], "unknown key 'n_featurs' for method 'padim'"),
        (["--strategy", "nope"], "unknown strategy 'nope'"),
        (["--weights", "/no/such/file.pth"], "weights: '/no/such/file.pth' is neither"),
    ]
    for extra, message in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err, err
        assert len(err.splitlines()) == 1, err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_require_pretrained_refuses_before_the_run_folder_exists(tiny_root: Path, tmp_path: Path) -> None:
    """A backbone resolving to random init under require_pretrained: one line naming the backbone and
    the ways out, raised before anything is written."""
    from clbench.engine.runner import run_experiment

    config = cfg.RunConfig(data_root=str(tiny_root), synthetic=False, weights="none", require_pretrained=True,
                           output_dir=str(tmp_path / "out"), image_size=32, device="cpu")
    with pytest.raises(cfg.ConfigError) as info:
        run_experiment(config, progress=False)
    message = str(info.value)
    assert "backbone 'resnet18'" in message and "random init" in message
    assert "--weights PATH" in message and "--allow-random-init" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_require_pretrained_checks_the_backbones_a_method_relies_on() -> None:
    """Each method names its pretrained backbones: EfficientAD none (its teacher file is what must be
    pretrained, checked by the method), DRAEM none, the others their ``backbone``."""
    from clbench.engine.runner import check_pretrained
    from methods.base import METHODS

    for name in ("efficientad", "draem"):
        method = METHODS.get(name)
        check_pretrained(method, method.resolve_params({}), "none")  # nothing to refuse
    patchcore = METHODS.get("patchcore")
    assert patchcore.pretrained_backbones(patchcore.resolve_params({})) == ["wide_resnet50_2"]
    with pytest.raises(cfg.ConfigError, match="backbone 'wide_resnet50_2'"):
        check_pretrained(patchcore, patchcore.resolve_params({}), "none")


@pytest.mark.slow
def test_cli_require_pretrained_and_allow_random_init(tiny_root: Path, tmp_path: Path, capsys) -> None:
    common = ["run", "--data-root", str(tiny_root), "--output", str(tmp_path / "r"), "--no-progress",
              "--weights", "none", "--image-size", "40", "--crop-size", "32", "--device", "cpu"]
    assert main(common + ["--require-pretrained"]) == 2
    err = capsys.readouterr().err.strip()
    assert "random init" in err and len(err.splitlines()) == 1
    config = tmp_path / "c.yaml"
    config.write_text("require_pretrained: true\n")
    assert main(common + ["--config", str(config), "--allow-random-init", "--param", "n_features=10"]) == 0
    saved = (tmp_path / "r").glob("*/config.yaml")
    import yaml

    resolved = yaml.safe_load(next(saved).read_text())
    assert (resolved["require_pretrained"], resolved["crop_size"], resolved["image_size"]) == (False, 32, 40)


def test_run_names_are_one_plain_folder_name() -> None:
    """S03-S05: '.', '..', paths, hidden names, flags and control characters are refused; unicode is fine."""
    for bad in (".", "..", "a/b", "a\\b", "", ".hidden", "-rf", "a\nb", "a\x00b", "x" * 256, 5):
        assert cfg.run_name_problem(bad) is not None, bad
        with pytest.raises(cfg.ConfigError, match="name"):
            cfg.check_run_name(bad)
    for good in ("padim-sequential-resnet18-seed0", "ünï-运行", "a.b", "a b", "x" * 255):
        assert cfg.check_run_name(good) == good


def test_the_run_folder_name_has_one_source() -> None:
    """RunConfig.run_name/run_dir named folders '<backbone or default>' while the runner names them
    from the method's resolved backbone: only the runner's name exists now."""
    from clbench.engine.runner import default_run_name

    assert not hasattr(cfg.RunConfig, "run_name") and not hasattr(cfg.RunConfig, "run_dir")
    assert default_run_name("padim", "sequential", "resnet18", 0) == "padim-sequential-resnet18-seed0"


def test_device_must_be_auto_cpu_or_cuda_n() -> None:
    for bad in ("cuda:abc", "gpu", "cuda:", "cpu:0", "CUDA"):
        with pytest.raises(cfg.ConfigError, match=f"device='{bad}' is not one of auto, cpu, cuda, cuda:N"):
            cfg.from_mapping({"device": bad})
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert cfg.from_mapping({"device": good}).device == good
