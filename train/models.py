"""The model registry moved to :mod:`kiln.models` (core: the PyTorch backend and export rebuild from it).

This name stays because the serve, bench and runtime test fixtures build models through it.
"""

from kiln.models import MODELS, build_model, load_model, load_weights, model_entry, read_state_dict

__all__ = ["MODELS", "build_model", "load_model", "load_weights", "model_entry", "read_state_dict"]
