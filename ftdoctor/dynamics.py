"""``ftdoctor trace`` and ``ftdoctor compare``: real fine-tuning runs that record the dynamics (SPEC §5).

A probe is a snapshot; fine-tuning is a process. :func:`fine_tune` runs one
method for one seed from a pretrained model's backbone and a fresh head, and
records per step (SPEC §3, trace layout):

* ``loss``, ``train_acc`` and ``lr`` (the head's rate; ``backbone_lr`` too);
* ``grad_norm`` — ‖∇_W L‖_F of every affine layer's weight after the
  backward (RIFLE §4.6.1, Fig. 2), steps × layers;
* ``feature_var`` — the variance across the batch of the head's input x^L,
  averaged over features (ENTAME §3.3, Fig. 1);
* ``noise_fraction`` — ζ/φ of the batch (ENTAME eq. 12, Table 1);
* ``sp_penalty`` — Σ_k ‖W_k − W⁰_k‖² over the backbone's affine weights (L2-SP's Ω);
* ``eval_step`` / ``eval_acc`` — accuracy on the evaluation split after
  each of the first ``window`` steps and every ``eval_every`` steps after
  (ENTAME Table 3 averages the first ten).

Methods (every one starts from the same backbone; the head is new):
``base`` He-initialised head (ENTAME's baseline); ``warmup`` the same plus
``warmup_steps`` head-only steps; ``entame`` the maximum-entropy head
(ENTAME eq. 21); ``entame-fn`` that plus the feature normalisation of eq. 20;
``rifle`` RIFLE Alg. 1 (head re-initialised every period, cosine-restart head
rate); ``l2sp`` base plus the L2-SP penalty (Li et al. 2018 eq. 3).

:func:`compare` runs methods × seeds where, per seed, every method sees the
same starting backbone and the same batches in the same order — checked, not
assumed: each run records a digest of its starting backbone and of the
example indices it consumed, and the comparison refuses to report if they
differ.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ftdoctor
from ftdoctor import progress
from ftdoctor.errors import FtdoctorError
from ftdoctor.heads import ENTAME_PHI_W, entame_phi_w, generator_for, init_head_
from ftdoctor.model import AffineLayer, find_head, is_scripted, new_head_like, set_module
from ftdoctor.stats import ci95_half_width, mean, paired_t_test
from ftdoctor import forward

SCHEMA = "ftdoctor.trace/1"
COMPARE_SCHEMA = "ftdoctor.compare/1"
METHODS = ("base", "warmup", "entame", "entame-fn", "rifle", "l2sp")
#: How each method initialises its fresh head (SPEC §5).
HEAD_INIT = {"base": "kaiming", "warmup": "kaiming", "l2sp": "kaiming", "entame": "entame",
             "entame-fn": "entame", "rifle": "torch-default"}
SERIES = ("step", "loss", "train_acc", "lr", "eval_step", "eval_acc", "feature_var", "noise_fraction",
          "grad_norm")
_IN_MEMORY_BYTES = 256 * 2**20


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


@dataclass(frozen=True)
class RunSeries:
    """The recorded dynamics of one method × seed (SPEC §3 trace layout)."""

    method: str
    seed: int
    head: str
    layers: tuple[str, ...]            # affine layers in forward order, the head last
    step: np.ndarray
    loss: np.ndarray
    train_acc: np.ndarray
    lr: np.ndarray
    backbone_lr: np.ndarray
    feature_var: np.ndarray
    noise_fraction: np.ndarray
    sp_penalty: np.ndarray
    grad_norm: np.ndarray              # steps × layers
    eval_step: np.ndarray
    eval_acc: np.ndarray
    start_digest: str                  # sha256 of the backbone's starting tensors
    batch_digest: str                  # sha256 of the example indices consumed, in order
    reinitialised: tuple[int, ...] = ()  # rifle: the head was re-drawn after these many steps

    def early_acc(self, window: int) -> float:
        """Mean evaluation accuracy after steps 1 … ``window`` (ENTAME Table 3)."""
        sel = (self.eval_step >= 1) & (self.eval_step <= window)
        return float(np.mean(self.eval_acc[sel])) if sel.any() else float(self.eval_acc[-1])

    @property
    def final_acc(self) -> float:
        return float(self.eval_acc[-1])

    def arrays(self) -> dict[str, np.ndarray]:
        prefix = f"runs/{self.method}/seed_{self.seed}"
        names = SERIES + ("backbone_lr", "sp_penalty")
        return {f"{prefix}/{n}": getattr(self, n) for n in names}

    def attrs(self) -> dict[str, dict[str, Any]]:
        prefix = f"runs/{self.method}/seed_{self.seed}"
        return {f"{prefix}/grad_norm": {"layers": list(self.layers), "head": self.head},
                f"{prefix}/step": {"start_digest": self.start_digest, "batch_digest": self.batch_digest,
                                   "reinitialised": np.asarray(self.reinitialised, dtype=np.int64)}}

    def final(self, window: int) -> dict[str, Any]:
        return {"loss": _num(self.loss[-1]), "train_acc": _num(self.train_acc[-1]),
                "eval_acc": _num(self.final_acc), "early_acc": _num(self.early_acc(window)),
                "feature_var": _num(self.feature_var[-1]), "noise_fraction": _num(self.noise_fraction[-1]),
                "sp_penalty": _num(self.sp_penalty[-1]),
                "grad_norm": [{"name": n, "grad_norm": _num(g)} for n, g in zip(self.layers, self.grad_norm[-1])],
                "reinitialised": list(self.reinitialised)}


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# -- data: the same examples, addressable by index ---------------------------------------------
def batch_plan(num_samples: int, steps: int, batch_size: int, seed: int) -> list[Tensor]:
    """The example indices of every step: epochs of seeded permutations, cut into batches."""
    if num_samples < 1:
        raise FtdoctorError("the training data is empty", "check --data, --split and --max-samples")
    gen = torch.Generator().manual_seed(0x5EED0000 + int(seed))
    need = steps * batch_size
    perms = [torch.randperm(num_samples, generator=gen) for _ in range(-(-need // num_samples))]
    flat = torch.cat(perms)[:need]
    return list(flat.split(batch_size))


class Examples:
    """A data bundle's examples by index: held in memory when small, else read through its loader."""

    def __init__(self, bundle: Any, device: torch.device) -> None:
        self.bundle, self.device = bundle, device
        self.num_samples = int(bundle.num_samples)
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        size = self.num_samples * int(np.prod(bundle.image_shape)) * 4
        if size <= _IN_MEMORY_BYTES:
            xs, ys, idx = [], [], []
            for x, y, i in bundle.loader(batch_size=256):
                xs.append(x)
                ys.append(torch.as_tensor(y))
                idx.append(torch.as_tensor(i))
            if xs:
                order = torch.cat(idx)
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                self.x = torch.empty_like(x_all)
                self.y = torch.empty_like(y_all)
                self.x[order], self.y[order] = x_all, y_all
                self.num_samples = len(order)

    def batches(self, plan: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if self.x is not None:
            for idx in plan:
                yield self.x[idx].to(self.device), self.y[idx].to(self.device), idx
            return
        flat = torch.cat(list(plan)).tolist()
        loader = self.bundle.loader(batch_size=len(plan[0]), sampler=flat)
        for x, y, i in loader:
            yield x.to(self.device), torch.as_tensor(y).to(self.device), torch.as_tensor(i)

    def all(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.x is not None:
            for s in range(0, self.num_samples, 256):
                yield self.x[s:s + 256].to(self.device), self.y[s:s + 256].to(self.device)
            return
        for x, y, _ in self.bundle.loader(batch_size=256):
            yield x.to(self.device), torch.as_tensor(y).to(self.device)


@torch.no_grad()
def accuracy(model: nn.Module, examples: Examples) -> float:
    """Top-1 accuracy in eval mode over all examples."""
    was = model.training
    model.eval()
    correct = n = 0
    for x, y in examples.all():
        correct += int((forward.logits(model, x).argmax(1) == y).sum())
        n += len(y)
    model.train(was)
    return correct / max(n, 1)


# -- per-step measurements ----------------------------------------------------------------------
def feature_variance(features: Tensor) -> float:
    """Variance across the batch of the head's input, averaged over features (ENTAME Fig. 1)."""
    f = features.detach().to(torch.float64).reshape(features.shape[0], -1)
    return float(f.var(dim=0, unbiased=False).mean()) if f.shape[0] > 0 else float("nan")


def batch_noise_fraction(logits: Tensor, y: Tensor) -> float:
    """ζ/φ of one batch (ENTAME eq. 12 and Table 1), from the logits and labels; NaN when φ = 0."""
    z = logits.detach().to(torch.float64)
    p = F.softmax(z, dim=1)
    zeta = float((p * p).sum(1).mean())
    kappa = float(p.gather(1, y[:, None]).mean())
    phi = zeta + 1.0 - 2.0 * kappa          # one-hot labels: E‖y‖² = 1 (SPEC §1.1)
    return zeta / phi if phi > 0 else float("nan")


def _digest_state(model: nn.Module, exclude_prefix: str) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k == exclude_prefix or k.startswith(exclude_prefix + "."):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- one run ------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    model: nn.Module
    head: nn.Module                   # the new head (a FeatureNormLinear for entame-fn), at the old head's name


def prepare_model(template: nn.Module, head: AffineLayer, num_classes: int, method: str, seed: int,
                  options: TraceOptions, first_batch: Tensor | None = None) -> _Prepared:
    """A copy of ``template`` with a fresh head for ``num_classes``, initialised the ``method``'s way.

    ``entame-fn`` puts ENTAME's feature normalisation (eq. 20) in front of the
    head (a :class:`~ftdoctor.featurenorm.FeatureNormLinear`, same parameter
    names), its eval statistics taken from ``first_batch``'s features.
    """
    model = copy.deepcopy(template)
    new = new_head_like(head.module, num_classes)
    init_head_(new, HEAD_INIT[method], generator_for(seed), phi_w=options.phi_w_for(num_classes))
    set_module(model, head.name, new)
    if method == "entame-fn":
        from ftdoctor.featurenorm import insert_feature_norm
        if not isinstance(new, nn.Linear):
            raise FtdoctorError("entame-fn needs a Linear head (the feature normalisation is per feature)",
                                "use --method entame for this model")
        new = insert_feature_norm(model, head.name)
        if first_batch is not None:
            _init_feature_norm(model, new, first_batch)
    return _Prepared(model, new)


@torch.no_grad()
def _init_feature_norm(model: nn.Module, head: nn.Module, x: Tensor) -> None:
    """Set FeatureNorm's eval statistics from one batch's features, so step-0 evaluation is meaningful."""
    from ftdoctor.featurenorm import feature_statistics
    feats: list[Tensor] = []
    h = head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()), prepend=True)
    was = model.training
    try:
        model.eval()
        forward.logits(model, x)
    finally:
        model.train(was)
        h.remove()
    head.feature_norm.set_statistics(*feature_statistics(feats))


