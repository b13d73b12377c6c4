"""loraplex.plugins: entry points in `loraplex.plugins`, selected by VLLM_PLUGINS, each loaded on its
own; `loraplex plugins`.

The plugins are real packages (tests/plugin_packages/), installed with pip into a temporary
directory once per session; each scenario runs loraplex in a fresh subprocess with that directory
on PYTHONPATH, so entry point discovery, imports and the environment are all real. Other plugins
installed in the environment (the project's resolver packages) may load too: the checks look at
the test plugins only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from loraplex import plugins
from loraplex.resolver import LoRAResolver, _LoRAResolverRegistry

PACKAGES = Path(__file__).parent / "plugin_packages"
TEST_PLUGINS = ("alpha", "beta", "broken_import", "broken_register", "exit_import", "exit_register")
TEST_RESOLVERS = ("alpha_resolver", "beta_resolver", "broken_half_resolver", "exit_half_resolver")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """The test plugin packages, pip-installed into a directory of their own (offline)."""
    root = tmp_path_factory.mktemp("plugin_packages")
    sources = []
    for name in ("alpha", "beta", "broken", "exiting"):
        shutil.copytree(PACKAGES / name, root / "src" / name)  # build outside the repository
        sources.append(str(root / "src" / name))
    site = root / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--disable-pip-version-check",
               "--target", str(site), *sources]
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(4, "--no-build-isolation")  # build with this environment's setuptools: no network
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    return site


SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from loraplex.plugins import load_plugins
from loraplex.resolver import LoRAResolverRegistry
strict = {strict}
try:
    first = load_plugins(strict=strict)
except Exception as exc:
    print(json.dumps({{"raised": f"{{type(exc).__name__}}: {{exc}}"}}))
    sys.exit(0)
second = load_plugins(strict=strict)
calls = {{}}
for module in ("lp_test_alpha", "lp_test_beta"):
    if module in sys.modules:
        calls[module] = len(sys.modules[module].CALLS)
print(json.dumps({{
    "statuses": [s.to_dict() for s in first],
    "same_on_second_call": [s.to_dict() for s in second] == [s.to_dict() for s in first],
    "resolvers": list(LoRAResolverRegistry.get_supported_resolvers()),
    "imported": sorted(m for m in sys.modules if m.startswith("lp_test_")),
    "calls": calls,
}}))
"""


