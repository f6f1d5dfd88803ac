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


def resolved_device(device: torch.device) -> str:
    """The device a run computes on, with its index (``auto`` and ``cuda`` resolve to ``cuda:N``)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def cuda_info(device: torch.device) -> dict[str, Any]:
    """What a CUDA result depends on: the GPU, its memory and compute capability, the CUDA and cuDNN
    versions torch was built with, and whether TF32 matmuls are allowed (they change fp32 results)."""
    props = torch.cuda.get_device_properties(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": int(props.total_memory),
        "device_count": torch.cuda.device_count(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def precision_info(config: RunConfig, device: torch.device) -> dict[str, Any]:
    """``amp``'s effect (absent when off, so fp32 runs' env.json is unchanged): the autocast type the
    trainer uses on this device (methods/training.py ``Precision``); methods that do not train ignore it."""
    if not config.amp:
        return {}
    from methods.training import Precision

    precision = Precision.of(device, True)
    return {"amp": {"dtype": precision.name, "grad_scaler": precision.scaled,
                    "applies_to": "gradient-trained methods (methods/training.py); no effect on methods that do not train"}}


def environment_info(config: RunConfig, device: torch.device, pool: BackbonePool, categories: list[Category]) -> dict[str, Any]:
    backbones = [
        {"model": b.model_name, "layers": list(b.layers), "channels": b.channels,
         "cache_dtype": str(b.cache_dtype).removeprefix("torch."), **b.weights.as_dict()} for b in pool.backbones
    ]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": resolved_device(device),
        "device_requested": config.device,
        "device_name": device_name(device),
        **({"cuda": cuda_info(device)} if device.type == "cuda" else {}),
        **precision_info(config, device),
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
