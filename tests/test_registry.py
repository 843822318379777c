"""The one plug-in registry: built-ins read from source and imported on first use, entry points, clear errors.

Every test builds its own package (in ``tmp_path``, on ``sys.path``) and its own :class:`Registry`, so nothing
here touches harmprune's own registries.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from harmprune.errors import ConfigError, HarmpruneError
from harmprune.registry import Registry, declared_names

PLUGIN = """
from {registry_module} import REG

@REG.register("{name}")
def plugin():
    return "{name}"
"""


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh package ``pkg_<id>`` whose ``__init__`` holds a registry ``REG`` over the package's modules."""
    name = f"pkg_{abs(hash(tmp_path)) % 10**8}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text(
        f"from harmprune.registry import Registry\n"
        f"REG = Registry('widget', 'harmprune_test_{name}.widgets', 'register', [__name__])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, root
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def write_plugin(root, module: str, name: str) -> None:
    (root / f"{module}.py").write_text(PLUGIN.format(registry_module=root.name, name=name))


def registry_of(name: str) -> Registry:
    __import__(name)
    return sys.modules[name].REG


def test_names_are_read_without_importing_and_a_module_is_imported_on_first_use(package):
    name, root = package
    write_plugin(root, "alpha", "a")
    write_plugin(root, "beta", "b")
    (root / "heavy.py").write_text("raise ImportError('never imported: it registers nothing')\n")
    reg = registry_of(name)
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg
    assert f"{name}.alpha" not in sys.modules and f"{name}.beta" not in sys.modules
    assert reg.get("b")() == "b"
    assert f"{name}.beta" in sys.modules and f"{name}.alpha" not in sys.modules


def test_unknown_name_lists_the_available_ones_with_the_registry_error_class(package):
    name, root = package
    write_plugin(root, "alpha", "a")
    reg = registry_of(name)
    reg.register("z")(lambda: "z")
    with pytest.raises(HarmpruneError, match=r"^unknown widget 'x'; available: a, z$"):
        reg.get("x")
    strict = Registry("control kind", "g", "register", [name], error=ConfigError)
    with pytest.raises(ConfigError, match="unknown control kind 'x'; available: a"):
        strict.get("x")


def test_registering_again_from_the_same_source_replaces_from_another_is_an_error():
    reg: Registry = Registry("widget", "harmprune_test.none", "register", [])

    def make(tag):
        def plugin():
            return tag
        return plugin

    reg.register("w")(make(1))
    reg.register("w")(make(2))  # the same function, defined again (a module imported twice)
    assert reg.get("w")() == 2

    def other():
        return 3

    twice = "widget 'w' is registered twice: by .*make.<locals>.plugin and by .*other"
    with pytest.raises(HarmpruneError, match=twice):
        reg.register("w")(other)


def test_a_name_declared_in_two_modules_is_an_error(package):
    name, root = package
    write_plugin(root, "alpha", "a")
    write_plugin(root, "beta", "a")
    with pytest.raises(HarmpruneError, match="widget 'a' is declared in both"):
        registry_of(name).names()


def test_a_module_that_does_not_register_its_declared_name_is_named(package):
    name, root = package
    (root / "alpha.py").write_text("if False:\n    @register('a')\n    def f(): pass\n")
    with pytest.raises(HarmpruneError, match=rf"module {name}.alpha did not register widget 'a'"):
        registry_of(name).get("a")


def test_declared_names_need_a_literal_name_on_a_decorator(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent("""
        NAME = "computed"
        @register("lit")
        class A: ...
        @other.register("attr", 1)
        def b(): ...
        @register(NAME)
        def c(): ...
        register("call-not-decorator")
    """))
    assert declared_names(f, "register") == ["lit", "attr"]
    assert declared_names(f, "absent") == []


def write_distribution(site, dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """A minimal installed distribution: modules plus ``<dist>-0.1.dist-info`` with its entry points by group."""
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    sections = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
                for group, entries in entry_points.items()]
    (info / "entry_points.txt").write_text("".join(sections))


def test_entry_points_are_listed_unimported_loaded_on_use_and_never_override_a_builtin(package, tmp_path,
                                                                                          caplog):
    name, root = package
    write_plugin(root, "alpha", "a")
    site = tmp_path / "site"
    site.mkdir()
    group = f"harmprune_test_{name}.widgets"
    source = PLUGIN.format(registry_module=name, name="outside")
    write_distribution(site, "outside_dist", {group: {"outside": "outside_mod:plugin", "a": "clash_mod:plugin",
                                                      "silent": "silent_mod"}},
                       {"outside_mod": source, "clash_mod": "raise ImportError('a is built in')\n",
                        "silent_mod": ""})
    sys.path.insert(0, str(site))
    try:
        reg = registry_of(name)
        assert reg.names() == ["a", "outside", "silent"]
        assert "built in" in caplog.text and "outside_mod" not in sys.modules
        assert reg.get("outside")() == "outside" and reg.get("a")() == "a"
        with pytest.raises(HarmpruneError, match=r"entry point silent = 'silent_mod' .* did not register widget"):
            reg.get("silent")
    finally:
        sys.path.remove(str(site))
        for mod in ("outside_mod", "silent_mod"):
            sys.modules.pop(mod, None)


def harmprune_registries() -> dict[str, Registry]:
    from harmprune.control_masks import CONTROLS
    from harmprune.experiments import EXPERIMENTS
    from harmprune.experiments.evaluations import EVALUATIONS
    from harmprune.experiments.executors import EXECUTORS
    from harmprune.judges import JUDGES
    from harmprune.report import SECTIONS
    from harmprune.scoring_methods import SCORING_METHODS

    return {"judges": JUDGES, "scoring_methods": SCORING_METHODS, "evaluation_kinds": EVALUATIONS,
            "experiments": EXPERIMENTS, "control_kinds": CONTROLS, "report_sections": SECTIONS,
            "executors": EXECUTORS}


def test_harmprunes_registries_declare_exactly_what_importing_harmprune_registers():
    """Names read from the source are the names the modules register (no dynamic name hides from listing)."""
    import importlib
    import pkgutil

    import harmprune

    registries = harmprune_registries()
    declared = {group: set(reg._builtin_table()) for group, reg in registries.items()}
    for name in declared["judges"]:
        registries["judges"].get(name)  # the built-ins resolve through the registry itself
    for module in pkgutil.walk_packages(harmprune.__path__, "harmprune."):
        importlib.import_module(module.name)
    for group, reg in registries.items():
        assert reg.group == f"harmprune.{group}"
        registered = {n for n, source in reg._sources.items() if source.startswith("harmprune.")}
        assert registered == declared[group], group
    assert set(registries["scoring_methods"].names()) >= {"signed-snip", "snip", "wanda", "magnitude"}
    assert set(registries["executors"].names()) >= {"local", "ray"}
    assert set(registries["control_kinds"].names()) >= {"random", "magnitude-matched", "benign-task"}
    assert set(registries["report_sections"].names()) >= set(registries["experiments"].names())
    from harmprune.scoring_methods import scoring_method

    assert [m for m in ("signed-snip", "snip", "wanda", "magnitude") if scoring_method(m).signed] == ["signed-snip"]
