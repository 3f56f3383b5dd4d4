"""flashep: expert-parallel (MoE) dispatch and combine for PyTorch, in Python and Triton.

Drop-in for DeepEP V1: `import flashep as deep_ep`.
"""
from . import _env  # noqa: F401  (first: multicast guards before anything initialises)
from .buffer import Buffer, topk_idx_t
from .config import Config
from .event import EventOverlap

__version__ = "0.1.0"
__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t", "__version__"]
