"""ftdoctor in a Hugging Face ``Trainer``: the live monitor and the papers' methods as a ``TrainerCallback``.

::

    from ftdoctor.monitor.hf import FtdoctorCallback
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[FtdoctorCallback(hdf5="run.h5")])
    trainer.train()

At every measuring step (default: 0, 1, 2, then every 50th) the monitor reads the step's micro-batches
(the forward is given ``labels=``, as Trainer does) and their backward passes, and its scalars go through
Trainer's own logging — ``control.should_log`` is raised for that step and the values join its ``logs``
— so they land in whichever tracker ``report_to`` enabled (TensorBoard names them
``train/ftdoctor/noise_fraction`` …), at the step Trainer logs after the measured optimizer step. The
callback puts itself first among Trainer's callbacks so its values are in ``logs`` before the trackers'
callbacks write them. Methods: ``entame=True`` (ENTAME's head, with ``feature_norm``), ``rifle_period=``
steps or ``rifle_epochs=`` (RIFLE), ``l2sp_alpha=`` (L2-SP); they change the run, nothing else does.

Under DDP (torchrun, Accelerate) every rank measures its share and the sums are reduced as ``probe``
reduces them; rank 0 warns and writes the HDF5 file.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from ftdoctor.distributed import is_main_process
from ftdoctor.monitor.core import Measurement, Monitor
from ftdoctor.monitor.methods import Methods
from ftdoctor.monitor.record import RunRecord
from ftdoctor.monitor.schedule import Schedule
from ftdoctor.thresholds import Thresholds

log = logging.getLogger("ftdoctor.monitor")


class FtdoctorCallback(TrainerCallback):
    """The live monitor and the methods in a ``transformers.Trainer`` (module doc)."""

    def __init__(self, *, schedule: Schedule | int | Sequence[int] | None = None, probes: Sequence[str] | None = None,
                 reference: Any = "initial", thresholds: Thresholds | None = None, head: str | None = None,
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
        self.hdf5 = Path(hdf5) if hdf5 is not None else None
        self.run_name = run_name
        self.monitor: Monitor | None = None
        self.methods: Methods | None = None
        self.record: RunRecord | None = None
        self._pending: dict[str, float] | None = None

    # -- ordering: before the trackers' callbacks ------------------------------------------------
    def _go_first(self) -> None:
        """Move this callback to the front of the handler whose event is running (Trainer appends user
        callbacks after the trackers'); moving it from index k to 0 leaves the running loop's next item
        where it was."""
        frame = sys._getframe(1)
        for _ in range(6):
            frame = frame.f_back
            if frame is None:
                return
            handler = frame.f_locals.get("self")
            callbacks = getattr(handler, "callbacks", None)
            if isinstance(callbacks, list) and any(c is self for c in callbacks):
                if callbacks[0] is not self:
                    callbacks.remove(self)
                    callbacks.insert(0, self)
                return

    def on_init_end(self, args, state, control, **kwargs):
        self._go_first()

    # -- the run -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        self._go_first()
        period = self.rifle_period
        if period is None and self.rifle_epochs is not None:
            per_epoch = max(1, len(train_dataloader) // max(1, args.gradient_accumulation_steps)) \
                if train_dataloader is not None else max(1, state.max_steps // max(1, int(args.num_train_epochs)))
            period = max(1, round(self.rifle_epochs * per_epoch))
        self.methods = Methods(model, rifle_period=period, optimizer=optimizer, scheduler=lr_scheduler,
                               **self.method_options)
        self.monitor = Monitor(model, optimizer=optimizer, **self.options)
        if self.hdf5 is not None and is_main_process():
            settings = {"framework": "transformers.Trainer", "lr": args.learning_rate,
                        "optimizer": str(getattr(args.optim, "value", args.optim)),     # as --optim spells it
                        "batch_size": args.per_device_train_batch_size,
                        "gradient_accumulation_steps": args.gradient_accumulation_steps,
                        "methods": [k for k in ("entame", "rifle", "l2sp") if self._uses(k, period)]}
            self.record = RunRecord(self.hdf5, self.run_name, self.options["seed"],
                                    model={"path": getattr(getattr(model, "config", None), "_name_or_path", "") or
                                           type(model).__name__, "arch": type(model).__name__}, settings=settings)
        if state.global_step > 0 and self.options["reference"] == "initial" and "r2" in self.monitor.names:
            log.warning("ftdoctor monitor: resumed at step %d: R² and drift are measured against the weights at "
                        "resume, not the pretrained ones; pass reference=<the pretrained model> to keep them",
                        state.global_step)

    def _uses(self, method: str, period: int | None) -> bool:
        o = self.method_options
        return {"entame": o["entame"], "rifle": period is not None, "l2sp": o["l2sp_alpha"] is not None}[method]

    def on_step_begin(self, args, state, control, **kwargs):
        if self.methods is not None:
            self.methods.begin_step(state.global_step)
        if self.monitor is not None:
            self.monitor.begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        m = self.monitor.end()
        if m is not None:
            self._measured(m)

    def _measured(self, m: Measurement) -> None:
        self._pending = dict(m.scalars)
        if self.record is not None:
            self.record.reinitialised = self.methods.reinitialised if self.methods else []
            self.record.write(self.monitor.history)

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if self._pending:
            logs.update(self._pending)
            self._pending = None
        penalty = self.methods.penalty() if self.methods is not None else None
        if penalty is not None and "loss" in logs:
            logs["ftdoctor/l2sp_penalty"] = penalty

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        acc = (metrics or {}).get("eval_accuracy")
        if self.record is not None and isinstance(acc, (int, float)):
            self.record.evaluations.append((state.global_step, float(acc)))

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        if self.methods is not None:
            self.methods.close()
        if self.record is not None and self.monitor is not None:
            self.record.reinitialised = self.methods.reinitialised if self.methods else []
            self.record.write(self.monitor.history)


def attach(trainer: Any, **options: Any) -> FtdoctorCallback:
    """Make a :class:`FtdoctorCallback` with ``options`` and put it first in ``trainer``'s callbacks."""
    callback = FtdoctorCallback(**options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
