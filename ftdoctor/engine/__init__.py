"""The single streaming pass that serves every probe (SPEC §7): :func:`run_pass`.

* :mod:`.stream` — per batch one forward (through :mod:`ftdoctor.forward`), at most two backward passes and
  the reference's forward; what each yields is what the probes declared in ``Probe.needs``;
* :mod:`.capture` — the forward/tensor hooks on the affine layers;
* :mod:`.reference` — the reference model's outputs for R², in line or overlapped;
* :mod:`.persample` (with :mod:`.tiles` and :mod:`.conv_squares`) — Σ_n (∂ℓ_n/∂W)², batched;
* :mod:`.sums` — the float64 running sums the probes accumulate in; :mod:`.batch` — what a probe is handed.

The engine knows the probe interface (``needs``, ``update``, ``grad_sq_sink``, ``take_pair``), never a
probe by name.
"""
from __future__ import annotations

from ftdoctor.engine.batch import Batch
from ftdoctor.engine.reference import overlap_allowed
from ftdoctor.engine.stream import PassSettings, check_logits, preserved, run_pass
from ftdoctor.engine.sums import Float64Sum, sum_of_squares

__all__ = ["Batch", "Float64Sum", "PassSettings", "check_logits", "overlap_allowed", "preserved", "run_pass",
           "sum_of_squares"]
