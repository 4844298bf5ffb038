"""``ftdoctor.probe``: load a checkpoint and a dataset, run the probes in one pass, report.

:func:`probe` is the library call behind ``ftdoctor probe``; :func:`probe_model`
does the same on an in-memory model (the fixes verify themselves with it).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

import ftdoctor
from ftdoctor import distributed, forward
from ftdoctor.engine import PassSettings, run_pass
from ftdoctor.errors import FtdoctorError
from ftdoctor.heads import HEAD_INITS
from ftdoctor.model import AffineLayer, find_head, is_affine, is_scripted, layer_order, measured_layers
from ftdoctor.session import count_params, first_in_channels, install_new_head, model_info  # noqa: F401 (API)
from ftdoctor.probes import PROBES, Finding, Probe, ProbeContext, ProbeResult, Skipped
from ftdoctor.probes.verdicts import PLACEHOLDERS, RunArgs, Suggestion
from ftdoctor.thresholds import Thresholds

if TYPE_CHECKING:
    from ftdoctor import checkpoint as ckpt
    from ftdoctor.data import DataBundle, DataOptions

SCHEMA = "ftdoctor.report/1"


#: ``--dtype``: the precision of the model's forward and backward (under ``torch.autocast``; float32: none)
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ProbeOptions:
    """Every option of ``ftdoctor probe`` that changes a figure (SPEC §3)."""

    probes: tuple[str, ...] | None = None      # None: all that apply
    head: str | None = None
    new_head: bool = False
    head_init: str = "kaiming"
    seeds: int = 1
    change_rate_mode: str = "exact"
    change_rate_loss: str = "random"
    r2_layers: tuple[str, ...] | None = None
    seed: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)
    dtype: str = "float32"                      # float32 | bfloat16 | float16: the forward under autocast

    def validate(self, have_reference: bool) -> tuple[str, ...]:
        """The probes to run, or an FtdoctorError for a contradictory request."""
        if self.change_rate_mode not in ("exact", "batch"):
            raise FtdoctorError(f"unknown --change-rate-mode {self.change_rate_mode!r}", "use exact or batch")
        if self.change_rate_loss not in ("random", "ce"):
            raise FtdoctorError(f"unknown --change-rate-loss {self.change_rate_loss!r}", "use random or ce")
        if self.change_rate_mode == "batch" and self.change_rate_loss == "ce":
            raise FtdoctorError(
                "--change-rate-mode batch cannot use --change-rate-loss ce: with labels the cross terms "
                "of the batch gradient do not vanish",
                "use --change-rate-mode exact with ce, or the random loss with batch mode")
        if self.dtype not in DTYPES:
            raise FtdoctorError(f"unknown --dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.head_init not in HEAD_INITS:
            raise FtdoctorError(f"unknown --head-init {self.head_init!r}", f"use one of {', '.join(HEAD_INITS)}")
        if self.seeds < 1:
            raise FtdoctorError(f"--seeds must be at least 1, got {self.seeds}", "pass --seeds K with K >= 1")
        if self.seeds > 1 and not self.new_head:
            raise FtdoctorError("--seeds K repeats the measurement over K fresh heads, so it needs --new-head",
                                "add --new-head (the ENTAME Table 1 setting)")
        if self.probes is None:
            names = tuple(n for n in PROBES.names() if have_reference or not PROBES[n].needs_reference)
        else:
            unknown = [n for n in self.probes if n not in PROBES]
            if unknown:
                raise FtdoctorError(f"unknown probe(s) {', '.join(unknown)}",
                                    f"choose from {', '.join(PROBES.names())}")
            names = tuple(n for n in PROBES.names() if n in self.probes)
            missing_ref = [n for n in names if PROBES[n].needs_reference and not have_reference]
            if missing_ref:
                raise FtdoctorError(f"the {', '.join(missing_ref)} probe(s) compare against the pretrained model",
                                    "pass --reference PRETRAINED.pt (same architecture)")
        if not names:
            raise FtdoctorError("no probe selected", f"pass --probes with some of {', '.join(PROBES.names())}")
        return names


@dataclass
class ProbeRun:
    """The figures of one pass, before they are dressed as a report."""

    results: dict[str, ProbeResult]
    skipped: list[Skipped]
    findings: list[Finding]
    layers: list[AffineLayer]
    head: AffineLayer
    num_samples: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """A probe report; :meth:`to_json` is the SPEC §3 JSON document."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    run: ProbeRun
    notes: list[str] = field(default_factory=list)
    run_args: RunArgs = PLACEHOLDERS        # what the suggested commands repeat from this run
    main_process: bool = True               # under torchrun: rank 0, which prints and writes
    kind: ClassVar[str] = "probe"

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "ftdoctor_version": ftdoctor.__version__,
                "torch_version": torch.__version__.split("+")[0],
                "model": self.model, "data": self.data, "settings": self.settings,
                "probes": {name: res.figures.to_json() for name, res in self.run.results.items()},
                "skipped": [s.to_json() for s in self.run.skipped],
                "findings": [f.to_json(self.run_args) for f in self.run.findings],
                "notes": [*self.notes, *self.run.notes]}

    def arrays(self) -> dict[str, np.ndarray]:
        """HDF5 arrays keyed by path below ``/probes``."""
        out: dict[str, np.ndarray] = {}
        for name, res in self.run.results.items():
            for key, arr in res.arrays.items():
                out[f"probes/{name}/{key}"] = arr
        return out


