"""No output may overwrite an input or land half-written; every location is checked before the run (SPEC §8)."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hostile import ARCH, SMALL, assert_clean, run

FIX = ("--method", "rifle", "--data", "d.npz", "--new-head", "--max-samples", "16", "--quiet")


@pytest.fixture
def data(nets_dir: Path) -> Path:
    path = nets_dir / "d.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3), dtype=np.uint8), y=np.arange(16) % 4)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Opening the model (the first work of a run) fails the test: outputs must be refused before it."""
    import ftdoctor.session

    def refuse(*args, **kwargs):
        raise AssertionError("the run started before its outputs were checked")
    monkeypatch.setattr(ftdoctor.session, "open_session", refuse)


@pytest.fixture
def reference(good_model: Path) -> Path:
    ref = good_model.with_name("ref.pt")
    ref.write_bytes(good_model.read_bytes())
    return ref


def test_probe_outputs_onto_any_input_are_refused(good_model, nets_dir, data, reference, no_work):
    base = ("probe", good_model, *ARCH, "--data", data, "--new-head", "--reference", reference, *SMALL)
    for flag in ("--output", "--hdf5"):
        for target in (good_model, reference, data):
            o = run(nets_dir, *base, flag, target)
            assert_clean(o, 2, mentions=("refusing to overwrite the input", flag))
    os.symlink(reference, nets_dir / "soft.json")
    os.link(reference, nets_dir / "hard.json")
    for target in ("soft.json", "hard.json"):
        o = run(nets_dir, *base, "--output", target)
        assert_clean(o, 2, mentions=("refusing to overwrite the input",))
    o = run(nets_dir, *base, "--output", "r.json", "--hdf5", "r.json")
    assert_clean(o, 2, mentions=("both name",))


def test_check_output_onto_its_config_or_a_checkpoint_is_refused(good_model, nets_dir):
    config = nets_dir / "ftdoctor.toml"
    config.write_text("[tool.ftdoctor.check]\nmax_noise_fraction = 0.9\n")
    for target in (config, good_model):
        o = run(nets_dir, "check", good_model, *ARCH, "--config", config, "--output", target)
        assert_clean(o, 2, mentions=("refusing to overwrite the input",))


def test_fix_refuses_a_sidecar_that_is_an_input(good_model, nets_dir, data):
    model = nets_dir / "a.pt.ftdoctor.json"            # a model file named like a.pt's sidecar
    model.write_bytes(good_model.read_bytes())
    o = run(nets_dir, "fix", model, *ARCH, *FIX, "-o", "a.pt")
    assert_clean(o, 2, mentions=("refusing to overwrite the input",))


def test_fix_refuses_an_unrelated_existing_sidecar_without_force(good_model, nets_dir, data):
    (nets_dir / "out.pt.ftdoctor.json").write_text('{"someone": "else"}\n')
    o = run(nets_dir, "fix", good_model, *ARCH, *FIX, "-o", "out.pt")
    assert_clean(o, 2, mentions=("already exists", "--force"))


def test_fix_with_force_and_a_directory_in_the_sidecars_place_keeps_the_old_file(good_model, nets_dir, data):
    old = nets_dir / "old.pt"
    old.write_bytes(b"the user's previous checkpoint")
    (nets_dir / "old.pt.ftdoctor.json").mkdir()
    o = run(nets_dir, "fix", good_model, *ARCH, *FIX, "-o", old, "--force")
    assert_clean(o, 2, mentions=("is a directory",))
    assert old.read_bytes() == b"the user's previous checkpoint"


def test_fix_with_force_replaces_both_files_together(good_model, nets_dir, data):
    o = run(nets_dir, "fix", good_model, *ARCH, *FIX, "-o", "out.pt")
    assert o.code == 0 and sorted(o.created) == ["out.pt", "out.pt.ftdoctor.json"], o.err
    o = run(nets_dir, "fix", good_model, *ARCH, *FIX, "-o", "out.pt", "--force", "--seed", "1")
    assert o.code == 0 and sorted(o.changed) == ["out.pt", "out.pt.ftdoctor.json"] and not o.created, o


def test_an_output_that_is_a_directory_is_refused_before_the_run(good_model, nets_dir):
    (nets_dir / "reports").mkdir()
    for command in (("probe", good_model, *ARCH, "--data", "shapes:10", *SMALL, "--output", "reports"),
                    ("inspect", good_model, *ARCH, "--output", "reports"),
                    ("check", good_model, *ARCH, "--output", "reports")):
        o = run(nets_dir, *command)
        assert_clean(o, 2, mentions=("is a directory",))


def test_a_missing_output_directory_is_refused_before_the_run(good_model, nets_dir, no_work):
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", "shapes:10", "--max-samples", "1024", "--quiet",
            "--output", "nowhere/r.json")
    assert_clean(o, 2, mentions=("does not exist",))


def test_trace_compare_and_plot_refuse_their_inputs(good_model, nets_dir, data):
    o = run(nets_dir, "trace", good_model, *ARCH, "--data", data, "--steps", "2", "--save", good_model, "--quiet")
    assert_clean(o, 2, mentions=("refusing to overwrite the input",))
    o = run(nets_dir, "compare", good_model, *ARCH, "--data", data, "--steps", "2", "--seeds", "1", "--hdf5", data,
            "--quiet")
    assert_clean(o, 2, mentions=("refusing to overwrite the input",))
    pytest.importorskip("matplotlib")
    o = run(nets_dir, "trace", good_model, *ARCH, "--data", data, "--steps", "2", "--eval-split", "train",
            "--hdf5", "t.h5", "--quiet")
    assert o.code == 0, o.err
    o = run(nets_dir, "plot", "t.h5", "-o", "t.h5")
    assert_clean(o, 2, mentions=("refusing to overwrite the input",))


@contextlib.contextmanager
def _read_only(directory: Path):
    """``directory`` made read-only: by mode for a normal user; as root (modes do not stop root) by a
    read-only bind mount, or the test is skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a read-only directory as root here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True)


def test_outputs_into_a_read_only_directory_are_refused_before_the_run(good_model, nets_dir, data):
    locked = nets_dir / "locked"
    locked.mkdir()
    with _read_only(locked):
        o = run(nets_dir, "check", good_model, *ARCH, "--output", locked / "r.xml", "--format", "junit")
        assert_clean(o, 2, mentions=("cannot write",))
        o = run(nets_dir, "fix", good_model, *ARCH, *FIX, "-o", locked / "o.pt")
        assert_clean(o, 2, mentions=("cannot write",))
        o = run(nets_dir, "probe", good_model, *ARCH, "--data", "shapes:10", *SMALL, "--hdf5", locked / "r.h5")
        assert_clean(o, 2, mentions=("cannot write",))


def test_a_late_write_failure_leaves_nothing_and_says_so(good_model, nets_dir, monkeypatch):
    """The HDF5 file is written first, then the JSON report's write fails (disk full): both go."""
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", disk_full)
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", "shapes:10", *SMALL, "--output", "r.json",
            "--hdf5", "r.h5")
    assert_clean(o, 2, mentions=("No space left on device", "nothing was written"))
