"""The papers' methods inside the user's run, with the user's optimizer: one implementation each, ftdoctor.train's.

* **ENTAME head** (Varno et al. 2019, §5 eq. 21, and eq. 20 with ``feature_norm``): the head is drawn
  afresh the maximum-entropy way (:func:`~ftdoctor.train.entame_init_`) just before the loop's first
  training forward — where the head is first known for certain (one example finds it, in forward order).
* **RIFLE** (Li et al. 2020, Alg. 1): :class:`~ftdoctor.train.RifleSchedule` re-draws the head at every
  period boundary, drops its optimizer state and gives it the cosine-restart rate; the head gets a
  parameter group of its own in the framework's optimizer (:func:`~ftdoctor.train.own_group`).
* **L2-SP** (Li et al. 2018, eq. 3): the loop's loss is the framework's, so the penalty
  ``α/2 ‖w_S − w⁰_S‖² + β/2 ‖w_new‖²`` (:class:`~ftdoctor.train.L2SP`, the starting point the model at its
  first training forward, the head new) enters as its gradient: each micro-batch's backward adds
  ``c·∇Ω`` to each parameter's gradient, ``c = s·n`` its share of the step's loss (s the loss scale the
  tap fits at the logits, n its examples; :mod:`ftdoctor.monitor.tap`). Summed over a step's micro-batches
  that is ∇ of ``mean CE + Ω`` in the loop's units — accumulation, a gradient scaler and DDP's average
  included — before any clipping, exactly as if the penalty had been added to the loss.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ftdoctor.errors import FtdoctorError
from ftdoctor.featurenorm import insert_feature_norm
from ftdoctor.heads import ENTAME_PHI_W, generator_for
from ftdoctor.model import AffineLayer, find_head
from ftdoctor.monitor.tap import Step, Tap
from ftdoctor.train import L2SP, RifleSchedule, entame_init_, own_group, swap_parameters

log = logging.getLogger("ftdoctor.monitor")


class Methods:
    """ENTAME's head, RIFLE's schedule and L2-SP's penalty applied to a run (module doc); all off by default.

    Call :meth:`bind` with the optimizer (RIFLE and the feature norm need it), :meth:`begin_step` at the start
    of every optimizer step; the rest happens in the model's hooks.
    """

    def __init__(self, model: nn.Module, *, entame: bool = False, feature_norm: bool = False,
                 phi_w: float = ENTAME_PHI_W, rifle_period: int | None = None, rifle_init: str = "torch-default",
                 l2sp_alpha: float | None = None, l2sp_beta: float = 0.01, head: str | None = None,
                 seed: int = 0, optimizer: torch.optim.Optimizer | None = None, scheduler: object = None) -> None:
        if feature_norm and not entame:
            raise FtdoctorError("feature_norm is part of the ENTAME head", "pass entame=True with feature_norm=True")
        if rifle_period is not None and rifle_period < 1:
            raise FtdoctorError(f"the RIFLE period must be at least 1 step, got {rifle_period}",
                                "pass rifle_period=N with N a few hundred steps (a few periods per run)")
        if l2sp_alpha is not None and (l2sp_alpha < 0 or l2sp_beta < 0):
            raise FtdoctorError(f"L2-SP needs alpha, beta >= 0, got {l2sp_alpha}, {l2sp_beta}",
                                "the paper uses alpha in [0.001, 1] and beta = 0.01")
        self.model = model
        self.entame, self.feature_norm, self.phi_w = entame, feature_norm, phi_w
        self.rifle_period, self.rifle_init = rifle_period, rifle_init
        self.l2sp_alpha, self.l2sp_beta = l2sp_alpha, l2sp_beta
        self.head_name, self.seed = head, seed
        self.optimizer, self.scheduler = optimizer, scheduler
        self.head: AffineLayer | None = None
        self.rifle: RifleSchedule | None = None
        self.l2sp: L2SP | None = None
        self.step = 0
        self._ready = False
        self._warned: set[str] = set()
        self.tap = Tap.of(model)
        if self.active:
            self.tap.add(self, adder=self._add if l2sp_alpha is not None else None)

    @property
    def active(self) -> bool:
        return self.entame or self.rifle_period is not None or self.l2sp_alpha is not None

    @property
    def reinitialised(self) -> list[int]:
        """The steps at which RIFLE re-drew the head."""
        return list(self.rifle.reinitialised) if self.rifle is not None else []

    def bind(self, optimizer: torch.optim.Optimizer, scheduler: object = None) -> None:
        """The run's optimizer (and the learning-rate scheduler built on it, which RIFLE's head group joins)."""
        self.optimizer, self.scheduler = optimizer, scheduler

    def begin_step(self, step: int) -> None:
        """Optimizer step ``step`` (0-based) begins: RIFLE's rate for it, and its re-draw at a boundary."""
        self.step = step
        if self.rifle is not None:
            self.rifle.step(step)

    def penalty(self) -> float | None:
        """The L2-SP term ``α/2 ‖w_S − w⁰_S‖² + β/2 ‖w_new‖²`` now (None when L2-SP is off or not begun)."""
        if self.l2sp is None:
            return None
        with torch.no_grad():
            return float(self.l2sp())

    def close(self) -> None:
        self.tap.remove(self, adder=self._add)

    # -- the tap's side ---------------------------------------------------------------------------
    def forward_begin(self, step: Step) -> None:
        if not self._ready:
            self._ready = True
            self._setup(step)

    def logits_seen(self, step: Step) -> None:
        return None

    def scale_found(self, step: Step) -> None:
        return None

    def _setup(self, step: Step) -> None:
        layers, _ = self.tap.layout(step.inputs)
        head = find_head(layers, self.head_name)
        if self.entame:
            entame_init_(head.module, self.phi_w, generator=generator_for(self.seed, "entame"))
            if self.feature_norm:
                old = head.module
                new = insert_feature_norm(self.model, head.name)
                if self.optimizer is not None:
                    pairs = {old.weight: new.weight}
                    if old.bias is not None:
                        pairs[old.bias] = new.bias
                    swap_parameters(self.optimizer, pairs)
                self.tap.refresh()
                head = AffineLayer(head.name, new)
        self.head = head
        self.tap.set_head(head.module)
        if self.rifle_period is not None:
            if self.optimizer is None:
                raise FtdoctorError("RIFLE needs the optimizer", "pass optimizer= (the callbacks bind it themselves)")
            own_group(self.optimizer, head.module, self.scheduler)
            self.rifle = RifleSchedule(head.module, self.optimizer, self.rifle_period, init=self.rifle_init,
                                       seed=self.seed)
            self.rifle.step(self.step)
        if self.l2sp_alpha is not None:
            self.l2sp = L2SP(self.model, self.model.state_dict(), self.l2sp_alpha, self.l2sp_beta, new=[head.name])

    def _add(self, name: str, p: Tensor, step: Step | None) -> Tensor | None:
        if self.l2sp is None:
            return None
        if step is None or not step.scale:
            self._warn("scale", "ftdoctor L2-SP: the loss's gradient at the logits was not seen (are the labels "
                                "known?): the penalty was not added to this backward")
            return None
        g = self.l2sp.gradient(name)
        return None if g is None else g * (step.scale * step.size)

    def _warn(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(text)
