"""The monitor and the methods inside a real Lightning ``Trainer`` on a tiny CNN: the figures at a measuring step
equal ``probe`` of the same state on the same examples (with gradient accumulation too), the scalars are in the
TensorBoard logger's event files (read back with TensorBoard's own reader), RIFLE re-draws the head at each
period boundary, and a resumed run keeps its reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TensorBundle, assert_figures_close
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.monitor import Schedule

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("tensorboard")

from ftdoctor.monitor.lightning import FtdoctorCallback  # noqa: E402


class _Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(72, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _data(n=32):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 10, 10, generator=g), torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class _Spy(pl.Callback):
    def __init__(self):
        self.states, self.batches = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.states.setdefault(step, copy.deepcopy(pl_module.state_dict()))
        self.batches.setdefault(step, []).append([t.clone() for t in batch])


def _fit(tmp_path, callback, steps=4, accumulate=1, ckpt=None, module=None):
    module = module or _Net()
    spy = _Spy()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=pl.loggers.TensorBoardLogger(tmp_path, "tb"),
                         callbacks=[callback, spy], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=accumulate, log_every_n_steps=1000)
    trainer.fit(module, _data(), ckpt_path=ckpt)
    return trainer, module, spy


def _check(m, spy, pretrained, first_step, held_spy=None):
    """``m`` is probe's of the model at its step on that step's examples, R² on the examples held from the
    first measuring step (every one of its examples: fewer than 16; of ``held_spy``'s run when given)."""
    live = copy.deepcopy(pretrained)
    live.load_state_dict(spy.states[m.step])

    def probe(step, source=spy, **options):
        x = torch.cat([b[0] for b in source.batches[step]])
        y = torch.cat([b[1] for b in source.batches[step]])
        return probe_model(live.eval(), TensorBundle(x, y, 4, batch_size=len(y)), ProbeOptions(**options),
                           reference=pretrained.eval(), batch_size=len(y))

    run = probe(m.step, change_rate_loss="ce")
    assert set(m.figures) == set(run.results)
    run.results["r2"] = probe(first_step, source=held_spy or spy, probes=("r2",)).results["r2"]
    for name, res in run.results.items():
        assert_figures_close(m.figures[name], res.figures.to_json(), rel=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_figures_equal_probe_and_the_scalars_reach_the_logger(tmp_path, accumulate):
    pretrained = _Net()
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=1, steps=(2,)))
    trainer, module, spy = _fit(tmp_path, callback, accumulate=accumulate)
    history = callback.monitor.history
    assert [m.step for m in history] == [0, 2]
    assert history[0].examples == 4 * accumulate
    for m in history:
        _check(m, spy, pretrained, first_step=0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    for key in ("noise_fraction", "change_rate_spread", "depth_ratio", "r2_median", "drift"):
        events = acc.Scalars(f"ftdoctor/{key}")
        assert [e.step for e in events] == [0, 2]
        assert [e.value for e in events] == pytest.approx([m.scalars[f"ftdoctor/{key}"] for m in history], rel=1e-6)


def test_rifle_re_initialises_the_head_at_each_period_boundary(tmp_path):
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=0), rifle_period=2)
    trainer, module, spy = _fit(tmp_path, callback, steps=5)
    rifle = callback.methods.rifle
    assert rifle.reinitialised == [2, 4]
    for step in (2, 4):
        w, _ = rifle.fresh_head(step // 2)
        assert torch.equal(spy.states[step]["fc.weight"], w)
    assert spy.states[1]["fc.weight"].shape == w.shape and not torch.equal(spy.states[1]["fc.weight"], w)


def test_a_resumed_run_keeps_its_reference_and_r2_s_examples(tmp_path):
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=1, steps=(3,)))
    trainer, module, first_spy = _fit(tmp_path, callback, steps=2)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    first = callback.monitor.reference.state_dict()
    again = FtdoctorCallback(schedule=Schedule(every=0, first=1, steps=(3,)))
    _, _, spy = _fit(tmp_path, again, steps=4, ckpt=str(path))
    assert [m.step for m in again.monitor.history] == [3]
    for k, v in again.monitor.reference.state_dict().items():
        assert torch.equal(v, first[k]), k
    assert not any(p.requires_grad for p in again.monitor.reference.parameters())
    # R² at step 3 on the examples the first run held at its step 0
    _check(again.monitor.history[0], spy, _Net(), first_step=0, held_spy=first_spy)
