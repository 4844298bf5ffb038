"""ftdoctor: diagnose and repair the dynamics of fine-tuning pretrained classifiers.

The library is the product; the ``ftdoctor`` command is a thin shell over it::

    import ftdoctor
    report = ftdoctor.probe("model.pt", data=ftdoctor.DataOptions("cifar10"))
    ftdoctor.fix("model.pt", "entame", data=ftdoctor.DataOptions("cifar10"), out="fixed.pt")
    verdicts = ftdoctor.check(["model.pt"])

Attributes are imported lazily so that ``import ftdoctor`` (and the CLI's start) stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "probe": ("ftdoctor.diagnose", "probe"),
    "probe_model": ("ftdoctor.diagnose", "probe_model"),
    "ProbeOptions": ("ftdoctor.diagnose", "ProbeOptions"),
    "fix": ("ftdoctor.fixes.api", "fix"),
    "inspect": ("ftdoctor.inspection", "inspect"),
    "check": ("ftdoctor.check", "check"),
    "load_model": ("ftdoctor.checkpoint", "load_model"),
    "ModelOptions": ("ftdoctor.checkpoint", "ModelOptions"),
    "load_data": ("ftdoctor.data", "load_data"),
    "DataOptions": ("ftdoctor.data", "DataOptions"),
    "Thresholds": ("ftdoctor.thresholds", "Thresholds"),
    "FtdoctorError": ("ftdoctor.errors", "FtdoctorError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ftdoctor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