def run_loraplex(site: Path, env: dict[str, str | None], *args: str, strict: str = "None") -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "LORAPLEX_PLUGINS_STRICT")}
    environment["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    environment.update({k: v for k, v in env.items() if v is not None})
    command = [sys.executable, *args] if args else [sys.executable, "-c", SCRIPT.format(strict=strict)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)


def load(site: Path, vllm_plugins: str | None, strict: str = "None", **env: str) -> tuple[dict, str]:
    result = run_loraplex(site, {"VLLM_PLUGINS": vllm_plugins, **env}, strict=strict)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "statuses" in report:
        report["by_name"] = {s["name"]: s for s in report["statuses"]}
        report["resolvers"] = [r for r in report["resolvers"] if r in TEST_RESOLVERS]
    return report, result.stderr


def test_unset_loads_every_plugin_each_on_its_own(plugin_site) -> None:
    report, stderr = load(plugin_site, None)
    by_name = report["by_name"]
    alpha, beta = by_name["alpha"], by_name["beta"]
    assert (alpha["package"], alpha["version"], alpha["allowed"], alpha["loaded"]) == ("loraplex-test-plugin-alpha", "1.2.3", True, True)
    assert alpha["resolvers_registered"] == ["alpha_resolver"] and alpha["error"] is None
    assert (beta["loaded"], beta["resolvers_registered"]) == (True, ["beta_resolver"])
    # the two broken plugins are reported and do not stop the others
    assert by_name["broken_import"]["loaded"] is False
    assert by_name["broken_import"]["error"].startswith("import failed (ImportError: lp_test_broken_import needs the package 'unobtainium'")
    assert by_name["broken_register"]["error"] == "registration failed (RuntimeError: bucket is not configured)"
    # what the failing plugin registered before raising is undone
    assert report["resolvers"] == ["alpha_resolver", "beta_resolver"]  # loaded by name when VLLM_PLUGINS is unset
    for name, reason in (("broken_import", "unobtainium"), ("broken_register", "bucket is not configured")):
        assert f"plugin '{name}' (package loraplex-test-plugin-broken 0.0.1) did not load" in stderr and reason in stderr
    # load_plugins() is idempotent: the second call reports the same and registers nothing again
    assert report["same_on_second_call"] and report["calls"] == {"lp_test_alpha": 1, "lp_test_beta": 1}


def test_empty_loads_none(plugin_site) -> None:
    report, _ = load(plugin_site, "")
    for name in TEST_PLUGINS:
        status = report["by_name"][name]
        assert (status["allowed"], status["loaded"]) == (False, False)
        assert status["not_allowed_reason"] == "VLLM_PLUGINS is empty (no plugins load)"
    assert report["resolvers"] == [] and report["imported"] == []


def test_one_name_loads_only_that_one(plugin_site) -> None:
    report, _ = load(plugin_site, "alpha")
    by_name = report["by_name"]
    assert by_name["alpha"]["loaded"] and report["resolvers"] == ["alpha_resolver"]
    assert by_name["beta"]["allowed"] is False and by_name["beta"]["not_allowed_reason"] == "VLLM_PLUGINS=alpha does not name it"
    assert report["imported"] == ["lp_test_alpha"]  # the others are not even imported


def test_two_names_are_trimmed_and_load_in_the_order_given(plugin_site) -> None:
    report, _ = load(plugin_site, " beta , alpha ")
    assert report["by_name"]["alpha"]["loaded"] and report["by_name"]["beta"]["loaded"]
    assert report["resolvers"] == ["beta_resolver", "alpha_resolver"]  # the order resolvers are asked
    assert report["by_name"]["broken_import"]["allowed"] is False


def test_an_unknown_name_is_warned_about_and_the_rest_load(plugin_site) -> None:
    report, stderr = load(plugin_site, "alpha,nope")
    assert report["by_name"]["alpha"]["loaded"]
    assert "VLLM_PLUGINS names plugin(s) 'nope' that are not installed" in stderr
    assert "'alpha'" in stderr and "'beta'" in stderr  # the installed ones are listed
    assert report["by_name"]["nope"]["error"].startswith("not installed")


def test_a_plugin_that_fails_to_import_does_not_stop_the_others(plugin_site) -> None:
    report, stderr = load(plugin_site, "broken_import,alpha,beta")
    assert report["by_name"]["broken_import"]["error"].startswith("import failed (ImportError")
    assert report["resolvers"] == ["alpha_resolver", "beta_resolver"]
    assert "plugin 'broken_import' (package loraplex-test-plugin-broken 0.0.1) did not load: import failed" in stderr


def test_a_plugin_whose_registration_raises_is_undone_and_does_not_stop_the_others(plugin_site) -> None:
    report, stderr = load(plugin_site, "broken_register,beta")
    assert report["by_name"]["broken_register"]["resolvers_registered"] == []
    assert report["resolvers"] == ["beta_resolver"]
    assert "registration failed (RuntimeError: bucket is not configured)" in stderr


def test_a_plugin_that_calls_sys_exit_is_reported_like_one_that_raises(plugin_site) -> None:
    report, stderr = load(plugin_site, "exit_import,exit_register,alpha")
    by_name = report["by_name"]
    assert by_name["exit_import"]["loaded"] is False
    assert by_name["exit_import"]["error"] == (
        "import failed (SystemExit: it called sys.exit('lp_test_exit_import: no configuration found, giving up'))")
    assert by_name["exit_register"]["error"] == "registration failed (SystemExit: it called sys.exit(3))"
    assert by_name["exit_register"]["resolvers_registered"] == []
    assert report["resolvers"] == ["alpha_resolver"]  # the half-registered resolver is undone, the others load
    assert by_name["alpha"]["loaded"]
    for name in ("exit_import", "exit_register"):
        assert f"plugin '{name}' (package loraplex-test-plugin-exiting 0.0.2) did not load" in stderr


def test_strict_mode_makes_failures_fatal(plugin_site) -> None:
    report, _ = load(plugin_site, "alpha,broken_register", LORAPLEX_PLUGINS_STRICT="1")
    assert report["raised"].startswith("PluginError: 1 plugin(s) failed to load in strict mode")
    assert "'broken_register' (loraplex-test-plugin-broken): registration failed (RuntimeError: bucket is not configured)" in report["raised"]
    report, _ = load(plugin_site, "alpha,nope", strict="True")  # the argument, and an unknown name
    assert "'nope' (no package): not installed" in report["raised"]
    report, _ = load(plugin_site, "alpha,beta", LORAPLEX_PLUGINS_STRICT="1")  # nothing fails: nothing raised
    assert report["resolvers"] == ["alpha_resolver", "beta_resolver"]
    report, _ = load(plugin_site, "alpha,broken_register", strict="False", LORAPLEX_PLUGINS_STRICT="1")  # argument wins
    assert report["resolvers"] == ["alpha_resolver"]


def test_list_plugins_without_loading_imports_nothing(plugin_site) -> None:
    code = ("import json, sys; from loraplex.plugins import list_plugins; "
            "report = {s.name: s.to_dict() for s in list_plugins(load=False)}; "
            "print(json.dumps([report, sorted(m for m in sys.modules if m.startswith('lp_test_'))]))")
    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "alpha"}, "-c", code)
    assert result.returncode == 0, result.stderr
    report, imported = json.loads(result.stdout)
    assert imported == []
    assert (report["alpha"]["allowed"], report["alpha"]["loaded"], report["alpha"]["version"]) == (True, False, "1.2.3")
    assert report["beta"]["not_allowed_reason"] == "VLLM_PLUGINS=alpha does not name it"


