"""The probes, one module each; importing this package registers them in :data:`PROBES`."""
from ftdoctor.probes.base import PROBES, Finding, Probe, ProbeContext, ProbeResult, Skipped, register_probe
from ftdoctor.probes import noise, change_rate, grad_norm, r2, drift  # noqa: F401  (registration)

ORDER = ("noise", "change_rate", "grad_norm", "r2", "drift")

__all__ = ["PROBES", "ORDER", "Finding", "Probe", "ProbeContext", "ProbeResult", "Skipped", "register_probe"]
