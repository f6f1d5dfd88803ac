"""EfficientAD as a package: ``model`` (the method, registered as ``efficientad``), ``networks`` (PDN,
autoencoder, loading teacher weights), ``distill`` (teacher distillation and ``clbench distill-teacher``)
and ``penalty`` (the penalty images). Importing the package registers the method."""
from methods.efficientad.model import EfficientAD

__all__ = ["EfficientAD"]