def test_loraplex_plugins_lists_everything_installed(plugin_site) -> None:
    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "alpha,broken_import,nope"}, "-m", "loraplex.cli", "plugins")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["NAME"].split() == ["NAME", "PACKAGE", "VERSION", "ALLOWED", "RESOLVERS", "STATUS"]
    assert lines["alpha"].split() == ["alpha", "loraplex-test-plugin-alpha", "1.2.3", "yes", "alpha_resolver", "loaded"]
    assert "no: VLLM_PLUGINS=alpha,broken_import,nope does not name it" in lines["beta"] and "not loaded" in lines["beta"]
    assert "failed: import failed (ImportError: lp_test_broken_import needs" in lines["broken_import"]
    assert "failed: not installed" in lines["nope"]
    assert "VLLM_PLUGINS: alpha,broken_import,nope" in result.stdout
    assert "LoRA resolvers, in the order they are asked: alpha_resolver" in result.stdout

    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "beta"}, "-m", "loraplex.cli", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["vllm_plugins"] == ["beta"] and report["resolvers"][-1] == "beta_resolver"
    beta = next(p for p in report["plugins"] if p["name"] == "beta")
    assert beta == {"name": "beta", "package": "loraplex-test-plugin-beta", "version": "0.1.0", "allowed": True, "loaded": True,
                    "error": None, "resolvers_registered": ["beta_resolver"], "not_allowed_reason": None,
                    "entry_point": "lp_test_beta:register_beta_resolver", "log": []}


# ---- in process: what an entry point may load to --------------------------------------------------------


