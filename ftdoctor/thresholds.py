"""The thresholds shared by the probes' findings (SPEC §1.6) and ``ftdoctor check`` (§4).

Defaults, and why:

* ``max_noise_fraction`` ``"2x"`` — twice the floor 1/(C−1) that ``noise_fraction``
  ζ/φ reaches at a maximum-entropy head (ENTAME eqs. 13–17). The floor depends
  on the class count (1 at C = 2, 0.5 at C = 3, 0.01 at C = 101), so an absolute
  default would fail a correctly fixed 2- or 3-class model and let a noisy
  100-class head through; a multiple of the floor means the same at every C ≥ 2
  (at C = 5 it is 0.5, the old absolute default). A plain number (``0.3``) is
  an absolute bound, as before.
* ``max_excess_noise_fraction`` 0.05 — (ζ − 1/C)/φ, the part of the noise that
  maximum-entropy initialisation removes; 0 at a maximum-entropy head for every
  C, so one default serves every class count.
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
* ``pickle_safe`` — a checkpoint whose pickles name a global that can act (``posix.system``,
  ``builtins.eval``, any callable the pickle calls that is not data: :mod:`ftdoctor.checkpoint.pickle_rules`)
  fails. On by default; only a ``pickle_safe = false`` key in the config turns it off (no flag does), and
  the report then says it was off.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class FloorMultiple:
    """A bound written as a multiple of ``noise_fraction``'s floor 1/(C−1): ``"2x"`` in a config or a flag."""

    factor: float

    def of(self, floor: float) -> float:
        return self.factor * floor

    def __str__(self) -> str:
        return f"{self.factor:g}x"


_MULTIPLE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[x×]\s*(?:floor)?\s*$")


def parse_floor_multiple(text: str) -> FloorMultiple | None:
    """``"2x"``, ``"2×"``, ``"1.5x floor"`` → :class:`FloorMultiple`; anything else None."""
    m = _MULTIPLE.match(text)
    return FloorMultiple(float(m.group(1))) if m else None


@dataclass(frozen=True)
class Thresholds:
    max_noise_fraction: float | FloorMultiple | None = FloorMultiple(2.0)
    max_excess_noise_fraction: float = 0.05
    max_change_rate_spread: float = 10.0
    max_change_rate_cv: float = 5.0
    min_depth_ratio: float = 0.01
    min_r2_median: float = 0.5
    max_drift_rel: float = 0.5
    expect_num_classes: int | None = None
    require_finite: bool = True
    pickle_safe: bool = True

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_json(self) -> dict[str, object]:
        """Every threshold as JSON; a multiple of the floor as its text (``"2x"``)."""
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


def plain(value: object) -> object:
    """A threshold as JSON: a multiple of the floor as its text (``"2x"``), anything else as it is."""
    return str(value) if isinstance(value, FloorMultiple) else value