def fine_tune(template: nn.Module, head: AffineLayer, layers: Sequence[AffineLayer], train: Examples,
              evaluation: Examples, num_classes: int, options: TraceOptions, *, method: str | None = None,
              seed: int | None = None, bar: Any = None) -> tuple[RunSeries, nn.Module]:
    """Fine-tune a copy of ``template`` with a fresh head by ``method`` for ``options.steps`` steps.

    ``template`` (the pretrained model, its own head included) is not modified;
    its state is the L2-SP reference w⁰. Returns the recorded series and the
    fine-tuned model.
    """
    method = method or options.method
    seed = options.seed if seed is None else seed
    options.validate((method,))
    steps = options.steps
    plan = batch_plan(train.num_samples, steps, options.batch_size, seed)
    first_batch = next(train.batches(plan[:1]))[0] if method == "entame-fn" else None
    prep = prepare_model(template, head, num_classes, method, seed, options, first_batch=first_batch)
    model, new_head = prep.model, prep.head
    start_digest = _digest_state(model, head.name)

    from ftdoctor.train import L2SP, RifleSchedule, param_groups
    groups = param_groups(model, new_head, options.lr)
    if options.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=options.lr)
    else:
        opt = torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum)
    backbone_group, head_group = opt.param_groups
    rifle = (RifleSchedule(new_head, opt, options.period, lr_max=options.lr, init=options.rifle_init, seed=seed)
             if method == "rifle" else None)
    l2sp = (L2SP(model, template, options.alpha, options.beta, new=[head.name]) if method == "l2sp" else None)
    warm = options.warmup_steps if method == "warmup" else 0

    modules = dict(model.named_modules())
    tracked = [new_head if l.name == head.name else modules[l.name] for l in layers]
    names = tuple(l.name for l in layers)
    ref_state = template.state_dict()
    drift_pairs = [(modules[l.name].weight, ref_state[f"{l.name}.weight"]) for l in layers
                   if l.name != head.name and f"{l.name}.weight" in ref_state
                   and ref_state[f"{l.name}.weight"].shape == modules[l.name].weight.shape]

    feats: list[Tensor] = []
    hook = new_head.register_forward_pre_hook(      # prepended: the raw x^L, before any FeatureNorm
        lambda m, a: feats.append(a[0].detach()) if not feats else None, prepend=True)
    rec: dict[str, list] = {k: [] for k in ("loss", "train_acc", "lr", "backbone_lr", "feature_var",
                                            "noise_fraction", "sp_penalty", "grad_norm")}
    evals = set(options.eval_points())
    eval_step: list[int] = [0]
    eval_acc: list[float] = [accuracy(model, evaluation)]
    digest = hashlib.sha256()
    backbone_params = backbone_group["params"]
    try:
        model.train()
        for t, (x, y, idx) in enumerate(train.batches(plan)):
            digest.update(idx.to(torch.int64).numpy().tobytes())
            if rifle is not None:
                rifle.step(t)
            in_warmup = t < warm
            feats.clear()
            logits = forward.logits(model, x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FtdoctorError(f"{method} diverged at step {t + 1} (seed {seed}): the loss is not finite",
                                    "lower --lr (ENTAME uses 1e-4 with adam)")
            objective = loss + l2sp() if l2sp is not None else loss
            opt.zero_grad(set_to_none=True)
            objective.backward()
            rec["grad_norm"].append([float(m.weight.grad.norm()) if m.weight.grad is not None else float("nan")
                                     for m in tracked])
            if in_warmup:
                for p in backbone_params:      # head-only step: Adam/SGD skip parameters without a gradient
                    p.grad = None
            opt.step()
            rec["loss"].append(float(loss.detach()))
            rec["train_acc"].append(float((logits.argmax(1) == y).float().mean()))
            rec["lr"].append(float(head_group["lr"]))
            rec["backbone_lr"].append(0.0 if in_warmup else float(backbone_group["lr"]))
            rec["feature_var"].append(feature_variance(feats[0]) if feats else float("nan"))
            rec["noise_fraction"].append(batch_noise_fraction(logits, y))
            with torch.no_grad():
                rec["sp_penalty"].append(float(sum(((w - w0.to(w)) ** 2).sum() for w, w0 in drift_pairs))
                                         if drift_pairs else 0.0)
            if t + 1 in evals:
                eval_step.append(t + 1)
                eval_acc.append(accuracy(model, evaluation))
            if bar is not None:
                bar.advance(1, status=f"{method} seed {seed}: loss {rec['loss'][-1]:.3f} "
                                      f"acc {rec['train_acc'][-1]:.0%} eval {eval_acc[-1]:.1%}")
    finally:
        hook.remove()
    model.eval()
    series = RunSeries(
        method=method, seed=seed, head=head.name, layers=names, step=np.arange(1, steps + 1, dtype=np.int64),
        **{k: np.asarray(v, dtype=np.float64) for k, v in rec.items() if k != "grad_norm"},
        grad_norm=np.asarray(rec["grad_norm"], dtype=np.float64).reshape(steps, len(names)),
        eval_step=np.asarray(eval_step, dtype=np.int64), eval_acc=np.asarray(eval_acc, dtype=np.float64),
        start_digest=start_digest, batch_digest=digest.hexdigest(),
        reinitialised=tuple(rifle.reinitialised) if rifle is not None else ())
    return series, model


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceResult:
    """One ``trace`` run: the series, the settings and where it came from."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    run: RunSeries
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "ftdoctor_version": ftdoctor.__version__,
                "torch_version": torch.__version__.split("+")[0], "model": self.model, "data": self.data,
                "settings": self.settings, "method": self.run.method, "seed": self.run.seed,
                "steps": int(len(self.run.step)), "final": self.run.final(self.settings["window"])}

    def arrays(self) -> dict[str, np.ndarray]:
        return self.run.arrays()

    def attrs(self) -> dict[str, dict[str, Any]]:
        return self.run.attrs()


@dataclass(frozen=True)
class MethodSummary:
    """One row of the ENTAME Table 3 view."""

    name: str
    early_acc: tuple[float, ...]        # per seed
    final_acc: tuple[float, ...]
    early_acc_mean: float
    early_acc_ci95: float | None
    final_acc_mean: float
    final_acc_ci95: float | None
    diff_vs_first: float | None
    diff_ci95: float | None
    p_value: float | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "early_acc_mean": self.early_acc_mean, "early_acc_ci95": self.early_acc_ci95,
                "final_acc_mean": self.final_acc_mean, "final_acc_ci95": self.final_acc_ci95,
                "diff_vs_first": self.diff_vs_first, "diff_ci95": self.diff_ci95, "p_value": self.p_value}


@dataclass(frozen=True)
class CompareResult:
    """Methods × seeds from identical starts and batches, summarised as ENTAME Table 3."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    window: int
    steps: int
    seeds: tuple[int, ...]
    methods: tuple[MethodSummary, ...]
    runs: tuple[RunSeries, ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"schema": COMPARE_SCHEMA, "ftdoctor_version": ftdoctor.__version__,
                "torch_version": torch.__version__.split("+")[0], "window": self.window, "steps": self.steps,
                "seeds": len(self.seeds), "seed_values": list(self.seeds), "model": self.model,
                "data": self.data, "settings": self.settings, "methods": [m.to_json() for m in self.methods]}

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for r in self.runs:
            out.update(r.arrays())
        return out

    def attrs(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.runs:
            out.update(r.attrs())
        return out


def summarise(runs: Sequence[RunSeries], methods: Sequence[str], window: int) -> tuple[MethodSummary, ...]:
    """Per method: mean early and final accuracy ± 95% CI over seeds; paired difference to the first."""
    by = {m: sorted((r for r in runs if r.method == m), key=lambda r: r.seed) for m in methods}
    first = [r.early_acc(window) for r in by[methods[0]]]
    rows = []
    for i, m in enumerate(methods):
        early = [r.early_acc(window) for r in by[m]]
        final = [r.final_acc for r in by[m]]
        d = half = p = None
        if i > 0:
            d, half, p = paired_t_test(early, first)
        rows.append(MethodSummary(name=m, early_acc=tuple(early), final_acc=tuple(final),
                                  early_acc_mean=mean(early), early_acc_ci95=ci95_half_width(early),
                                  final_acc_mean=mean(final), final_acc_ci95=ci95_half_width(final),
                                  diff_vs_first=d, diff_ci95=half, p_value=p))
    return tuple(rows)


def check_paired(runs: Sequence[RunSeries]) -> None:
    """Every method of a seed must have started from the same backbone and consumed the same batches."""
    by_seed: dict[int, list[RunSeries]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    for s, rs in by_seed.items():
        if len({r.start_digest for r in rs}) > 1 or len({r.batch_digest for r in rs}) > 1:
            raise FtdoctorError(f"seed {s}: the methods did not start from identical backbones and batches",
                                "this is a bug in ftdoctor; rerun with --debug and report it")


# -- library calls ------------------------------------------------------------------------------
def _setup(template: nn.Module, train_bundle: Any, eval_bundle: Any, head_name: str | None,
           device: torch.device) -> tuple[list[AffineLayer], AffineLayer, Examples, Examples]:
    if is_scripted(template):
        raise FtdoctorError("a TorchScript model cannot be fine-tuned with a new head",
                            "pass the eager checkpoint (state dict) with --arch")
    train, evaluation = Examples(train_bundle, device), Examples(eval_bundle, device)
    if train.num_samples == 0 or evaluation.num_samples == 0:
        raise FtdoctorError("the training or evaluation data is empty", "check --data, --split and --max-samples")
    from ftdoctor.session import find_layers
    layers, _ = find_layers(template, train_bundle, device=device)
    head = find_head(layers, head_name)
    return layers, head, train, evaluation


def trace_model(template: nn.Module, train_bundle: Any, eval_bundle: Any, options: TraceOptions
                ) -> tuple[RunSeries, nn.Module]:
    """``trace`` on an in-memory pretrained model (left unchanged) and data bundles."""
    options.validate()
    device = next(iter(template.parameters())).device
    layers, head, train, evaluation = _setup(template, train_bundle, eval_bundle, options.head, device)
    with progress.task(f"trace {options.method}", options.steps, "steps") as bar:
        return fine_tune(template, head, layers, train, evaluation, train_bundle.num_classes, options, bar=bar)


def compare_model(template: nn.Module, train_bundle: Any, eval_bundle: Any, options: TraceOptions,
                  methods: Sequence[str], seeds: int) -> tuple[tuple[MethodSummary, ...], tuple[RunSeries, ...]]:
    """``compare`` on an in-memory pretrained model: methods × seeds, paired by seed."""
    methods = tuple(methods)
    if not methods:
        raise FtdoctorError("no method to compare", f"pass --methods with some of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise FtdoctorError("a method is listed twice in --methods", "list each method once")
    if seeds < 1:
        raise FtdoctorError(f"--seeds must be at least 1, got {seeds}", "pass --seeds K with K >= 1")
    options.validate(methods)
    device = next(iter(template.parameters())).device
    layers, head, train, evaluation = _setup(template, train_bundle, eval_bundle, options.head, device)
    runs: list[RunSeries] = []
    total = len(methods) * seeds * options.steps
    with progress.task("compare", total, "steps") as bar:
        for s in range(options.seed, options.seed + seeds):
            for m in methods:
                bar.describe(f"compare {m} seed {s}")
                series, _ = fine_tune(template, head, layers, train, evaluation, train_bundle.num_classes,
                                      options, method=m, seed=s, bar=bar)
                runs.append(series)
    check_paired(runs)
    return summarise(runs, methods, options.window), tuple(runs)


def _load(model_path: str | Path, model_opts: Any, data: Any, eval_split: str, eval_samples: int
          ) -> tuple[Any, Any, Any, list[str]]:
    from ftdoctor import checkpoint as ckpt
    from ftdoctor.session import open_data
    model_opts = model_opts or ckpt.ModelOptions()
    loaded = ckpt.load_model(model_path, model_opts)
    notes = list(loaded.notes)
    train_bundle = open_data(loaded.model, data)
    eval_bundle = open_data(loaded.model, replace(data, split=eval_split, max_samples=eval_samples))
    notes.extend(train_bundle.notes)
    if eval_bundle.num_classes != train_bundle.num_classes:
        raise FtdoctorError(f"the {eval_split} split has {eval_bundle.num_classes} classes but the "
                            f"{train_bundle.split} split has {train_bundle.num_classes}",
                            "use an evaluation split with the same classes")
    return loaded, train_bundle, eval_bundle, notes


def _info(loaded: Any, train_bundle: Any, eval_bundle: Any, head: str | None) -> tuple[dict, dict]:
    from ftdoctor.session import model_info
    model = {**model_info(loaded, None), "head": head}
    data = {"name": train_bundle.name, "split": train_bundle.split, "num_samples": train_bundle.num_samples,
            "num_classes": train_bundle.num_classes, "eval_split": eval_bundle.split,
            "eval_samples": eval_bundle.num_samples}
    return model, data


def trace(model_path: str | Path, *, model: Any = None, data: Any, options: TraceOptions = TraceOptions(),
          eval_split: str = "test", eval_samples: int = 512, save: str | Path | None = None,
          force: bool = False) -> TraceResult:
    """``ftdoctor trace``: fine-tune MODEL's backbone with a fresh head by one method, recording the dynamics.

    With ``save`` the fine-tuned checkpoint is written in the input's format
    (atomically, with a sidecar ``OUT.ftdoctor.json``).
    """
    options.validate()
    from ftdoctor.data import input_paths
    from ftdoctor.outputs import Output, journal, sidecar_path
    outputs = ([Output(Path(save), "--save", replace=False),
                Output(sidecar_path(save), "--save's sidecar", replace=False)] if save is not None else [])
    with journal(outputs, (model_path, *input_paths(data.data, data.data_root)), force=force):
        return _trace(model_path, model, data, options, eval_split, eval_samples, save, force)


def _trace(model_path: str | Path, model: Any, data: Any, options: TraceOptions, eval_split: str,
           eval_samples: int, save: str | Path | None, force: bool) -> TraceResult:
    from ftdoctor import checkpoint as ckpt
    loaded, train_bundle, eval_bundle, notes = _load(model_path, model, data, eval_split, eval_samples)
    run, tuned = trace_model(loaded.model, train_bundle, eval_bundle, options)
    minfo, dinfo = _info(loaded, train_bundle, eval_bundle, None)
    layers_head = run.head
    minfo["head"] = layers_head
    settings = {"method": options.method, **options.settings(), "eval_split": eval_split,
                "eval_samples": eval_samples, "eval_points": options.eval_points()}
    if options.method == "entame-fn":
        notes.append(f"the head {layers_head} normalises its input first (ENTAME eq. 20): a saved checkpoint "
                     f"carries the buffers {layers_head}.feature_norm.mean/var")
    result = TraceResult(minfo, dinfo, settings, run, tuple(notes))
    if save is not None:
        sha = ckpt.save_model(loaded, tuned, Path(save), force=force)
        ckpt.write_sidecar(Path(save), {
            "command": "trace", "method": options.method, "parameters": settings, "seed": options.seed,
            "input": {"path": str(loaded.path), "sha256": loaded.sha256}, "output": {"sha256": sha},
            "versions": {"ftdoctor": ftdoctor.__version__, "torch": torch.__version__.split("+")[0]},
            "final": run.final(options.window)})
    return result


def compare(model_path: str | Path, *, model: Any = None, data: Any, options: TraceOptions = TraceOptions(),
            methods: Sequence[str] = ("base", "entame"), seeds: int = 5, eval_split: str = "test",
            eval_samples: int = 512) -> CompareResult:
    """``ftdoctor compare``: methods × seeds from identical starts and batches, ENTAME Table 3 style."""
    options.validate(methods)
    loaded, train_bundle, eval_bundle, notes = _load(model_path, model, data, eval_split, eval_samples)
    rows, runs = compare_model(loaded.model, train_bundle, eval_bundle, options, methods, seeds)
    minfo, dinfo = _info(loaded, train_bundle, eval_bundle, runs[0].head)
    settings = {"methods": list(methods), **options.settings(), "eval_split": eval_split,
                "eval_samples": eval_samples, "eval_points": options.eval_points()}
    settings.pop("seed")
    settings["first_seed"] = options.seed
    if options.steps < options.window:
        notes.append(f"--steps {options.steps} is shorter than --window {options.window}: the early accuracy "
                     f"averages all {options.steps} steps")
    return CompareResult(minfo, dinfo, settings, options.window, options.steps,
                         tuple(range(options.seed, options.seed + seeds)), rows, runs, tuple(notes))


def write_hdf5(path: str | Path, result: TraceResult | CompareResult) -> None:
    """The trace/compare HDF5 file (SPEC §3): ``schema = ftdoctor.trace/1``, ``/runs/<method>/seed_<s>/...``."""
    from ftdoctor.report import hdf5 as hdf5_report
    hdf5_report.write(path, SCHEMA, result.to_json(), result.arrays(), result.attrs())


# -- rendering ----------------------------------------------------------------------------------
def _pct(x: float | None, ci: float | None = None, signed: bool = False) -> str:
    if x is None:
        return "—"
    s = f"{x * 100:+.2f}" if signed else f"{x * 100:.2f}"
    return s + (f" ± {ci * 100:.2f}" if ci is not None else "")


def render_compare(result: CompareResult, console: Any) -> None:
    """The ENTAME Table 3 view as a rich table."""
    from rich.table import Table
    k = len(result.seeds)
    first = result.methods[0].name
    table = Table(title=f"{result.data['name']}: {result.steps} steps × {k} seed(s), accuracy on "
                        f"{result.data['eval_split']} ({result.data['eval_samples']} examples), %",
                  title_justify="left")
    table.add_column("method")
    table.add_column(f"first {result.window} steps", justify="right")
    table.add_column(f"Δ vs {first}", justify="right")
    table.add_column("p (paired t)", justify="right")
    table.add_column(f"final (step {result.steps})", justify="right")
    for m in result.methods:
        p = "—" if m.p_value is None else (f"{m.p_value:.2g}" if m.p_value >= 1e-4 else f"{m.p_value:.1e}")
        table.add_row(m.name, _pct(m.early_acc_mean, m.early_acc_ci95), _pct(m.diff_vs_first, m.diff_ci95, True),
                      p, _pct(m.final_acc_mean, m.final_acc_ci95))
    console.print(table)
    console.print(f"[dim]± = 95% confidence half-width over {k} seeds (Student t); every method starts from the "
                  f"same backbone and sees the same batches per seed (checked).[/]")


def render_trace(result: TraceResult, console: Any) -> None:
    """Final figures of one run, and the layers' gradient norms (RIFLE Fig. 2) at the first and last step."""
    from rich.table import Table
    r = result.run
    w = result.settings["window"]
    console.print(f"[bold]{r.method}[/] on {result.data['name']} ({result.data['num_classes']} classes), "
                  f"seed {r.seed}, {len(r.step)} steps of {result.settings['optimizer']} at lr "
                  f"{result.settings['lr']:g}")
    console.print(f"eval accuracy: start {r.eval_acc[0]:.1%}, mean of steps 1–{min(w, len(r.step))} "
                  f"{r.early_acc(w):.1%}, final {r.final_acc:.1%}   train loss {r.loss[0]:.3f} → {r.loss[-1]:.3f}")
    console.print(f"head-input variance {r.feature_var[0]:.4g} → {r.feature_var[-1]:.4g}   "
                  f"noise fraction {r.noise_fraction[0]:.3f} → {r.noise_fraction[-1]:.3f}   "
                  f"backbone drift Σ‖W−W⁰‖² {r.sp_penalty[-1]:.4g}")
    if r.reinitialised:
        console.print(f"head re-initialised after steps {', '.join(map(str, r.reinitialised))}")
    table = Table(title="gradient norm ‖∇W‖ per layer", title_justify="left")
    table.add_column("layer")
    table.add_column("step 1", justify="right")
    table.add_column(f"step {len(r.step)}", justify="right")
    for j, name in enumerate(r.layers):
        table.add_row(name, f"{r.grad_norm[0, j]:.3g}", f"{r.grad_norm[-1, j]:.3g}")
    console.print(table)


# -- demo ---------------------------------------------------------------------------------------
DEMO_METHODS = ("base", "entame")
DEMO_SEEDS = 3
DEMO_STEPS = 30


def demo_compare_step(source_path: Path, workdir: Path, console: Any, seed: int = 0) -> CompareResult:
    """``ftdoctor demo``'s dynamics step: compare base vs entame on the ``shapes:5`` transfer task, then plot.

    Writes ``compare.h5`` and (with matplotlib) ``compare.png`` into ``workdir``.
    """
    from ftdoctor.checkpoint import ModelOptions
    from ftdoctor.data import DataOptions
    arch = "ftdoctor.zoo:ShapesNet"
    target = "shapes:5"
    h5, png = Path(workdir) / "compare.h5", Path(workdir) / "compare.png"
    console.rule(f"[bold]ftdoctor compare {Path(source_path).name} --arch {arch} --data {target} "
                 f"--methods {','.join(DEMO_METHODS)} --seeds {DEMO_SEEDS} --steps {DEMO_STEPS}")
    console.print("[dim]Real fine-tuning from the pretrained backbone with a fresh head, per seed the same start "
                  "and the same batches for both methods: does ENTAME's maximum-entropy head learn faster in "
                  "the first steps (ENTAME Table 3)?[/]")
    options = TraceOptions(steps=DEMO_STEPS, seed=seed)
    result = compare(source_path, model=ModelOptions(arch=arch),
                     data=DataOptions(data=target, split="train", max_samples=1024, seed=seed),
                     options=options, methods=DEMO_METHODS, seeds=DEMO_SEEDS, eval_split="test", eval_samples=512)
    write_hdf5(h5, result)
    render_compare(result, console)
    console.print(f"curves written to {h5}")
    try:
        from ftdoctor.report.plot import plot
        plot(h5, png)
        console.print(f"picture written to {png} (accuracy and loss with seed bands, head-input variance, "
                      f"gradient-norm heat maps)")
    except FtdoctorError as exc:          # matplotlib missing: the demo goes on without the picture
        console.print(f"[yellow]no picture: {exc.cause}[/] — {exc.remedy}")
    return result
