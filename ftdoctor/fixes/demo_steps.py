"""The fix part of ``ftdoctor demo``: probe → ``fix --method entame`` → probe again, then ``fix --method rescale``.

Called by :func:`ftdoctor.demo.run_demo` with the source checkpoint it
pretrained (:class:`~ftdoctor.zoo.ShapesNet` on ``shapes``, 10 classes); the
target task is ``shapes:5``, so both fixes attach a new head (``--new-head``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

ARCH = "ftdoctor.zoo:ShapesNet"
TARGET_TASK = "shapes:5"


@dataclass(frozen=True)
class DemoFixFigures:
    """The numbers the demo shows (also handy for tests)."""

    noise_before: float
    noise_after: float
    noise_floor: float
    cross_entropy_after: float
    spread_before: float
    spread_after: float
    entame_path: Path
    rescale_path: Path


def step(console: Console, title: str, command: str) -> None:
    """A demo step's heading, then the command it runs on a line of its own (unbroken, so it copies whole)."""
    from rich.text import Text
    console.rule(f"[bold]{title}")
    console.print(Text(command, style="bold"), soft_wrap=True)


def demo_fix_steps(source_path: Path, workdir: Path, console: Console, seed: int = 0,
                   max_samples: int = 512) -> DemoFixFigures:
    """Run and print the demo's fix steps; returns the figures shown."""
    from ftdoctor.checkpoint import ModelOptions
    from ftdoctor.data import DataOptions
    from ftdoctor.diagnose import ProbeOptions, probe
    from ftdoctor.fixes import fix
    from ftdoctor.fixes.render import render

    source_path, workdir = Path(source_path), Path(workdir)
    model = ModelOptions(arch=ARCH)
    data = DataOptions(data=TARGET_TASK, split="train", max_samples=max_samples, seed=seed)
    entame_out = workdir / "target_entame.pt"
    rescale_out = workdir / "target_rescaled.pt"

    # the flags the library calls below are given, so the headings run as printed
    flags = " ".join((*model.flags(), "--data", TARGET_TASK, *data.flags(), *(("--seed", str(seed)) if seed else ())))
    step(console, "4. the noise at a He-initialised head",
         f"ftdoctor probe {source_path.name} {flags} --new-head --probes noise")
    console.print("[dim]A He-initialised new head (ENTAME's baseline): how much of the error it sends into the "
                  "pretrained backbone is noise.[/]")
    before = probe(source_path, model=model, data=data,
                   options=ProbeOptions(probes=("noise",), new_head=True, seed=seed)).to_json()["probes"]["noise"]
    floor = before["max_entropy_noise_fraction"]
    console.print(f"noise fraction [bold]{before['noise_fraction']:.3f}[/] (floor 1/(C−1) = {floor:.3f}), "
                  f"cross-entropy {before['cross_entropy']:.3f} (ln C = {before['max_entropy_loss']:.3f})")

    step(console, "5. fix: ENTAME's maximum-entropy head", f"ftdoctor fix {source_path.name} {flags} --method entame "
                                                               f"--new-head -o {entame_out.name} --force")
    res = fix(source_path, "entame", out=entame_out, model=model, data=data, new_head=True, seed=seed, force=True)
    render(res, console)

    step(console, "6. the noise at the fixed head", f"ftdoctor probe {entame_out.name} {flags} --probes noise")
    after = probe(entame_out, model=model, data=data,
                  options=ProbeOptions(probes=("noise",), seed=seed)).to_json()["probes"]["noise"]
    console.print(f"noise fraction [bold]{before['noise_fraction']:.3f} → {after['noise_fraction']:.3f}[/] — "
                  f"at its floor 1/(C−1) = {floor:.3f}; cross-entropy {after['cross_entropy']:.4f} = ln C")

    step(console, "7. fix: equal change rates (Krähenbühl)", f"ftdoctor fix {source_path.name} {flags} --method "
                                                                  f"rescale --new-head -o {rescale_out.name} --force")
    console.print("[dim]Krähenbühl et al. §3.2: rescale layers (function-preserving) so that all of them "
                  "change at the same rate under SGD.[/]")
    res = fix(source_path, "rescale", out=rescale_out, model=model, data=data, new_head=True, seed=seed,
              force=True)
    render(res, console)
    figs = res.outcome.figures
    console.print(f"change-rate spread [bold]{figs['spread_before']:.3g} → {figs['spread_after']:.3g}[/] "
                  f"in {figs['rounds']} round(s), logits kept within {figs['logit_change']:.1e} relative")
    return DemoFixFigures(noise_before=before["noise_fraction"], noise_after=after["noise_fraction"],
                          noise_floor=floor, cross_entropy_after=after["cross_entropy"],
                          spread_before=figs["spread_before"], spread_after=figs["spread_after"],
                          entame_path=entame_out, rescale_path=rescale_out)
