"""The probes, one module each; importing this package registers them in :data:`PROBES`."""
from ftdoctor.probes import change_rate, drift, grad_norm, noise, r2  # noqa: F401  (registration)
from ftdoctor.probes.base import PROBES, Finding, Probe, ProbeContext, ProbeResult, Skipped, register_probe

ORDER = ("noise", "change_rate", "grad_norm", "r2", "drift")

__all__ = ["PROBES", "ORDER", "Finding", "Probe", "ProbeContext", "ProbeResult", "Skipped", "register_probe"]
