"""The one pipeline every command opens a model with: checkpoint, data, layers, head, new head, reference.

:func:`open_session` is used by ``probe``, ``fix``, ``trace``, ``compare``,
``inspect`` (and so ``demo``); ``check`` calls its steps one by one, since a
checkpoint's problem there is a failed check rather than an error:

1. :func:`~ftdoctor.checkpoint.load_model` — the checkpoint through its model source;
2. :func:`open_data` — ``--data`` adapted to the model's input channels;
3. :func:`find_layers` — the affine layers in forward order, from two examples run through
   :func:`ftdoctor.forward.logits` (registration order without data, or for TorchScript);
4. :func:`~ftdoctor.model.find_head` — the last of them, or ``--head``;
5. :func:`install_new_head` with ``--new-head`` (a fresh head for the data's classes), else the head must
   already have one output per class;
6. :func:`load_reference` — the pretrained model, same architecture, for ``r2`` and ``drift``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ftdoctor import forward
from ftdoctor.errors import FtdoctorError
from ftdoctor.model import AffineLayer, find_head, is_scripted, layer_order, new_head_like, registered_affine_layers, \
    set_module

if TYPE_CHECKING:
    from ftdoctor.checkpoint import LoadedModel, ModelOptions
    from ftdoctor.checkpoint.sources import InputSize
    from ftdoctor.data import DataBundle, DataOptions


@dataclass
class Session:
    """An opened model, ready for a command: where it came from, its data, layers and head."""

    loaded: "LoadedModel"
    data: "DataBundle | None"
    layers: list[AffineLayer]
    order: str                              # "forward" or "registration"
    head: AffineLayer
    device: torch.device
    reference: nn.Module | None = None
    outputs_before: int | None = None       # the head's outputs before --new-head replaced it
    replaced: nn.Module | None = None       # the head module --new-head replaced
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model


def open_session(model_path: str | Path, model_opts: "ModelOptions", data_opts: "DataOptions | None" = None, *,
                 head: str | None = None, new_head: str | None = None, seed: int = 0,
                 reference: str | Path | None = None, image_size: int | None = None) -> Session:
    """Steps 1–6 of the module doc. ``new_head`` is the initialisation of a fresh head (``kaiming``,
    ``torch-default``, ``entame``) or None to keep the checkpoint's, which must then fit the data."""
    from ftdoctor.checkpoint import load_model

    loaded = load_model(model_path, model_opts)
    notes = list(loaded.notes)
    device = torch.device(model_opts.device)
    bundle = None
    if data_opts is not None:
        bundle = open_data(loaded, data_opts, model_input_size(loaded))
        notes.extend(bundle.notes)
    layers, order = find_layers(loaded.model, bundle, device=device, image_size=image_size)
    session = Session(loaded, bundle, layers, order, find_head(layers, head), device, notes=notes)
    if bundle is not None:
        outputs = int(session.head.weight.shape[0])
        if new_head is not None:
            session.replaced, session.outputs_before = session.head.module, outputs
            use_new_head(session, install_new_head(loaded.model, session.head, bundle.num_classes, new_head, seed))
        elif outputs != bundle.num_classes:
            raise FtdoctorError(
                f"the head {session.head.name} has {outputs} outputs but the data has {bundle.num_classes} classes",
                "pass --new-head to attach a fresh head for the data's classes")
    if reference is not None:
        session.reference = load_reference(reference, loaded, model_opts)
    return session


def open_data(loaded: "LoadedModel", opts: "DataOptions", size: "InputSize | None" = None) -> "DataBundle":
    """``--data`` loaded for the model: grey and RGB adapted to its first convolution's input channels; resized
    to the size the model needs (``size``, :func:`model_input_size`) when the data's own does not fit it and
    ``--image-size`` is not given (a given one that does not fit is an error that says why). Text is
    tokenised with the model folder's tokenizer (:mod:`ftdoctor.data.text`), string labels mapped by its
    ``label2id`` where they are its labels; a text classifier needs text data."""
    from ftdoctor.data import load_data

    from ftdoctor.data.bundle import WrongInputKind

    model = loaded.model
    channels = first_in_channels(model)
    try:
        bundle = load_data(replace(opts, **text_context(loaded),
                                   **({"in_channels": channels} if channels and opts.in_channels is None else {})))
    except WrongInputKind as exc:
        raise ModelCannotTakeData(exc.cause, exc.remedy) from None
    if bundle.num_samples == 0:
        raise FtdoctorError("the dataset is empty", "check --data, --split and --max-samples")
    takes_text = takes_text_input(loaded)
    if takes_text is not None and takes_text != (bundle.kind == "text"):
        raise ModelCannotTakeData(
            f"{loaded.path} is a {'text' if takes_text else 'image'} classifier, but --data {opts.data} holds "
            f"{bundle.kind}s", "pass a CSV, TSV, JSONL, parquet file or datasets folder with a text column"
            if takes_text else "pass images for an image model (a text model is a Hugging Face "
                               "*ForSequenceClassification folder)")
    if bundle.kind == "text":
        return bundle
    height, width = bundle.image_shape[1:]
    if size is not None and not size.fits(height, width):
        if opts.image_size is not None:
            fits = (f"--image-size {size.exact}" if size.exact is not None
                    else f"--image-size {size.pretrained} (or at least {size.minimum})")
            raise InputSizeError(f"{size.why}, but --image-size {opts.image_size} gives {height}×{width} images",
                                f"drop --image-size (ftdoctor then resizes to {size.pretrained}×{size.pretrained}) "
                                f"or pass {fits}")
        bundle.resize(size.pretrained)
        bundle.notes.append(f"images resized from {height}×{width} to {size.pretrained}×{size.pretrained}: "
                            f"{size.why}; --image-size chooses another size")
    return bundle


