"""The probes, one module each; importing this package registers them in :data:`PROBES`
(report order: ``PROBES.names()``, by each probe's ``priority``)."""
from ftdoctor.probes import change_rate, drift, grad_norm, noise, r2  # noqa: F401  (registration)
from ftdoctor.probes.base import PROBES, Finding, Probe, ProbeContext, ProbeResult, Skipped, register_probe

__all__ = ["PROBES", "Finding", "Probe", "ProbeContext", "ProbeResult", "Skipped", "register_probe"]
