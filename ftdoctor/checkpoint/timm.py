"""timm's models: ``--arch timm:NAME`` for any name ``timm.list_models()`` knows, and timm hub folders
(``config.json`` with ``architecture``, ``num_classes``, ``model_args``: :mod:`.folder`), with the
``ftdoctor[timm]`` extra.

The model is built offline by ``timm.create_model(NAME, pretrained=False, num_classes=C)`` — never a
download — and the checkpoint's weights are loaded into it. ``num_classes`` comes from the head in the
state dict (or ``--num-classes``); a ViT-style model whose position embedding implies another image size
than the name's default gets ``img_size`` from the checkpoint. A patch embedding of fixed size
(ViT, DeiT, ...) makes that size the one the model needs (:meth:`TimmSource.input_size`).
"""
from __future__ import annotations

import difflib
import functools
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ftdoctor.checkpoint.builders import Builder
from ftdoctor.checkpoint.common import LoadedModel, ModelOptions
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import InputSize, ModelSource, loaded, register_model_source
from ftdoctor.checkpoint.state_dict import model_from_state_dict, prefix_options, strip
from ftdoctor.checkpoint.writing import save_state_dict
from ftdoctor.errors import FtdoctorError

PREFIX = "timm:"
INSTALL = "pip install 'ftdoctor[timm]'"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise FtdoctorError("--arch timm:NAME needs the timm package, which is not installed",
                            f"install it: {INSTALL}") from None
    return timm


def timm_name(arch: str) -> str:
    return arch[len(PREFIX):].strip()


def check_name(name: str) -> None:
    timm = _timm()
    if not name:
        raise FtdoctorError("--arch timm: names no model", "write --arch timm:NAME, e.g. timm:resnet50")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise FtdoctorError(f"timm has no model {name!r} (--arch timm:{name})",
                            f"did you mean {', '.join('timm:' + c for c in close)}?" if close
                            else "list the names with python -c 'import timm; print(timm.list_models())'")


def image_size_from_state(state: Mapping[str, torch.Tensor]) -> int | None:
    """The square image size a ViT-style checkpoint was trained at, from ``pos_embed`` and the patch size."""
    pos, proj = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos is None or proj is None or pos.dim() != 3 or proj.dim() != 4:
        return None
    tokens = int(pos.shape[1])
    for extra in (1, 0, 2):                       # class token, none, class + distillation token
        side = math.isqrt(max(tokens - extra, 0))
        if side > 0 and side * side == tokens - extra:
            return side * int(proj.shape[-1])
    return None


def builder(name: str, state: Mapping[str, torch.Tensor] | None = None) -> Builder:
    timm = _timm()
    kwargs: tuple[tuple[str, Any], ...] = ()
    size = image_size_from_state(state) if state is not None else None
    default = timm.models.get_pretrained_cfg_value(name, "input_size") if hasattr(timm.models,
                                                                                  "get_pretrained_cfg_value") else None
    if size is not None and (default is None or tuple(default)[-1] != size):
        kwargs = (("img_size", size),)
    return Builder(PREFIX + name, functools.partial(timm.create_model, name, pretrained=False), kwargs,
                   takes_num_classes=True, torchvision=False)


def folder_builder(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Path) -> Builder:
    """The builder of a timm hub folder: ``architecture`` with its ``model_args`` (``num_classes`` comes from
    the head, like any state dict)."""
    name = str(config["architecture"])
    check_name(name)
    args = config.get("model_args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise FtdoctorError(f"{path}/config.json: model_args is not a mapping of argument names",
                            "re-create the folder with timm's save_for_hf / push_to_hub")
    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if k != "num_classes"}
    plain = builder(name, state)
    kwargs = dict(plain.kwargs)
    kwargs.update(args)
    return Builder(plain.name, plain.fn, tuple(sorted(kwargs.items())), takes_num_classes=True, torchvision=False)


@register_model_source(name="timm", priority=70)
class TimmSource(ModelSource):
    """A state dict of a timm model named by ``--arch timm:NAME``."""

    def accepts_arch(self, arch: str) -> bool:
        return arch.startswith(PREFIX)

    def check_arch(self, arch: str) -> None:
        check_name(timm_name(arch))

    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        found = ckpt.container.folder
        if found is not None and found.kind == "timm":
            return [folder_builder(found.config, ckpt.payload, ckpt.path)]
        if ckpt.state_dict is None or opts.arch is None or not self.accepts_arch(opts.arch):
            return None
        name = timm_name(opts.arch)
        check_name(name)
        raw = ckpt.payload
        state = strip(raw, prefix_options(list(raw))[-1]) if isinstance(raw, Mapping) else None
        return [builder(name, state)]

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        model, used, box = model_from_state_dict(ckpt, opts, notes, builders=plan)
        if used.kwargs:
            notes.append(f"built {used.label()}: the position embedding sets the image size")
        return loaded(ckpt, model, box.format, used.name, box, opts, notes, self.name)

    def input_size(self, arch: str | None, model: nn.Module) -> InputSize | None:
        embed = getattr(model, "patch_embed", None)
        fixed = getattr(embed, "img_size", None)
        if embed is not None and getattr(embed, "strict_img_size", False) and fixed is not None:
            side = int(fixed[0]) if isinstance(fixed, (tuple, list)) else int(fixed)
            return InputSize(pretrained=side, minimum=side, exact=side,
                             why=f"{arch} takes {side}×{side} images only (its patch embedding fixes the size)")
        return None                    # convolutional: any size (the pretrained one is in its pretrained_cfg)

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        if loaded.container.folder is not None:
            from ftdoctor.checkpoint.folder import save_folder

            return save_folder(loaded, model, out)
        return save_state_dict(loaded.container, model, out)
