"""Where ftdoctor grows: name -> plug-in registries filled by a class decorator (timm's ``register_model``).

Probes, fixes, model sources, data sources and output formats each have one
:class:`Registry`; adding one is a module with a class carrying a ``name``
(and, where the order of asking matters, a ``priority``) and the registry's
decorator. The CLI and the library look plug-ins up by name.

Plug-ins outside ftdoctor: a package names its plug-in modules in the ``ftdoctor.plugins`` entry-point
group (``[project.entry-points."ftdoctor.plugins"] stripes = "my_plugins"`` in its ``pyproject.toml``);
the ``ftdoctor`` command imports them at start (:func:`load_plugins`), so their decorators register them
and every command, help text and printed suggestion knows them.
"""
from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")

PLUGIN_GROUP = "ftdoctor.plugins"
_plugins: list[str] | None = None      # the entry points loaded, once loaded


class Registry(dict):
    """``name -> plug-in``; :meth:`register` is the decorator. ``instances``: keep one instance of each class
    (sources and formats are stateless) instead of the class (probes and fixes are made per run)."""

    def __init__(self, what: str, *, instances: bool = False) -> None:
        super().__init__()
        self.what = what
        self.instances = instances

    def register(self, cls: type[T] | None = None, /, **attrs: Any) -> Any:
        """``@register`` on a class with a ``name``, or ``@register(name=..., other=...)`` setting the class
        attributes first (a plug-in's description in one place, its class body all behaviour)."""
        if cls is None:
            return lambda c: self.register(c, **attrs)
        for key, value in attrs.items():
            setattr(cls, key, value)
        self[cls.name] = cls() if self.instances else cls   # type: ignore[attr-defined]
        return cls

    def ordered(self) -> list[Any]:
        """The plug-ins by ``priority`` (lower first; 100 when unset), then registration order."""
        return sorted(self.values(), key=lambda p: getattr(p, "priority", 100))

    def names(self) -> list[str]:
        """The registered names in :meth:`ordered` order (reports, help texts and defaults use it)."""
        return [p.name for p in self.ordered()]


def load_plugins() -> list[str]:
    """Import every module installed packages name in the :data:`PLUGIN_GROUP` entry-point group (once per
    process); returns their names. A plug-in that fails to import is an FtdoctorError naming its package."""
    global _plugins
    if _plugins is not None:
        return list(_plugins)
    from importlib.metadata import entry_points

    from ftdoctor.errors import FtdoctorError

    names = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - any failure of foreign code is reported the same way
            dist = getattr(getattr(ep, "dist", None), "name", None) or "its package"
            raise FtdoctorError(f"cannot load the ftdoctor plug-in {ep.name!r} ({ep.value}) from {dist}: "
                                f"{type(exc).__name__}: {exc}",
                                f"fix or uninstall {dist}") from None
        names.append(ep.name)
    _plugins = names
    return list(names)
