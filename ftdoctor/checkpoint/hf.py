"""Hugging Face transformers classifiers: a ``save_pretrained`` folder (the ``ftdoctor[hf]`` extra).

The folder (:mod:`.folder`: ``config.json`` and ``model.safetensors``, shards or ``pytorch_model.bin``) is
built offline: the config class of its ``model_type`` reads ``config.json``, the model class is its
``architectures[0]`` (or ``--arch hf:CLASS``) — a class of the ``transformers`` package, never code from
the folder (``auto_map`` is refused) — and the weights, read by ftdoctor's bounded ``weights_only`` reader,
are loaded by the library's own loader (``from_pretrained(None, config=..., state_dict=...)``), so its key
renames apply and no file is fetched. Every ``*ForImageClassification`` and ``*ForSequenceClassification``
works; the forward seam (:mod:`ftdoctor.forward`) takes the output's ``.logits``.

Written back as a folder of the same layout (:func:`~.folder.write_folder`); a new head's class count goes
into ``config.json`` (``id2label``, ``label2id``, ``num_labels``) so ``from_pretrained`` loads the result.
"""
from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ftdoctor.checkpoint.common import Container, LoadedModel, ModelOptions, _listing, _quiet, _short
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import InputSize, ModelSource, loaded, register_model_source
from ftdoctor.errors import FtdoctorError

PREFIX = "hf:"
INSTALL = "pip install 'ftdoctor[hf]'"
#: the model classes ftdoctor diagnoses: their output's ``.logits`` are class scores
TASKS = ("ForImageClassification", "ForSequenceClassification")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise FtdoctorError("a Hugging Face model folder needs the transformers package, which is not installed",
                            f"install it: {INSTALL}") from None
    return transformers


@contextlib.contextmanager
def _silent() -> Iterator[None]:
    """No progress bars or loading chatter from the library on ftdoctor's output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with _quiet():
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def model_class(name: str) -> type:
    """The ``transformers`` class ``name`` (a ``PreTrainedModel`` classifier); FtdoctorError naming close ones."""
    transformers = _transformers()
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        known = [n for n in dir(transformers) if n.endswith(TASKS)]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        raise FtdoctorError(f"transformers {transformers.__version__} has no model class {name!r}",
                            f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else
                            "pass --arch hf:CLASS with a *ForImageClassification or *ForSequenceClassification class")
    if not name.endswith(TASKS):
        raise FtdoctorError(f"{name} is not a classifier (ftdoctor diagnoses *ForImageClassification and "
                            "*ForSequenceClassification models)",
                            f"pass --arch hf:{name.split('For')[0].removesuffix('Model')}ForSequenceClassification "
                            "(or ...ForImageClassification) to build it with a classification head, with --new-head")
    return cls


def config_for(config: dict[str, Any], path: Path) -> Any:
    """The library's config object of ``config`` (a parsed ``config.json``), without running anything."""
    transformers = _transformers()
    if config.get("auto_map"):
        raise FtdoctorError(f"{path} needs code from the folder (config.json has auto_map), which ftdoctor "
                            "does not run", "load the model in Python and pass it to ftdoctor's library API, or "
                                            "save its state dict and pass --arch pkg.module:callable")
    args = config.get("model_args")
    if isinstance(args, dict):          # TimmWrapper: timm's create_model arguments
        from ftdoctor.checkpoint.timm import refuse_loading_args

        refuse_loading_args(args, path)
    labels = config.get("num_labels")
    if labels is not None:
        from ftdoctor.safety import MAX_CLASSES

        if isinstance(labels, bool) or not isinstance(labels, int) or not 1 <= labels <= MAX_CLASSES:
            raise FtdoctorError(f"{path}/config.json: num_labels {labels!r} is not a class count (1 … {MAX_CLASSES:,})",
                                "fix num_labels in config.json (or drop it: id2label gives the labels)")
    model_type = config.get("model_type")
    mapping = transformers.CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in mapping:
        raise FtdoctorError(f"{path}: transformers {transformers.__version__} does not know the model type "
                            f"{model_type!r}", "upgrade transformers, or check config.json's model_type")
    try:
        with _silent():
            return mapping[model_type].from_dict(dict(config))
    except Exception as exc:  # noqa: BLE001 - a config the library refuses
        raise FtdoctorError(f"{path}/config.json is not a valid {model_type} config: {_short(exc)}",
                            "re-create the folder with save_pretrained") from None


