"""Plugins: installed packages that register LoRA resolvers, found through entry points.

A plugin is an entry point in the group `loraplex.plugins` (found with `importlib.metadata`).
What the entry point loads decides how it registers:

* a module or object carrying `@hookimpl` functions (pluggy, project name "loraplex"): its
  `register_lora_resolvers(registry)` hook is called with the `LoRAResolverRegistry`;

      from loraplex.plugins import hookimpl

      @hookimpl
      def register_lora_resolvers(registry):
          registry.register_resolver("my_resolver", MyResolver())

* a plain callable taking no arguments (vLLM's general-plugin style, e.g.
  `register_s3_resolver()`): it is called, and registers its resolvers itself.

`VLLM_PLUGINS` selects by entry point name: unset loads all, an empty string loads none,
`a,b` loads those (an unknown name is warned about). Plugins load in the order `VLLM_PLUGINS`
names them (unset: by name), and that is the order their resolvers are asked. Each plugin loads on its own: one that
fails to import or to register (by raising, or by calling `sys.exit()`) is reported (a logged
warning naming the plugin, its package and the reason), whatever it registered before failing
is undone, and the others still load.
`load_plugins(strict=True)` or `LORAPLEX_PLUGINS_STRICT=1` makes any failure a `PluginError`.
What a plugin's package logs while it loads (INFO and up) is kept in its report: a plugin that
loaded but registered no resolver says why there.

`load_plugins()` runs once per process (later calls return the first call's report); the
engine calls it when it starts with LoRA enabled. `loraplex plugins` prints the report.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import envs
from .errors import PluginError
from .resolver import LoRAResolverRegistry, _LoRAResolverRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "PluginStatus",
    "hookimpl",
    "hookspec",
    "list_plugins",
    "load_plugins",
    "plugin_failures",
    "plugin_manager",
    "render_plugins",
]

logger = logging.getLogger(__name__)

PROJECT_NAME = "loraplex"
ENTRY_POINT_GROUP = "loraplex.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class LoraplexHookSpecs:
    """The hooks a plugin may implement. pluggy hooks are synchronous."""

    @hookspec
    def register_lora_resolvers(self, registry: _LoRAResolverRegistry) -> None:
        """Register this plugin's resolvers: `registry.register_resolver(name, resolver)`."""


@dataclass
class PluginStatus:
    """What became of one installed plugin (one entry point of the group `loraplex.plugins`)."""

    name: str  # the entry point's name, the one VLLM_PLUGINS selects by
    package: str | None  # the distribution that provides it
    version: str | None
    allowed: bool  # by VLLM_PLUGINS
    loaded: bool  # imported and registered without error
    error: str | None = None  # why it failed to import or to register
    resolvers_registered: list[str] = field(default_factory=list)
    not_allowed_reason: str | None = None  # why VLLM_PLUGINS leaves it out
    entry_point: str = ""  # what it loads, e.g. "my_package.plugin:register"
    # what its package logged (INFO and up) while it imported and registered: says why a plugin
    # that loaded registered no resolver ("... is not set: not registered")
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_lock = threading.RLock()
_statuses: list[PluginStatus] | None = None
_manager: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process's pluggy PluginManager (hook plugins loaded so far are registered in it)."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = pluggy.PluginManager(PROJECT_NAME)
            _manager.add_hookspecs(LoraplexHookSpecs)
        return _manager


def load_plugins(strict: bool | None = None, registry: _LoRAResolverRegistry | None = None) -> list[PluginStatus]:
    """Load every installed plugin that `VLLM_PLUGINS` allows, each on its own; a report per plugin.

    Idempotent: the first call loads, later calls return its report. `strict` (default:
    `LORAPLEX_PLUGINS_STRICT`) raises `PluginError` when a plugin failed or `VLLM_PLUGINS`
    names one that is not installed.
    """
    global _statuses
    strict = envs.plugins_strict() if strict is None else strict
    with _lock:
        if _statuses is None:
            _statuses = _load_all(LoRAResolverRegistry if registry is None else registry)
        statuses = list(_statuses)
    if strict:
        _raise_on_failures(statuses)
    return statuses


def list_plugins(load: bool = True) -> list[PluginStatus]:
    """Every installed plugin, allowed or not. With `load` (the default) the allowed ones are
    loaded first (as `load_plugins()` does), so the report shows failures and resolvers;
    without it nothing is imported and nothing registers."""
    if load:
        return load_plugins(strict=False)
    with _lock:
        if _statuses is not None:
            return list(_statuses)
    selection = envs.plugins_selection()
    return [_status(ep, selection) for ep in _discover()]


def _reset_for_tests() -> None:
    """Forget what was loaded (the resolvers stay registered): the next load_plugins() loads again."""
    global _statuses, _manager
    with _lock:
        _statuses = None
        _manager = None


