"""The thresholds shared by the probes' findings (SPEC §1.6) and ``ftdoctor check`` (§4).

Defaults, and why:

* ``max_noise_fraction`` 0.5 — ENTAME Table 1 measures 0.21–0.35 at a freshly
  He-initialised head; above 0.5 the error reaching the backbone is mostly noise.
* ``max_excess_noise_fraction`` 0.05 — the part of the noise that maximum-entropy
  initialisation removes; ENTAME's head brings it to 0.
* ``max_change_rate_spread`` 10 — Krähenbühl et al. Fig. 1a: a well-scaled net
  has all layers within a small factor; an order of magnitude means some layers
  barely learn.
* ``max_change_rate_cv`` 5 — within-layer spread of per-weight rates (Fig. 1b).
* ``min_depth_ratio`` 0.01 — RIFLE Fig. 2: gradients two orders of magnitude
  smaller at the bottom than at the head mean the lower layers hardly move.
* ``min_r2_median`` 0.5 — L2-SP Fig. 4: deep layers of an L2-SP-trained network
  keep R² near 1; a median below 0.5 means the pretrained features are lost.
* ``max_drift_rel`` 0.5 — a layer moved by half its own norm.
* ``expect_num_classes`` — unset: no class-count check.
* ``require_finite`` — NaN/Inf weights fail.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Thresholds:
    max_noise_fraction: float = 0.5
    max_excess_noise_fraction: float = 0.05
    max_change_rate_spread: float = 10.0
    max_change_rate_cv: float = 5.0
    min_depth_ratio: float = 0.01
    min_r2_median: float = 0.5
    max_drift_rel: float = 0.5
    expect_num_classes: int | None = None
    require_finite: bool = True

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]