@register_model_source(name="hf", priority=30)
class HuggingFaceSource(ModelSource):
    """A Hugging Face ``save_pretrained`` folder of a ``*ForImageClassification`` or
    ``*ForSequenceClassification`` model (``--arch hf:CLASS`` names the class when config.json does not)."""

    def accepts_arch(self, arch: str) -> bool:
        return arch.startswith(PREFIX)

    def check_arch(self, arch: str) -> None:
        model_class(arch[len(PREFIX):].strip())

    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        found = ckpt.container.folder
        if found is None or found.kind != "hf":
            if opts.arch is not None and self.accepts_arch(opts.arch):
                raise FtdoctorError(f"--arch {opts.arch} builds a Hugging Face model from its folder, but "
                                    f"{ckpt.path} is not one", "pass the folder save_pretrained wrote "
                                                               "(config.json beside the weights)")
            return None
        if opts.arch is not None and self.accepts_arch(opts.arch):
            return opts.arch[len(PREFIX):].strip()
        names = found.config.get("architectures")
        if not isinstance(names, list) or not names or not isinstance(names[0], str):
            raise FtdoctorError(f"{ckpt.path}/config.json names no model class (no architectures)",
                                "pass --arch hf:CLASS, e.g. hf:BertForSequenceClassification")
        return names[0]

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        from ftdoctor.featurenorm import attach_feature_norms, is_feature_norm_key

        found = ckpt.container.folder
        config = config_for(dict(found.config), ckpt.path)
        cls = model_class(plan)
        state = {k: v for k, v in ckpt.payload.items() if not is_feature_norm_key(k)}
        from ftdoctor.checkpoint.builders import Bound, check_size

        with _silent():      # a config far larger than its weights is refused on meta, before any allocation
            check_size(lambda: cls(config), Bound.of(state, f"{ckpt.path}/config.json"))
        try:
            with _silent():
                model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                                  local_files_only=True, output_loading_info=True,
                                                  ignore_mismatched_sizes=True)   # listed, then judged below
        except FtdoctorError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the library raises on weights that do not fit
            raise FtdoctorError(f"the weights in {ckpt.path} do not load into {plan}: {_short(exc)}",
                                "check that config.json belongs to these weights") from None
        _loading_info(info, ckpt.path, plan, opts.non_strict, notes)
        extra = {k: v for k, v in ckpt.payload.items() if is_feature_norm_key(k)}
        if extra:
            notes.extend(attach_feature_norms(model, extra))
            model.load_state_dict(extra, strict=False)
        model = model.float()
        notes.append(f"built {plan} from {found.describe()} (transformers, offline)")
        box = Container(found.format, dtypes={k: v.dtype for k, v in ckpt.payload.items()}, folder=found)
        return loaded(ckpt, model, found.format, PREFIX + plan, box, opts, notes, self.name)

    def input_size(self, arch: str | None, model: nn.Module) -> InputSize | None:
        config = getattr(model, "config", None)
        side, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
        if isinstance(side, (list, tuple)):
            side = side[0]
        if isinstance(side, int) and patch is not None:
            name = arch[len(PREFIX):] if arch else "the model"
            return InputSize(pretrained=side, minimum=side, exact=side,
                             why=f"{name} takes {side}×{side} images only (config.json's image_size)")
        return None

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        from ftdoctor.checkpoint.folder import write_folder

        found = loaded.container.folder
        return write_folder(found, loaded.path, file_state(model, loaded.container), found.config, out)


def file_state(model: nn.Module, box: Container) -> dict[str, torch.Tensor]:
    """The model's tensors as ``save_pretrained`` stores them — ignored keys dropped, tied weights once, the
    library's renames reverted to the checkpoint's own key names — in the file's order and dtypes."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict, revert_weight_conversion

        with _silent():
            state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))
    except ImportError:     # an older transformers: its model keys are its file keys
        pass
    order = [k for k in box.dtypes if k in state] + [k for k in state if k not in box.dtypes]
    out = {}
    for key in order:
        tensor = state[key].detach().cpu()
        stored = box.dtypes.get(key)
        if stored is not None and tensor.dtype != stored and tensor.is_floating_point() == stored.is_floating_point:
            tensor = tensor.to(stored)
        out[key] = tensor
    return out


def _loading_info(info: dict[str, Any], path: Path, cls: str, non_strict: bool, notes: list[str]) -> None:
    """Missing, unexpected or mismatched weights: an error (strict) or notes (``--non-strict``)."""
    parts = []
    for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                       ("with another shape", "mismatched_keys")):
        items = [k if isinstance(k, str) else str(k[0]) for k in (info.get(key) or [])]
        if items:
            parts.append(f"{len(items)} {label} ({_listing(sorted(items))})")
    if not parts:
        return
    if not non_strict:
        raise FtdoctorError(f"the weights in {path} do not fit {cls}: " + "; ".join(parts),
                            "check config.json against the weights (or pass --non-strict to start what does "
                            "not fit from the library's initialisation)")
    notes.append("--non-strict: " + "; ".join(parts) + " (left at the library's initialisation)")
