"""Where ``check`` finds its thresholds: defaults < ``[tool.ftdoctor.check]`` < command-line flags (SPEC §4).

As black and ruff find their settings: the nearest ``pyproject.toml`` above
the working directory that has a ``[tool.ftdoctor]`` table, or ``--config FILE``
(which may also hold the keys at its top level). Unknown keys are an error
listing the valid ones; ``false`` / ``"off"`` disables a check.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from ftdoctor.errors import FtdoctorError
from ftdoctor.thresholds import Thresholds, parse_floor_multiple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OFF = "off"
#: keys that are true or false (not thresholds)
BOOLEAN_KEYS = ("require_finite", "pickle_safe")


@dataclass(frozen=True)
class ResolvedThresholds:
    """Thresholds and where they came from (``source`` is a file path, or None for the defaults), and the
    ``[tool.ftdoctor.check.arch]`` table: (glob, architecture) pairs for checkpoints that cannot be
    recognised, in the file's order."""

    thresholds: Thresholds
    source: str | None
    archs: tuple[tuple[str, str], ...] = ()

    def arch_for(self, path: Path) -> str | None:
        """The architecture the first matching glob names for ``path`` (matched as given, relative to the
        config file's directory, and by file name), or None."""
        import fnmatch

        base = Path(self.source).resolve().parent if self.source else None
        forms = [path.as_posix(), path.name]
        if base is not None:
            try:
                forms.append(path.resolve().relative_to(base).as_posix())
            except ValueError:
                pass
        return next((arch for glob, arch in self.archs if any(fnmatch.fnmatch(f, glob) for f in forms)), None)


def valid_keys() -> list[str]:
    return Thresholds.keys()


def find_pyproject(start: str | Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (default: the working directory)
    that has a ``[tool.ftdoctor]`` table — as ruff does, so a sub-project's own
    pyproject.toml without ftdoctor settings does not hide the repository's."""
    here = Path(start or os.getcwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            doc = _read_toml(candidate)
            tool = doc.get("tool")
            if isinstance(tool, dict) and "ftdoctor" in tool:
                return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    from ftdoctor.safety import MAX_CONFIG_BYTES, read_bounded
    try:
        return tomllib.loads(read_bounded(path, MAX_CONFIG_BYTES, "the config file").decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FtdoctorError(f"{path} is not valid TOML: {exc}", "fix the file's syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FtdoctorError(f"cannot read the config file {path}: {exc}",
                            "check the path and its permissions") from None


def config_table(path: str | Path, *, explicit: bool) -> dict[str, Any]:
    """The ``[tool.ftdoctor.check]`` table of a TOML file.

    A file passed with ``--config`` (``explicit``) may instead hold the keys at
    its top level (a dedicated ``ftdoctor.toml``); it must hold one or the other.
    """
    path = Path(path)
    if explicit and not os.path.exists(path):
        raise FtdoctorError(f"config file {path} not found", "pass an existing TOML file to --config")
    doc = _read_toml(path)
    tool = doc.get("tool")
    if isinstance(tool, dict) and isinstance(tool.get("ftdoctor"), dict):
        table = tool["ftdoctor"].get("check", {})
        if not isinstance(table, dict):
            raise FtdoctorError(f"{path}: tool.ftdoctor.check must be a table",
                                "write it as a [tool.ftdoctor.check] section")
        return table
    if explicit and "tool" not in doc:
        return doc
    if explicit:
        raise FtdoctorError(f"{path} has no [tool.ftdoctor.check] table",
                            f"add one with some of: {', '.join(valid_keys())}")
    return {}


def validate_settings(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check keys and types; map ``false``/``"off"`` to None (check disabled)."""
    unknown = [k for k in table if k not in valid_keys()]
    if unknown:
        raise FtdoctorError(f"unknown ftdoctor check key(s) {', '.join(map(repr, unknown))} in {source}",
                            f"valid keys: {', '.join(valid_keys())}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        out[key] = _validate_value(key, value, source)
    return out


def _validate_value(key: str, value: Any, source: str) -> Any:
    if key in BOOLEAN_KEYS:
        if isinstance(value, bool):
            return value
        raise FtdoctorError(f"{key} in {source} must be true or false, got {value!r}",
                            f"write {key} = true (the default) or false")
    if value is False or (isinstance(value, str) and value.strip().lower() == OFF):
        return None
    if key == "expect_num_classes":
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise FtdoctorError(f"{key} in {source} must be a whole number of classes >= 1, got {value!r}",
                            f"write e.g. {key} = 10 (or false to disable the check)")
    if key == "max_noise_fraction" and isinstance(value, str):
        multiple = parse_floor_multiple(value)
        if multiple is not None:
            return multiple
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    if key == "max_noise_fraction":
        raise FtdoctorError(f"{key} in {source} must be a multiple of the floor 1/(C-1) such as \"2x\", or a "
                            f"finite number >= 0, got {value!r}",
                            f'write e.g. {key} = "2x" (the default) or 0.3 (or false / off to disable the check)')
    raise FtdoctorError(f"{key} in {source} must be a finite number >= 0, got {value!r}",
                        f"write e.g. {key} = {getattr(Thresholds(), key)} (or false / off to disable the check)")


def resolve_thresholds(config: str | Path | None = None, *, cwd: str | Path | None = None,
                       overrides: Mapping[str, Any] | None = None) -> ResolvedThresholds:
    """Documented defaults < ``[tool.ftdoctor.check]`` (``config``, or the nearest pyproject.toml
    above ``cwd``) < ``overrides`` (the command-line flags; ``"off"`` disables a check)."""
    if config is not None:
        source: Path | None = Path(config)
        table = config_table(source, explicit=True)
    else:
        source = find_pyproject(cwd)
        table = config_table(source, explicit=False) if source is not None else {}
    table = dict(table)
    archs = _arch_table(table.pop("arch", {}), str(source))
    values = validate_settings(table, str(source))
    values.update(validate_settings(dict(overrides or {}), "the command line"))
    return ResolvedThresholds(replace(Thresholds(), **values), str(source) if source is not None else None, archs)


def _arch_table(table: Any, source: str) -> tuple[tuple[str, str], ...]:
    """``[tool.ftdoctor.check.arch]``: ``"GLOB" = "ARCH"`` pairs, every architecture checked now."""
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise FtdoctorError(f"tool.ftdoctor.check.arch in {source} must map globs to architecture names",
                            'write e.g. [tool.ftdoctor.check.arch] then "exports/timm/*.pt" = "timm:convnext_atto"')
    from ftdoctor.checkpoint import check_arch

    for glob, arch in table.items():
        try:
            check_arch(arch)
        except FtdoctorError as exc:
            raise FtdoctorError(f"{source}: tool.ftdoctor.check.arch {glob!r} = {arch!r}: {exc.cause}",
                                exc.remedy) from None
    return tuple(table.items())
