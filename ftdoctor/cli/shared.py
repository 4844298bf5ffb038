"""Every option more than one command takes, declared once, and the decorators that add them to a command.

``@model_options`` adds ``--arch --num-classes --trust-checkpoint --non-strict
--device`` and hands the command a :class:`~ftdoctor.checkpoint.ModelOptions`
as ``model_opts``; ``@data_options`` adds ``--data-root --download --split
--max-samples --batch-size --image-size --normalize --workers --text-column --label-column --image-column
--max-length --tokenizer`` and hands it a
:class:`DataFlags` as ``data_flags`` (``--data`` and ``--seed`` stay with each
command: their defaults and meanings differ).
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

MODEL_PANEL, DATA_PANEL, OUTPUT_PANEL, PROBE_PANEL = "Model", "Data", "Output", "Probes"

ModelArg = Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin/.ckpt (state dict, wrapped, "
                                                "pickled module, TorchScript), .safetensors, .onnx, or a model "
                                                "folder (Hugging Face save_pretrained, timm hub).",
                                           show_default=False)]
Arch = Annotated[Optional[str], typer.Option(
    "--arch", help="torchvision builder name (resnet18, vgg16_bn, vit_b_16, ...), timm:NAME, hf:CLASS (a "
                   "folder's transformers class) or pkg.module:callable; recognised from the state dict or the "
                   "folder's config.json when omitted.", rich_help_panel=MODEL_PANEL)]
NumClasses = Annotated[Optional[int], typer.Option(
    "--num-classes", help="Classes of the checkpoint's head (inferred from the head weight when omitted).",
    rich_help_panel=MODEL_PANEL, min=1)]
Head = Annotated[Optional[str], typer.Option(
    "--head", help="Qualified name of the head layer (default: the last affine layer run).",
    rich_help_panel=MODEL_PANEL)]
Trust = Annotated[bool, typer.Option(
    "--trust-checkpoint", help="Allow full pickled modules and TorchScript archives (runs code from the file: "
                               "only for files you trust).", rich_help_panel=MODEL_PANEL)]
NonStrict = Annotated[bool, typer.Option(
    "--non-strict", help="Load a state dict whose keys do not all match the architecture.",
    rich_help_panel=MODEL_PANEL)]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)]

DATA_HELP = ("shapes[:C], fake, textlines[:2], cifar10, cifar100, mnist, fashion-mnist, svhn, an ImageFolder directory, "
             "a .h5/.hdf5 or .npz file; text or image paths with labels: a .csv/.tsv/.jsonl/.parquet file or "
             "a datasets save_to_disk folder")
Data = Annotated[str, typer.Option("--data", help=DATA_HELP + ".", rich_help_panel=DATA_PANEL)]
DataRoot = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Where torchvision datasets live (default $FTDOCTOR_DATA or ~/.cache/ftdoctor/data).",
    rich_help_panel=DATA_PANEL)]
Download = Annotated[bool, typer.Option("--download", help="Allow torchvision to download a dataset.",
                                        rich_help_panel=DATA_PANEL)]


def choices(name: str, *values: str) -> Any:
    """A str Enum of ``values`` for a typer option with a fixed set of choices (``-`` becomes ``_`` in names)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Split = choices("Split", "train", "test")
Normalize = choices("Normalize", "imagenet", "inception", "dataset", "none")
HeadInit = choices("HeadInit", "kaiming", "torch-default", "entame")
CRMode = choices("CRMode", "exact", "batch")
CRLoss = choices("CRLoss", "random", "ce")
DType = choices("DType", "float32", "bfloat16", "float16")
Optim = choices("Optim", "adam", "sgd")
RifleInit = choices("RifleInit", "torch-default", "kaiming-normal")
Method = choices("Method", "base", "warmup", "entame", "entame-fn", "rifle", "l2sp")
Subset = choices("Subset", "stratified", "first")


SplitOpt = Annotated[str, typer.Option("--split", help="train or test; a datasets folder: any of its splits "
                                      "(validation, ...).", rich_help_panel=DATA_PANEL)]
TextColumn = Annotated[Optional[str], typer.Option(
    "--text-column", help="Table or datasets column of the text; A,B for sentence pairs (default: text, "
                          "sentence, sentence1,sentence2, premise,hypothesis, ...).", rich_help_panel=DATA_PANEL)]
LabelColumn = Annotated[Optional[str], typer.Option(
    "--label-column", help="Column of the labels: class indices or names (default: label, labels, target, ...).",
    rich_help_panel=DATA_PANEL)]
ImageColumn = Annotated[Optional[str], typer.Option(
    "--image-column", help="Column of image paths or images (default: image, img, path, file, ...).",
    rich_help_panel=DATA_PANEL)]
MaxLength = Annotated[Optional[int], typer.Option(
    "--max-length", min=1, help="Tokens per text example (default: what the model takes, at most 512).",
    rich_help_panel=DATA_PANEL)]
Tokenizer = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="Folder with the tokenizer for text data (default: the model folder's own).",
    rich_help_panel=DATA_PANEL)]