def text_context(loaded: "LoadedModel") -> dict[str, Any]:
    """What tokenising text for this model needs from it: its folder (the tokenizer), its label names,
    its longest input."""
    from ftdoctor.checkpoint.folder import folder_of

    folder = folder_of(loaded.path)
    config = getattr(loaded.model, "config", None)
    names = getattr(config, "id2label", None)
    labels = None
    if isinstance(names, dict) and names and not all(str(v).startswith("LABEL_") for v in names.values()):
        labels = tuple(str(names[i]) for i in sorted(names))
    longest = getattr(config, "max_position_embeddings", None)
    return {"model_folder": str(folder) if folder is not None else None, "class_names": labels,
            "model_max_length": longest if isinstance(longest, int) else None,
            "model_takes_text": takes_text_input(loaded)}


def takes_text_input(loaded: "LoadedModel") -> bool | None:
    """Whether the model classifies text (token ids: a Hugging Face sequence classifier) or images (a
    Hugging Face image classifier, torchvision, timm); None when its source cannot tell (your own class,
    a pickled module: text then needs ``--tokenizer``)."""
    arch = str(loaded.arch or "")
    if arch.startswith("hf:"):
        return arch.endswith("ForSequenceClassification")
    return False if loaded.source in ("torchvision", "timm") else None


class ModelCannotTakeData(FtdoctorError):
    """The model cannot take this data (text for an image model, images for a text model, a size it does not
    run at): the checkpoint's failure in ``check``, not the data's."""


class InputSizeError(ModelCannotTakeData):
    """``--image-size`` gives images the model cannot take."""


def model_input_size(loaded: "LoadedModel") -> "InputSize | None":
    """The image size the loaded model needs (its model source's rule; else an ``image_size`` attribute
    as torchvision's VisionTransformer has, which is exact), or None when any size will do."""
    from ftdoctor.checkpoint.sources import InputSize, input_size

    size = input_size(loaded)
    exact = getattr(loaded.model, "image_size", None)
    if size is None and isinstance(exact, int) and not isinstance(exact, bool):
        size = InputSize(pretrained=exact, exact=exact,
                         why=f"the model takes {exact}×{exact} images only (its image_size)")
    return size


def first_in_channels(model: nn.Module) -> int | None:
    layers = registered_affine_layers(model)
    if not layers or not layers[0].kind.startswith("Conv"):
        return None
    m = layers[0].module
    return int(m.weight.shape[1] * getattr(m, "groups", 1))


def example_inputs(bundle: "DataBundle", n: int = 2) -> Any:
    """The first ``n`` examples' inputs, batched (read directly, without a DataLoader)."""
    return forward.stack([bundle.dataset[i][0] for i in range(min(n, bundle.num_samples))])


def find_layers(model: nn.Module, bundle: "DataBundle | None" = None, *, device: torch.device | str = "cpu",
                image_size: int | None = None) -> tuple[list[AffineLayer], str]:
    """Affine layers in forward order from two examples of ``bundle`` (or dummy inputs of ``image_size``);
    a model that cannot run on the data is one FtdoctorError, whatever the model raised."""
    if bundle is None:
        return layer_order(model, image_size=image_size)
    try:
        return layer_order(model, forward.to_device(example_inputs(bundle), device))
    except FtdoctorError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the model's forward raises on this data
        raise cannot_run(exc) from None


def cannot_run(exc: BaseException) -> FtdoctorError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return FtdoctorError(f"the model cannot run on this data: {first}",
                         "check --image-size, the input channels and the architecture")


def install_new_head(model: nn.Module, head: AffineLayer, num_classes: int, method: str, seed: int) -> AffineLayer:
    """Replace the head by a fresh layer for ``num_classes``, initialised ``method``'s way as seed 0 of a
    ``--seeds`` run (:func:`ftdoctor.heads.seed_head_params`)."""
    from ftdoctor.heads import seed_head_params

    if is_scripted(model):
        raise FtdoctorError("--new-head cannot replace the head of a TorchScript model",
                            "probe the eager checkpoint (state dict) with --arch instead")
    new = new_head_like(head.module, num_classes)
    w, b = seed_head_params(new.weight.shape, new.bias is not None, method, seed, 0)
    with torch.no_grad():
        new.weight.copy_(w.to(new.weight))
        if new.bias is not None and b is not None:
            new.bias.copy_(b.to(new.bias))
    set_module(model, head.name, new)
    return AffineLayer(head.name, new)


def use_new_head(session: Session, head: AffineLayer) -> None:
    session.head = head
    session.layers = with_head(session.layers, head)


def with_head(layers: Sequence[AffineLayer], head: AffineLayer) -> list[AffineLayer]:
    return [head if layer.name == head.name else layer for layer in layers]


def load_reference(path: str | Path, loaded: "LoadedModel", model_opts: "ModelOptions") -> nn.Module:
    """The pretrained model for ``r2``/``drift``: a state dict is read as the model's own architecture."""
    from ftdoctor.checkpoint import ModelOptions, load_model

    arch = loaded.arch if loaded.format in ("state_dict", "safetensors") else model_opts.arch
    return load_model(path, ModelOptions(arch=arch, trust_checkpoint=model_opts.trust_checkpoint,
                                         non_strict=model_opts.non_strict, device=model_opts.device)).model


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def model_info(loaded: "LoadedModel", head: AffineLayer | None) -> dict[str, Any]:
    """The ``model`` block of every report (SPEC §3)."""
    return {"path": str(loaded.path), "sha256": loaded.sha256, "format": loaded.format, "arch": loaded.arch,
            "num_params": count_params(loaded.model), "head": head.name if head else None,
            "num_classes": int(head.weight.shape[0]) if head is not None else loaded.num_classes}
