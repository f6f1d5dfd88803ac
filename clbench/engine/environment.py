"""What a run ran on: package versions, device, git commit, backbone weights, seed, held-out data."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from clbench.features.backbones import BackbonePool
from clbench.engine.config import RunConfig
from clbench.data import Category

PACKAGES = ("clbench", "torch", "torchvision", "timm", "FrEIA", "numpy", "scipy", "scikit-learn", "pandas", "faiss-cpu", "faiss-gpu", "avalanche-lib", "ray")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the clbench source tree, when it is a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None}
        status = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment_info(config: RunConfig, device: torch.device, pool: BackbonePool, categories: list[Category]) -> dict[str, Any]:
    backbones = [
        {"model": b.model_name, "layers": list(b.layers), **b.weights.as_dict()} for b in pool.backbones
    ]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "git": git_state(),
        "seed": config.seed,
        "weights": backbones[0] if backbones else {"source": "none", "pretrained": False},
        "backbones": backbones,
        "held_out": {
            "source": "good training images (never the test set)",
            "fraction": config.val_fraction,
            "counts": {c.name: len(c.val) for c in categories},
            **_own_splits(categories),
        },
        "data": {"root": str(Path(config.data_root).resolve()), "synthetic": config.synthetic,
                 "image_size": config.image_size, "crop_size": config.crop_size, "eval_size": config.eval_size},
        "require_pretrained": config.require_pretrained,
        **({"paper_profile": config.paper_profile} if config.paper_profile is not None else {}),
    }


def _own_splits(categories: list[Category]) -> dict[str, Any]:
    """Which categories' held-out set is the dataset's own ``validation/good`` (MVTec LOCO, MVTec AD 2),
    not a ``fraction`` sample of train/good; absent when none is, so other runs' env.json is unchanged."""
    own = [c.name for c in categories if c.val_source != "sample"]
    return {"own_split": {name: "validation/good (all of train/good is trained on)" for name in own}} if own else {}
