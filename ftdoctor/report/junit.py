"""JUnit XML for ``ftdoctor check``: one ``<testsuite>`` per checkpoint, one ``<testcase>`` per check.

The shape GitLab (``artifacts:reports:junit``) and Jenkins (``junit`` step)
read: ``<testsuites>`` with totals; each case carries ``classname`` (the
checkpoint path, dots made underscores so Jenkins does not split it into
packages), ``name`` (the check) and ``file``; a failed check is a
``<failure message=... type=...>``, a check that could not run a ``<skipped>``.
No timings, so the same inputs give the same file.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from ftdoctor.check import CheckReport
from ftdoctor.numbers import plain
from ftdoctor.report.formats import text_format

# XML 1.0 cannot carry most control characters, even escaped.
_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: object) -> str:
    return _ILLEGAL.sub("\ufffd", str(text))


def _classname(path: str) -> str:
    return _clean(path).replace(".", "_")


def _text(v: object) -> str:
    return plain(v, "-", ".6g")


def render(report: CheckReport) -> str:
    total = sum(len(cp.checks) for cp in report.checkpoints)
    failures = sum(len(cp.failures) for cp in report.checkpoints)
    skipped = sum(1 for cp in report.checkpoints for c in cp.checks if c.passed is None)
    root = ET.Element("testsuites", name="ftdoctor check", tests=str(total), failures=str(failures),
                      errors="0", skipped=str(skipped))
    for cp in report.checkpoints:
        suite = ET.SubElement(root, "testsuite", name=_clean(cp.path), tests=str(len(cp.checks)),
                              failures=str(len(cp.failures)), errors="0",
                              skipped=str(sum(1 for c in cp.checks if c.passed is None)))
        props = ET.SubElement(suite, "properties")
        for key, value in (("sha256", cp.sha256), ("arch", cp.arch), ("config", report.config),
                           ("data", report.data), ("reference", report.reference)):
            if value is not None:
                ET.SubElement(props, "property", name=key, value=_clean(value))
        for c in cp.checks:
            case = ET.SubElement(suite, "testcase", classname=_classname(cp.path), name=c.name,
                                 file=_clean(cp.path))
            detail = f"value: {_text(c.value)}\nthreshold: {_text(c.threshold)}\n{c.message}"
            if c.passed is False:
                node = ET.SubElement(case, "failure", message=_clean(c.message), type=f"ftdoctor.{c.name}")
                node.text = _clean(detail)
            elif c.passed is None:
                ET.SubElement(case, "skipped", message=_clean(c.message))
            else:
                ET.SubElement(case, "system-out").text = _clean(c.message)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


text_format("junit", {"check"}, render, "JUnit XML for GitLab and Jenkins: a suite per checkpoint, a case per check.")
