"""The monitor and the methods inside a real ``transformers.Trainer`` on a tiny random BERT and a text data set:
the figures at a measuring step equal ``probe`` of the same state on the same examples, the scalars are in
TensorBoard's event files (read back with TensorBoard's own reader), the HDF5 file draws with ``ftdoctor
plot``, and the methods do what the papers say with the Trainer's own optimizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import TensorBundle, assert_figures_close
from hf_helpers import SENTENCES, SENTIMENT, wordpiece_tokenizer
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.monitor import Schedule

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")
datasets = pytest.importorskip("datasets")

from ftdoctor.monitor.hf import FtdoctorCallback  # noqa: E402  (needs transformers)

LENGTH = 12


def _model(num_labels=2):
    transformers.utils.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=80, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _dataset(repeat=2):
    tok = wordpiece_tokenizer()
    texts = SENTENCES * repeat
    labels = [0 if s == "neg" else 1 for s in SENTIMENT] * repeat
    enc = tok(texts, padding="max_length", max_length=LENGTH, truncation=True)
    return datasets.Dataset.from_dict({**enc, "labels": labels})


class _Spy(transformers.TrainerCallback):
    """The state before each step and the inputs of its training forwards, as the Trainer fed them."""

    def __init__(self, model):
        self.states, self.inputs, self.step, self.last_group_lr = {}, {}, 0, {}
        model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.inputs.setdefault(self.step, []).append({k: v.detach().clone() for k, v in kwargs.items()
                                                          if isinstance(v, torch.Tensor) and v.dim() > 0})

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.step = state.global_step
        self.last_group_lr[state.global_step] = optimizer.param_groups[-1]["lr"]
        self.states[state.global_step] = copy.deepcopy(model.state_dict())


class _Batches(TensorBundle):
    def __init__(self, batches):
        keys = [k for k in batches[0] if k != "labels"]
        self.inputs = {k: torch.cat([b[k] for b in batches]) for k in keys}
        y = torch.cat([b["labels"] for b in batches])
        super().__init__(y.float(), y, 2, batch_size=len(y))

    @property
    def dataset(self):
        inputs, y = self.inputs, self.y

        class _D(torch.utils.data.Dataset):
            def __len__(self):
                return len(y)

            def __getitem__(self, i):
                return {k: v[i] for k, v in inputs.items()}, int(y[i]), i
        return _D()


def _train(tmp_path, callback, *, steps=4, accumulation=1, bf16=False, spy=True, **args):
    model = _model()
    pretrained = copy.deepcopy(model)
    spy_cb = _Spy(model) if spy else None
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-3,
        gradient_accumulation_steps=accumulation, logging_steps=1000, report_to=["tensorboard"], save_strategy="no",
        use_cpu=True, seed=0, data_seed=0, bf16=bf16, disable_tqdm=True, dataloader_num_workers=0, **args)
    cbs = [callback] + ([spy_cb] if spy_cb else [])
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=_dataset(), callbacks=cbs)
    trainer.train()
    return trainer, model, pretrained, spy_cb


def _event_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for run in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(run.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def test_figures_equal_probe_and_the_scalars_are_in_tensorboard(tmp_path):
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=1, steps=(2,)), hdf5=tmp_path / "run.h5")
    trainer, model, pretrained, spy = _train(tmp_path, callback)
    history = callback.monitor.history
    assert [m.step for m in history] == [0, 2]
    assert trainer.callback_handler.callbacks[0] is callback        # first: before the trackers' callbacks
    for m in history:
        live = copy.deepcopy(pretrained)
        live.load_state_dict(spy.states[m.step])
        run = probe_model(live.eval(), _Batches(spy.inputs[m.step]), ProbeOptions(change_rate_loss="ce"),
                          reference=pretrained.eval(), batch_size=4)
        assert set(m.figures) == set(run.results) == {"noise", "change_rate", "grad_norm", "r2", "drift"}
        # R² on the examples held from the first measuring step (its batch of 4: every example)
        held = probe_model(live.eval(), _Batches(spy.inputs[history[0].step]), ProbeOptions(probes=("r2",)),
                           reference=pretrained.eval(), batch_size=4)
        run.results["r2"] = held.results["r2"]
        for name, res in run.results.items():
            assert_figures_close(m.figures[name], res.figures.to_json(), rel=1e-5)
    scalars = _event_scalars(tmp_path / "out")
    for key in ("noise_fraction", "change_rate_spread", "depth_ratio", "r2_median", "drift"):
        tag = f"train/ftdoctor/{key}"
        assert [s for s, _ in scalars[tag]] == [1, 3], tag            # logged at Trainer's step after the measured one
        for (_, value), m in zip(scalars[tag], history):
            assert value == pytest.approx(m.scalars[f"ftdoctor/{key}"], rel=1e-6)
    from ftdoctor.report.plot import plot
    page = plot(tmp_path / "run.h5", tmp_path / "run.html")
    text = page.read_text()
    assert "<svg" in text and "monitor" in text
    # no evaluation in this run: its accuracy is the measured batches', and the headline says so
    assert "final accuracy on the last measured batch" in text and "final eval accuracy" not in text
    assert "ftdoctor monitor: " in text and "ftdoctor trace" not in text
    assert "OptimizerNames" not in text and str(trainer.args.optim.value) in text   # as --optim spells it


def test_gradient_accumulation_and_bf16_autocast(tmp_path):
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=1))
    trainer, model, pretrained, spy = _train(tmp_path, callback, steps=2, accumulation=2, bf16=True)
    m = callback.monitor.history[0]
    assert len(spy.inputs[0]) == 2 and m.examples == 8
    live = copy.deepcopy(pretrained)
    live.load_state_dict(spy.states[0])
    run = probe_model(live.eval(), _Batches(spy.inputs[0]), ProbeOptions(change_rate_loss="ce", dtype="bfloat16"),
                      reference=pretrained.eval(), batch_size=8)
    for name in ("noise", "grad_norm", "drift"):
        assert_figures_close(m.figures[name], run.results[name].figures.to_json(), rel=5e-2, skip=("head_kind",))
    assert not m.notes


def test_rifle_re_initialises_the_head_exactly_at_each_period_boundary(tmp_path):
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=0), rifle_period=3)
    trainer, model, pretrained, spy = _train(tmp_path, callback, steps=7)
    rifle = callback.methods.rifle
    assert rifle.reinitialised == [3, 6]
    head = model.classifier
    for step in (3, 6):
        w, b = rifle.fresh_head(step // 3)
        # re-drawn in the callback's on_step_begin: the state the spy takes after it holds the fresh head
        assert torch.equal(spy.states[step]["classifier.weight"], w)
        assert not torch.equal(spy.states[step - 1]["classifier.weight"], w)
    assert any(g.get("name") == "head" for g in trainer.optimizer.param_groups)
    # the head's rate is RIFLE's cosine restart, whatever Trainer's scheduler wrote after the step before
    assert [spy.last_group_lr[t] for t in range(1, 7)] == pytest.approx([rifle.lr_at(t) for t in range(1, 7)])
    assert spy.last_group_lr[3] == spy.last_group_lr[6] == pytest.approx(5e-3)
    assert head.weight.shape == (2, 16)


def test_the_l2sp_term_equals_alpha_half_the_squared_distance(tmp_path):
    """L2-SP through the callback: at every step the Trainer's gradient is that of mean CE + α/2‖w_S − w⁰_S‖² +
    β/2‖w_new‖² (the head new) on the step's examples, in the Trainer's loss units — by autograd on a copy of
    the model in that state."""
    alpha, beta = 0.5, 0.1
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=0), l2sp_alpha=alpha, l2sp_beta=beta)
    grads = {}

    class _Grads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads[state.global_step] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model = _model()
    pretrained = copy.deepcopy(model)
    spy = _Spy(model)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-3,
        gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, max_grad_norm=0.0)
    transformers.Trainer(model=model, args=targs, train_dataset=_dataset(),
                         callbacks=[callback, spy, _Grads()]).train()
    from ftdoctor.train import L2SP
    for step in range(3):
        live = copy.deepcopy(pretrained)
        live.load_state_dict(spy.states[step])
        omega = L2SP(live, pretrained.state_dict(), alpha, beta, new=["classifier"])
        batches = spy.inputs[step]
        n = sum(len(b["labels"]) for b in batches)
        loss = sum(torch.nn.functional.cross_entropy(live(**{k: v for k, v in b.items() if k != "labels"}).logits,
                                                     b["labels"], reduction="sum") for b in batches) / n
        (loss + omega()).backward()
        # Trainer's loss is its own multiple κ of the mean cross-entropy (with accumulation it sums the
        # micro-batches' means: κ = 2 here); the penalty must enter with that same κ, as if added to the loss
        mine = torch.cat([grads[step][n].flatten() for n, _ in live.named_parameters()]).double()
        truth = torch.cat([p.grad.flatten() for _, p in live.named_parameters()]).double()
        kappa = float(mine @ truth / (truth @ truth))
        assert kappa == pytest.approx(2.0, rel=1e-5)
        assert float((mine - kappa * truth).norm() / (kappa * truth).norm()) < 1e-5
    shared = callback.methods.l2sp
    params = {n: p.detach() for n, p in model.named_parameters()}
    expected = 0.5 * alpha * sum(float(((params[n] - pretrained.state_dict()[n]) ** 2).sum()) for n in shared.shared)
    expected += 0.5 * beta * sum(float((params[n] ** 2).sum()) for n in shared.new)
    assert callback.methods.penalty() == pytest.approx(expected, rel=1e-6)
    assert set(shared.new) == {"classifier.weight", "classifier.bias"}


def test_the_entame_head_at_train_start(tmp_path):
    callback = FtdoctorCallback(schedule=Schedule(every=0, first=1), entame=True, reference=None)
    trainer, model, pretrained, spy = _train(tmp_path, callback, steps=1)
    w0 = spy.states[0]["classifier.weight"]           # before the first forward: the Trainer's own head
    m = callback.monitor.history[0]
    noise = m.figures["noise"]
    # the first forward ran on the maximum-entropy head (re-drawn in its forward pre-hook): uniform outputs
    assert noise["cross_entropy"] == pytest.approx(math.log(2), abs=1e-6)
    assert m.figures["grad_norm"]["head_kind"] == "max-entropy"
    assert float(w0.abs().max()) > 1e-3