def _all_finite(t: torch.Tensor) -> bool:
    # a finite sum means no NaN/Inf (they propagate); only an overflowing sum needs the full check
    return t.numel() == 0 or bool(torch.isfinite(t.detach().sum())) or bool(torch.isfinite(t).all())


def weight_findings(model: nn.Module) -> list[Finding]:
    """NaN/Inf in any parameter or buffer is an error finding, naming the tensors."""
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not _all_finite(t)]
    if not bad:
        return []
    return [Finding("weights", "error", f"NaN or Inf in {len(bad)} tensor(s): {', '.join(bad[:5])}",
                    Suggestion(before="the checkpoint is corrupt or training diverged; re-export it from a good step"))]


def reference_pairs(layers: Sequence[AffineLayer], reference: nn.Module,
                    patterns: Sequence[str] | None = None) -> list[tuple[AffineLayer, AffineLayer]]:
    """(model layer, reference layer) pairs matched by name and weight shape, in forward order."""
    ref_modules = dict(reference.named_modules())
    pairs = []
    for layer in layers:
        if patterns and not any(fnmatch.fnmatchcase(layer.name, p) for p in patterns):
            continue
        ref = ref_modules.get(layer.name)
        w = getattr(ref, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == tuple(layer.weight.shape):
            pairs.append((layer, AffineLayer(layer.name, ref)))
    return pairs


def probe_model(model: nn.Module, data: DataBundle, options: ProbeOptions = ProbeOptions(), *,
                reference: nn.Module | None = None, device: str | torch.device = "cpu",
                layers: Sequence[AffineLayer] | None = None, batch_size: int | None = None,
                workers: int = 0, description: str = "probing") -> ProbeRun:
    """Run the probes on an in-memory model (left exactly as it was) over ``data``.

    Under ``torchrun`` each process takes its share of every global batch of ``batch_size``
    (default: the data's own) and the figures are those of a single process.
    """
    names = options.validate(reference is not None)
    if data.num_samples == 0:
        raise FtdoctorError("the dataset is empty", "check --data, --split and --max-samples")
    from ftdoctor.session import example_inputs
    example = forward.to_device(example_inputs(data, 1), device)
    if layers is None:
        layers, _ = layer_order(model, example)
    head = find_head(list(layers), options.head)
    measured = measured_layers(model, layers, example) if any(
        PROBES[n].measures_norms for n in names) else list(layers)
    ctx = ProbeContext(model=model, layers=tuple(layers), head=head, num_classes=data.num_classes,
                       measured=tuple(measured),
                       seed=options.seed, reference=reference,
                       reference_layers=tuple(reference_pairs(layers, reference, options.r2_layers))
                       if reference is not None else (), scripted=is_scripted(model),
                       new_head=options.new_head, head_init=options.head_init, seeds=options.seeds,
                       change_rate_mode=options.change_rate_mode, change_rate_loss=options.change_rate_loss)
    probes: list[Probe] = []
    skipped: list[Skipped] = unreached_parameters(model, measured)
    for n in names:
        p = PROBES[n](ctx)
        why = p.unavailable()
        if why:
            skipped.append(Skipped("(all layers)", n, why))
        else:
            probes.append(p)
    data_probes = [p for p in probes if p.needs_data]
    n = 0
    if data_probes:
        settings = PassSettings(seed=options.seed, change_rate_mode=options.change_rate_mode,
                                change_rate_loss=options.change_rate_loss, autocast=DTYPES[options.dtype])
        world = distributed.world()
        batches = distributed.sharded_batches(data.dataset, batch_size or getattr(data, "batch_size", 64), world,
                                              workers=workers)
        run_pass(model, batches, data_probes, list(measured), head, data.num_classes, settings,
                 reference=reference if any(p.needs_reference and p.needs_data for p in probes) else None,
                 reference_pairs=ctx.reference_layers, device=device, total=data.num_samples,
                 description=description, all_reduce=distributed.all_reduce_sum if world.distributed else None)
        for p in data_probes:
            p.reduce_(distributed.all_reduce_sum)
        n = data.num_samples
    results: dict[str, ProbeResult] = {}
    findings: list[Finding] = weight_findings(model)
    notes: list[str] = []
    for p in probes:
        res = p.compute()
        results[p.name] = res
        skipped.extend(p.skipped)
        notes.extend(p.notes)
        findings.extend(p.findings(res, options.thresholds))
    return ProbeRun(results=results, skipped=skipped, findings=findings, layers=list(layers), head=head,
                    num_samples=n, notes=notes)


def unreached_parameters(model: nn.Module, layers: Sequence[AffineLayer]) -> list[Skipped]:
    """Weights no probe can see: affine modules whose own forward never ran (their parent applies
    them functionally, as ``nn.MultiheadAttention`` does with ``out_proj``) and attention's packed
    ``in_proj_weight`` (SPEC §1.2)."""
    seen = {l.name for l in layers}
    out: list[Skipped] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is not None:
            out.append(Skipped(f"{name}.in_proj_weight", "all",
                               "used outside a module's own forward (nn.MultiheadAttention applies it "
                               "functionally): no per-layer hook sees it"))
        elif name and name not in seen and is_affine(module):
            out.append(Skipped(name, "all", "its forward never ran on the data: the parent module applies "
                                            "its weight functionally (e.g. nn.MultiheadAttention.out_proj)"))
    return out


def probe(model_path: str | Path, *, model: "ckpt.ModelOptions" = None, data: DataOptions,
          options: ProbeOptions = ProbeOptions(), reference: str | Path | None = None,
          output: str | Path | None = None, hdf5: str | Path | None = None,
          html: str | Path | None = None) -> Report:
    """``ftdoctor probe``: measure the diagnoses of SPEC §1 for a checkpoint on a dataset.

    With ``output``, ``hdf5`` and/or ``html`` the JSON report, the HDF5 file (report and arrays) and the
    self-contained HTML page (:mod:`ftdoctor.report.html`) are written: all checked against every input
    before any work, all kept or none (:mod:`ftdoctor.outputs`). Under
    ``torchrun`` every process measures its shard; only rank 0 writes (``Report.main_process``).
    """
    from ftdoctor import distributed
    from ftdoctor.data import input_paths
    from ftdoctor.outputs import Output, journal
    from ftdoctor.report import write_files

    outputs = [Output(Path(p), flag) for p, flag in ((output, "--output"), (hdf5, "--hdf5"), (html, "--html"))
               if p is not None]
    with journal(outputs, (model_path, reference, *input_paths(data.data, data.data_root))):
        world = distributed.setup(model.device if model is not None else "cpu")   # under torchrun: join the group
        if not world.is_main:
            from ftdoctor import progress
            progress.set_quiet(True)
        try:
            report = _probe(model_path, model=model, data=data, options=options, reference=reference)
        finally:
            distributed.teardown()
        report.main_process = world.is_main
        if world.is_main:
            write_files(report, (("hdf5", hdf5), ("json", output), ("html", html)))
    return report


def _probe(model_path: str | Path, *, model: "ckpt.ModelOptions" = None, data: DataOptions,
           options: ProbeOptions = ProbeOptions(), reference: str | Path | None = None) -> Report:
    from ftdoctor import checkpoint as ckpt
    from ftdoctor.session import open_session
    model_opts = model or ckpt.ModelOptions()
    options.validate(reference is not None)
    session = open_session(model_path, model_opts, data, head=options.head,
                           new_head=options.head_init if options.new_head else None, seed=options.seed,
                           reference=reference)
    loaded, net, bundle, head, layers, how = (session.loaded, session.model, session.data, session.head,
                                              session.layers, session.order)
    notes, device, ref_model = session.notes, session.device, session.reference
    if options.new_head:
        notes.append(f"head {head.name} replaced by a fresh {options.head_init} head for "
                     f"{bundle.num_classes} classes")
    run = probe_model(net, bundle, options, reference=ref_model, device=device, layers=layers,
                      batch_size=data.batch_size, workers=data.workers)
    notes.extend(run.notes)
    settings = {"probes": list(run.results), "seed": options.seed, "split": bundle.split,
                "max_samples": data.max_samples, "subset": data.subset, "batch_size": data.batch_size,
                "image_size": data.image_size,
                "normalize": data.normalize, "change_rate_mode": options.change_rate_mode,
                "change_rate_loss": options.change_rate_loss, "new_head": options.new_head,
                "head_init": options.head_init if options.new_head else None, "seeds": options.seeds,
                "head": head.name, "reference": str(reference) if reference is not None else None,
                "r2_layers": list(options.r2_layers) if options.r2_layers else None,
                "layer_order": how, "thresholds": options.thresholds.to_json(), "dtype": options.dtype}
    data_info = bundle.info(run.num_samples)
    return Report(model=model_info(loaded, head), data=data_info, settings=settings, run=run, notes=notes,
                  run_args=RunArgs.of(model_path, model_opts, data, options.new_head))

