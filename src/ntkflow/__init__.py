"""ntkflow: predict training dynamics of neural networks from their Neural Tangent Kernel."""

from ntkflow import predict
from ntkflow._empirical import empirical_ntk_fn

__all__ = ["empirical_ntk_fn", "predict"]
__version__ = "0.1.0"
