"""Kernels behind one dispatch.

Each op has a plain PyTorch reference (`reference.py`, the test oracle) and, where one exists, a faster
path. `use(name)` switches the active implementation for the whole process; tests run every path
against the reference.
"""

from __future__ import annotations

from . import reference

_BACKENDS = {"reference": reference}
_active = {"name": "reference", "module": reference}


def register(name: str, module) -> None:
    _BACKENDS[name] = module


def use(name: str) -> None:
    """Select the kernel backend (``"reference"`` or a registered fast path)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; available: {sorted(_BACKENDS)}")
    _active.update(name=name, module=_BACKENDS[name])


def active() -> str:
    return _active["name"]


def selective_scan(*args, **kwargs):
    return _active["module"].selective_scan(*args, **kwargs)


def selective_state_update(*args, **kwargs):
    return _active["module"].selective_state_update(*args, **kwargs)


def causal_conv1d(*args, **kwargs):
    return _active["module"].causal_conv1d(*args, **kwargs)