MaxSamples = Annotated[int, typer.Option("--max-samples", min=1, help="Use N examples of the split, chosen by "
                                         "--subset.", rich_help_panel=DATA_PANEL)]
SubsetOpt = Annotated[Subset, typer.Option(
    "--subset", help="How --max-samples chooses: stratified (every class in proportion, drawn with --seed) or "
                     "first (the first N in dataset order; an ImageFolder lists them class by class).",
    rich_help_panel=DATA_PANEL)]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, rich_help_panel=DATA_PANEL)]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", min=1, help="Resize images to S×S (default: the data's own size, or the "
                                                  "size the model needs: a ViT's image_size, 224 for Swin).",
                                                  rich_help_panel=DATA_PANEL)]
NormalizeOpt = Annotated[Normalize, typer.Option(
    "--normalize", help="imagenet mean/std, inception (mean 0.5, std 0.5: PP-OCR, Inception, many timm "
    "models), the data's own per-channel statistics, or none.",
    rich_help_panel=DATA_PANEL)]
Workers = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.",
                                      rich_help_panel=DATA_PANEL)]
Seed = Annotated[int, typer.Option("--seed", help="Seeds every random draw: same seed, same figures.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.",
                                     rich_help_panel=OUTPUT_PANEL)]
OutputJson = Annotated[Optional[Path], typer.Option("--output", help="Also write the JSON report to FILE.",
                                                    rich_help_panel=OUTPUT_PANEL)]
HtmlOut = Annotated[Optional[Path], typer.Option(
    "--html", help="Also write one self-contained HTML page (verdict, figures against their "
    "thresholds, findings with commands, charts; no network request): open it in a browser or keep it as a CI "
    "artifact.", rich_help_panel=OUTPUT_PANEL)]
Hdf5 = Annotated[Optional[Path], typer.Option("--hdf5", help="Write the report and its arrays (G², per-batch "
                                              "norms, per-channel R²) to an HDF5 file.",
                                              rich_help_panel=OUTPUT_PANEL)]


def csv(value: str | None) -> tuple[str, ...] | None:
    """``a,b`` -> ``("a", "b")``."""
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class DataFlags:
    """The data options shared by every command with data, but ``--data`` and ``--seed``."""

    data_root: Path | None = None
    download: bool = False
    split: str = "train"
    max_samples: int = 1024
    subset: Subset = Subset.stratified
    batch_size: int = 64
    image_size: int | None = None
    normalize: Normalize = Normalize.imagenet
    workers: int = 0
    text_column: str | None = None
    label_column: str | None = None
    image_column: str | None = None
    max_length: int | None = None
    tokenizer: Path | None = None

    def options(self, data: str, seed: int) -> Any:
        from ftdoctor.data import DataOptions
        return DataOptions(data=data, data_root=str(self.data_root) if self.data_root else None,
                           download=self.download, split=self.split, max_samples=self.max_samples,
                           subset=self.subset.value, batch_size=self.batch_size, image_size=self.image_size,
                           normalize=self.normalize.value, workers=self.workers, seed=seed,
                           text_column=self.text_column, label_column=self.label_column,
                           image_column=self.image_column, max_length=self.max_length,
                           tokenizer=str(self.tokenizer) if self.tokenizer else None)


def _build_model(**kw: Any) -> Any:
    from ftdoctor.checkpoint import ModelOptions
    return ModelOptions(arch=kw["arch"], num_classes=kw["num_classes"], trust_checkpoint=kw["trust_checkpoint"],
                        non_strict=kw["non_strict"], device=kw["device"])


_MODEL = ("model_opts", _build_model, [("arch", Arch, None), ("num_classes", NumClasses, None),
                                       ("trust_checkpoint", Trust, False), ("non_strict", NonStrict, False),
                                       ("device", Device, "cpu")])
_DATA = ("data_flags", lambda **kw: DataFlags(**kw),
         [("data_root", DataRoot, None), ("download", Download, False), ("split", SplitOpt, "train"),
          ("max_samples", MaxSamples, 1024), ("subset", SubsetOpt, Subset.stratified),
          ("batch_size", BatchSize, 64), ("image_size", ImageSize, None),
          ("normalize", NormalizeOpt, Normalize.imagenet), ("workers", Workers, 0),
          ("text_column", TextColumn, None), ("label_column", LabelColumn, None),
          ("image_column", ImageColumn, None), ("max_length", MaxLength, None), ("tokenizer", Tokenizer, None)])


def _injecting(group: tuple[str, Callable[..., Any], list[tuple[str, Any, Any]]]) -> Callable:
    target, build, params = group

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in sig.parameters.values() if p.name != target]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for name, annotation, default in params]
        names = [name for name, _, _ in params]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            kwargs[target] = build(**{n: kwargs.pop(n) for n in names})
            return fn(**kwargs)

        parameters = own + added
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper
    return decorate


model_options = _injecting(_MODEL)
data_options = _injecting(_DATA)
