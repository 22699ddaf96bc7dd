"""Importing CrypTen 0.4.1 on torch 2.13.

CrypTen's ONNX converter imports ``torch.onnx._internal.registration``, which torch 2.13
no longer has. mpc-rec never converts ONNX models, so a stand-in module with an empty
``registry`` lets ``import crypten`` succeed. Everything CrypTen-specific that needs
patching lives here, and nothing here runs at import time.
"""

from __future__ import annotations

import importlib
import sys
import types

_MISSING_MODULE = "torch.onnx._internal.registration"


def import_crypten() -> types.ModuleType:
    """Return the ``crypten`` module, installing the torch-2.13 stand-in first if needed."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    try:
        importlib.import_module(_MISSING_MODULE)
    except ImportError:
        stand_in = types.ModuleType(_MISSING_MODULE)
        stand_in.registry = None  # only read by crypten.nn.from_onnx, which we never call
        sys.modules[_MISSING_MODULE] = stand_in
    return importlib.import_module("crypten")
