"""The fixes of SPEC §2, one module each; importing this package registers them in :data:`FIXES`.

* ``entame`` — maximum-entropy head, optional feature norm (ENTAME §5);
* ``rifle`` — re-initialised head (RIFLE Alg. 1);
* ``rescale`` — function-preserving between-layer rescaling (Krähenbühl et al. §3.2);
* ``datadep`` — data-dependent within-layer initialisation (Krähenbühl et al. §3.1).

:func:`fix` is the library call behind ``ftdoctor fix``.
"""
from ftdoctor.fixes.base import FIXES, Check, Fix, FixContext, FixOutcome, LeftAlone, register_fix
from ftdoctor.fixes import entame, rifle, rescale, datadep  # noqa: F401  (registration)
from ftdoctor.fixes.api import FixFailed, FixResult, fix
from ftdoctor.fixes.datadep import DatadepOptions
from ftdoctor.fixes.entame import EntameOptions
from ftdoctor.fixes.rescale import RescaleOptions
from ftdoctor.fixes.rifle import RifleOptions

__all__ = ["FIXES", "Check", "Fix", "FixContext", "FixOutcome", "LeftAlone", "register_fix", "fix",
           "FixFailed", "FixResult", "EntameOptions", "RifleOptions", "RescaleOptions", "DatadepOptions"]
