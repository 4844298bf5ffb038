"""``check``'s pickle_safe in every format (issue 24): the failing checkpoint names the file, the pickle in
it and the global; the SARIF report is read back with a SARIF library (sarif-pydantic's object model);
turning the check off takes a named pyproject key and the report says so; inert classes are information."""
from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from helpers import run_cli


class _Evil:
    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


@pytest.fixture
def gate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    torch.manual_seed(0)
    import torchvision
    net = torchvision.models.resnet18(num_classes=4)
    torch.save(net.state_dict(), "good.pt")
    canary = tmp_path / "CANARY"
    torch.save({"state_dict": net.state_dict(), "extra": _Evil(str(canary))}, "evil.pt")
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(lr=0.1, out=Path("runs"))},
               "with_args.pt")
    yield tmp_path
    assert not canary.exists()                                  # nothing ran, whatever the test did


def _check(*args):
    code, out, err = run_cli("check", *args)
    return code, out, err


def test_every_format_names_the_file_the_pickle_and_the_global(gate):
    code, out, err = _check("evil.pt", "good.pt", "--format", "json")
    assert code == 1, err
    doc = json.loads(out)
    evil, good = doc["checkpoints"]
    first = evil["checks"][0]
    assert first["name"] == "pickle_safe" and first["passed"] is False and first["value"] == 1
    assert "posix.system (REDUCE, evil/data.pkl at offset" in first["message"]
    assert evil["pickle_scan"]["verdict"] == "unsafe"
    (unsafe,) = evil["pickle_scan"]["unsafe"]
    assert (unsafe["global"], unsafe["opcode"], unsafe["pickle"]) == ("posix.system", "REDUCE", "evil/data.pkl")
    assert all(c["passed"] is None for c in evil["checks"][1:])           # never loaded
    assert good["passed"] is True and good["checks"][0]["passed"] is True

    code, out, err = _check("evil.pt", "good.pt")
    assert code == 1 and "pickle_safe" in out and "posix.system" in out and "FAIL evil.pt" in out
    code, out, err = _check("evil.pt", "good.pt", "--format", "markdown")
    assert code == 1 and "**pickle_safe**" in out and "posix.system" in out and "| pickle_safe |" in out
    code, out, err = _check("evil.pt", "good.pt", "--format", "github")
    assert code == 1 and out.startswith("::error title=ftdoctor pickle_safe::evil.pt: ") and "posix.system" in out
    code, out, err = _check("evil.pt", "good.pt", "--format", "junit", "--output", "r.xml", "--html", "r.html")
    assert code == 1
    root = ET.parse(gate / "r.xml").getroot()
    failure = root.find("testsuite[@name='evil.pt']/testcase[@name='pickle_safe']/failure")
    assert failure is not None and "posix.system" in failure.get("message")
    assert root.find("testsuite[@name='good.pt']/testcase[@name='pickle_safe']/failure") is None
    page = (gate / "r.html").read_text()
    assert "pickle_safe" in page and "posix.system" in page and "evil/data.pkl" in page


def test_sarif_reads_back_with_a_sarif_library(gate):
    from sarif_pydantic import Sarif

    code, out, err = _check("evil.pt", "good.pt", "--format", "sarif", "--output", "ftdoctor.sarif")
    assert code == 1, err
    raw = json.loads((gate / "ftdoctor.sarif").read_text())
    log = Sarif.model_validate(raw)                              # the SARIF 2.1.0 object model, not json.loads
    assert log.version == "2.1.0" and len(log.runs) == 1
    run = log.runs[0]
    rules = [r.id for r in run.tool.driver.rules]
    assert rules[0] == "pickle_safe" and len(rules) == len(set(rules))   # one rule per check
    (result,) = run.results                                      # one result per failed check
    assert result.rule_id == "pickle_safe" and result.level.value == "error"
    assert "posix.system" in result.message.text
    location = result.locations[0].physical_location.artifact_location
    assert location.uri == "evil.pt"
    assert rules.index(result.rule_id) == result.rule_index


def test_turning_it_off_takes_a_named_key_and_the_report_says_so(gate):
    (gate / "pyproject.toml").write_text("[tool.ftdoctor.check]\npickle_safe = false\n")
    code, out, err = _check("evil.pt", "--format", "json")
    check = json.loads(out)["checkpoints"][0]["checks"][0]
    assert check["name"] == "pickle_safe" and check["passed"] is None
    assert check["message"].startswith("off (pickle_safe = false in ") and "posix.system" in check["message"]
    assert code == 1                             # still never loaded without --trust-checkpoint: loadable fails
    code, out, err = _check("evil.pt", "--pickle-safe", "false")
    assert code == 2                             # no flag turns it off, only the config key


def test_inert_classes_are_listed_as_information(gate):
    code, out, err = _check("with_args.pt", "--format", "json")
    assert code == 0, out + err
    doc = json.loads(out)["checkpoints"][0]
    check = doc["checks"][0]
    assert check["passed"] is True and "argparse.Namespace" in check["message"]
    assert {f["global"] for f in doc["pickle_scan"]["inert"]} >= {"argparse.Namespace"}
    assert doc["pickle_scan"]["unsafe"] == []
