"""The options of a fine-tuning run (``trace`` / ``compare`` flags), the methods and the recorded series."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ftdoctor.errors import FtdoctorError
from ftdoctor.heads import ENTAME_PHI_W, entame_phi_w

SCHEMA = "ftdoctor.trace/1"

COMPARE_SCHEMA = "ftdoctor.compare/1"

METHODS = ("base", "warmup", "entame", "entame-fn", "rifle", "l2sp")

#: How each method initialises its fresh head (SPEC §5).
HEAD_INIT = {"base": "kaiming", "warmup": "kaiming", "l2sp": "kaiming", "entame": "entame",
             "entame-fn": "entame", "rifle": "torch-default"}

SERIES = ("step", "loss", "train_acc", "lr", "eval_step", "eval_acc", "feature_var", "noise_fraction",
          "grad_norm")


@dataclass(frozen=True)
class TraceOptions:
    """Everything that shapes a fine-tuning run (the ``trace`` / ``compare`` flags)."""

    method: str = "base"
    steps: int = 100
    optimizer: str = "adam"            # adam | sgd
    lr: float = 1e-4                   # ENTAME's γ
    momentum: float = 0.9              # sgd only
    batch_size: int = 64
    seed: int = 0
    eval_every: int = 10
    window: int = 10                   # ENTAME Table 3: the first ten steps
    warmup_steps: int = 1
    rifle_period: int | None = None    # None: a quarter of the run
    rifle_init: str = "torch-default"
    alpha: float = 0.1
    beta: float = 0.01
    phi_w: float = ENTAME_PHI_W
    lam: float | None = None           # entame: φ_w = γ²λ²/C² instead of phi_w (ENTAME eq. 21)
    head: str | None = None

    @classmethod
    def from_flags(cls, *, phi_w: float | None = None, **kw: Any) -> "TraceOptions":
        """From command-line flags: ``--phi-w`` and ``--lam`` are two ways to set φ_w, so not both."""
        if phi_w is not None and kw.get("lam") is not None:
            raise FtdoctorError("--phi-w and --lam both set φ_w", "pass one of them")
        return cls(**kw) if phi_w is None else cls(phi_w=phi_w, **kw)

    def phi_w_for(self, num_classes: int) -> float:
        """φ_w of the ENTAME head: ``phi_w``, or γ²λ²/C² when ``lam`` is set (ENTAME eq. 21)."""
        return self.phi_w if self.lam is None else entame_phi_w(self.lr, self.lam, num_classes)

    def validate(self, methods: Sequence[str] | None = None) -> None:
        for m in (methods or (self.method,)):
            if m not in METHODS:
                raise FtdoctorError(f"unknown method {m!r}", f"choose from {', '.join(METHODS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise FtdoctorError(f"unknown --optimizer {self.optimizer!r}", "use adam or sgd")
        checks = [(self.steps >= 1, "--steps must be at least 1"),
                  (self.batch_size >= 1, "--batch-size must be at least 1"),
                  (self.eval_every >= 1, "--eval-every must be at least 1"),
                  (self.window >= 1, "--window must be at least 1"),
                  (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
                  (self.rifle_period is None or self.rifle_period >= 1, "--rifle-period must be at least 1"),
                  (math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number"),
                  (self.alpha >= 0 and self.beta >= 0, "--alpha and --beta must be >= 0"),
                  (self.phi_w >= 0 and math.isfinite(self.phi_w), "--phi-w must be a finite number >= 0"),
                  (self.lam is None or (self.lam >= 0 and math.isfinite(self.lam)), "--lam must be >= 0"),
                  (0 <= self.momentum < 1, "--momentum must be in [0, 1)")]
        for ok, msg in checks:
            if not ok:
                raise FtdoctorError(msg, "see ftdoctor trace --help for the valid ranges")
        if self.rifle_init not in ("torch-default", "kaiming-normal"):
            raise FtdoctorError(f"unknown --rifle-init {self.rifle_init!r}", "use torch-default or kaiming-normal")

    @property
    def period(self) -> int:
        """RIFLE's period P: ``rifle_period`` or a quarter of the run (RIFLE Fig. 2 re-initialises 4 times)."""
        return self.rifle_period or max(1, math.ceil(self.steps / 4))

    def eval_points(self) -> list[int]:
        """Update counts after which the evaluation split is scored (0 = before training)."""
        pts = {0, self.steps} | set(range(1, min(self.window, self.steps) + 1))
        pts |= set(range(self.eval_every, self.steps + 1, self.eval_every))
        return sorted(pts)

    def settings(self) -> dict[str, Any]:
        return {"steps": self.steps, "optimizer": self.optimizer, "lr": self.lr,
                "momentum": self.momentum if self.optimizer == "sgd" else None, "batch_size": self.batch_size,
                "seed": self.seed, "eval_every": self.eval_every, "window": self.window,
                "warmup_steps": self.warmup_steps, "rifle_period": self.period, "rifle_init": self.rifle_init,
                "alpha": self.alpha, "beta": self.beta, "phi_w": self.phi_w, "lam": self.lam, "head": self.head}
