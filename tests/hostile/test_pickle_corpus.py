"""The pickle scan against the peers (issue 24): at least 40 payload checkpoints and 20 benign ones as the
libraries save them, written here in their real formats. ftdoctor flags every payload picklescan or fickling
flags (and every other payload), flags no benign file, and no payload runs in any command."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from helpers import NETS_SOURCE
from hostile import ARCH, CANARY, PAYLOAD, SMALL, assert_clean, run
from pickle_corpus import (HParams, Mode, Reduce, containers, fickling_flags, metadata, object_payloads,
                           picklescan_flags, raw_payloads)

from ftdoctor.checkpoint.pickle_scan import scan_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

#: the payloads that create the canary when a full unpickler reads them (the others act in other ways)
CREATES_CANARY = {
    "raw_proto0_global_reduce", "raw_proto0_py2_builtin_eval", "raw_proto0_inst", "raw_proto1_obj",
    "raw_proto4_getattr_chain", "raw_proto4_memo_names", "raw_proto2_memo_reuse", "raw_proto2_build_setstate",
    "raw_proto2_subprocess_popen", "raw_proto2_function_from_marshal", "raw_proto4_runpy",
    "zip_os_system", "zip_builtins_exec", "zip_builtins_eval", "zip_builtins_open", "zip_subprocess_run",
    "zip_subprocess_check_output", "zip_shutil_copyfile", "zip_io_open", "zip_reduce_ex", "zip_timeit",
    "zip_cprofile_run", "zip_numpy_runstring", "zip_zipfile_create",
    *(f"rawproto{p}" for p in range(6)), "zipproto2", "zipproto3", "zipproto4", "zipproto5", "legacyproto2",
    "legacyproto3", *(f"zip_{c}" for c in ("in_list", "in_dict", "in_ordereddict", "in_tuple", "in_hyper_parameters",
                                           "in_optimizer_state")), "legacy_in_hyper_parameters",
}


def _nets(root: Path):
    sys.path.insert(0, str(root))
    try:
        import importlib

        import ftd_hostile_nets
        return importlib.reload(ftd_hostile_nets)
    finally:
        sys.path.remove(str(root))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every payload (name -> path) in one working directory, the canary path absolute inside it."""
    root = tmp_path_factory.mktemp("payloads")
    (root / "ftd_hostile_nets.py").write_text(NETS_SOURCE)
    torch.manual_seed(0)
    sd = _nets(root).SmallCNN(10).state_dict()
    canary = root / CANARY
    found: dict[str, Path] = {}

    def save(name: str, obj: object, **kw) -> None:
        found[name] = root / f"{name}.pt"
        torch.save(obj, found[name], **kw)

    for name, blob in raw_payloads(canary).items():
        found[f"raw_{name}"] = root / f"raw_{name}.pt"
        found[f"raw_{name}"].write_bytes(blob)
    objects = object_payloads(canary)
    for name, obj in objects.items():
        save(f"zip_{name}", {"state_dict": sd, "x": obj})
    evil = objects["os_system"]
    for p in range(6):
        found[f"rawproto{p}"] = root / f"rawproto{p}.pt"
        with open(found[f"rawproto{p}"], "wb") as f:
            pickle.dump({"state_dict": sd, "x": evil}, f, protocol=p)
    for p in (2, 3, 4, 5):
        save(f"zipproto{p}", {"state_dict": sd, "x": evil}, pickle_protocol=p)
    for p in (2, 3):
        save(f"legacyproto{p}", {"state_dict": sd, "x": evil}, pickle_protocol=p,
             _use_new_zipfile_serialization=False)
    for name, obj in containers(evil, sd).items():
        save(f"zip_{name}", obj)
    save("legacy_in_hyper_parameters", containers(evil, sd)["in_hyper_parameters"],
         _use_new_zipfile_serialization=False)
    # a pickle stored as bytes beside the weights: harmless until a loader unpickles that entry
    save("zip_nested_in_bytes", {"state_dict": sd, "blob": pickle.dumps(evil)})
    # TorchScript whose __setstate__ writes the canary when the archive is loaded
    (root / "ftd_payload.py").write_text(PAYLOAD.replace("CANARY", str(canary)))
    sys.path.insert(0, str(root))
    try:
        import ftd_payload
        torch.jit.script(ftd_payload.Evil()).save(str(root / "torchscript_setstate.pt"))
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("ftd_payload", None)
    found["torchscript_setstate"] = root / "torchscript_setstate.pt"
    # Hugging Face folders: a payload weight file, and a payload training_args.bin beside safe weights
    from hf_helpers import bert_folder
    hf = bert_folder(root / "hf_bin")
    weights = {k: v for k, v in scan_weights(hf).items()}
    (hf / "model.safetensors").unlink()
    torch.save({**weights, "x": evil}, hf / "pytorch_model.bin")
    found["hf_pytorch_model_bin"] = hf
    hf2 = bert_folder(root / "hf_training_args")
    torch.save({"output_dir": "x", "x": evil}, hf2 / "training_args.bin")
    found["hf_training_args_bin"] = hf2
    for leftover in root.glob(CANARY):
        leftover.unlink()
    return root, found