class _Resolver(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        return None


@pytest.fixture
def fresh_plugins():
    plugins._reset_for_tests()
    yield
    plugins._reset_for_tests()


def test_an_entry_point_may_name_a_hookimpl_function_an_object_or_a_callable(fresh_plugins) -> None:
    registry = _LoRAResolverRegistry()

    @plugins.hookimpl
    def register_lora_resolvers(registry):
        registry.register_resolver("from_function", _Resolver())

    class Holder:
        @plugins.hookimpl
        def register_lora_resolvers(self, registry):
            registry.register_resolver("from_object", _Resolver())

    plugins._register("fn", register_lora_resolvers, registry)
    plugins._register("obj", Holder(), registry)
    plugins._register("callable", lambda: registry.register_resolver("from_callable", _Resolver()), registry)
    assert list(registry.get_supported_resolvers()) == ["from_function", "from_object", "from_callable"]


def test_entry_points_that_cannot_register_are_refused_clearly(fresh_plugins) -> None:
    registry = _LoRAResolverRegistry()
    with pytest.raises(TypeError, match="no @loraplex.plugins.hookimpl functions and is not a function"):
        plugins._register("data", {"not": "a plugin"}, registry)

    module = types.ModuleType("typo_plugin")

    @plugins.hookimpl
    def register_lora_resolver(registry):  # a typo in the hook's name
        pass

    module.register_lora_resolver = register_lora_resolver
    with pytest.raises(TypeError, match="unknown hook.*register_lora_resolver.*register_lora_resolvers"):
        plugins._register("typo", module, registry)


# ---- the whole truth: strict exit status, why a plugin registered nothing, JSON for CI -----------------------


def test_loraplex_plugins_strict_exits_non_zero_on_a_failure_or_a_missing_name(plugin_site) -> None:
    cli = ("-m", "loraplex.cli", "plugins")
    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "alpha,nope"}, *cli, "--strict")
    assert result.returncode == 1
    assert "strict mode: 1 plugin(s) failed or are not installed: nope" in result.stderr
    assert "failed: not installed" in result.stdout  # the report is printed all the same
    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "alpha,broken_register", "LORAPLEX_PLUGINS_STRICT": "1"}, *cli)
    assert result.returncode == 1 and "broken_register" in result.stderr
    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "alpha,broken_register"}, *cli, "--json", "--strict")
    assert result.returncode == 1 and json.loads(result.stdout)["failed"] == ["broken_register"]
    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "alpha,beta"}, *cli, "--strict")
    assert result.returncode == 0, result.stderr
    result = run_loraplex(plugin_site, {"VLLM_PLUGINS": "alpha,nope"}, *cli)  # not strict: a report, exit 0
    assert result.returncode == 0, result.stderr


def test_a_plugin_that_registered_nothing_says_why(plugin_site) -> None:
    """The project's Hub resolver (installed in this environment) is opt-in: left out of VLLM_PLUGINS
    it loads, registers nothing, and logs why at INFO, which the report keeps."""
    env = {"VLLM_PLUGINS": None, "VLLM_LORA_RESOLVER_CACHE_DIR": None}
    result = run_loraplex(plugin_site, env, "-m", "loraplex.cli", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    report = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    hub = report["lora_hf_hub_resolver"]
    assert (hub["loaded"], hub["resolvers_registered"]) == (True, [])
    assert any("opt-in and is not registered; name it in VLLM_PLUGINS" in line for line in hub["log"]), hub["log"]
    assert report["alpha"]["log"] == [] and report["alpha"]["resolvers_registered"] == ["alpha_resolver"]
    assert "opt-in" not in result.stderr  # kept in the report, not added to what the application shows

    result = run_loraplex(plugin_site, env, "-m", "loraplex.cli", "plugins")
    hub_line = next(line for line in result.stdout.splitlines() if line.startswith("lora_hf_hub_resolver "))
    assert "loaded, registered no resolver: INFO: lora_hf_hub_resolver: the Hugging Face Hub LoRA resolver is opt-in" in hub_line
    fs_line = next(line for line in result.stdout.splitlines() if line.startswith("lora_filesystem_resolver "))
    assert "registered no resolver: INFO: lora_filesystem_resolver: VLLM_LORA_RESOLVER_CACHE_DIR is not set" in fs_line


def test_captured_log_lines_still_reach_the_application_at_its_level(caplog) -> None:
    import logging

    logger = logging.getLogger("lp_capture_probe.plugin")
    with caplog.at_level(logging.WARNING), plugins._captured_log("lp_capture_probe") as lines:
        logger.info("not configured: registering nothing")
        logger.warning("a setting looks odd")
    assert lines == ["INFO: not configured: registering nothing", "WARNING: a setting looks odd"]
    assert [r.getMessage() for r in caplog.records] == ["a setting looks odd"]
    assert logging.getLogger("lp_capture_probe").propagate and not logging.getLogger("lp_capture_probe").handlers
