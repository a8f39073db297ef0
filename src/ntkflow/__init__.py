"""ntkflow: predict training dynamics of neural networks from their Neural Tangent Kernel."""

from ntkflow import predict

__all__ = ["predict"]
__version__ = "0.1.0"