def scan_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_the_corpus_is_large_and_real(corpus, tmp_path):
    """At least 40 payloads; those that should create the canary do so under a real full unpickler (in a child
    process), so a passing scan is not a scan of harmless files."""
    root, found = corpus
    assert len(found) >= 40, len(found)
    names = sorted(CREATES_CANARY)
    canary = root / CANARY
    script = (                                  # one child process for all: each load, then look for the canary
        "import json, os, sys, time, torch\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "made = []\n"
        "for path in sys.argv[2:]:\n"
        "    try:\n"
        "        torch.load(path, weights_only=False)\n"
        "    except BaseException:\n"
        "        pass\n"
        "    for _ in range(100):\n"                 # Popen's child touches the canary a moment later
        "        if os.path.exists(sys.argv[1]):\n"
        "            break\n"
        "        time.sleep(0.02)\n"
        "    made.append(os.path.exists(sys.argv[1]))\n"
        "    if made[-1]:\n"
        "        os.unlink(sys.argv[1])\n"
        "print(json.dumps(made))\n")
    done = subprocess.run([sys.executable, "-c", script, str(canary), *(str(found[n]) for n in names)],
                          cwd=tmp_path, timeout=300, capture_output=True, text=True)
    made = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(made), [n for n, m in zip(names, made) if not m]


def test_every_payload_is_flagged_including_all_the_peers_flag(corpus):
    root, found = corpus
    rows = {}
    for name, path in found.items():
        scan = scan_checkpoint(path)
        rows[name] = (bool(scan.acting), picklescan_flags(path), fickling_flags(path))
    missed = [n for n, (ours, ps, fk) in rows.items() if not ours]
    assert not missed, missed                                    # ftdoctor flags every payload ...
    assert all(ours for ours, ps, fk in rows.values() if ps or fk)  # ... so every one a peer flags
    # the oracles are working oracles (each flags most payloads), and ftdoctor goes beyond picklescan
    assert sum(ps for _, ps, _ in rows.values()) >= 30 and sum(fk for _, _, fk in rows.values()) >= 30
    beyond = sorted(n for n, (ours, ps, fk) in rows.items() if ours and not ps)
    assert "zip_zipfile_create" in beyond and "zip_nested_in_bytes" in beyond, beyond
    assert not (root / CANARY).exists()


def _findings(path: Path) -> list[str]:
    return [f"{f.name} ({f.opcode})" for f in scan_checkpoint(path).acting]


def test_the_scan_names_the_global_and_how_it_is_used(corpus):
    root, found = corpus
    assert "posix.system (REDUCE)" in _findings(found["zip_os_system"])
    assert "posix.system (REDUCE)" in _findings(found["legacyproto2"])
    assert "builtins.getattr (REDUCE)" in _findings(found["raw_proto4_getattr_chain"])
    assert "os.system (INST)" in _findings(found["raw_proto0_inst"])
    assert "posix.system (OBJ)" in _findings(found["raw_proto1_obj"])
    assert "builtins.eval (REDUCE)" in _findings(found["raw_proto0_py2_builtin_eval"])   # __builtin__ spelled
    assert "posix.system (REDUCE)" in _findings(found["raw_proto4_memo_names"])          # names from the memo
    assert "posix.system (REDUCE)" in _findings(found["raw_proto2_memo_reuse"])          # global from the memo
    assert any(f.startswith("zipfile.ZipFile (REDUCE)") for f in _findings(found["zip_zipfile_create"]))
    nested = scan_checkpoint(found["zip_nested_in_bytes"]).acting
    assert nested and "a pickle inside" in nested[0].pickle
    ts = scan_checkpoint(found["torchscript_setstate"]).acting
    assert ts and "__setstate__" in ts[0].reason                # (TorchScript mangles the name per process)
    assert ts[0].name.startswith("__torch__.ftd_payload.") and ts[0].name.endswith(".Payload")
    folder = scan_checkpoint(found["hf_training_args_bin"]).acting
    assert folder and folder[0].file == "training_args.bin"


