"""ftdoctor in a Lightning ``Trainer``: the live monitor and the papers' methods as a ``Callback``.

::

    from ftdoctor.monitor.lightning import FtdoctorCallback
    trainer = L.Trainer(max_epochs=3, callbacks=[FtdoctorCallback(hdf5="run.h5")])
    trainer.fit(module, train_loader)

The monitor taps the ``LightningModule`` itself (``training_step`` calls ``self(x)``), or the submodule
named by ``module=`` when ``training_step`` calls that one (``self.net(x)``). The labels of each batch are
``batch[1]`` of a tuple or list, ``batch["labels"]`` (or ``"label"``, ``"y"``) of a mapping; pass
``labels=`` (a function of the batch) for anything else. At a measuring step the scalars go to every
logger the Trainer has (``trainer.loggers``: TensorBoard, W&B, MLflow, CSV …) at the Trainer's
``global_step``, whatever ``log_every_n_steps`` says — the figures are of that step, not an average.
Under DDP every rank measures its share, the sums are reduced as ``probe`` reduces them, and rank 0 logs,
warns and writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from ftdoctor.distributed import is_main_process
from ftdoctor.monitor.core import Measurement, Monitor
from ftdoctor.monitor.methods import Methods
from ftdoctor.monitor.record import RunRecord
from ftdoctor.monitor.schedule import Schedule
from ftdoctor.thresholds import Thresholds


def default_labels(batch: Any) -> torch.Tensor | None:
    """The labels of a ``(x, y, …)`` batch or of a mapping with ``labels`` / ``label`` / ``y``."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "y"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return None


class FtdoctorCallback(Callback):
    """The live monitor and the methods in a Lightning ``Trainer`` (module doc)."""

    def __init__(self, *, schedule: Schedule | int | Sequence[int] | None = None, probes: Sequence[str] | None = None,
                 reference: Any = "initial", thresholds: Thresholds | None = None, head: str | None = None,
                 module: str | None = None, labels: Callable[[Any], torch.Tensor | None] = default_labels,
                 hdf5: str | Path | None = None, run_name: str = "monitor", random_change_rates: bool = False,
                 change_rate_cv: bool = False, r2_examples: int | None = 16,
                 entame: bool = False, feature_norm: bool = False, rifle_period: int | None = None,
                 rifle_epochs: float | None = None, rifle_init: str = "torch-default",
                 l2sp_alpha: float | None = None, l2sp_beta: float = 0.01, seed: int = 0, warn: bool = True) -> None:
        self.options = dict(schedule=schedule, probes=probes, reference=reference, thresholds=thresholds, head=head,
                            random_change_rates=random_change_rates, change_rate_cv=change_rate_cv,
                            r2_examples=r2_examples, seed=seed, warn=warn)
        self.method_options = dict(entame=entame, feature_norm=feature_norm, rifle_init=rifle_init,
                                   l2sp_alpha=l2sp_alpha, l2sp_beta=l2sp_beta, head=head, seed=seed)
        self.rifle_period, self.rifle_epochs = rifle_period, rifle_epochs
        self.module, self.labels = module, labels
        self.hdf5 = Path(hdf5) if hdf5 is not None else None
        self.run_name = run_name
        self.monitor: Monitor | None = None
        self.methods: Methods | None = None
        self.record: RunRecord | None = None

    def _target(self, pl_module: Any) -> torch.nn.Module:
        return pl_module.get_submodule(self.module) if self.module else pl_module

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = self._target(pl_module)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        scheduler = configs[0].scheduler if configs else None
        period = self.rifle_period
        if period is None and self.rifle_epochs is not None:
            per_epoch = max(1, int(trainer.num_training_batches) // max(1, trainer.accumulate_grad_batches))
            period = max(1, round(self.rifle_epochs * per_epoch))
        options = dict(self.options)
        resumed = getattr(self, "_resumed_reference", None)
        if resumed is not None and options["reference"] == "initial":
            # resumed from a checkpoint: the reference is the start the run had, as the checkpoint kept it
            import copy
            reference = copy.deepcopy(model).eval().requires_grad_(False)   # frozen, as the monitor's own copy
            reference.load_state_dict(resumed)
            options["reference"] = reference
        self.methods = Methods(model, rifle_period=period, optimizer=optimizer, scheduler=scheduler,
                               **self.method_options)
        self.monitor = Monitor(model, optimizer=optimizer, **options)
        held = getattr(self, "_resumed_r2_held", None)
        if held:
            from ftdoctor import forward
            device = next(model.parameters()).device
            self.monitor.r2_held = [(forward.to_device(x, device), y.to(device)) for x, y in held]
        if self.hdf5 is not None and is_main_process():
            self.record = RunRecord(self.hdf5, self.run_name, self.options["seed"],
                                    model={"path": type(pl_module).__name__, "arch": type(model).__name__},
                                    settings={"framework": "lightning.Trainer",
                                              "accumulate_grad_batches": trainer.accumulate_grad_batches,
                                              "optimizer": type(optimizer).__name__ if optimizer else None,
                                              "lr": optimizer.param_groups[0]["lr"] if optimizer else None})

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        if batch_idx % max(1, trainer.accumulate_grad_batches) == 0:
            self.methods.begin_step(trainer.global_step)
            self.monitor.begin(trainer.global_step)
        self.methods.tap.set_labels(self.labels(batch))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor is None:
            return
        m = self.monitor.end()
        metrics = dict(m.scalars) if m is not None else {}
        penalty = self.methods.penalty()
        if penalty is not None:
            metrics["ftdoctor/l2sp_penalty"] = penalty
        if metrics and is_main_process():
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if m is not None:
            self._measured(m)

    def _measured(self, m: Measurement) -> None:
        if self.record is not None:
            self.record.reinitialised = self.methods.reinitialised
            self.record.write(self.monitor.history)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.methods.close()
            if self.record is not None:
                self.record.reinitialised = self.methods.reinitialised
                self.record.write(self.monitor.history)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to keep measuring against the same start on the same examples: the
        reference's weights and R²'s held examples."""
        from ftdoctor import forward
        ref = self.monitor.reference if self.monitor is not None else None
        held = self.monitor.r2_held if self.monitor is not None else []
        return {"reference": {k: v.detach().cpu() for k, v in ref.state_dict().items()} if ref is not None else None,
                "r2_held": [(forward.to_device(x, "cpu"), y.cpu()) for x, y in held]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_reference = state_dict.get("reference")
        self._resumed_r2_held = state_dict.get("r2_held")
