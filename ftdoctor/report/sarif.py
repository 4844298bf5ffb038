"""SARIF 2.1.0 for ``ftdoctor check``: what a CI uploads to code scanning (GitHub's ``upload-sarif``, GitLab,
Azure DevOps).

One run of the tool ``ftdoctor``; one rule per check the report holds (``ruleId`` = the check's name, its
description from :mod:`ftdoctor.check.catalog`); one result per failed check, level ``error``, located at
the checkpoint (a relative URI under ``%SRCROOT%``, the working directory; ``region.startLine`` 1, since a
checkpoint has no lines and code scanning wants one). A ``pickle_safe`` result also names each unsafe global
as a logical location (``posix.system``) and carries the scan in its properties. No timestamps, so the same
inputs give the same file; ``partialFingerprints`` are the check and the path, so a finding keeps its identity
from one run to the next.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import ftdoctor
from ftdoctor.check import CheckReport
from ftdoctor.check.catalog import describe
from ftdoctor.report.formats import text_format

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"


def _uri(path: str) -> tuple[str, str | None]:
    """The artifact URI of a checkpoint: relative to the working directory (base ``%SRCROOT%``) when it lies
    under it, else an absolute ``file://`` URI."""
    p = Path(path)
    try:
        rel = p.resolve().relative_to(Path(os.getcwd()).resolve())
        return quote(rel.as_posix()), "%SRCROOT%"
    except ValueError:
        return p.resolve().as_uri(), None


def _rules(report: CheckReport) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(c.name for cp in report.checkpoints for c in cp.checks))
    rules = []
    for name in names:
        text, source = describe(name)
        rules.append({"id": name, "name": name, "shortDescription": {"text": text},
                      "fullDescription": {"text": f"{text} ({source})"},
                      "defaultConfiguration": {"level": "error"},
                      "properties": {"tags": ["security"] if name == "pickle_safe" else ["fine-tuning"]}})
    return rules


def _result(verdict: Any, check: Any, index: int) -> dict[str, Any]:
    uri, base = _uri(verdict.path)
    artifact: dict[str, Any] = {"uri": uri}
    if base:
        artifact["uriBaseId"] = base
    location: dict[str, Any] = {"physicalLocation": {"artifactLocation": artifact, "region": {"startLine": 1}}}
    properties: dict[str, Any] = {"value": check.value, "threshold": check.threshold}
    scan = verdict.pickle_scan
    if check.name == "pickle_safe" and scan is not None:
        location["logicalLocations"] = [{"fullyQualifiedName": f.name, "kind": "global",
                                         "decoratedName": f.where} for f in scan.unsafe]
        properties["unsafe"] = [f.to_json() for f in scan.unsafe]
    fingerprint = hashlib.sha256(f"{check.name}\0{uri}".encode()).hexdigest()
    return {"ruleId": check.name, "ruleIndex": index, "level": "error",
            "message": {"text": f"{verdict.path}: {check.message}"}, "locations": [location],
            "partialFingerprints": {"ftdoctorCheck/v1": fingerprint}, "properties": properties}


def render(report: CheckReport) -> str:
    rules = _rules(report)
    index = {r["id"]: i for i, r in enumerate(rules)}
    results = [_result(verdict, check, index[check.name]) for verdict, check in report.failures()]
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "ftdoctor", "version": ftdoctor.__version__,
                            "rules": rules}},
        "results": results,
        "columnKind": "unicodeCodePoints",
        "properties": {"passed": report.passed, "config": report.config, "data": report.data,
                       "thresholds": report.thresholds.to_json()},
    }
    doc = {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


text_format("sarif", {"check"}, render,
            "SARIF 2.1.0 for code scanning: a rule per check, a result per failed check at the checkpoint.")
