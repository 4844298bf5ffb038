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

import contextlib
import difflib
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ftdoctor.checkpoint.builders import Builder, Signature, comparable, signature_for
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


#: create_model's own arguments: they load, fetch or wrap weights rather than describe the architecture
_CREATE_MODEL_ARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                "cache_dir", "features_only", "scriptable", "exportable", "no_jit", "model_name"})


def refuse_loading_args(args: Mapping[str, Any], path: Path) -> None:
    """FtdoctorError when a folder's ``model_args`` set create_model's own arguments: they steer downloads and
    file reads, not the architecture (timm folders and Hugging Face ``timm_wrapper`` folders alike)."""
    control = sorted(set(args) & _CREATE_MODEL_ARGS)
    if control:
        raise FtdoctorError(f"{path}/config.json: model_args sets {', '.join(control)}, which would make timm "
                            "fetch or read weights itself", "remove them from model_args: ftdoctor reads the "
                                                            "folder's own weights")


def folder_builder(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Path) -> Builder:
    """The builder of a timm hub folder: ``architecture`` with its ``model_args`` (``num_classes`` comes from
    the head, like any state dict)."""
    name = str(config["architecture"])
    check_name(name)
    args = config.get("model_args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise FtdoctorError(f"{path}/config.json: model_args is not a mapping of argument names",
                            "re-create the folder with timm's save_for_hf / push_to_hub")
    refuse_loading_args(args, path)
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
        if "img_size" in dict(used.kwargs):
            notes.append(f"img_size={dict(used.kwargs)['img_size']}: the position embedding sets the image size")
        if box.folder is not None:
            notes.append(f"built {used.label()} from {box.folder.describe()} (timm, offline)")
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


# -- recognising a bare timm state dict -----------------------------------------------------------------
def candidate_families(keys: set[str]) -> dict[str, list[str]]:
    """timm's model names whose pretrained config names a first convolution and a classifier that ``keys``
    hold, grouped by the module that defines them (``convnext``, ``resnet``, ...) — without building any."""
    timm = _timm()
    from timm.models import get_pretrained_cfg
    from timm.models._registry import _model_to_module

    def names(value: Any) -> list[str]:
        return [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]

    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        cfg = get_pretrained_cfg(name)
        if cfg is None:
            continue
        first, head = names(cfg.first_conv), names(cfg.classifier)
        if first and head and all(f + ".weight" in keys for f in first) and all(h + ".weight" in keys for h in head):
            families.setdefault(str(_model_to_module.get(name, name)), []).append(name)
    return families


class SignatureCache:
    """timm models' state-dict signatures (key -> shape, head), built on ``meta`` once and kept in
    ``$FTDOCTOR_CACHE`` (default ``~/.cache/ftdoctor``) per timm version: a family's first recognition builds
    its members, later ones read them. The file only steers recognition; the weights must still load strictly."""

    MAX_BYTES = 64 * 2**20

    def __init__(self, version: str) -> None:
        root = os.environ.get("FTDOCTOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ftdoctor")
        self.path = Path(root) / f"timm-{version}-signatures.json"
        self.entries: dict[str, Any] = {}
        self.changed = False
        try:
            if 0 < self.path.stat().st_size <= self.MAX_BYTES:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self.entries = loaded
        except (OSError, ValueError):
            pass

    def signature(self, name: str) -> Signature | None:
        entry = self.entries.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("shapes"), dict):
            try:
                return Signature({k: tuple(int(s) for s in v) for k, v in entry["shapes"].items()},
                                 entry.get("head") if isinstance(entry.get("head"), str) else None)
            except (TypeError, ValueError):
                pass
        sig = signature_for(Builder(PREFIX + name, functools.partial(_timm().create_model, name, pretrained=False),
                                    torchvision=False))
        self.entries[name] = None if sig is None else {"shapes": {k: list(v) for k, v in sig.shapes.items()},
                                                       "head": sig.head}
        self.changed = True
        return sig

    def save(self) -> None:
        if not self.changed:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)


def match_timm(path: Path, state: Mapping[str, torch.Tensor]) -> Builder:
    """The timm model whose keys and shapes fit ``state`` (the head's class count and a ViT's image size
    aside). Families are those whose pretrained config names a first convolution and a classifier the state
    dict holds (:func:`candidate_families`); a family is expanded only when its smallest member has the same
    top-level modules, and its members' signatures are cached (:class:`SignatureCache`)."""
    from ftdoctor import progress

    keys = comparable(state)
    top = {k.split(".", 1)[0] for k in keys}
    families = candidate_families(set(state))
    cache = SignatureCache(_timm().__version__)
    fits: list[str] = []
    exact: list[bool] = []
    tried: list[tuple[float, str]] = []
    with progress.task("recognising the timm model", total=sum(map(len, families.values())),
                       unit="models") as bar:
        for members in families.values():
            rep = cache.signature(min(members, key=lambda n: (len(n), n)))
            if rep is None or {k.split(".", 1)[0] for k in rep.comparable()} != top:
                bar.advance(len(members))
                continue
            for name in members:
                sig = cache.signature(name)
                bar.advance(1)
                if sig is None:
                    continue
                theirs = sig.comparable()
                tried.append((len(keys & theirs) / max(1, len(keys | theirs)), name))
                if theirs != keys:
                    continue
                free = {f"{sig.head}.weight", f"{sig.head}.bias", "pos_embed"}
                if all(tuple(state[k].shape) == sig.shapes[k] for k in keys if k not in free):
                    fits.append(name)
                    exact.append("pos_embed" not in keys or tuple(state["pos_embed"].shape) == sig.shapes["pos_embed"])
    cache.save()
    if any(exact):           # a ViT trained at its default size: the names of other sizes drop out
        fits = [n for n, e in zip(fits, exact) if e]
    if len(fits) == 1:
        return builder(fits[0], state)
    if fits:
        raise FtdoctorError(f"the state dict in {path} fits several timm models: "
                            f"{', '.join(PREFIX + n for n in fits[:5])}", "pass --arch with the one it was trained as")
    closest = ", ".join(f"{PREFIX}{n} ({share:.0%} of keys in common)" for share, n in sorted(tried)[::-1][:2])
    raise NoTimmMatch(f"the state dict in {path} ({len(state)} tensors) matches no timm classification model",
                      "pass --arch NAME (torchvision), --arch timm:NAME, or --arch pkg.module:callable for your "
                      "own model class", closest)


class NoTimmMatch(FtdoctorError):
    """No timm model fits the state dict; ``closest`` names the nearest ones tried."""

    def __init__(self, cause: str, remedy: str, closest: str = "") -> None:
        super().__init__(cause, remedy)
        self.closest = closest
