"""``ftdoctor demo``: the whole loop on the built-in ``shapes`` data, no download.

1. pretrain :class:`~ftdoctor.zoo.ShapesNet` on the source task ``shapes`` (10 classes);
2. ``inspect`` the saved checkpoint;
3. ``probe`` it on a different target task, ``shapes:5``, with a fresh head —
   the moment a fine-tune starts, where the papers' diagnoses apply;
4. ``fix --method entame`` and probe again (the noise fraction falls to its
   floor), and ``fix --method rescale`` (the change-rate spread shrinks);
5. ``compare`` base against entame over a few seeds of real fine-tuning, and
   ``plot`` the curves into the work directory.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from ftdoctor import progress
from ftdoctor.data import DataBundle, DataOptions, load_data
from ftdoctor.zoo import ShapesNet
from ftdoctor import forward

SOURCE_TASK = "shapes"
TARGET_TASK = "shapes:5"


def train_classifier(model: nn.Module, data: DataBundle, *, epochs: int, lr: float, seed: int,
                     description: str = "training") -> list[float]:
    """Plain Adam training with a progress bar; returns the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-data.num_samples // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    losses: list[float] = []
    model.train()
    with progress.task(description, steps, "steps") as bar:
        for epoch in range(epochs):
            total, n = 0.0, 0
            epoch_seed = int(torch.randint(0, 2**31, (1,), generator=gen))
            for x, y, _ in data.loader(batch_size=64, shuffle=True, seed=epoch_seed):
                loss = F.cross_entropy(forward.logits(model, x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(y)
                n += len(y)
                bar.advance(1, status=f"epoch {epoch + 1}/{epochs} loss {total / n:.3f}")
            losses.append(total / n)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: DataBundle) -> float:
    model.eval()
    correct = n = 0
    for x, y, _ in data.loader(batch_size=256):
        correct += int((forward.logits(model, x).argmax(1) == y).sum())
        n += len(y)
    return correct / max(n, 1)


def pretrain_source(workdir: Path, *, seed: int = 0, epochs: int = 6, console: Console | None = None) -> Path:
    """Train ShapesNet on the source task and save its state dict; returns the checkpoint path."""
    torch.manual_seed(seed)
    train = load_data(DataOptions(data=SOURCE_TASK, split="train", max_samples=4096, seed=seed))
    test = load_data(DataOptions(data=SOURCE_TASK, split="test", max_samples=1024, seed=seed))
    model = ShapesNet(num_classes=train.num_classes)
    t0 = time.perf_counter()
    train_classifier(model, train, epochs=epochs, lr=5e-3, seed=seed, description="pretraining on shapes")
    acc = accuracy(model, test)
    path = workdir / "source.pt"
    from ftdoctor.checkpoint.writing import torch_save
    from ftdoctor.outputs import atomic_write
    state = model.state_dict()
    atomic_write(path, lambda tmp: torch_save(state, tmp))
    if console is not None:
        console.print(f"pretrained ShapesNet on [bold]{SOURCE_TASK}[/] ({train.num_classes} classes) in "
                      f"{time.perf_counter() - t0:.0f} s: test accuracy [bold]{acc:.1%}[/] → {path}")
    return path


def run_demo(workdir: Path | None, *, seed: int = 0, console: Console | None = None) -> Path:
    """Run the demo; returns the work directory."""
    from ftdoctor.outputs import journal

    console = console or Console()
    made = workdir is None or not Path(workdir).exists()
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ftdoctor-demo-"))
    if workdir.exists() and not workdir.is_dir():
        from ftdoctor.errors import FtdoctorError
        raise FtdoctorError(f"--workdir {workdir} is a file, not a directory", "pass a directory (it is created)")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with journal():       # an interrupted or failed demo leaves none of its files behind
            return _run_demo(workdir, seed, console)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                workdir.rmdir()    # ours and (rolled back) empty
        raise


def _run_demo(workdir: Path, seed: int, console: Console) -> Path:
    from ftdoctor.checkpoint import ModelOptions
    from ftdoctor.diagnose import ProbeOptions, probe
    from ftdoctor.inspection import inspect
    from ftdoctor.report import inspect_table, table

    console.rule("[bold]ftdoctor demo")
    console.print(f"work directory: [bold]{workdir}[/] (each step's command runs from there as printed)")
    arch = "ftdoctor.zoo:ShapesNet"

    console.rule("1. pretrain a source model")
    source = pretrain_source(workdir, seed=seed, console=console)

    from ftdoctor.fixes.demo_steps import step
    step(console, "2. inspect the source model", f"ftdoctor inspect {source.name} --arch {arch}")
    inspect_table.render(inspect(source, ModelOptions(arch=arch)), console)

    target = DataOptions(data=TARGET_TASK, split="train", max_samples=512, seed=seed)
    seed_flag = f" --seed {seed}" if seed else ""
    step(console, "3. probe it on a new task with a fresh head",
         f"ftdoctor probe {source.name} --arch {arch} --data {TARGET_TASK} {' '.join(target.flags())} "
         f"--new-head --seeds 3{seed_flag} --html probe.html")
    console.print("[dim]A fresh head for the new 5-class task, as a fine-tune begins: how much of the error "
                  "reaching the backbone is noise, how evenly the layers learn, how deep the gradients reach.[/]")
    report = probe(source, model=ModelOptions(arch=arch), data=target,
                   options=ProbeOptions(new_head=True, seeds=3, seed=seed), html=workdir / "probe.html")
    doc = report.to_json()
    from ftdoctor.report import json as json_report
    json_report.write(doc, workdir / "probe_target.json")
    table.render(doc, console)
    console.print(f"report written to {workdir / 'probe_target.json'}; the page to open in a browser: "
                  f"{workdir / 'probe.html'}")
    from ftdoctor.report.html import have_matplotlib
    if not have_matplotlib():
        from rich.markup import escape
        console.print(escape("note: without matplotlib the pages have every table but no chart; for the charts: "
                             "pip install 'ftdoctor[plot]'"), style="yellow")

    from ftdoctor.fixes.demo_steps import demo_fix_steps
    demo_fix_steps(source, workdir, console, seed=seed)

    from ftdoctor.dynamics import demo_compare_step
    demo_compare_step(source, workdir, console, seed=seed)
    console.rule("done")
    console.print(f"everything the demo wrote is in [bold]{workdir}[/]")
    return workdir
