"""Checkpoint formats in and out, safety against malicious pickles, atomic writes (SPEC §3, §8)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from ftdoctor.checkpoint import (
    Container,
    LoadedModel,
    ModelOptions,
    affine_modules,
    atomic_write,
    check_output_path,
    load_model,
    save_model,
    sha256_file,
    validate_options,
    write_sidecar,
)
from ftdoctor.errors import FtdoctorError

USER_MODELS = '''
import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class Wrapped(nn.Module):
    """Its own keys start with 'model.': the prefix must not be stripped."""
    def __init__(self, num_classes=10):
        super().__init__()
        self.model = SmallCNN(num_classes)

    def forward(self, x):
        return self.model(x)


class DataDependent(nn.Module):
    """Reads a tensor value while building, so it cannot be built on the meta device."""
    def __init__(self, num_classes=3):
        super().__init__()
        width = int(torch.ones(2).sum().item()) * 2
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(x)


def fixed_mlp():
    """A callable that does not take num_classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
'''


class Evil:
    """Unpickling this runs a shell command: the attack a checkpoint loader must not fall for."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("usermodels")
    (d / "ftd_usermodels.py").write_text(USER_MODELS)
    return d


@pytest.fixture
def usermodels(models_dir, monkeypatch):
    """The user-model module, importable both by the test and (via the CWD) by the loader."""
    monkeypatch.syspath_prepend(str(models_dir))
    monkeypatch.chdir(models_dir)
    import ftd_usermodels

    return ftd_usermodels


def small_cnn(usermodels, num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = usermodels.SmallCNN(num_classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for buf in (model.features[1].running_mean, model.features[1].running_var):
            buf.copy_(torch.rand_like(buf) + 0.5)
        model.features[1].num_batches_tracked.fill_(7)
    return model


def assert_same_tensors(a, b) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def raw(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


SMALL = ModelOptions(arch="ftd_usermodels:SmallCNN")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict", "net"])
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model."])
def test_state_dict_round_trip_keeps_wrapper_prefix_and_values(usermodels, tmp_path, wrapper, prefix):
    sd = OrderedDict((prefix + k, v) for k, v in small_cnn(usermodels).state_dict().items())
    extras = {"epoch": 3, "optimizer": {"lr": 0.1, "momentum": torch.ones(2)}, "hparams": ["a", 1]}
    obj = sd if wrapper is None else {"epoch": 3, wrapper: sd, "optimizer": extras["optimizer"], "hparams": ["a", 1]}
    src = tmp_path / "in.ckpt"
    torch.save(obj, src)
    before = sha256_file(src)

    first = load_model(src, SMALL)
    assert first.format == "state_dict" and first.num_classes == 10 and first.head_key == "fc"
    assert first.container.wrapper_key == wrapper and first.container.prefix == prefix
    assert not first.model.training
    if prefix:
        assert any(prefix in note for note in first.notes)
    out = tmp_path / "out.ckpt"
    saved = save_model(first, first.model, out)

    assert saved.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert saved.scan.safe and saved.scan.pickles          # the output scanned like any input
    assert sha256_file(src) == before  # the input is never modified
    original, written = raw(src), raw(out)
    if wrapper is None:
        assert_same_tensors(original, written)
    else:
        assert list(written) == list(original)  # same entries, same order
        assert written["epoch"] == 3 and written["hparams"] == ["a", 1]
        assert torch.equal(written["optimizer"]["momentum"], torch.ones(2))
        assert_same_tensors(original[wrapper], written[wrapper])
    again = load_model(out, SMALL)
    assert_same_tensors(first.model.state_dict(), again.model.state_dict())


def test_round_trip_keeps_dtypes_and_writes_modified_weights(usermodels, tmp_path):
    model = small_cnn(usermodels).to(torch.bfloat16)
    src = tmp_path / "bf16.pt"
    torch.save(model.state_dict(), src)
    loaded = load_model(src, SMALL)
    with torch.no_grad():
        loaded.model.fc.weight.zero_()
    out = tmp_path / "bf16_out.pt"
    save_model(loaded, loaded.model, out)
    written = raw(out)
    assert written["fc.weight"].dtype == torch.bfloat16 and not written["fc.weight"].any()
    original = model.state_dict()
    for k in original:
        assert written[k].dtype == original[k].dtype
        if not k.startswith("fc.weight"):
            assert torch.equal(written[k], original[k]), k


def test_torchvision_dataparallel_round_trip(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    sd = {"module." + k: v for k, v in resnet18(num_classes=10).state_dict().items()}
    src = tmp_path / "dp.pth"
    torch.save(sd, src)
    loaded = load_model(src, ModelOptions(arch="resnet18"))
    assert (loaded.arch, loaded.num_classes, loaded.head_key) == ("resnet18", 10, "fc")
    out = tmp_path / "dp_out.pth"
    save_model(loaded, loaded.model, out)
    assert_same_tensors(raw(src), raw(out))


def test_safetensors_round_trip_keeps_metadata(usermodels, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    sd = small_cnn(usermodels).state_dict()
    src = tmp_path / "m.safetensors"
    save_file(dict(sd), str(src), metadata={"format": "pt", "origin": "test"})
    loaded = load_model(src, SMALL)
    assert loaded.format == "safetensors" and loaded.container.metadata == {"format": "pt", "origin": "test"}
    out = tmp_path / "m_out.safetensors"
    save_model(loaded, loaded.model, out)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}
    original, written = load_file(str(src)), load_file(str(out))
    assert set(original) == set(written)
    assert all(torch.equal(original[k], written[k]) and original[k].dtype == written[k].dtype for k in original)


def test_full_module_needs_trust_and_stays_a_module(usermodels, tmp_path):
    model = small_cnn(usermodels)
    src = tmp_path / "full.pt"
    torch.save(model, src)
    with pytest.raises(FtdoctorError) as err:
        load_model(src, ModelOptions())
    assert "ftd_usermodels.SmallCNN" in err.value.cause and "--trust-checkpoint" in err.value.remedy

    loaded = load_model(src, ModelOptions(trust_checkpoint=True))
    assert (loaded.format, loaded.arch, loaded.num_classes, loaded.head_key) == ("module", "SmallCNN", 10, "fc")
    assert not loaded.model.training
    out = tmp_path / "full_out.pt"
    save_model(loaded, loaded.model, out)
    written = torch.load(out, weights_only=False)
    assert isinstance(written, usermodels.SmallCNN)
    assert_same_tensors(model.state_dict(), written.state_dict())
    again = load_model(out, ModelOptions(trust_checkpoint=True))
    assert again.format == "module"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_needs_trust_loads_for_probes_but_is_not_written_back(usermodels, tmp_path):
    model = small_cnn(usermodels, num_classes=5).eval()
    src = tmp_path / "ts.pt"
    torch.jit.script(model).save(str(src))
    with pytest.raises(FtdoctorError) as refused:      # a program: its __setstate__ runs on load
        load_model(src, ModelOptions())
    assert "TorchScript" in refused.value.cause and "--trust-checkpoint" in refused.value.remedy
    loaded = load_model(src, ModelOptions(trust_checkpoint=True))
    assert (loaded.format, loaded.arch, loaded.num_classes, loaded.head_key) == ("torchscript", "SmallCNN", 5, "fc")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x))
    out = tmp_path / "ts_out.pt"
    with pytest.raises(FtdoctorError) as err:
        save_model(loaded, loaded.model, out)
    assert "TorchScript" in err.value.cause and "--arch" in err.value.remedy
    assert not out.exists()


def test_trusted_pickles_keep_their_wrapper(usermodels, tmp_path):
    import argparse

    sd = small_cnn(usermodels).state_dict()
    src = tmp_path / "with_args.ckpt"
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, src)
    untrusted = load_model(src, SMALL)           # the Namespace stays inert: nothing from the file runs
    assert any("argparse.Namespace" in n and "inert" in n for n in untrusted.notes)
    out = tmp_path / "inert_out.ckpt"
    save_model(untrusted, untrusted.model, out)
    assert torch.load(out, weights_only=False)["args"] == argparse.Namespace(lr=0.1)   # written back as it was
    loaded = load_model(src, ModelOptions(arch=SMALL.arch, trust_checkpoint=True))
    assert loaded.format == "state_dict" and loaded.container.wrapper_key == "state_dict"
    out = tmp_path / "with_args_out.ckpt"
    save_model(loaded, loaded.model, out)
    written = torch.load(out, weights_only=False)
    assert written["args"] == argparse.Namespace(lr=0.1)
    assert_same_tensors(sd, written["state_dict"])

    src = tmp_path / "wrapped_module.pt"
    torch.save({"epoch": 2, "model": small_cnn(usermodels)}, src)
    loaded = load_model(src, ModelOptions(trust_checkpoint=True))
    assert (loaded.format, loaded.container.wrapper_key) == ("module", "model")
    out = tmp_path / "wrapped_module_out.pt"
    save_model(loaded, loaded.model, out)
    written = torch.load(out, weights_only=False)
    assert written["epoch"] == 2 and isinstance(written["model"], usermodels.SmallCNN)


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle", "raw-pickle-protocol-2"])
def test_malicious_pickle_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "PWNED"
    payload = {"state_dict": Evil(marker), "epoch": 1}
    path = tmp_path / "evil.pt"
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2 if kind.endswith("2") else pickle.DEFAULT_PROTOCOL)
    for arch in ("resnet18", None):
        with pytest.raises(FtdoctorError) as err:
            load_model(path, ModelOptions(arch=arch))
        message = f"{err.value.cause} {err.value.remedy}"
        assert "posix.system" in message or "os.system" in message, message
        assert "--trust-checkpoint" in err.value.remedy
    assert not marker.exists()


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> Path:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r18") / "r18.pt"
    torch.save(resnet18(num_classes=10).state_dict(), path)
    return path


def test_unreadable_files_are_errors(tmp_path, r18_file):
    data = r18_file.read_bytes()
    cases = {
        "head.pt": data[:5000],
        "tail.pt": data[:-5000],
        "random.pt": random.Random(0).randbytes(4096),   # seeded: random bytes may start with a pickle opcode
        "empty.pt": b"",
        "text.pth": b"hello, world\n" * 10,
        "cut.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FtdoctorError) as err:
            load_model(tmp_path / name, ModelOptions(arch="resnet18"))
        assert "not a readable checkpoint" in err.value.cause, (name, err.value)
        assert "\n" not in err.value.cause and err.value.remedy, name
    with pytest.raises(FtdoctorError, match="does not exist"):
        load_model(tmp_path / "missing.pt", ModelOptions(arch="resnet18"))
    with pytest.raises(FtdoctorError, match="is a directory"):
        load_model(tmp_path, ModelOptions(arch="resnet18"))


def test_non_model_payloads_are_errors(tmp_path):
    for name, obj in {"list.pt": [1, 2, 3], "dict.pt": {"epoch": 3, "lr": 0.1}, "tensor.pt": torch.ones(3)}.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(FtdoctorError) as err:
            load_model(tmp_path / name, ModelOptions(arch="resnet18"))
        assert "state_dict" in err.value.remedy


def test_unknown_arch_suggests_close_names(r18_file):
    with pytest.raises(FtdoctorError) as err:
        load_model(r18_file, ModelOptions(arch="resnet9000"))
    assert "resnet9000" in err.value.cause and "resnet18" in err.value.remedy


def test_arch_mismatch_lists_keys(usermodels, tmp_path):
    src = tmp_path / "small.pt"
    torch.save(small_cnn(usermodels).state_dict(), src)
    with pytest.raises(FtdoctorError) as err:
        load_model(src, ModelOptions(arch="resnet18"))
    assert "missing" in err.value.cause and "features.0.weight" in err.value.cause
    assert "--non-strict" in err.value.remedy and "--arch" in err.value.remedy


def test_validate_options_without_a_file():
    validate_options(ModelOptions(arch="resnet18", num_classes=3))
    for bad in (ModelOptions(arch="resnet9000"), ModelOptions(device="gpu7"), ModelOptions(num_classes=0),
                ModelOptions(arch="no_such_module_xyz:f")):
        with pytest.raises(FtdoctorError):
            validate_options(bad)


def test_unavailable_device_is_an_error(r18_file):
    with pytest.raises(FtdoctorError, match="unknown device"):
        load_model(r18_file, ModelOptions(arch="resnet18", device="gpu7"))
    if not torch.cuda.is_available():
        with pytest.raises(FtdoctorError, match="not available"):
            load_model(r18_file, ModelOptions(arch="resnet18", device="cuda"))


# --------------------------------------------------------------------------- architectures


def test_num_classes_inferred_from_the_head(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    reference = resnet18(num_classes=7)
    src = tmp_path / "r18_7.pt"
    torch.save(reference.state_dict(), src)
    loaded = load_model(src, ModelOptions(arch="resnet18"))
    assert loaded.num_classes == 7 and loaded.model.fc.out_features == 7
    assert_same_tensors(reference.state_dict(), loaded.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference.eval()(x))
    with pytest.raises(FtdoctorError) as err:
        load_model(src, ModelOptions(arch="resnet18", num_classes=10))
    assert "7 outputs" in err.value.cause and "--num-classes 7" in err.value.remedy
    assert load_model(src, ModelOptions(arch="resnet18", num_classes=7)).num_classes == 7


def test_resnet18_recognised_without_arch(r18_file):
    loaded = load_model(r18_file, ModelOptions())   # its cost: benchmarks/recognition.py
    assert (loaded.arch, loaded.num_classes, loaded.head_key) == ("resnet18", 10, "fc")
    assert any("resnet18 recognised" in note for note in loaded.notes)
    assert_same_tensors(raw(r18_file), loaded.model.state_dict())


def test_vgg11_bn_recognised_without_arch(tmp_path):
    from torchvision.models import vgg11_bn

    from ftdoctor.checkpoint.torchvision import match_torchvision

    with torch.device("meta"):
        shapes = vgg11_bn(num_classes=10).state_dict()
    # Keys and shapes are all the matcher reads: meta tensors stand in for 500 MB of weights.
    assert match_torchvision(tmp_path / "vgg.pt", shapes).name == "vgg11_bn"


def test_stride_zero_views_are_refused_as_allocation_bombs(tmp_path):
    from torchvision.models import vgg11_bn

    with torch.device("meta"):
        shapes = vgg11_bn(num_classes=10).state_dict()
    # Each tensor a broadcast scalar, saved as one element: 18 KB on disk that would become 500 MB.
    sd = OrderedDict((k, torch.full((), 0.5 if v.is_floating_point() else 1, dtype=v.dtype).expand(v.shape))
                     for k, v in shapes.items())
    src = tmp_path / "vgg.pt"
    torch.save(sd, src)
    with pytest.raises(FtdoctorError) as err:
        load_model(src, ModelOptions())
    assert "repeats its storage" in err.value.cause and "stride" in err.value.cause


def test_vit_image_size_read_from_the_position_embedding(tmp_path):
    from torchvision.models import vit_b_32

    from ftdoctor.checkpoint.builders import build_kwargs, signature_for
    from ftdoctor.checkpoint.torchvision import match_torchvision

    with torch.device("meta"):
        shapes = vit_b_32(num_classes=5, image_size=64).state_dict()
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in shapes.items()}
    builder = match_torchvision(tmp_path / "vit.pt", sd)  # matching alone: the real build is 88M parameters
    assert builder.name == "vit_b_32"
    assert build_kwargs(builder, signature_for(builder), sd, 5) == {"num_classes": 5, "image_size": 64}


def test_unknown_state_dict_without_arch_asks_for_arch(usermodels, tmp_path):
    src = tmp_path / "small.pt"
    torch.save(small_cnn(usermodels).state_dict(), src)
    with pytest.raises(FtdoctorError) as err:
        load_model(src, ModelOptions())
    assert "matches no torchvision" in err.value.cause and "closest" in err.value.cause
    assert "--arch" in err.value.remedy


def test_import_path_arch_from_the_working_directory(tmp_path, monkeypatch):
    name = f"ftd_cwd_models_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        torch.manual_seed(0)
        src = tmp_path / "small6.pt"
        state = {
            "features.0.weight": torch.randn(8, 3, 3, 3), "features.0.bias": torch.randn(8),
            "features.1.weight": torch.rand(8), "features.1.bias": torch.randn(8),
            "features.1.running_mean": torch.randn(8), "features.1.running_var": torch.rand(8) + 0.5,
            "features.1.num_batches_tracked": torch.tensor(3),
            "features.3.weight": torch.randn(8, 8, 3, 3), "features.3.bias": torch.randn(8),
            "fc.weight": torch.randn(6, 32), "fc.bias": torch.randn(6),
        }
        torch.save(state, src)
        loaded = load_model(src, ModelOptions(arch=f"{name}:SmallCNN"))
        assert (loaded.arch, loaded.num_classes, loaded.head_key) == (f"{name}:SmallCNN", 6, "fc")
        assert_same_tensors(state, loaded.model.state_dict())

        mlp = sys.modules[name].fixed_mlp()
        torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
        fixed = load_model(tmp_path / "mlp.pt", ModelOptions(arch=f"{name}:fixed_mlp"))
        assert (fixed.num_classes, fixed.head_key) == (3, "3")

        # Not buildable on meta: built for real with defaults, then again with the file's class count.
        torch.save({"fc.weight": torch.randn(5, 4), "fc.bias": torch.randn(5)}, tmp_path / "dd.pt")
        dd = load_model(tmp_path / "dd.pt", ModelOptions(arch=f"{name}:DataDependent"))
        assert dd.num_classes == 5 and dd.model.fc.out_features == 5

        # A model whose own keys start with "model." keeps them.
        wrapped = sys.modules[name].Wrapped(4)
        torch.save(wrapped.state_dict(), tmp_path / "wrapped.pt")
        kept = load_model(tmp_path / "wrapped.pt", ModelOptions(arch=f"{name}:Wrapped"))
        assert kept.container.prefix == "" and kept.head_key == "model.fc" and kept.num_classes == 4

        with pytest.raises(FtdoctorError, match="cannot import"):
            load_model(src, ModelOptions(arch="no_such_module_xyz:SmallCNN"))
        with pytest.raises(FtdoctorError, match="no attribute"):
            load_model(src, ModelOptions(arch=f"{name}:NoSuchModel"))
    finally:
        sys.modules.pop(name, None)
    assert sys.path == path_before


def test_non_strict_loads_what_fits_and_notes_the_rest(usermodels, tmp_path):
    model = small_cnn(usermodels)
    sd = model.state_dict()
    del sd["features.3.bias"]
    sd["fc.weight"] = torch.randn(10, 99)
    sd["extra.weight"] = torch.randn(2)
    src = tmp_path / "partial.pt"
    torch.save(sd, src)
    with pytest.raises(FtdoctorError) as err:
        load_model(src, SMALL)
    assert "features.3.bias" in err.value.cause and "extra.weight" in err.value.cause and "fc.weight" in err.value.cause

    loaded = load_model(src, ModelOptions(arch=SMALL.arch, non_strict=True))
    notes = " ".join(loaded.notes)
    assert "features.3.bias" in notes and "extra.weight" in notes and "fc.weight" in notes
    got = loaded.model.state_dict()
    assert torch.equal(got["features.0.weight"], sd["features.0.weight"])
    assert torch.equal(got["features.1.running_var"], sd["features.1.running_var"])
    assert got["fc.weight"].shape == (10, 32)


def test_affine_modules_in_registration_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, although applied last
            self.conv = nn.Conv1d(1, 4, 1)
            self.norm = nn.BatchNorm1d(4)
            self.attn = nn.MultiheadAttention(4, 1)  # its out_proj is a Linear subclass

    names = [name for name, _ in affine_modules(Net())]
    assert names == ["head", "conv", "attn.out_proj"]


# --------------------------------------------------------------------------- writing


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    out = tmp_path / "out.pt"

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(out, half_then_fail)
    assert list(tmp_path.iterdir()) == []

    def half_then_interrupt(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    out.write_bytes(b"keep")
    for writer in (half_then_fail, half_then_interrupt):
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            atomic_write(out, writer)
        assert out.read_bytes() == b"keep" and list(tmp_path.iterdir()) == [out]

    atomic_write(out, lambda tmp: tmp.write_bytes(b"new"))
    assert out.read_bytes() == b"new" and list(tmp_path.iterdir()) == [out]


def test_write_sidecar(tmp_path):
    out = tmp_path / "fixed.pt"
    path = write_sidecar(out, {"method": "entame", "a": [1, 2]})
    assert path == tmp_path / "fixed.pt.ftdoctor.json"
    text = path.read_text()
    assert json.loads(text) == {"a": [1, 2], "method": "entame"}
    assert text.index('"a"') < text.index('"method"') and '\n  "a"' in text


def test_check_output_path_refusals(tmp_path):
    inp = tmp_path / "in.pt"
    inp.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    for same in (inp, tmp_path / "sub" / ".." / "in.pt"):
        with pytest.raises(FtdoctorError, match="refusing to overwrite the input"):
            check_output_path(inp, same, force=True)
    link = tmp_path / "link.pt"
    link.symlink_to(inp)
    with pytest.raises(FtdoctorError, match="refusing to overwrite the input"):
        check_output_path(inp, link, force=True)
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep")
    with pytest.raises(FtdoctorError) as err:
        check_output_path(inp, existing, force=False)
    assert "--force" in err.value.remedy
    check_output_path(inp, existing, force=True)
    with pytest.raises(FtdoctorError, match="does not exist"):
        check_output_path(inp, tmp_path / "nowhere" / "out.pt", force=False)
    check_output_path(inp, tmp_path / "new.pt", force=False)


def test_save_model_refuses_input_and_existing_output(usermodels, tmp_path):
    src = tmp_path / "in.pt"
    torch.save(small_cnn(usermodels).state_dict(), src)
    before = sha256_file(src)
    loaded = load_model(src, SMALL)
    with pytest.raises(FtdoctorError):
        save_model(loaded, loaded.model, src, force=True)
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep")
    with pytest.raises(FtdoctorError):
        save_model(loaded, loaded.model, existing)
    assert existing.read_bytes() == b"keep" and sha256_file(src) == before
    save_model(loaded, loaded.model, existing, force=True)
    assert_same_tensors(raw(src), raw(existing))


def test_public_types():
    box = Container("state_dict")
    assert box.prefix == "" and box.wrapper_key is None
    with pytest.raises(AttributeError):
        box.prefix = "module."  # type: ignore[misc]
    assert "notes" in LoadedModel.__dataclass_fields__
