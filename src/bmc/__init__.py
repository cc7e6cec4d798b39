"""bmc: train, compress, export, benchmark and serve PyTorch models for the edge.

Heavy libraries (torch, onnxruntime) are imported by the functions that need them, so
`import bmc` and `bmc --help` stay instant.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
