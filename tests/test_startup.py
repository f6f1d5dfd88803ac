"""Fixed costs of a process (issue 14): the light commands import no torch, a run imports its own method
and strategy only, and the registry's index (read from the source) is what importing registers.

Each check that is about imports runs in a fresh interpreter (``sys.modules`` of this test process
holds whatever other tests imported). Wall times are machine-dependent: measured and reported, never
asserted here."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

from clbench.registry import index

ROOTS = ("methods", "strategies", "clbench.data.formats")

# Run ``clbench.cli.main(argv)`` in a fresh interpreter; print what it imported, as JSON.
LIGHT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from clbench.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(sys.argv[1:])
        except SystemExit:
            pass
    heavy = [m for m in ("torch", "timm", "FrEIA", "sklearn", "scipy") if m in sys.modules]
    ours = [m for m in sys.modules if m.split(".")[0] in ("methods", "strategies")]
    print(json.dumps({"heavy": heavy, "ours": ours, "out": out.getvalue()}))
    """
)


def _fresh(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["data", "synth", "--help"], ["report", "--help"]],
                         ids=lambda argv: " ".join(argv))
def test_light_commands_import_no_torch_and_no_method(argv: list[str]) -> None:
    seen = _fresh(LIGHT, *argv)
    assert seen["heavy"] == [] and seen["ours"] == [], seen
    if argv == ["--help"]:  # every command is listed, the ones a method adds too
        for command in ("run", "sweep", "report", "data", "memory", "plot", "methods", "distill-teacher"):
            assert f"    {command} " in seen["out"], command
    if argv == ["methods"]:
        assert "padim" in seen["out"] and "replay" in seen["out"]


# Import what every run imports, then, in one forked child per method (strategy), ``get`` it: the child's
# new modules are that method's. Forking shares the torch import, so this is one import of torch.
ONE_EACH = textwrap.dedent(
    """
    import json, os, sys
    import clbench.engine.runner
    from methods.base import METHODS
    from strategies.base import STRATEGIES
    base = {m for m in sys.modules if m.split(".")[0] in ("methods", "strategies")}
    seen = {"runner": sorted(base), "sklearn": "sklearn" in sys.modules, "get": {}}
    for registry in (METHODS, STRATEGIES):
        for name in registry.names():
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                registry.get(name)
                new = sorted(m for m in sys.modules if m.split(".")[0] in ("methods", "strategies") and m not in base)
                os.write(write, json.dumps(new + ["sklearn"] * ("sklearn" in sys.modules)).encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read) as pipe:
                seen["get"][name] = json.loads(pipe.read() or "null")
            os.waitpid(pid, 0)
    print(json.dumps(seen))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per method")
def test_a_run_imports_its_own_method_and_strategy_only() -> None:
    seen = _fresh(ONE_EACH)
    units = {name: entry.module for package in ("methods", "strategies") for name, entry in index(package).items()}
    assert "methods.base" in seen["runner"] and not set(units.values()) & set(seen["runner"])  # interfaces only
    assert seen["sklearn"] is False
    assert sorted(seen["get"]) == sorted(units)
    for name, new in seen["get"].items():
        assert new is not None and units[name] in new, (name, new)
        others = [m for m in new if any(m == units[o] for o in units if o != name)]
        assert others == [], f"getting {name} imported {others}"
        assert "sklearn" not in new, f"getting {name} imported scikit-learn"
    # a method package's other modules are its own helpers (flows: FastFlow's run has no CAINNFlow)
    assert "methods.flows.cainnflow" not in seen["get"]["fastflow"]


def _import_everything(package: str) -> None:
    """Every module under ``package``, helpers and private ones included (not through the index)."""
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


@pytest.mark.parametrize("package", ROOTS)
def test_the_index_is_what_importing_registers(package: str) -> None:
    """A registration the source scan cannot see (a computed name, a call instead of a decorator) fails here."""
    _import_everything(package)
    registry = {"methods": "methods.base:METHODS", "strategies": "strategies.base:STRATEGIES",
                "clbench.data.formats": "clbench.data.formats.base:FORMATS"}[package]
    module, attr = registry.split(":")
    entries = getattr(importlib.import_module(module), attr)._entries
    assert {name: cls.__module__ for name, cls in entries.items()} == \
        {name: entry.module for name, entry in index(package).items()}


def test_declared_commands_are_the_ones_each_method_adds() -> None:
    from methods.base import METHODS

    declared = {}
    for name, entry in index("methods").items():
        scratch = argparse.ArgumentParser(prog="clbench").add_subparsers()
        METHODS.get(name).add_cli_commands(scratch)
        helps = {action.dest: action.help for action in scratch._choices_actions}
        assert helps == dict(entry.commands), f"{name}: CLI_COMMANDS differs from what add_cli_commands adds"
        declared.update(entry.commands)
    assert "distill-teacher" in declared