COMMANDS = {
    "inspect": lambda p, out: ("inspect", p),
    "probe": lambda p, out: ("probe", p, "--data", "shapes:10", *SMALL),
    "fix": lambda p, out: ("fix", p, "--method", "rifle", "--data", "shapes:10", "-o", out, *SMALL),
    "trace": lambda p, out: ("trace", p, "--data", "shapes:10", "--steps", "2", *SMALL),
    "compare": lambda p, out: ("compare", p, "--data", "shapes:10", "--steps", "2", "--seeds", "2", *SMALL),
    "check": lambda p, out: ("check", p),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_payload_runs_in_any_command(corpus, command):
    """Every payload through every command: refused (exit 2, naming the global; check: pickle_safe fails, exit
    1), no canary, no file written, no traceback."""
    root, found = corpus
    for name, path in found.items():
        arch = () if path.is_dir() or name.startswith("torchscript") else ARCH
        out = root / ("out_dir" if path.is_dir() else "out.pt")
        o = run(root, *COMMANDS[command](path, out), *arch)
        if command == "check":
            assert_clean(o, 1, mentions=("pickle_safe",))
        else:
            first = scan_checkpoint(path).acting[0]
            assert_clean(o, 2, mentions=(first.name, "--trust-checkpoint", "ftdoctor check"))


def test_trust_checkpoint_runs_it_and_fix_warns_when_the_output_carries_it(corpus, tmp_path):
    root, found = corpus
    o = run(root, "fix", found["zip_functools_partial"], *ARCH, "--method", "rifle", "--data", "shapes:10",
            "-o", tmp_path / "out.pt", "--trust-checkpoint", *SMALL[:-1])
    assert o.code == 0, o.err
    assert "warning:" in o.out and "carries the same code" in o.out and "functools.partial" in o.out
    side = json.loads((tmp_path / "out.pt.ftdoctor.json").read_text())
    assert side["pickle_scan"]["input"]["verdict"] == "unsafe" and side["pickle_scan"]["output"]["verdict"] == "unsafe"
    o = run(root, "inspect", found["zip_os_system"], *ARCH, "--trust-checkpoint")
    assert o.code == 0 and o.canary                                 # the user vouched: it ran, as asked
    (root / CANARY).unlink()


# --- benign files ------------------------------------------------------------------------------------------

def _lightning_checkpoint(root: Path, nets) -> Path:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Lit(pl.LightningModule):
        def __init__(self, hp: HParams, mode: Mode, args: argparse.Namespace, root: Path):
            super().__init__()
            self.save_hyperparameters()
            self.net = nets.SmallCNN(10)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, accelerator="cpu")
    trainer.fit(Lit(HParams(), Mode.PROBE, argparse.Namespace(lr=0.1), Path("data")), DataLoader(data, batch_size=4))
    trainer.save_checkpoint(root / "lightning.ckpt")
    return root / "lightning.ckpt"


