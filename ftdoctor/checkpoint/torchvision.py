"""torchvision's classification models: ``--arch NAME``, or recognised from a state dict's keys and shapes
(and, when none fits and timm is installed, timm's: :func:`~.timm.match_timm`)."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ftdoctor.checkpoint.builders import (
    Builder,
    Signature,
    build_kwargs,
    comparable,
    head_classes,
    signature_for,
)
from ftdoctor.checkpoint.common import LoadedModel, ModelOptions, _key, _listing
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import InputSize, ModelSource, loaded, register_model_source
from ftdoctor.checkpoint.state_dict import model_from_state_dict
from ftdoctor.checkpoint.writing import save_state_dict
from ftdoctor.errors import FtdoctorError

# Builders whose default configuration adds parameters a fine-tuned checkpoint
# usually lacks (pretrained weights switch the auxiliary classifiers off).
BUILDER_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "googlenet": ({}, {"aux_logits": False}),
    "inception_v3": ({}, {"aux_logits": False}),
}


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_builders(name: str) -> list[Builder]:
    import torchvision

    fn = torchvision.models.get_model_builder(name)
    return [Builder(name, fn, tuple(sorted(v.items()))) for v in BUILDER_VARIANTS.get(name, ({},))]


def family(name: str) -> str:
    import torchvision

    return torchvision.models.get_model_builder(name).__module__


def match_torchvision(path: Path, state: Mapping[str, torch.Tensor]) -> Builder:
    """The unique torchvision classification builder whose keys and shapes fit ``state``.

    Candidates are built on ``meta``. A family (one torchvision module, e.g.
    ``resnet``) is only expanded when its smallest member has the same
    top-level modules and head as the state dict, which skips most builds.
    """
    keys = comparable(state)
    top = {k.split(".", 1)[0] for k in keys}
    families: dict[str, list[Builder]] = {}
    for name in torchvision_names():
        families.setdefault(family(name), []).extend(torchvision_builders(name))

    tried: dict[str, tuple[float, str]] = {}  # label -> (key overlap, description), for the error message
    fits_keys: list[tuple[Builder, Signature]] = []

    def consider(builder: Builder) -> Signature | None:
        sig = signature_for(builder)
        if sig is not None:
            theirs = sig.comparable()
            overlap = len(keys & theirs) / max(1, len(keys | theirs))
            tried[builder.label()] = (overlap, f"{overlap:.0%} of keys in common")
        return sig

    for members in families.values():
        if len(members) > 2:
            rep = min(members, key=lambda b: (len(b.name), b.name, len(b.kwargs)))
            sig = consider(rep)
            if (
                sig is None
                or {k.split(".", 1)[0] for k in sig.comparable()} != top
                or (sig.head is not None and _key(sig.head, "weight") not in state)
            ):
                continue
        for builder in members:
            sig = consider(builder)
            if sig is not None and sig.comparable() == keys:
                fits_keys.append((builder, sig))

    matches = []
    for builder, sig in fits_keys:
        classes = head_classes(sig, state)
        extra = build_kwargs(builder, sig, state, classes)
        extra = {k: v for k, v in extra.items() if k not in dict(builder.kwargs)}
        sized = signature_for(builder, **extra) if extra else sig
        if sized is not None and all(tuple(state[k].shape) == sized.shapes.get(k) for k in keys):
            matches.append(builder)
        else:
            tried[builder.label()] = (1.0, "same keys, other shapes")
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise FtdoctorError(
            f"the state dict in {path} fits several torchvision models: {_listing([b.label() for b in matches])}",
            "pass --arch with the one it was trained as",
        )
    closest = sorted(tried.items(), key=lambda kv: -kv[1][0])[:3]
    described = ", ".join(f"{label} ({text})" for label, (_, text) in closest) or "none could be built"
    raise NoTorchvisionMatch(
        f"the state dict in {path} ({len(state)} tensors) matches no torchvision classification model; "
        f"closest: {described}",
        "pass --arch NAME (a torchvision model) or --arch pkg.module:callable for your own model class",
        closest=described,
    )


class NoTorchvisionMatch(FtdoctorError):
    """No torchvision classification model fits the state dict (timm's are tried next, when installed)."""

    def __init__(self, cause: str, remedy: str, closest: str = "") -> None:
        super().__init__(cause, remedy)
        self.closest = closest


def match_any(path: Path, state: Mapping[str, torch.Tensor]) -> Builder:
    """:func:`match_torchvision`, else (timm installed) :func:`~.timm.match_timm`."""
    try:
        return match_torchvision(path, state)
    except NoTorchvisionMatch as exc:
        try:
            import timm  # noqa: F401
        except ImportError:
            raise exc from None
        torchvision_closest = exc.closest
    from ftdoctor.checkpoint.timm import NoTimmMatch, match_timm

    try:
        return match_timm(path, state)
    except NoTimmMatch as exc:
        closest = ", ".join(c for c in (torchvision_closest, exc.closest) if c) or "none could be built"
        raise FtdoctorError(f"the state dict in {path} ({len(state)} tensors) matches no torchvision or timm "
                            f"classification model; closest: {closest}", exc.remedy) from None


def unknown_arch(arch: str) -> FtdoctorError:
    """The error for an ``--arch`` no source accepts, with torchvision's closest names."""
    close = difflib.get_close_matches(arch, torchvision_names(), n=5, cutoff=0.5) or ["resnet18", "vgg16_bn",
                                                                                        "vit_b_16"]
    return FtdoctorError(
        f"unknown architecture {arch!r}: not a torchvision classification model",
        f"did you mean {', '.join(close)}? (or an import path pkg.module:callable for your own model)",
    )


@register_model_source(name="torchvision", priority=90)
class TorchvisionSource(ModelSource):
    """A state dict of a torchvision classification model: named by ``--arch``, or recognised."""

    def accepts_arch(self, arch: str) -> bool:
        return ":" not in arch and arch in torchvision_names()

    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        if ckpt.state_dict is None:
            return None
        if opts.arch is None:
            return "match"
        return torchvision_builders(opts.arch) if self.accepts_arch(opts.arch) else None

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        builders = None if plan == "match" else plan
        model, builder, box = model_from_state_dict(ckpt, opts, notes, builders=builders, match=match_any)
        source = "timm" if builder.name.startswith("timm:") else self.name   # timm writes it back, sizes it
        return loaded(ckpt, model, box.format, builder.name, box, opts, notes, source)

    def input_size(self, arch: str | None, model: nn.Module) -> InputSize | None:
        """From the metadata of torchvision's own weights for ``arch`` (nothing is downloaded): their
        ``min_size`` and crop size; a ViT's ``image_size`` is exact (its position embeddings fix it)."""
        import torchvision

        if arch is None or not self.accepts_arch(arch):
            return None
        try:
            weights = torchvision.models.get_model_weights(arch).DEFAULT
        except (ValueError, AttributeError, KeyError):
            return None
        keywords = getattr(weights.transforms, "keywords", {}) or {}
        crop = int(keywords.get("crop_size", 224))
        minimum = int(min(weights.meta.get("min_size", (1, 1))))
        exact = getattr(model, "image_size", None)
        exact = int(exact) if isinstance(exact, int) else None
        if exact is None and minimum <= 1:
            return None                       # a convolutional net that runs at any size
        if exact is not None:
            why = f"{arch} takes {exact}×{exact} images only (its position embeddings fix the size)"
        else:
            why = f"{arch} needs images of at least {minimum}×{minimum} (its pretrained weights take {crop}×{crop})"
        return InputSize(pretrained=exact or crop, minimum=minimum, exact=exact, why=why)

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        return save_state_dict(loaded.container, model, out)
