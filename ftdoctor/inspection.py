"""``ftdoctor inspect``: what a checkpoint holds, without data."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ftdoctor import checkpoint as ckpt
from ftdoctor.session import count_params, model_info, open_session

SCHEMA = "ftdoctor.inspect/1"


@dataclass
class Inspection:
    model: dict[str, Any]
    layers: list[dict[str, Any]]
    order: str                                   # "forward" or "registration"
    notes: list[str] = field(default_factory=list)
    #: what the pickle scan found in the file (ftdoctor.checkpoint.pickle_scan.PickleScan)
    pickle_scan: Any = None
    kind: ClassVar[str] = "inspect"

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "model": self.model, "layers": self.layers,
                "pickle_scan": self.pickle_scan.to_json() if self.pickle_scan is not None else None}


def inspect(path: str | Path, model: ckpt.ModelOptions | None = None, *, head: str | None = None,
            image_size: int | None = None, output: str | Path | None = None) -> Inspection:
    """Affine layers (forward order when a dummy input runs), head, classes, parameters, finiteness; with
    ``output`` the JSON document written there (never over the checkpoint)."""
    from ftdoctor.outputs import Output, journal
    from ftdoctor.report import get as get_format, load_formats

    with journal([Output(Path(output), "--output")] if output is not None else [], (path,)):
        result = _inspect(path, model, head=head, image_size=image_size)
        if output is not None:
            load_formats()
            get_format("json", "inspect").write(result, Path(output))
    return result


def _inspect(path: str | Path, model: ckpt.ModelOptions | None = None, *, head: str | None = None,
             image_size: int | None = None) -> Inspection:
    session = open_session(path, model or ckpt.ModelOptions(), head=head, image_size=image_size)
    loaded, layers, order, head_layer = session.loaded, session.layers, session.order, session.head
    rows = [{"name": l.name, "kind": l.kind, "shape": list(l.weight.shape),
             "params": int(l.weight.numel() + (l.bias.numel() if l.bias is not None else 0)),
             "finite": bool(torch.isfinite(l.weight).all()) and
             (l.bias is None or bool(torch.isfinite(l.bias).all()))} for l in layers]
    notes = list(loaded.notes)
    if order != "forward":
        notes.append("layers listed in registration order (no dummy input ran through the model; "
                     "pass --image-size)")
    info = model_info(loaded, head_layer)
    info["num_params"] = count_params(loaded.model)
    return Inspection(model=info, layers=rows, order=order, notes=notes, pickle_scan=loaded.scan)
