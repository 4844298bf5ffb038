"""Model folders (Hugging Face save_pretrained, timm hub): read whole, built offline by the library, written
back as a folder of the same layout that the library loads, atomically; hostile folders refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ftdoctor.checkpoint import ModelOptions, load_model, save_model
from ftdoctor.checkpoint.folder import folder_of
from ftdoctor.errors import FtdoctorError
from ftdoctor.outputs import journal, Output
from hf_helpers import bert_folder, timm_folder, vit_folder

transformers = pytest.importorskip("transformers")


def _images(n=4, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_a_vit_folder_builds_offline_with_the_library_and_computes_its_logits(tmp_path):
    folder = vit_folder(tmp_path / "vit")
    loaded = load_model(folder)
    assert loaded.arch == "hf:ViTForImageClassification" and loaded.num_classes == 3
    assert loaded.head_key == "classifier"
    theirs = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    x = _images()
    assert torch.equal(loaded.model(x).logits, theirs(x).logits)
    # the weight file inside the folder names the folder
    inner = load_model(folder / "model.safetensors")
    assert inner.path == folder and any("part of the model folder" in n for n in inner.notes)


def test_a_sharded_folder_is_read_whole_and_written_back_in_the_same_shards(tmp_path):
    folder = vit_folder(tmp_path / "vit", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(folder)
    with torch.no_grad():
        loaded.model.classifier.weight.mul_(2.0)
    out = tmp_path / "out"
    save_model(loaded, loaded.model, out)
    written = json.loads((out / "model.safetensors.index.json").read_text())
    assert written["weight_map"] == index["weight_map"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder))
    again = transformers.ViTForImageClassification.from_pretrained(out).eval()
    x = _images()
    assert torch.allclose(again(x).logits, loaded.model(x).logits)


def test_a_new_head_updates_config_json_so_from_pretrained_loads_it(tmp_path):
    folder = bert_folder(tmp_path / "bert", num_labels=2, labels=["neg", "pos"])
    loaded = load_model(folder)
    loaded.model.classifier = torch.nn.Linear(16, 5)
    notes: list[str] = []
    save_model(loaded, loaded.model, tmp_path / "five", notes=notes)
    config = json.loads((tmp_path / "five" / "config.json").read_text())
    assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(5)}
    assert any("2 labels -> 5" in n for n in notes)
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "five")
    assert again.classifier.out_features == 5 and torch.equal(again.classifier.weight, loaded.model.classifier.weight)
    assert (tmp_path / "five" / "tokenizer.json").is_file()       # the other files come along
    save_model(loaded, loaded.model, tmp_path / "named", class_names=["a", "b", "c", "d", "e"])
    named = json.loads((tmp_path / "named" / "config.json").read_text())
    assert named["id2label"]["4"] == "e" and named["label2id"]["a"] == 0     # the data's class names


def test_a_pytorch_model_bin_folder_stays_one(tmp_path):
    folder = vit_folder(tmp_path / "vit")
    state = transformers.ViTForImageClassification.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    loaded = load_model(folder)
    save_model(loaded, loaded.model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out")
    assert torch.equal(again.classifier.weight, loaded.model.classifier.weight)


def test_a_timm_hub_folder_is_recognised_from_its_config(tmp_path):
    timm = pytest.importorskip("timm")
    folder = timm_folder(tmp_path / "convnext", "convnext_atto", num_classes=4)
    loaded = load_model(folder)
    assert loaded.arch == "timm:convnext_atto" and loaded.num_classes == 4
    loaded.model.head.fc = torch.nn.Linear(loaded.model.head.fc.in_features, 6)
    notes: list[str] = []
    save_model(loaded, loaded.model, tmp_path / "six", notes=notes)
    config = json.loads((tmp_path / "six" / "config.json").read_text())
    assert config["num_classes"] == 6 and any("num_classes 4 -> 6" in n for n in notes)
    rebuilt = timm.create_model("convnext_atto", pretrained=False, num_classes=config["num_classes"])
    from safetensors.torch import load_file
    rebuilt.load_state_dict(load_file(str(tmp_path / "six" / "model.safetensors")))
    x = _images(2, 64)
    loaded.model.eval(), rebuilt.eval()
    assert torch.allclose(rebuilt(x), loaded.model(x), atol=1e-6)


def test_a_folder_output_is_refused_over_an_existing_one_and_over_its_input(tmp_path):
    folder = vit_folder(tmp_path / "vit")
    loaded = load_model(folder)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FtdoctorError, match="already exists"):
        save_model(loaded, loaded.model, tmp_path / "taken")
    with pytest.raises(FtdoctorError, match="refusing"):
        save_model(loaded, loaded.model, folder, force=True)
    with pytest.raises(FtdoctorError, match="holds the input"):
        save_model(loaded, loaded.model, tmp_path, force=True)
    save_model(loaded, loaded.model, tmp_path / "taken", force=True)     # --force replaces the folder whole
    assert (tmp_path / "taken" / "config.json").is_file()


def test_a_failed_command_leaves_no_folder_and_puts_back_the_one_it_replaced(tmp_path):
    folder = vit_folder(tmp_path / "vit")
    loaded = load_model(folder)
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with journal([Output(tmp_path / "new", "-o", directory=True), Output(old, "-o2", directory=True)],
                     [folder], force=True):
            save_model(loaded, loaded.model, tmp_path / "new", force=True)
            save_model(loaded, loaded.model, old, force=True)
            assert (tmp_path / "new" / "config.json").exists() and not (old / "keep.txt").exists()
            raise RuntimeError("late failure")
    assert not (tmp_path / "new").exists()
    assert (old / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "vit"]    # no temporary folder left


@pytest.mark.parametrize("config, match", [
    ({"model_type": "bert", "architectures": ["Evil"], "auto_map": {"AutoModel": "evil.Evil"}}, "auto_map"),
    ({"model_type": "no-such-type", "architectures": ["BertForSequenceClassification"]}, "model type"),
    ({"model_type": "bert", "architectures": ["os.system"]}, "no model class"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, "not a classifier"),
    ({"hello": 1}, "neither a Hugging Face config"),
])
def test_a_hostile_or_foreign_config_is_refused_without_running_anything(tmp_path, config, match):
    folder = vit_folder(tmp_path / "m")
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtdoctorError, match=match):
        load_model(folder)
    assert not marker.exists()


def test_a_folder_whose_index_points_outside_is_refused(tmp_path):
    folder = vit_folder(tmp_path / "m", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../../etc/passwd" for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FtdoctorError, match="outside the folder"):
        load_model(folder)


def test_a_directory_without_config_says_what_a_model_folder_needs(tmp_path):
    with pytest.raises(FtdoctorError, match="without a config.json"):
        load_model(tmp_path)
    assert folder_of(tmp_path) is None


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    folder = vit_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 64
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtdoctorError, match="do not"):
        load_model(folder)
    loaded = load_model(folder, ModelOptions(non_strict=True))
    assert any("--non-strict" in n for n in loaded.notes)


@pytest.mark.parametrize("change, match", [
    ({"hidden_size": 1_000_000, "intermediate_size": 4_000_000}, "far larger than its weights"),
    ({"num_hidden_layers": 1_000_000}, "far larger than its weights"),
    ({"image_size": 2**20}, "far larger than its weights"),
    ({"num_labels": 10**9}, "not a class count"),
])
def test_a_config_far_larger_than_its_weights_is_refused_before_anything_is_allocated(tmp_path, change, match):
    folder = vit_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FtdoctorError, match=match):
        load_model(folder)


def test_a_timm_folder_whose_model_args_ask_for_a_huge_model_is_refused(tmp_path):
    pytest.importorskip("timm")
    folder = timm_folder(tmp_path / "r", "resnet18", num_classes=4)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"] = {"layers": [100_000, 2, 2, 2]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtdoctorError, match="far larger than its weights"):
        load_model(folder)


def test_a_link_to_a_file_outside_the_folder_is_not_copied_into_the_output(tmp_path):
    folder = vit_folder(tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (folder / "notes.txt").symlink_to(secret)
    loaded = load_model(folder)
    notes: list[str] = []
    loaded.model.classifier = torch.nn.Linear(32, 4)
    save_model(loaded, loaded.model, tmp_path / "out", notes=notes)
    assert not (tmp_path / "out" / "notes.txt").exists() and (tmp_path / "out" / "preprocessor_config.json").exists()
    assert any("not copied: notes.txt" in n for n in notes)


@pytest.mark.parametrize("args", [{"pretrained": True}, {"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
                                  {"checkpoint_path": "/etc/passwd"}])
def test_timm_model_args_that_would_fetch_or_read_weights_are_refused(tmp_path, args):
    pytest.importorskip("timm")
    folder = timm_folder(tmp_path / "r", "resnet18", num_classes=4)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"] = args
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtdoctorError, match="fetch or read weights"):
        load_model(folder)
