"""The generic registry: names, lazy entry points, errors that name the field, install hints."""

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.errors import ConfigError, MissingDependencyError
from kvtier.registry import Registry
from kvtier.serde import LayoutDesc, create_serde_processor, registered_serdes
from kvtier.serde.registry import SERDES

GROUP = "kvtier.test_registry_plugins"


def _plugin_dist(root: Path, group: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """A minimal installed distribution on ``root``: entry points of ``group`` plus their modules."""
    info = root / "kvtier_test_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvtier-test-plugins\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[Path]:
    """Puts ``tmp_path`` on sys.path for a test's fake plugin distributions; removes the modules afterwards."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in set(sys.modules) - before:
            if name.startswith("kvtier_plugin_"):
                del sys.modules[name]


def test_register_get_unregister_and_names() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("a", len)
    reg.register("b-2", str, extra="fancy")
    assert reg.names() == ["a", "b-2"] and "a" in reg and "zz" not in reg
    assert reg.get("a") is len
    reg.unregister("a")
    reg.unregister("never-registered")
    assert reg.names() == ["b-2"]


def test_registration_errors() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("a", len)
    with pytest.raises(ConfigError, match="'a' is already registered"):
        reg.register("a", str)
    for bad in ("", "a b", "a/b", 3):
        with pytest.raises(ConfigError, match="widget name"):
            reg.register(bad, len)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a valid widget factory"):
        reg.register("c", 42)


def test_unknown_name_lists_the_known_ones_and_names_the_field() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("alpha", len)
    with pytest.raises(ConfigError, match=r"^cfg\[2\]\.type: unknown widget 'beta'; known widgets are \['alpha'\]"):
        reg.get("beta", "cfg[2].type")


def test_missing_dependency_of_a_factory_gives_an_install_hint() -> None:
    reg: Registry[object] = Registry("widget")

    def needs_missing_package(config: dict) -> object:
        import kvtier_no_such_package  # type: ignore[import-not-found]  # noqa: F401

        return object()

    reg.register("fancy", needs_missing_package, extra="fancy")
    reg.register("plain", needs_missing_package)
    with pytest.raises(MissingDependencyError, match=r"kvtier_no_such_package.*pip install 'kvtier\[fancy\]'"):
        reg.call("fancy", {}, where="w.type")
    with pytest.raises(MissingDependencyError, match=r"pip install kvtier_no_such_package"):
        reg.call("plain", {})


def test_entry_points_are_lazy_and_loaded_on_first_use(plugins: Path) -> None:
    _plugin_dist(
        plugins,
        GROUP,
        {"good": "kvtier_plugin_good:factory", "broken": "kvtier_plugin_broken:factory"},
        {
            "kvtier_plugin_good": "def factory(config):\n    return ('good', config)\n",
            "kvtier_plugin_broken": "raise RuntimeError('plugin import exploded')\n",
        },
    )
    reg: Registry[object] = Registry("widget", GROUP)
    reg.register("builtin", len)
    assert reg.names() == ["broken", "builtin", "good"]
    assert "kvtier_plugin_good" not in sys.modules, "listing names must not import plugins"
    assert reg.call("good", {"x": 1}) == ("good", {"x": 1})
    assert "kvtier_plugin_good" in sys.modules
    # a broken plugin fails only the configs that name it, as a config error naming the field
    with pytest.raises(ConfigError, match=r"^l2\.type: widget plugin 'broken' .*failed to import: plugin import"):
        reg.get("broken", "l2.type")
    assert reg.get("builtin") is len


def test_entry_point_of_a_missing_module_and_a_non_factory(plugins: Path) -> None:
    _plugin_dist(
        plugins,
        GROUP,
        {"gone": "kvtier_plugin_gone_missing:factory", "notcallable": "kvtier_plugin_value:VALUE"},
        {"kvtier_plugin_value": "VALUE = 3\n"},
    )
    reg: Registry[object] = Registry("widget", GROUP)
    with pytest.raises(MissingDependencyError, match="kvtier_plugin_gone_missing"):
        reg.get("gone")
    with pytest.raises(ConfigError, match="not a valid widget factory"):
        reg.get("notcallable")


def test_registered_name_shadows_an_entry_point(plugins: Path) -> None:
    _plugin_dist(plugins, GROUP, {"same": "kvtier_plugin_same:factory"}, {"kvtier_plugin_same": "factory = 1\n"})
    reg: Registry[object] = Registry("widget", GROUP)
    reg.register("same", len)
    assert reg.get("same") is len and reg.names() == ["same"]


def test_a_serde_plugin_is_found_through_the_kvtier_serde_group(plugins: Path) -> None:
    _plugin_dist(
        plugins,
        "kvtier.serde",
        {"plugin-raw": "kvtier_plugin_serde:factory"},
        {
            "kvtier_plugin_serde": """
                from kvtier.serde import AsyncSerdeProcessor
                from kvtier.serde.raw import RawDeserializer, RawSerializer

                def factory(config):
                    return AsyncSerdeProcessor(RawSerializer(), RawDeserializer())
            """
        },
    )
    SERDES.rescan()
    try:
        assert "plugin-raw" in registered_serdes()
        processor = create_serde_processor({"type": "plugin-raw"})
        assert processor.identity.name == "plugin-raw"
        assert processor.estimate_serialized_size(LayoutDesc((4,), __import__("torch").float32)) == 16
    finally:
        SERDES.unregister("plugin-raw")
        SERDES.rescan()
