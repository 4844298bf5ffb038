"""Training-loop pieces for acting on a diagnosis inside any plain PyTorch loop (SPEC §6).

* :func:`entame_init_` / :func:`attach_head` — a fresh head for the new task,
  drawn the maximum-entropy way of ENTAME §5 eq. 21 (``W ~ N(0, φ_w)``,
  ``b = 0``), with :class:`FeatureNorm` (eq. 20) optionally in front of it.
* :class:`L2SP` — the L2-SP penalty of Li et al. (2018) eq. 3,
  ``α/2 ‖w_S − w⁰_S‖² + β/2 ‖w_new‖²``; the new parameters are found by shape.
* :class:`RifleSchedule` — RIFLE (Li et al. 2020) Alg. 1: the head is
  re-initialised at the start of every period and its learning rate follows a
  cosine that restarts with each period.

Example (a complete loop; docs/python-api.md runs the same)::

    head = attach_head(model, num_classes=5, init="entame", feature_norm=True, example=x0)
    l2sp = L2SP(model, pretrained_state, alpha=0.1, beta=0.01, new=[head.name])
    opt = torch.optim.SGD(param_groups(model, head.module, lr=1e-2), momentum=0.9)
    rifle = RifleSchedule(head.module, opt, period=100)
    for step, (x, y) in enumerate(batches):
        rifle.step(step)
        loss = F.cross_entropy(model(x), y) + l2sp()
        opt.zero_grad(); loss.backward(); opt.step()
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ftdoctor.errors import FtdoctorError
from ftdoctor.featurenorm import FeatureNorm, FeatureNormLinear, insert_feature_norm
from ftdoctor.heads import ENTAME_PHI_W, entame_phi_w, generator_for, init_head_, init_head_tensors
from ftdoctor.model import AffineLayer, find_head, layer_order, new_head_like, set_module

__all__ = ["FeatureNorm", "FeatureNormLinear", "entame_init_", "entame_phi_w", "attach_head", "L2SP",
           "RifleSchedule", "param_groups", "own_group", "swap_parameters", "ENTAME_PHI_W"]


def entame_init_(head: nn.Module, phi_w: float = ENTAME_PHI_W, *,
                 generator: torch.Generator | None = None) -> nn.Module:
    """Maximum-entropy initialisation of ``head`` in place (ENTAME §5, eq. 21).

    ``W ~ N(0, φ_w)`` i.i.d. and ``b = 0``: the logits start near zero, so ŷ is
    uniform, the cross-entropy is ln C and the error passed back into the
    backbone (eq. 8, through ``W``) is negligible until the first update has
    grown ``W``. ``φ_w`` defaults to the paper's 1e-12; :func:`entame_phi_w`
    gives ``γ²λ²/C²`` from the learning rate γ and λ.
    """
    if phi_w < 0 or not math.isfinite(phi_w):
        raise FtdoctorError(f"phi_w must be a finite number >= 0, got {phi_w}", "use e.g. the paper's 1e-12")
    return init_head_(head, "entame", generator or torch.Generator().manual_seed(0), phi_w=phi_w)


def attach_head(model: nn.Module, num_classes: int, *, init: str = "entame", head: str | None = None,
                feature_norm: bool = False, phi_w: float = ENTAME_PHI_W, seed: int = 0,
                example: Tensor | None = None) -> AffineLayer:
    """Replace the model's head by a fresh layer for ``num_classes`` classes; return it.

    ``init`` is ``entame`` (eq. 21), ``kaiming`` (He-normal, ENTAME's baseline),
    ``torch-default`` or ``kaiming-normal``. With ``feature_norm`` the head's
    input is z-normalised first (ENTAME eq. 20): the head becomes a
    :class:`~ftdoctor.featurenorm.FeatureNormLinear` (same name, same
    ``weight``/``bias``, plus the buffers ``feature_norm.mean/var``, which
    hold the last training batch's statistics for eval mode). ``example`` (one input batch) finds the head as the last
    affine layer run; without it a dummy input is tried.
    """
    if num_classes < 1:
        raise FtdoctorError(f"num_classes must be at least 1, got {num_classes}", "pass the target task's classes")
    layers, _ = layer_order(model, example)
    old = find_head(layers, head)
    new = new_head_like(old.module, num_classes)
    gen = generator_for(seed)
    if init == "entame":
        entame_init_(new, phi_w, generator=gen)
    else:
        try:
            init_head_(new, init, gen)
        except ValueError:
            raise FtdoctorError(f"unknown head initialisation {init!r}",
                                "use entame, kaiming, torch-default or kaiming-normal") from None
    set_module(model, old.name, new)
    if feature_norm:
        if not isinstance(new, nn.Linear):
            raise FtdoctorError("feature normalisation needs a Linear head", "attach the head without feature_norm")
        new = insert_feature_norm(model, old.name)
    return AffineLayer(old.name, new)


def own_group(optimizer: torch.optim.Optimizer, head: nn.Module, scheduler: object = None) -> dict:
    """Give the head's parameters a parameter group of their own in an optimizer already built (a framework's
    ``AdamW`` with decay and no-decay groups), so :class:`RifleSchedule` can drive the head alone.

    The head's parameters leave the groups they were in; the new group (``name`` "head") copies the
    hyper-parameters of the first of them. Optimizer state is keyed by parameter, so momentum and moments
    are kept. A learning-rate ``scheduler`` built before (Trainer's LambdaLR) gets the new group too, as a
    copy of the template group's entries in its per-group lists (``base_lrs``, ``lr_lambdas``, …): it then
    writes the head group's rate after each optimizer step as for the others, and :class:`RifleSchedule`
    sets it again before the next one. Returns the head's group.
    """
    ids = {id(p) for p in head.parameters()}
    groups = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
    if len(groups) == 1 and all(id(p) in ids for p in groups[0]["params"]):
        return groups[0]
    if not groups:
        raise FtdoctorError("the head's parameters are not in the optimizer",
                            "build the optimizer after attaching the head, from the model's parameters")
    template = {k: v for k, v in groups[0].items() if k != "params"}
    index = next(i for i, g in enumerate(optimizer.param_groups) if g is groups[0])
    count = len(optimizer.param_groups)
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    optimizer.add_param_group({**template, "params": list(head.parameters()), "name": "head"})
    if scheduler is not None:
        for key, value in list(vars(scheduler).items()):
            if isinstance(value, list) and len(value) == count:
                value.append(value[index])
    return optimizer.param_groups[-1]


def swap_parameters(optimizer: torch.optim.Optimizer, pairs: Mapping[Tensor, Tensor]) -> None:
    """Replace parameters in an optimizer's groups (a module replaced by one holding copies, as
    :func:`~ftdoctor.featurenorm.insert_feature_norm` does); their state moves with them."""
    by_id = {id(old): new for old, new in pairs.items()}
    for g in optimizer.param_groups:
        g["params"] = [by_id.get(id(p), p) for p in g["params"]]
    for old, new in pairs.items():
        if old in optimizer.state:
            optimizer.state[new] = optimizer.state.pop(old)


def param_groups(model: nn.Module, head: nn.Module, lr: float, *, head_lr: float | None = None) -> list[dict]:
    """Two optimizer parameter groups, ``backbone`` and ``head``, so a schedule can drive the head alone."""
    head_ids = {id(p) for p in head.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": backbone, "lr": lr, "name": "backbone"},
            {"params": list(head.parameters()), "lr": lr if head_lr is None else head_lr, "name": "head"}]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p):
            return True
    return False


class L2SP:
    """The L2-SP penalty (Li et al. 2018, eq. 3): ``α/2 Σ_S ‖w − w⁰‖² + β/2 Σ_new ‖w‖²``.

    ``reference`` is the pretrained model or its state dict (the starting
    point w⁰). A parameter of ``model`` is *shared* (set S) when the reference
    has a tensor of the same name and shape; every other parameter — a head
    for a different class count, an inserted layer — is *new*. A fresh head
    of the same shape as the old one cannot be told apart by shape: name it
    in ``new`` (module names, prefixes of parameter names, or globs).
    Call the object to get the penalty as a scalar tensor, to add to the loss.
    """

    def __init__(self, model: nn.Module, reference: nn.Module | Mapping[str, Tensor], alpha: float = 0.1,
                 beta: float = 0.01, *, new: Iterable[str] = ()) -> None:
        if alpha < 0 or beta < 0:
            raise FtdoctorError(f"L2-SP needs alpha, beta >= 0, got alpha={alpha}, beta={beta}",
                                "the paper uses alpha in [0.001, 1] and beta = 0.01")
        ref = reference.state_dict() if isinstance(reference, nn.Module) else dict(reference)
        forced = tuple(new)
        self.alpha, self.beta = float(alpha), float(beta)
        self._shared: list[tuple[str, Tensor, Tensor]] = []
        self._new: list[tuple[str, Tensor]] = []
        for name, p in model.named_parameters():
            w0 = ref.get(name)
            if (not _matches(name, forced) and isinstance(w0, Tensor)
                    and tuple(w0.shape) == tuple(p.shape)):
                self._shared.append((name, p, w0.detach().to(device=p.device, dtype=p.dtype).clone()))
            else:
                self._new.append((name, p))
        self._by_name = {n: (p, w0) for n, p, w0 in self._shared}
        self._by_name.update({n: (p, None) for n, p in self._new})

    @property
    def shared(self) -> tuple[str, ...]:
        """Names of the parameters pulled towards the reference (w_S)."""
        return tuple(n for n, _, _ in self._shared)

    @property
    def new(self) -> tuple[str, ...]:
        """Names of the parameters with plain weight decay β (w_S̄)."""
        return tuple(n for n, _ in self._new)

    def sp_distance(self) -> Tensor:
        """``Σ_S ‖w − w⁰‖²`` (before α/2)."""
        terms = [((p - w0) ** 2).sum() for _, p, w0 in self._shared]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def new_norm(self) -> Tensor:
        """``Σ_new ‖w‖²`` (before β/2)."""
        terms = [(p ** 2).sum() for _, p in self._new]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def gradient(self, name: str) -> Tensor | None:
        """The penalty's gradient for parameter ``name``: ``α (w − w⁰)`` if shared, ``β w`` if new, None
        when that term is off (α or β is 0) or the name is not a parameter of the model. What a loop that
        cannot change its loss adds to the parameter's gradient instead (:mod:`ftdoctor.monitor.methods`)."""
        entry = self._by_name.get(name)
        if entry is None:
            return None
        p, w0 = entry
        if w0 is not None:
            return self.alpha * (p.detach() - w0) if self.alpha else None
        return self.beta * p.detach() if self.beta else None

    def __call__(self) -> Tensor:
        out = torch.zeros(())
        if self.alpha:
            out = out + 0.5 * self.alpha * self.sp_distance()
        if self.beta:
            out = out + 0.5 * self.beta * self.new_norm()
        return out


class RifleSchedule:
    """RIFLE (Li et al. 2020, Alg. 1) for any loop: periodic head re-initialisation and a cyclic head rate.

    Call :meth:`step` with the 0-based step number before each forward pass.
    At a period boundary (``step > 0`` and ``step % period == 0``) the head's
    weight and bias are drawn afresh (``init``: ``torch-default`` as the
    authors' PyTorch code, or ``kaiming-normal``) and the optimizer state of
    the head's parameters (momentum, Adam moments of the old head) is
    dropped. The head's parameter group gets the cosine-restart rate
    ``η_τ = ½ η_max (1 + cos(π τ / P))``, τ = step mod P: ``η_max`` at each
    re-initialisation, annealed to near zero by the end of the period. (Alg. 1
    line 12 writes ``cos(2π τ/P)``, which would climb back to η_max before
    the reset; the annealing form is the "cyclical learning rates … to ensure
    the final convergence" its text describes.) The head must have its own
    parameter group: see :func:`param_groups`. The draw for period k depends
    on (``seed``, k) only: :meth:`fresh_head` returns it.
    """

    def __init__(self, head: nn.Module, optimizer: torch.optim.Optimizer, period: int, *,
                 lr_max: float | None = None, init: str = "torch-default", seed: int = 0) -> None:
        if period < 1:
            raise FtdoctorError(f"the RIFLE period must be at least 1 step, got {period}",
                                "pass a period of several steps (RIFLE re-initialises a few times per run)")
        if init not in ("torch-default", "kaiming-normal"):
            raise FtdoctorError(f"unknown RIFLE head initialisation {init!r}", "use torch-default or kaiming-normal")
        self.head, self.optimizer, self.period, self.init, self.seed = head, optimizer, int(period), init, int(seed)
        ids = {id(p) for p in head.parameters()}
        groups = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
        if len(groups) != 1 or any(id(p) not in ids for p in groups[0]["params"]):
            raise FtdoctorError("the head's parameters must form exactly one optimizer parameter group of their own",
                                "build the optimizer from ftdoctor.train.param_groups(model, head, lr)")
        self.group = groups[0]
        self.lr_max = float(self.group["lr"] if lr_max is None else lr_max)
        self.reinitialised: list[int] = []

    def lr_at(self, step: int) -> float:
        tau = step % self.period
        return 0.5 * self.lr_max * (1.0 + math.cos(math.pi * tau / self.period))

    def is_boundary(self, step: int) -> bool:
        return step > 0 and step % self.period == 0

    def fresh_head(self, k: int) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) drawn at the start of period ``k`` (k ≥ 1)."""
        bias = getattr(self.head, "bias", None)
        return init_head_tensors(self.head.weight.shape, bias is not None, self.init,
                                 generator_for(self.seed * 1_000_003 + k), dtype=self.head.weight.dtype)

    @torch.no_grad()
    def step(self, step: int) -> bool:
        """Set the head's rate for ``step``; re-initialise the head at a boundary. True if it did."""
        self.group["lr"] = self.lr_at(step)
        if not self.is_boundary(step):
            return False
        w, b = self.fresh_head(step // self.period)
        self.head.weight.copy_(w.to(self.head.weight.device))
        bias = getattr(self.head, "bias", None)
        if bias is not None and b is not None:
            bias.copy_(b.to(bias.device))
        for p in self.head.parameters():
            self.optimizer.state.pop(p, None)
        self.reinitialised.append(step)
        return True