def _trainer_checkpoint(root: Path) -> Path:
    """A real Hugging Face Trainer checkpoint folder (optimizer, scheduler, rng state, training_args.bin)."""
    import transformers

    from hf_helpers import bert_folder
    folder = bert_folder(root / "bert_for_trainer")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    rows = [{"input_ids": torch.randint(5, 40, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": i % 2} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(root / "trainer"), max_steps=1, save_steps=1,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no", save_strategy="steps")
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    return root / "trainer" / "checkpoint-1"


@pytest.fixture(scope="module")
def benign(tmp_path_factory):
    import timm
    import torchvision
    from safetensors.torch import save_file

    from ftdoctor.zoo import ShapesNet
    from hf_helpers import bert_folder, timm_folder

    root = tmp_path_factory.mktemp("benign")
    (root / "ftd_hostile_nets.py").write_text(NETS_SOURCE)
    nets = _nets(root)
    torch.manual_seed(0)
    files: dict[str, Path] = {}

    def save(name: str, obj: object, **kw) -> None:
        files[name] = root / name
        torch.save(obj, files[name], **kw)

    squeeze = torchvision.models.squeezenet1_1(num_classes=10)
    save("torchvision_squeezenet.pth", squeeze.state_dict())
    save("torchvision_mobilenet_legacy.pth", torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(),
         _use_new_zipfile_serialization=False)
    save("torchvision_squeezenet_module.pt", squeeze)
    save("timm_test_resnet.pth", timm.create_model("test_resnet", num_classes=5).state_dict())
    files["timm_folder"] = timm_folder(root / "timm_folder", "test_resnet", 5)
    bert = bert_folder(root / "bert_bin")
    transformers_model = __import__("transformers").AutoModelForSequenceClassification.from_pretrained(bert)
    (bert / "model.safetensors").unlink()
    transformers_model.save_pretrained(bert, safe_serialization=False)
    files["hf_pytorch_model_bin"] = bert
    files["hf_trainer_checkpoint"] = _trainer_checkpoint(root)
    files["lightning.ckpt"] = _lightning_checkpoint(root, nets)
    net = nets.SmallCNN(10)
    adam = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    adam.step()
    save("adam_state.pt", adam.state_dict())
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sgd.step()
    save("sgd_state.pt", sgd.state_dict())
    sched = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=0.1, total_steps=10)
    save("onecycle_state.pt", sched.state_dict())
    save("grad_scaler.pt", torch.amp.GradScaler("cpu").state_dict())
    save("proto4.pt", net.state_dict(), pickle_protocol=4)
    save("proto5_legacy.pt", net.state_dict(), pickle_protocol=5, _use_new_zipfile_serialization=False)
    files["weights.safetensors"] = root / "weights.safetensors"
    save_file(net.state_dict(), str(files["weights.safetensors"]))
    torch.jit.script(nets.SmallCNN(10)).save(str(root / "scripted.pt"))
    files["scripted.pt"] = root / "scripted.pt"
    save("rng_state.pth", {"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state(),
                           "cpu": torch.random.get_rng_state()})
    save("with_metadata.pt", {"state_dict": net.state_dict(), "meta": metadata()})
    save("shapesnet_module.pt", ShapesNet(num_classes=5))
    save("hparams_dataclass.ckpt", {"state_dict": net.state_dict(), "hyper_parameters": {"hp": HParams(),
                                                                                        "mode": Mode.FINETUNE}})
    save("argparse.ckpt", {"state_dict": net.state_dict(), "args": argparse.Namespace(lr=0.1)})
    ema = torch.optim.swa_utils.AveragedModel(net)
    save("ema.pt", ema.state_dict())
    return root, files


def test_no_benign_file_is_flagged(benign):
    """As the libraries save them: check's pickle_safe passes on every one (through the CLI, one call)."""
    root, files = benign
    assert len(files) >= 20
    o = run(root, "check", *files.values(), "--format", "json")
    doc = json.loads(o.out)
    verdicts = {Path(c["path"]).name: {x["name"]: x for x in c["checks"]} for c in doc["checkpoints"]}
    assert len(verdicts) == len(files)
    flagged = {n: v["pickle_safe"]["message"] for n, v in verdicts.items() if v["pickle_safe"]["passed"] is not True}
    assert not flagged, flagged
    assert not o.created and not o.canary
    lightning = scan_checkpoint(files["lightning.ckpt"])
    inert = {f.name for f in lightning.inert}
    assert {"pickle_corpus.HParams", "pickle_corpus.Mode", "argparse.Namespace"} <= inert, inert
    mode = next(f for f in lightning.inert if f.name == "pickle_corpus.Mode")
    assert "Enum" in mode.reason and "pickle_corpus.py" in mode.reason       # read from its source, not imported
    trainer = scan_checkpoint(files["hf_trainer_checkpoint"])
    assert {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {
        p.split(":")[0] for p in trainer.pickles}


def test_benign_files_load_untrusted_with_their_extras_inert(benign):
    """The benign training checkpoints still open without --trust-checkpoint (the extras inert placeholders)."""
    root, files = benign
    o = run(root, "inspect", files["hparams_dataclass.ckpt"], *ARCH)
    assert_clean(o, 0, mentions=("pickle_corpus.HParams",))
    o = run(root, "inspect", files["with_metadata.pt"], *ARCH, "--format", "json")
    assert o.code == 0, o.err
    scan = json.loads(o.out)["pickle_scan"]
    assert scan["verdict"] == "safe" and {"datetime.datetime", "pathlib.PosixPath"} <= {g["global"] for g in scan["inert"]}
