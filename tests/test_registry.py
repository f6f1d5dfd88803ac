"""The registry's discovery rule and the CLI's method seam: the index (read from the source) names each
method (strategy) module, discovery imports those and nothing else, ``get`` imports one, every method
registers, and a method adds its own commands to the CLI without the CLI naming it."""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from clbench import registry as registry_module
from clbench.cli import build_parser, main
from clbench.registry import Entry, Registry, index
from methods.base import METHODS, AnomalyMethod

METHOD_NAMES = ["cainnflow", "cfa", "draem", "efficientad", "fastflow", "padim", "patchcore", "stfpm"]


def _discovered(monkeypatch: pytest.MonkeyPatch, package: str) -> list[str]:
    """The modules a fresh registry's ``discover`` imports itself (not what those modules import)."""
    calls: list[str] = []
    real = importlib.import_module

    def recording(name: str, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(registry_module.importlib, "import_module", recording)
    Registry("thing", package).discover()
    monkeypatch.undo()
    return [c for c in calls if c == package or c.startswith(package + ".")]  # not other libraries' own


def test_discovery_imports_the_method_modules_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _discovered(monkeypatch, "methods")
    assert sorted(calls) == ["methods.cfa", "methods.draem.model", "methods.efficientad.model",
                             "methods.flows.cainnflow", "methods.flows.fastflow", "methods.padim",
                             "methods.patchcore", "methods.stfpm"]
    # helpers (methods.base, methods.training, methods.efficientad.distill, ...) are never imported as methods
    calls = _discovered(monkeypatch, "strategies")
    assert sorted(calls) == ["strategies.der", "strategies.ewc", "strategies.joint", "strategies.latent_replay", "strategies.lwf", "strategies.mas", "strategies.replay",
                            "strategies.sequential"]


def test_every_method_registers_from_its_module_or_package() -> None:
    assert METHODS.names() == METHOD_NAMES
    homes = {name: METHODS.get(name).__module__ for name in METHOD_NAMES}
    assert homes == {
        "cainnflow": "methods.flows.cainnflow", "cfa": "methods.cfa", "draem": "methods.draem.model",
        "efficientad": "methods.efficientad.model", "fastflow": "methods.flows.fastflow", "padim": "methods.padim",
        "patchcore": "methods.patchcore", "stfpm": "methods.stfpm",
    }


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package laid out like ``methods``: a method module, a method package with a helper module,
    helper modules, a private module (registering, but private), and a ``base`` module."""
    name = "fake_methods_for_discovery"
    root = tmp_path / name
    files = {
        "__init__.py": """
            from clbench.registry import Registry
            REG = Registry("thing", __name__)
        """,
        "base.py": "raise AssertionError('base imported by discovery')",
        "helper.py": "raise AssertionError('helper imported by discovery')",
        "_private.py": "raise AssertionError('private module imported by discovery')\n"
                       "@REG.register('private')\nclass Private: pass",
        "alpha.py": """
            from fake_methods_for_discovery import REG
            @REG.register("alpha")
            class Alpha:
                pass
        """,
        "multi/__init__.py": "from fake_methods_for_discovery.multi import model  # registers",
        "multi/model.py": """
            from fake_methods_for_discovery import REG
            @REG.register("multi")
            class Multi:
                pass
        """,
        "multi/networks.py": "raise AssertionError('a method package\\'s helper imported by discovery')",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]
    index.cache_clear()  # the next test's package lies in another folder


def _loaded(package: str) -> list[str]:
    return sorted(m for m in sys.modules if m.startswith(package + "."))


def test_the_rule_on_a_package_of_its_own(fake_package: str) -> None:
    package = importlib.import_module(fake_package)
    assert package.REG.names() == ["alpha", "multi"] and _loaded(fake_package) == []  # names: nothing imported
    assert package.REG.get("multi").__name__ == "Multi"  # one name: its module only
    assert _loaded(fake_package) == [f"{fake_package}.multi", f"{fake_package}.multi.model"]
    package.REG.discover()
    assert _loaded(fake_package) == [f"{fake_package}.alpha", f"{fake_package}.multi", f"{fake_package}.multi.model"]


def test_an_unknown_name_or_a_stale_index_is_one_clear_error(fake_package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    package = importlib.import_module(fake_package)
    with pytest.raises(ValueError, match=r"unknown thing 'beta' \(available: alpha, multi\)"):
        package.REG.get("beta")
    # an index that says alpha registers 'beta' (it does not)
    monkeypatch.setitem(index(fake_package), "beta", Entry("beta", f"{fake_package}.alpha"))
    with pytest.raises(ValueError, match=f"thing 'beta': importing {fake_package}.alpha did not register it"):
        package.REG.get("beta")


def test_the_cli_adds_each_methods_own_commands(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    class WithCommand(AnomalyMethod):
        name = "with-command"

        @classmethod
        def add_cli_commands(cls, subparsers) -> None:
            p = subparsers.add_parser("hello-method", help="a method's own command")
            p.set_defaults(func=lambda args: print("hello from a method") or 0)

    assert AnomalyMethod.add_cli_commands(argparse.ArgumentParser().add_subparsers()) is None  # default: nothing
    monkeypatch.setitem(METHODS._entries, "with-command", WithCommand)
    # what a module's ``CLI_COMMANDS = {"hello-method": ...}`` declares, as the index reads it from the source
    monkeypatch.setitem(index("methods"), "with-command",
                        Entry("with-command", __name__, commands={"hello-method": "a method's own command"}))
    parser = build_parser()
    assert parser.parse_args(["distill-teacher", "--images", "in", "--out", "out"]).func.__module__ == \
        "methods.efficientad.distill"  # EfficientAD's own command
    assert parser.parse_args(["hello-method"]).command == "hello-method"
    assert main(["hello-method"]) == 0 and capsys.readouterr().out == "hello from a method\n"
    source = Path(sys.modules["clbench.cli"].__file__).read_text()
    assert "efficientad" not in source.lower() and "distill" not in source
