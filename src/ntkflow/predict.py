"""Public, neural-tangents-compatible prediction functions."""
