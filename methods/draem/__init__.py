"""DRAEM as a package: ``model`` (the method, registered as ``draem``), ``networks`` (reconstructive and
discriminative networks), ``losses`` (SSIM, focal) and ``simulator`` (Perlin-mask anomaly simulation).
Importing the package registers the method."""
from methods.draem.model import DRAEM

__all__ = ["DRAEM"]
