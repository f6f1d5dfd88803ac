"""EfficientAD as a package: ``model`` (the method, registered as ``efficientad``), ``networks`` (PDN,
autoencoder, loading teacher weights), ``distill`` (teacher distillation and ``clbench distill-teacher``)
and ``penalty`` (the penalty images). Importing ``model`` registers the method; importing the package
imports nothing (``clbench.registry`` reads this file's ``CLI_COMMANDS`` from the source, so
``clbench --help`` lists the command without torch)."""
from __future__ import annotations

from typing import Any

# The clbench commands EfficientAD adds (``EfficientAD.add_cli_commands`` builds them when used): name -> help.
CLI_COMMANDS = {"distill-teacher": "distil an EfficientAD PDN teacher from a timm backbone on a folder of images"}

__all__ = ["EfficientAD"]


def __getattr__(name: str) -> Any:
    """``methods.efficientad.EfficientAD`` still works, importing ``model`` only when asked."""
    if name == "EfficientAD":
        from methods.efficientad.model import EfficientAD

        return EfficientAD
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
