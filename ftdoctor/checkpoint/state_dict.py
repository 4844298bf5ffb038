"""A model from a state dict: the builder, the key prefix, the weights (shared by every state-dict source).

A state dict may carry a prefix on every key (``module.`` from DataParallel,
``model.`` from Lightning, both); the prefix whose keys overlap the
architecture most is stripped, and restored when the model is written back.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ftdoctor.checkpoint.builders import (Bound, Builder, Signature, build, build_kwargs, comparable, head_classes,
                                          signature_for, signature_of)
from ftdoctor.checkpoint.common import STRIPPED_PREFIXES, Container, ModelOptions, _listing, _short
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.errors import FtdoctorError


def model_from_state_dict(ckpt: CheckpointFile, opts: ModelOptions, notes: list[str], *,
                          builders: list[Builder] | None = None,
                          match: Callable[[Path, Mapping[str, torch.Tensor]], Builder] | None = None,
                          ) -> tuple[nn.Module, Builder, Container]:
    """Build ``builders``' best fit (or ``match``'s recognition) and load ``ckpt``'s weights into it.

    Returns the model, the builder used and the container to write it back with.
    """
    path, raw, box = ckpt.path, ckpt.payload, ckpt.container
    options = prefix_options(list(raw))
    prebuilt: nn.Module | None = None
    if builders is not None:
        # a builder that is not torchvision's may be sized by the file (a timm folder's model_args): refused
        # on meta when it would be far larger than the weights, before anything is allocated
        bound = None if all(b.torchvision for b in builders) else Bound.of(raw, f"the configuration of {path}")
        builder, sig, prefix = choose_builder(builders, raw, options, bound=bound)
        if sig is None and not builder.torchvision:
            # The callable does not build on meta (data-dependent code): build it for real, once.
            prebuilt = build(builder, build_kwargs(builder, None, {}, opts.num_classes))
            sig = signature_of(prebuilt)
            builder, sig, prefix = choose_builder([builder], raw, options, sig)
    else:
        assert match is not None
        prefix = options[-1]
        builder = match(path, strip(raw, prefix))
        sig = signature_for(builder)
        notes.append(f"architecture {builder.name} recognised from the state dict keys and shapes")
    if prefix:
        notes.append(f"stripped the key prefix {prefix!r} (restored when saving)")
    state = strip(raw, prefix)

    classes = head_classes(sig, state)
    if opts.num_classes is not None and classes is not None and classes != opts.num_classes:
        raise FtdoctorError(
            f"the head {sig.head} of {path} has {classes} outputs, not --num-classes {opts.num_classes}",  # type: ignore[union-attr]
            f"drop --num-classes (it is read from the head) or pass --num-classes {classes}; "
            "--new-head replaces the head for a dataset with another class count",
        )
    wanted = opts.num_classes or classes
    if prebuilt is not None and (wanted is None or not builder.takes_num_classes or wanted == sig.head_outputs()):  # type: ignore[union-attr]
        model = prebuilt
    else:
        kwargs = build_kwargs(builder, sig, state, wanted)
        if "image_size" in kwargs and "image_size" not in dict(builder.kwargs):
            notes.append(f"image_size={kwargs['image_size']} read from the position embedding")
        model = build(builder, kwargs)
    from ftdoctor.featurenorm import attach_feature_norms

    notes.extend(attach_feature_norms(model, state))  # heads written by `fix --method entame --feature-norm`
    load_weights(model, state, builder.label(), opts.non_strict, path, notes)
    box = Container(box.format, wrapper_key=box.wrapper_key, wrapper=box.wrapper, prefix=prefix,
                    dtypes={k: v.dtype for k, v in state.items()}, metadata=box.metadata, folder=box.folder)
    if builder.kwargs and box.folder is None:
        notes.append(f"built as {builder.label()} to fit the checkpoint")
    return model, builder, box


def prefix_options(keys: list[str]) -> list[str]:
    """Prefixes that every key carries, stripped repeatedly: ``["", "module.", "module.model."]``."""
    options = [""]
    current = keys
    while current:
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in current):
                options.append(options[-1] + prefix)
                current = [k[len(prefix):] for k in current]
                break
        else:
            break
    return options


def strip(state: Mapping[str, torch.Tensor], prefix: str) -> OrderedDict[str, torch.Tensor]:
    """The state dict without ``prefix``, keeping ``_metadata`` (module versions) in step."""
    stripped = OrderedDict((k[len(prefix):], v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len(prefix):] if k.startswith(prefix) else "", v)
            for k, v in metadata.items()
            if not prefix or k.startswith(prefix) or k == prefix[:-1]
        )
    return stripped


def choose_builder(
    builders: list[Builder],
    raw: Mapping[str, torch.Tensor],
    options: list[str],
    known: Signature | None = None,
    bound: Bound | None = None,
) -> tuple[Builder, Signature | None, str]:
    """The builder variant and key prefix whose keys overlap the state dict most (ties: strip more)."""
    best: tuple[int, int, int] | None = None
    chosen: tuple[Builder, Signature | None, str] = (builders[0], known, options[-1])
    for b_index, builder in enumerate(builders):
        signature = known or signature_for(builder, bound)
        if signature is None:
            continue
        theirs = signature.comparable()
        for p_index, prefix in enumerate(options):
            keys = comparable(k[len(prefix):] for k in raw)
            score = (len(keys & theirs) - len(keys ^ theirs), p_index, -b_index)
            if best is None or score > best:
                best, chosen = score, (builder, signature, prefix)
    return chosen


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, non_strict: bool, path: Path, notes: list[str]
) -> None:
    """``load_state_dict``: strict, or with ``--non-strict`` only the tensors whose key and shape fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not non_strict:
        if missing or unexpected or mismatched:
            parts = [
                f"{len(items)} {label} ({_listing(items)})"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("with another shape, file vs model", mismatched),
                )
                if items
            ]
            raise FtdoctorError(
                f"the state dict in {path} does not fit {arch}: " + "; ".join(parts),
                "pass the right --arch (or --non-strict to load only the tensors that fit)",
            )
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise FtdoctorError(
                f"the state dict in {path} does not load into {arch}: {_short(exc)}",
                "pass the right --arch (or --non-strict to load only the tensors that fit)",
            ) from None
        return

    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fitting:
        raise FtdoctorError(
            f"none of the {len(state)} tensors in {path} fit {arch}, even with --non-strict",
            "pass the right --arch",
        )
    try:
        model.load_state_dict(fitting, strict=False)
    except Exception as exc:
        raise FtdoctorError(
            f"the state dict in {path} does not load into {arch}: {_short(exc)}", "pass the right --arch"
        ) from None
    for label, items in (
        ("missing from the checkpoint, left at their initial values", missing),
        ("in the checkpoint but not in the model, ignored", unexpected),
        ("with a different shape, left at their initial values", mismatched),
    ):
        if items:
            notes.append(f"--non-strict: {len(items)} tensors {label}: {_listing(items)}")
