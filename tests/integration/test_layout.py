"""The package layout as processes see it (docs/ARCHITECTURE.md, "Packaging").

- The daemons never load the client side: a real agent and coordinator run with
  PYTHONPROFILEIMPORTTIME=1, which makes each print every module it imports to
  stderr (its log), and neither log names vas.client, vas.connection or vas.mapping.
- A ``vasctl`` command served by its local agent never loads grpc (nor ssl): it needs
  only the local protocol's messages, and grpc was a third of its start-up CPU (a suite run
  starts ~640 of them); neither does its error path (a NotFound, exit 1).
- The checkout imports like the installed package: from the checkout root (where
  ``python -c`` puts the cwd first on sys.path) vas, vas.node and vas.coordinator
  import, because nothing at the root is named vas (the client package is src/vas).
- pyproject.toml lists every package folder (a package left out of the list is
  still found by an editable install, so only a wheel would miss it).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import vas

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIENT_SIDE = {"vas.client", "vas.connection", "vas.mapping"}


def imported_modules(log_path: str) -> set[str]:
    """Modules named by the ``import time:`` lines (-X importtime) of a log."""
    with open(log_path, errors="replace") as log:
        return modules_in(log)


def modules_in(lines) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in lines
            if line.startswith("import time:") and "|" in line}


def test_daemons_never_import_the_client(cluster, monkeypatch):
    # Read at interpreter start-up: it reaches the daemons (vas.cluster passes the
    # environment on), not this already running process.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    local = cluster(nodes=1)
    # Serve some requests first, so imports done on first use are in the logs too.
    with vas.connect(local.nodes[0].socket) as client:
        client.create("layout/a", 4096, mode=0o644)
        with client.attach("layout/a", "rw") as mapping:
            mapping.write(0, b"x")
            mapping.sync()
        assert client.stat("layout/a").version == 1
        local_commands_load_no_grpc(local.nodes[0].socket)
        client.delete("layout/a")
    local.stop()

    node = imported_modules(local.nodes[0].log_path)
    coordinator = imported_modules(local.coordinators[0].log_path)
    # The check sees what the daemons import...
    assert {"vas.cli.main", "vas.core.errors", "vas.node.server", "vas.node.agent"} <= node
    assert {"vas.cli.main", "vas.core.errors", "vas.coordinator.server"} <= coordinator
    # ...and the client side is not among it.
    agent_leaks, coordinator_leaks = CLIENT_SIDE & node, CLIENT_SIDE & coordinator
    assert not agent_leaks
    assert not coordinator_leaks


def local_commands_load_no_grpc(socket: str) -> None:
    """``vasctl seg ls`` and a ``seg stat`` that fails, through the agent at ``socket``
    (PYTHONPROFILEIMPORTTIME is set): right output, and no grpc or ssl imported."""
    def vasctl(*args: str) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
        """(the finished process, modules it imported, its other stderr lines)"""
        proc = subprocess.run([sys.executable, "-m", "vas.cli", *args, "--node", socket],
                              capture_output=True, text=True, timeout=60, cwd="/")
        lines = proc.stderr.splitlines()
        return proc, modules_in(lines), [line for line in lines if not line.startswith("import time:")]

    listed, modules, errors = vasctl("seg", "ls", "layout/", "-o", "json")
    assert (listed.returncode, errors) == (0, []), listed.stderr
    assert [s["name"] for s in json.loads(listed.stdout)] == ["layout/a"]
    assert "vas.cli.main" in modules and not {"grpc", "ssl"} & modules
    missing, modules, errors = vasctl("seg", "stat", "layout/missing")
    assert missing.returncode == 1 and len(errors) == 1, missing.stderr
    assert errors[0].startswith("vasctl: error: ") and "layout/missing" in errors[0]
    assert "vas.cli.main" in modules and not {"grpc", "ssl"} & modules


def python_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_checkout_root_imports_the_package():
    assert not (ROOT / "vas").exists(), "a vas/ at the checkout root would shadow the package"
    done = python_at_root("import vas, vas.node, vas.coordinator, vas._native, vas.v1; "
                          "print(vas.__file__)")
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().startswith(str(ROOT / "vas") + os.sep)


def test_the_checkout_root_shadows_no_other_package():
    # proto-plus (from Ray's dependencies) imports as `proto`: a package folder of that
    # name at the root would replace it in every process started there.
    assert not (ROOT / "proto" / "__init__.py").exists()
    done = python_at_root("import proto; print(getattr(proto, '__file__', None))")
    assert not done.stdout.strip().startswith(str(ROOT / "proto")), done.stdout


def test_the_daemon_packages_load_no_client_side():
    done = python_at_root("import sys, vas.node.server, vas.coordinator.server, vas.cli.main\n"
                          "vas.cli.main.build_parser()  # every noun module, as `serve` does\n"
                          f"print(sorted(m for m in sys.modules if m in {sorted(CLIENT_SIDE)}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    done = python_at_root("import sys, vas.node; print('vas.client' in sys.modules)")
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr


def test_the_client_names_load_on_first_use():
    done = python_at_root("import sys, vas\n"
                          "before = 'vas.client' in sys.modules\n"
                          "print(before, vas.connect.__module__, vas.Mapping.__module__, "
                          "vas.DEFAULT_SOCKET)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "vas.client", "vas.mapping", "/run/vas/node.sock"]


def test_pyproject_lists_every_package_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    found.discard("vas.v1")  # generated by setup.py (in place by an editable install)
    assert found == set(setuptools["packages"])