def render_plugins(statuses: list[PluginStatus], as_json: bool = False) -> str:
    """The report `loraplex plugins` prints: a table, or JSON (`{"vllm_plugins", "plugins", "resolvers",
    "failed"}`, "failed" naming what strict mode refuses)."""
    selection = envs.plugins_selection()
    resolvers = list(LoRAResolverRegistry.get_supported_resolvers())
    if as_json:
        import json

        failed = [s.name for s in plugin_failures(statuses)]
        return json.dumps({"vllm_plugins": selection, "plugins": [s.to_dict() for s in statuses], "resolvers": resolvers,
                           "failed": failed}, indent=2)
    header = ("NAME", "PACKAGE", "VERSION", "ALLOWED", "RESOLVERS", "STATUS")
    rows = [
        (
            s.name,
            s.package or "-",
            s.version or "-",
            "yes" if s.allowed else f"no: {s.not_allowed_reason}",
            ", ".join(s.resolvers_registered) or "-",
            _status_cell(s),
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in [header, *rows]]
    if not rows:
        lines.append(f"(no plugins installed: no package has an entry point in the group {ENTRY_POINT_GROUP!r})")
    vllm_plugins = "unset (all installed plugins load)" if selection is None else (",".join(selection) or "empty (no plugins load)")
    lines += ["", f"VLLM_PLUGINS: {vllm_plugins}", f"LoRA resolvers, in the order they are asked: {', '.join(resolvers) or 'none'}"]
    return "\n".join(lines)


def _status_cell(status: PluginStatus) -> str:
    if status.error:
        return f"failed: {status.error}"
    if not status.loaded:
        return "not loaded"
    if status.resolvers_registered:
        return "loaded"
    # loaded but registered nothing: its own words say why
    return "loaded, registered no resolver" + (f": {status.log[-1]}" if status.log else " (it logged no reason)")


# ---- loading ----------------------------------------------------------------------------------


def _discover() -> list[EntryPoint]:
    """This group's entry points, first of each name only (a package installed twice shows once)."""
    seen: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen:
            logger.warning(
                "plugin %r is installed twice (%s and %s); loading the first", ep.name, _describe(seen[ep.name]), _describe(ep)
            )
            continue
        seen[ep.name] = ep
    return list(seen.values())


def _status(ep: EntryPoint, selection: list[str] | None) -> PluginStatus:
    dist = getattr(ep, "dist", None)
    package = dist.metadata["Name"] if dist is not None else None
    version = dist.version if dist is not None else None
    allowed = selection is None or ep.name in selection
    reason = None
    if not allowed:
        reason = "VLLM_PLUGINS is empty (no plugins load)" if not selection else f"VLLM_PLUGINS={','.join(selection)} does not name it"
    return PluginStatus(ep.name, package, version, allowed, False, not_allowed_reason=reason, entry_point=ep.value)


def _load_all(registry: _LoRAResolverRegistry) -> list[PluginStatus]:
    selection = envs.plugins_selection()
    discovered = _discover()
    installed = sorted(ep.name for ep in discovered)
    if selection:
        unknown = [name for name in selection if name not in installed]
        if unknown:
            logger.warning(
                "VLLM_PLUGINS names plugin(s) %s that are not installed (installed: %s); check the names or "
                "install the packages",
                ", ".join(repr(n) for n in unknown),
                ", ".join(repr(n) for n in installed) or "none",
            )
    # load order = registration order = the order resolvers are asked: VLLM_PLUGINS's order, else by name
    rank = {name: i for i, name in enumerate(selection or [])}
    discovered.sort(key=lambda ep: (rank.get(ep.name, len(rank)), ep.name))
    statuses = []
    for ep in discovered:
        status = _status(ep, selection)
        if status.allowed:
            _load_one(ep, status, registry)
        statuses.append(status)
    statuses.extend(_unknown_statuses(selection, installed))
    loaded = [s.name for s in statuses if s.loaded]
    if loaded:
        logger.info("loaded plugins: %s; LoRA resolvers: %s", ", ".join(loaded), ", ".join(registry.get_supported_resolvers()) or "none")
    return statuses


def _unknown_statuses(selection: list[str] | None, installed: list[str]) -> list[PluginStatus]:
    """Names VLLM_PLUGINS asks for that no package provides, as failed entries of the report."""
    return [
        PluginStatus(name, None, None, True, False, error=f"not installed: no package provides a {ENTRY_POINT_GROUP!r} "
                     f"entry point named {name!r} (installed: {', '.join(installed) or 'none'})")
        for name in (selection or []) if name not in installed
    ]


def _load_one(ep: EntryPoint, status: PluginStatus, registry: _LoRAResolverRegistry) -> None:
    with _captured_log(ep.module.partition(".")[0]) as lines:
        _import_and_register(ep, status, registry)
    status.log = lines


def _import_and_register(ep: EntryPoint, status: PluginStatus, registry: _LoRAResolverRegistry) -> None:
    try:
        target = ep.load()
    except BaseException as exc:  # noqa: BLE001 - any import failure is this plugin's alone
        _raise_if_interrupt(exc)
        _fail(status, f"import failed ({_reason(exc)})")
        return
    before = registry._snapshot()
    try:
        _register(ep.name, target, registry)
    except BaseException as exc:  # noqa: BLE001 - a registration failure is this plugin's alone
        _raise_if_interrupt(exc)
        registry._restore(before)  # undo whatever it registered before failing
        _unregister_hooks(ep.name)
        _fail(status, f"registration failed ({_reason(exc)})")
        return
    after = registry._snapshot()
    status.resolvers_registered = [name for name, r in after.items() if before.get(name) is not r]
    status.loaded = True


def _register(name: str, target: Any, registry: _LoRAResolverRegistry) -> None:
    """Call the plugin's hook (a module/object with @hookimpl functions) or the plugin itself."""
    manager = plugin_manager()
    plugin = target
    if callable(target) and _is_hookimpl(target):  # the entry point names a @hookimpl function
        plugin = _HookFunction(target)
    if _has_hookimpls(plugin):
        manager.register(plugin, name=name)  # validates the hook's signature against the spec
        unknown = [caller.name for caller in manager.get_hookcallers(plugin) or [] if not caller.has_spec()]
        if unknown:
            raise TypeError(
                f"it implements unknown hook(s) {', '.join(unknown)}; loraplex's hooks are: register_lora_resolvers(registry)"
            )
        others = [p for p in manager.get_plugins() if p is not plugin]
        manager.subset_hook_caller("register_lora_resolvers", remove_plugins=others)(registry=registry)
    elif callable(target) and not isinstance(target, type):
        target()
    else:
        raise TypeError(
            f"the entry point loads {target!r}, which has no @loraplex.plugins.hookimpl functions and is not a "
            "function to call; point it at a module with a register_lora_resolvers hook, or a function"
        )


@contextmanager
def _captured_log(package: str) -> Iterator[list[str]]:
    """The lines `package`'s loggers write (INFO and up) inside the block.

    Plugins say why they register nothing at INFO, below most configured levels: the package's
    logger is lowered to INFO meanwhile, and what the application would not have shown is kept
    from its handlers (the rest goes on to them as before)."""
    lines: list[str] = []
    log = logging.getLogger(package)
    shown_from = log.getEffectiveLevel()
    level, propagate = log.level, log.propagate

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname}: {record.getMessage()}")
            if propagate and record.levelno >= shown_from and log.parent is not None:
                log.parent.handle(record)  # on to the application's handlers, as without the capture

    handler = Capture(logging.INFO)
    log.addHandler(handler)
    log.setLevel(min(shown_from, logging.INFO))
    log.propagate = False
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


