"""Fine-tuning results for a terminal, and the demo's compare step."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ftdoctor.dynamics.options import TraceOptions
from ftdoctor.dynamics.series import CompareResult, TraceResult
from ftdoctor.errors import FtdoctorError


def _pct(x: float | None, ci: float | None = None, signed: bool = False) -> str:
    if x is None:
        return "—"
    s = f"{x * 100:+.2f}" if signed else f"{x * 100:.2f}"
    return s + (f" ± {ci * 100:.2f}" if ci is not None else "")


def render_compare(result: CompareResult, console: Any) -> None:
    """The ENTAME Table 3 view as a rich table."""
    from rich.table import Table
    k = len(result.seeds)
    first = result.methods[0].name
    table = Table(title=f"{result.data['name']}: {result.steps} steps × {k} seed(s), accuracy on "
                        f"{result.data['eval_split']} ({result.data['eval_samples']} examples), %",
                  title_justify="left")
    table.add_column("method")
    table.add_column(f"first {result.window} steps", justify="right")
    table.add_column(f"Δ vs {first}", justify="right")
    table.add_column("p (paired t)", justify="right")
    table.add_column(f"final (step {result.steps})", justify="right")
    for m in result.methods:
        p = "—" if m.p_value is None else (f"{m.p_value:.2g}" if m.p_value >= 1e-4 else f"{m.p_value:.1e}")
        table.add_row(m.name, _pct(m.early_acc_mean, m.early_acc_ci95), _pct(m.diff_vs_first, m.diff_ci95, True),
                      p, _pct(m.final_acc_mean, m.final_acc_ci95))
    console.print(table)
    console.print(f"[dim]± = 95% confidence half-width over {k} seeds (Student t); every method starts from the "
                  f"same backbone and sees the same batches per seed (checked).[/]")


def render_trace(result: TraceResult, console: Any) -> None:
    """Final figures of one run, and the layers' gradient norms (RIFLE Fig. 2) at the first and last step."""
    from rich.table import Table
    r = result.run
    w = result.settings["window"]
    console.print(f"[bold]{r.method}[/] on {result.data['name']} ({result.data['num_classes']} classes), "
                  f"seed {r.seed}, {len(r.step)} steps of {result.settings['optimizer']} at lr "
                  f"{result.settings['lr']:g}")
    console.print(f"eval accuracy: start {r.eval_acc[0]:.1%}, mean of steps 1–{min(w, len(r.step))} "
                  f"{r.early_acc(w):.1%}, final {r.final_acc:.1%}   train loss {r.loss[0]:.3f} → {r.loss[-1]:.3f}")
    console.print(f"head-input variance {r.feature_var[0]:.4g} → {r.feature_var[-1]:.4g}   "
                  f"noise fraction {r.noise_fraction[0]:.3f} → {r.noise_fraction[-1]:.3f}   "
                  f"backbone drift Σ‖W−W⁰‖² {r.sp_penalty[-1]:.4g}")
    if r.reinitialised:
        console.print(f"head re-initialised after steps {', '.join(map(str, r.reinitialised))}")
    table = Table(title="gradient norm ‖∇W‖ per layer", title_justify="left")
    table.add_column("layer")
    table.add_column("step 1", justify="right")
    table.add_column(f"step {len(r.step)}", justify="right")
    for j, name in enumerate(r.layers):
        table.add_row(name, f"{r.grad_norm[0, j]:.3g}", f"{r.grad_norm[-1, j]:.3g}")
    console.print(table)

DEMO_METHODS = ("base", "entame")

DEMO_SEEDS = 3

DEMO_STEPS = 30


def demo_compare_step(source_path: Path, workdir: Path, console: Any, seed: int = 0) -> CompareResult:
    """``ftdoctor demo``'s dynamics step: compare base vs entame on the ``shapes:5`` transfer task, then plot.

    Writes ``compare.h5``, ``compare.html`` (the report page) and, with matplotlib, ``compare.png`` into
    ``workdir``.
    """
    from ftdoctor.checkpoint import ModelOptions
    from ftdoctor.data import DataOptions
    arch = "ftdoctor.zoo:ShapesNet"
    target = "shapes:5"
    h5, png = Path(workdir) / "compare.h5", Path(workdir) / "compare.png"
    from ftdoctor.fixes.demo_steps import step
    step(console, "8. fine-tune with and without ENTAME's head",
         f"ftdoctor compare {Path(source_path).name} --arch {arch} --data {target} --methods {','.join(DEMO_METHODS)} "
         f"--seeds {DEMO_SEEDS} --steps {DEMO_STEPS}" + (f" --seed {seed}" if seed else "") + " --html compare.html")
    console.print("[dim]Real fine-tuning from the pretrained backbone with a fresh head, per seed the same start "
                  "and the same batches for both methods: does ENTAME's maximum-entropy head learn faster in "
                  "the first steps (ENTAME Table 3)?[/]")
    options = TraceOptions(steps=DEMO_STEPS, seed=seed)
    from ftdoctor.dynamics.run import compare, write_hdf5
    result = compare(source_path, model=ModelOptions(arch=arch),
                     data=DataOptions(data=target, split="train", max_samples=1024, seed=seed),
                     options=options, methods=DEMO_METHODS, seeds=DEMO_SEEDS, eval_split="test", eval_samples=512,
                     html=Path(workdir) / "compare.html")
    write_hdf5(h5, result)
    render_compare(result, console)
    console.print(f"curves written to {h5}; the page to open in a browser: {Path(workdir) / 'compare.html'}")
    try:
        from ftdoctor.report.plot import plot
        plot(h5, png)
        console.print(f"picture written to {png} (accuracy and loss with seed bands, head-input variance, "
                      f"gradient-norm heat maps)")
    except FtdoctorError as exc:          # matplotlib missing: the demo goes on without the picture
        from rich.markup import escape
        console.print(f"[yellow]no picture: {escape(exc.cause)}[/] — {escape(exc.remedy)}")
    return result
