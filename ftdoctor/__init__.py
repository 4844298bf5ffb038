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

# public name -> the module that defines it
_LAZY = {name: module for module, names in {
    "ftdoctor.diagnose": ("probe", "probe_model", "ProbeOptions"),
    "ftdoctor.fixes.api": ("fix", "fix_options"),
    "ftdoctor.inspection": ("inspect",),
    "ftdoctor.check": ("check",),
    "ftdoctor.checkpoint": ("load_model", "ModelOptions"),
    "ftdoctor.data": ("load_data", "DataOptions"),
    "ftdoctor.dynamics": ("trace", "compare", "TraceOptions"),
    "ftdoctor.thresholds": ("Thresholds",),
    "ftdoctor.errors": ("FtdoctorError",),
}.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ftdoctor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
