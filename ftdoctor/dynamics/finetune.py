"""One fine-tuning run: a copy of the pretrained model with a fresh head, trained and measured step by step."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftdoctor import forward
from ftdoctor.dynamics.options import HEAD_INIT, TraceOptions
from ftdoctor.dynamics.series import RunSeries
from ftdoctor.errors import FtdoctorError
from ftdoctor.heads import generator_for, init_head_
from ftdoctor.model import AffineLayer, new_head_like, set_module

_IN_MEMORY_BYTES = 256 * 2**20


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
        self.x: forward.Inputs | None = None
        self.y: Tensor | None = None
        size = self.num_samples * int(np.prod(bundle.image_shape or (1,))) * 4
        if size <= _IN_MEMORY_BYTES:
            xs, ys, idx = [], [], []
            for x, y, i in bundle.loader(batch_size=256):
                xs.append(x)
                ys.append(torch.as_tensor(y))
                idx.append(torch.as_tensor(i))
            if xs:
                order = torch.cat(idx).argsort()      # back to dataset order: item k at position k
                self.x, self.y = forward.take(forward.cat(xs), order), torch.cat(ys)[order]
                self.num_samples = len(order)

    def batches(self, plan: Sequence[Tensor]) -> Iterator[tuple[forward.Inputs, Tensor, Tensor]]:
        if self.x is not None:
            for idx in plan:
                yield forward.to_device(forward.take(self.x, idx), self.device), self.y[idx].to(self.device), idx
            return
        flat = torch.cat(list(plan)).tolist()
        loader = self.bundle.loader(batch_size=len(plan[0]), sampler=flat)
        for x, y, i in loader:
            yield forward.to_device(x, self.device), torch.as_tensor(y).to(self.device), torch.as_tensor(i)

    def all(self) -> Iterator[tuple[forward.Inputs, Tensor]]:
        if self.x is not None:
            for s in range(0, self.num_samples, 256):
                yield (forward.to_device(forward.take(self.x, slice(s, s + 256)), self.device),
                       self.y[s:s + 256].to(self.device))
            return
        for x, y, _ in self.bundle.loader(batch_size=256):
            yield forward.to_device(x, self.device), torch.as_tensor(y).to(self.device)


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
