"""A training checkpoint fixed with ``--new-head`` reloads in its own framework (``checkpoint.retarget``)."""
from __future__ import annotations

import sys

import pytest
import torch

from ftdoctor.checkpoint.retarget import retarget
from helpers import run_cli

LIT = '''
import torch
from torch import nn
import pytorch_lightning as pl
from ftdoctor.zoo import ShapesNet


class LitShapes(pl.LightningModule):
    def __init__(self, num_classes=10, lr=1e-3, loss=None):
        super().__init__()
        self.save_hyperparameters()
        self.model = ShapesNet(num_classes=num_classes)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = self.hparams.loss or nn.CrossEntropyLoss()
        return loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def shapesnet(num_classes=10):
    return ShapesNet(num_classes=num_classes)
'''


def _trained_checkpoint(tmp_path, monkeypatch, module_name: str, **hparams):
    """A LightningModule (from a module ``module_name`` written to ``tmp_path``, the working directory) trained
    one step and saved by Lightning as ``lit.ckpt``; returns the imported module."""
    pl = pytest.importorskip("pytorch_lightning")
    (tmp_path / f"{module_name}.py").write_text(LIT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module_name, None)
    lit = __import__(module_name)
    torch.manual_seed(0)
    module = lit.LitShapes(num_classes=10, **hparams)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    trainer.save_checkpoint(tmp_path / "lit.ckpt")
    return lit


def test_retarget_sets_class_counts_and_drops_optimizer_state():
    wrapper = {"state_dict": None, "epoch": 3, "num_classes": 10,
               "hyper_parameters": {"num_classes": 10, "lr": 0.1, "net": {"n_classes": 10, "width": 10}},
               "optimizer_states": [{"state": {}}], "lr_schedulers": [{}]}
    out, notes = retarget(wrapper, 10, 5)
    assert out["num_classes"] == 5 and out["hyper_parameters"]["num_classes"] == 5
    assert out["hyper_parameters"]["net"] == {"n_classes": 5, "width": 10}          # only class-count names
    assert "optimizer_states" not in out and "lr_schedulers" not in out and out["epoch"] == 3
    assert wrapper["hyper_parameters"]["num_classes"] == 10 and "optimizer_states" in wrapper   # a copy
    assert any("hyper_parameters.num_classes" in n for n in notes) and any("dropped" in n for n in notes)
    out, notes = retarget({"state_dict": None, "hyper_parameters": {"width": 3}}, 10, 5)
    assert any("load_from_checkpoint(path, num_classes=5)" in n for n in notes)


def test_a_lightning_checkpoint_fixed_with_a_new_head_loads_with_load_from_checkpoint(tmp_path, monkeypatch):
    ftd_lit = _trained_checkpoint(tmp_path, monkeypatch, "ftd_lit")
    raw = torch.load(tmp_path / "lit.ckpt", weights_only=False)
    assert raw["optimizer_states"] and raw["hyper_parameters"]["num_classes"] == 10

    code, out, err = run_cli("fix", "lit.ckpt", "--arch", "ftd_lit:shapesnet", "--trust-checkpoint", "--method",
                             "entame", "--data", "shapes:5", "--max-samples", "64", "--new-head", "-o", "fixed.ckpt")
    assert code == 0, err
    text = " ".join(out.split())
    assert "hyper_parameters.num_classes from 10 to 5" in text and "dropped optimizer_states" in text
    fixed = ftd_lit.LitShapes.load_from_checkpoint(tmp_path / "fixed.ckpt")     # Lightning's own loader
    assert fixed.hparams.num_classes == 5 and fixed.model.classifier[2].out_features == 5
    saved = torch.load(tmp_path / "fixed.ckpt", weights_only=False)
    assert "optimizer_states" not in saved and saved["epoch"] == raw["epoch"]


def test_a_lightning_checkpoint_with_objects_in_its_hyper_parameters_needs_no_trust(tmp_path, monkeypatch):
    """Its loss module makes weights_only refuse the file; it is read with that object inert (nothing from the
    file runs), fixed, and written back with the object as it was: Lightning reloads it, loss included."""
    ftd_lit2 = _trained_checkpoint(tmp_path, monkeypatch, "ftd_lit2",
                                   loss=torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(Exception):
        torch.load(tmp_path / "lit.ckpt", weights_only=True)       # what used to force --trust-checkpoint

    code, out, err = run_cli("fix", "lit.ckpt", "--arch", "ftd_lit2:shapesnet", "--method", "entame",
                             "--data", "shapes:5", "--max-samples", "64", "--new-head", "-o", "fixed.ckpt")
    assert code == 0, err
    text = " ".join((out + err).split())
    assert "read without running anything from the file" in text and "CrossEntropyLoss" in text
    fixed = ftd_lit2.LitShapes.load_from_checkpoint(tmp_path / "fixed.ckpt", weights_only=False)
    assert fixed.hparams.num_classes == 5 and fixed.model.classifier[2].out_features == 5
    assert isinstance(fixed.hparams.loss, torch.nn.CrossEntropyLoss) and fixed.hparams.loss.label_smoothing == 0.1


def test_code_in_a_checkpoint_extra_is_refused_and_never_carried_on(tmp_path):
    """A training checkpoint whose extra would call os.system: inspect and fix refuse it (exit 2, naming
    posix.system), nothing is written, the marker file is never created; check fails it."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    from ftdoctor.zoo import ShapesNet
    torch.save({"state_dict": ShapesNet(num_classes=5).state_dict(), "callbacks": {"x": Evil()}},
               tmp_path / "evil.ckpt")
    for args in (("inspect", str(tmp_path / "evil.ckpt"), "--arch", "ftdoctor.zoo:ShapesNet"),
                 ("fix", str(tmp_path / "evil.ckpt"), "--arch", "ftdoctor.zoo:ShapesNet", "--method", "rifle",
                  "--data", "shapes:5", "--max-samples", "16", "-o", str(tmp_path / "out.ckpt"))):
        code, out, err = run_cli(*args)
        assert code == 2 and "posix.system (REDUCE" in err and "--trust-checkpoint" in err, err
        assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out.ckpt").exists()
    code, out, err = run_cli("check", str(tmp_path / "evil.ckpt"), "--arch", "ftdoctor.zoo:ShapesNet")
    assert code == 1 and "pickle_safe" in out and "posix.system" in out
    assert not (tmp_path / "PWNED").exists()
