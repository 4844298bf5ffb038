"""``load_model``: read a checkpoint (:mod:`.reading`), let the first model source that recognises it build
it (:mod:`.sources`), move it to the device in ``eval()`` mode."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftdoctor.checkpoint.common import LoadedModel, ModelOptions
from ftdoctor.checkpoint.reading import read_checkpoint
from ftdoctor.checkpoint.sources import on_device, ordered_sources
from ftdoctor.errors import FtdoctorError


def load_model(path: str | Path, opts: ModelOptions = ModelOptions(), scan: Any = None) -> LoadedModel:
    """Read a checkpoint of any supported format into an ``eval()`` model on ``opts.device``.

    Every unusable input raises :class:`FtdoctorError` (cause + remedy); a checkpoint whose pickles name a
    global that can act is one, unless ``opts.trust_checkpoint``. ``scan``: its
    :class:`~.pickle_scan.PickleScan`, when the caller made it already (and admitted it).
    """
    path = Path(path)
    device = parse_device(opts.device)
    if opts.num_classes is not None and opts.num_classes < 1:
        raise FtdoctorError(f"--num-classes {opts.num_classes} is not a class count", "give a positive integer")
    ckpt = read_checkpoint(path, opts, scan=scan)
    for source in ordered_sources():
        plan = source.recognise(ckpt, opts)
        if plan is not None:
            return on_device(source.build(ckpt, opts, plan, ckpt.notes), device)
    from ftdoctor.checkpoint.torchvision import unknown_arch
    raise unknown_arch(opts.arch or "")   # pragma: no cover - torchvision recognises every state dict


def check_arch(arch: str) -> None:
    """``--arch``: a name some model source accepts (else the closest torchvision names), usable as given."""
    for source in ordered_sources():
        if source.accepts_arch(arch):
            source.check_arch(arch)
            return
    from ftdoctor.checkpoint.torchvision import unknown_arch
    raise unknown_arch(arch)


def validate_options(opts: ModelOptions) -> None:
    """Check ``--arch``, ``--device`` and ``--num-classes`` without reading any file (bad usage: FtdoctorError)."""
    parse_device(opts.device)
    if opts.num_classes is not None and opts.num_classes < 1:
        raise FtdoctorError(f"--num-classes {opts.num_classes} is not a class count", "give a positive integer")
    if opts.arch is not None:
        check_arch(opts.arch)


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise FtdoctorError(f"unknown device {name!r}", "use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise FtdoctorError(f"ftdoctor cannot run on the {device.type} device (--device {name})",
                            "use --device cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise FtdoctorError(
                f"device {name} is not available ({count} CUDA device(s) found)", "use --device cpu"
            )
    return device