class _HookFunction:
    """A @hookimpl function that an entry point names directly, as a plugin object pluggy can scan."""

    def __init__(self, function: Any) -> None:
        self.register_lora_resolvers = function

    def __repr__(self) -> str:
        return f"<hook function {getattr(self.register_lora_resolvers, '__qualname__', self.register_lora_resolvers)!r}>"


def _is_hookimpl(obj: Any) -> bool:
    return hasattr(obj, f"{PROJECT_NAME}_impl")


def _has_hookimpls(obj: Any) -> bool:
    if isinstance(obj, type):
        return False  # a class would be registered unbound; plugins are modules or instances
    return any(_is_hookimpl(getattr(obj, attr, None)) for attr in dir(obj))


def _unregister_hooks(name: str) -> None:
    manager = plugin_manager()
    if manager.get_plugin(name) is not None:
        manager.unregister(name=name)


def _fail(status: PluginStatus, reason: str) -> None:
    status.error = reason
    logger.warning(
        "plugin %r (package %s) did not load: %s; the other plugins are unaffected",
        status.name, f"{status.package} {status.version}" if status.package else "unknown", reason,
    )


def plugin_failures(statuses: list[PluginStatus]) -> list[PluginStatus]:
    """The plugins strict mode refuses: allowed ones that failed, and names VLLM_PLUGINS asks for
    that are not installed."""
    return [s for s in statuses if s.allowed and s.error]


def _raise_on_failures(statuses: list[PluginStatus]) -> None:
    failed = plugin_failures(statuses)
    if failed:
        lines = "; ".join(f"{s.name!r} ({s.package or 'no package'}): {s.error}" for s in failed)
        raise PluginError(
            f"{len(failed)} plugin(s) failed to load in strict mode (LORAPLEX_PLUGINS_STRICT): {lines}; fix or "
            "uninstall them, or leave them out of VLLM_PLUGINS"
        )


def _raise_if_interrupt(exc: BaseException) -> None:
    """A plugin's failure is its own, whatever it raised (`sys.exit()` at import included), except
    KeyboardInterrupt: at start-up that is the operator's Ctrl-C, which must stop the process."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):  # sys.exit(2), sys.exit("message"), sys.exit()
        return f"SystemExit: it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _describe(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value} from {dist.metadata['Name']} {dist.version}" if dist is not None else ep.value
