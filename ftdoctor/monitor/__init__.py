"""ftdoctor inside the user's training loop: the live monitor, its schedule, and the framework callbacks.

:class:`Monitor` works in any loop; :mod:`ftdoctor.monitor.hf` (Hugging Face ``Trainer``) and
:mod:`ftdoctor.monitor.lightning` (Lightning ``Trainer``) wrap it as callbacks, imported only when used.
"""
from ftdoctor.monitor.core import DEFAULT_PROBES, SCALARS, Measurement, Monitor
from ftdoctor.monitor.schedule import Schedule
from ftdoctor.monitor.tap import Tap

__all__ = ["Monitor", "Measurement", "Schedule", "Tap", "DEFAULT_PROBES", "SCALARS"]
