"""Cost of the live monitor in a real Hugging Face ``Trainer``: the same run with and without
:class:`ftdoctor.monitor.hf.FtdoctorCallback`, on the same batches.

    python benchmarks/monitor_trainer.py [--steps 100] [--repeats 3] [--threads 2] [--batch 64]

:mod:`benchmarks.monitor` times the monitor against a bare SGD step in a tight loop, the strictest
baseline there is. This one times what a user of the callback sees: BERT-mini (``benchmarks/_models.py``)
fine-tuned by ``transformers.Trainer`` with its defaults (AdamW, linear schedule, its data loader and
collator), ``report_to=[]`` and no checkpoints, once plain and once with the callback at its default
schedule and probes (no HDF5 file), after one short untimed run of each. Repeats are interleaved, the
order alternating (plain then monitored, monitored then plain, …). A step's time is the wall time from the
previous step's end to its own (data loading, forward, backward, optimizer, the callbacks: all a user
waits for). Prints, as medians over the repeats:

* **run** — the monitored run's wall time (``train()`` called to the last step's end) over the plain run's
  (target ≤ 1.03×);
* **measuring step** — a measured step's time over the plain run's step at the same index, the median
  over the measured steps after step 0 (target ≤ 1.6×);
* **step 0** — ``train()``'s set-up and the first measured step, which also finds the layers and copies the
  reference, over the plain run's set-up and first step.
"""
from __future__ import annotations

from _machine import CostTable, busy_warning, header  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import logging
import tempfile
import time
import warnings

import torch

from _models import bert
from ftdoctor.monitor import Schedule


def _trainer_classes():
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()

    class Clock(TrainerCallback):
        """The wall time at each step's end."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return Trainer, TrainingArguments, Clock


def run(model, dataset, steps: int, batch: int, monitored: bool, workdir: str) -> list[float]:
    """One Trainer run: each step's wall time (previous step's end to its end)."""
    Trainer, TrainingArguments, Clock = _trainer_classes()
    from ftdoctor.monitor.hf import FtdoctorCallback

    args = TrainingArguments(output_dir=workdir, max_steps=steps, per_device_train_batch_size=batch,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=True, dataloader_num_workers=0, seed=0, learning_rate=5e-5)
    clock = Clock()
    callbacks = [FtdoctorCallback(warn=False), clock] if monitored else [clock]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)      # the logged lines, printed: not what is timed
    start = time.perf_counter()          # train()'s set-up (the callback's monitor among it) is in step 0
    trainer.train()
    marks = [start, *clock.ends]
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cycle", type=int, default=8, help="distinct batches in the training set")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("ftdoctor.monitor").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(header(args.threads))
    warning = busy_warning()
    if warning:
        print(warning)
    schedule = Schedule()
    measured = [s for s in range(args.steps) if s in schedule]
    print(f"transformers.Trainer, {args.steps} steps, batch {args.batch}, default schedule: steps {measured} "
          f"measured\n")
    print(CostTable.HEADER)
    name, model0, x, y, _, _ = bert(args.batch * args.cycle)
    dataset = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": y[i]}
               for i in range(len(y))]
    table = CostTable()
    with tempfile.TemporaryDirectory() as workdir:
        for m in (False, True):  # untimed: the process's first Trainer pays its imports and first kernels
            run(copy.deepcopy(model0), dataset, 3, args.batch, m, workdir)
        for k in range(args.repeats):
            first = k % 2 == 1     # plain first, then monitored first, …: a drift of the machine's speed cancels
            times = {m: run(copy.deepcopy(model0), dataset, args.steps, args.batch, m, workdir)
                     for m in (first, not first)}
            plain, watched = times[False], times[True]
            table.add(plain, watched, [watched[s] / plain[s] for s in measured[1:]])
    print(table.row(name), flush=True)

if __name__ == "__main__":
    main()
