"""The issue's "must hold" runs, typed as a user would: probe, fix --method entame --new-head and check on a
Hugging Face BERT-style text classifier (with a CSV and with a datasets folder), a Hugging Face ViT and a
timm hub folder; the fixed folder reloads in its own library; the commands ftdoctor prints run as printed."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import torch

from helpers import run_cli
from hf_helpers import SENTENCES, bert_folder, reviews_csv, reviews_dataset, timm_folder, vit_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"bert": bert_folder(root / "bert", labels=["neg", "pos"]), "csv": reviews_csv(root / "reviews.csv"),
            "datasets": reviews_dataset(root / "reviews")}


def _chain(model, data, tmp_path, reload, *extra):
    """probe (JSON), fix entame --new-head, check on the fixed folder; returns the probe report and the fixed
    folder, reloaded by ``reload``."""
    code, out, err = run_cli("probe", model, "--data", data, *extra, "--new-head", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    fixed = tmp_path / "FIXED"
    code, out, err = run_cli("fix", model, "--method", "entame", "--new-head", "--data", data, *extra, "-o", fixed)
    assert code == 0, err + out
    assert fixed.is_dir() and (tmp_path / "FIXED.ftdoctor.json").is_file()
    code, out, err = run_cli("check", fixed, "--data", data, *extra, "--format", "json")
    assert code in (0, 1), err
    checked = json.loads(out)
    verdicts = {c["name"]: c for c in checked["checkpoints"][0]["checks"]}
    assert verdicts["loadable"]["passed"] and verdicts["runs_on_data"]["passed"]
    assert verdicts["max_excess_noise_fraction"]["passed"]      # ENTAME's head: at the floor
    reload(fixed)
    return report, fixed


@pytest.mark.parametrize("data", ["csv", "datasets"])
def test_a_text_classifier_folder_with_a_csv_or_a_datasets_folder(text, data, tmp_path):
    def reload(fixed):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(fixed).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(fixed)
        logits = model(**tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")).logits
        assert torch.allclose(logits, torch.zeros_like(logits), atol=1e-5)   # ENTAME's head: uniform output

    report, _ = _chain(text["bert"], text[data], tmp_path, reload, "--max-samples", "24")
    assert report["model"]["arch"] == "hf:BertForSequenceClassification"
    rows = [l["name"] for l in report["probes"]["change_rate"]["layers"]]
    assert rows[0] == "bert.embeddings.word_embeddings"                    # measured from the embeddings up
    assert "bert.encoder.layer.0.attention.self.query" in rows and "bert.embeddings.LayerNorm" in rows
    skipped = {s["name"] for s in report["skipped"]}
    assert "bert.embeddings.position_embeddings" in skipped
    assert report["data"]["num_samples"] == 24 and report["data"]["num_classes"] == 2


def test_an_image_classifier_folder(tmp_path):
    vit = vit_folder(tmp_path / "vit", num_labels=3)

    def reload(fixed):
        model = transformers.ViTForImageClassification.from_pretrained(fixed)
        assert model.classifier.out_features == 5 and json.loads((fixed / "config.json").read_text())["id2label"]

    report, _ = _chain(vit, "shapes:5", tmp_path, reload, "--max-samples", "20")
    rows = [l["name"] for l in report["probes"]["change_rate"]["layers"]]
    assert rows[0] == "vit.embeddings.patch_embeddings.projection" and "vit.layers.0.attention.q_proj" in rows


def test_a_timm_hub_folder(tmp_path):
    timm = pytest.importorskip("timm")
    folder = timm_folder(tmp_path / "effnet", "efficientnet_b0", num_classes=4)

    def reload(fixed):
        config = json.loads((fixed / "config.json").read_text())
        model = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"])
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(fixed / "model.safetensors")))
        assert config["num_classes"] == 3

    report, _ = _chain(folder, "shapes:3", tmp_path, reload, "--max-samples", "12", "--batch-size", "6")
    assert report["model"]["arch"] == "timm:efficientnet_b0"


def test_every_command_printed_for_a_folder_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vit_folder(tmp_path / "vit", num_labels=3)
    code, out, err = run_cli("probe", "vit", "--data", "shapes:3", "--max-samples", "16", "--new-head",
                             env={"COLUMNS": "200"})
    assert code == 0, err
    printed = [m.group(1) for m in re.finditer(r"^\d+ → (.+)$", out, re.M)]
    commands = [c for c in printed if c.startswith("ftdoctor ")]
    assert commands and all(" -o FIXED" in c and "FIXED.pt" not in c for c in commands)
    for words in set(printed) - set(commands):      # what cannot run is said in words, not as a command
        assert "cannot" in words
    code, out, err = run_cli(*shlex.split(commands[0])[1:])
    assert code == 0, err + out
    assert (tmp_path / "FIXED" / "config.json").is_file()


def test_text_data_for_an_image_model_and_images_for_a_text_model_are_refused(text, tmp_path):
    vit = vit_folder(tmp_path / "vit")
    code, _, err = run_cli("probe", vit, "--data", text["csv"])
    assert code == 2 and "holds texts" in err
    code, _, err = run_cli("probe", text["bert"], "--data", "shapes:3")
    assert code == 2 and "text classifier" in err


def test_a_short_fine_tune_of_a_text_classifier(text, tmp_path):
    out = tmp_path / "trace.h5"
    code, _, err = run_cli("trace", text["bert"], "--data", text["csv"], "--steps", "3", "--batch-size", "8",
                           "--max-samples", "16", "--eval-samples", "8", "--hdf5", out)
    assert code == 2 and "--eval-split train" in err          # one file, one split: said how to evaluate
    code, _, err = run_cli("trace", text["bert"], "--data", text["csv"], "--steps", "3", "--batch-size", "8",
                           "--max-samples", "16", "--eval-samples", "8", "--eval-split", "train", "--hdf5", out)
    assert code == 0, err
    assert out.is_file()


def test_check_recognises_each_checkpoint_of_a_folder_that_mixes_libraries(tmp_path):
    timm = pytest.importorskip("timm")
    import torchvision

    root = tmp_path / "exports"
    root.mkdir()
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), root / "tv.pt")
    torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=3).state_dict(), root / "tm.pt")
    vit_folder(root / "hf", num_labels=3)
    timm_folder(root / "hub", "convnext_atto", num_classes=3)
    code, out, err = run_cli("check", root, "--data", "shapes:3", "--max-samples", "8", "--format", "json")
    assert code in (0, 1), err
    found = {c["path"].rsplit("/", 1)[-1]: next(x for x in c["checks"] if x["name"] == "loadable")
             for c in json.loads(out)["checkpoints"]}
    assert sorted(found) == ["hf", "hub", "tm.pt", "tv.pt"] and all(v["passed"] for v in found.values())
    assert "resnet18" in found["tv.pt"]["message"] and "timm:convnext_atto" in found["tm.pt"]["message"]
    assert "hf:ViTForImageClassification" in found["hf"]["message"]
    assert "timm:convnext_atto" in found["hub"]["message"]


TEXTNET = '''
import torch
from torch import nn


class TextNet(nn.Module):
    """Your own text classifier: embeddings averaged over the real tokens, a linear head."""

    def __init__(self, num_classes=2, vocab=80):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, input_ids, attention_mask, **_):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))
'''


def test_your_own_text_model_takes_text_with_a_tokenizer(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "textnets.py").write_text(TEXTNET)
    import importlib
    torch.manual_seed(0)
    torch.save(importlib.import_module("textnets").TextNet().state_dict(), tmp_path / "t.pt")
    args = ["t.pt", "--arch", "textnets:TextNet", "--data", text["csv"], "--max-samples", "16"]
    code, _, err = run_cli("probe", *args)
    assert code == 2 and "--tokenizer" in err                 # text needs a tokenizer: said where to get one
    code, out, err = run_cli("probe", *args, "--tokenizer", text["bert"], "--format", "json")
    assert code == 0, err
    rows = [l["name"] for l in json.loads(out)["probes"]["change_rate"]["layers"]]
    assert rows == ["embed", "head"]


def test_check_fails_the_checkpoint_that_cannot_take_the_data_and_judges_the_others(text, tmp_path):
    vit = vit_folder(tmp_path / "vit", num_labels=3)
    code, out, err = run_cli("check", text["bert"], vit, "--data", "shapes:3", "--max-samples", "8",
                             "--format", "json")
    assert code == 1, err
    results = {c["path"].rsplit("/", 1)[-1]: {x["name"]: x for x in c["checks"]}
               for c in json.loads(out)["checkpoints"]}
    assert not results["bert"]["runs_on_data"]["passed"]
    assert "text classifier" in results["bert"]["runs_on_data"]["message"]
    assert results["vit"]["runs_on_data"]["passed"]


def test_r2_and_drift_against_a_reference_folder(text, tmp_path):
    fixed = tmp_path / "fixed"
    code, _, err = run_cli("fix", text["bert"], "--method", "entame", "--new-head", "--data", text["csv"],
                           "--max-samples", "16", "-o", fixed)
    assert code == 0, err
    code, out, err = run_cli("probe", fixed, "--data", text["csv"], "--max-samples", "16", "--reference",
                             text["bert"], "--probes", "r2,drift", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    r2 = {l["name"]: l for l in report["probes"]["r2"]["layers"]}
    assert r2["bert.encoder.layer.0.attention.self.query"]["median"] == pytest.approx(1.0)   # untouched
    drift = {l["name"]: l for l in report["probes"]["drift"]["layers"]}
    assert drift["bert.pooler.dense"]["rel"] == 0 and drift["classifier"]["rel"] > 0.5       # only the head moved


@pytest.mark.parametrize("flag", ["--max-length", "--batch-size"])
def test_an_out_of_range_number_is_a_usage_error_not_an_unexpected_one(flag):
    code, _, err = run_cli("probe", "model.pt", "--data", "shapes", flag, "0")
    assert code == 2 and "Invalid value" in err and "unexpected" not in err
