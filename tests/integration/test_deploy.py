"""deploy/: the files that run vas for real, checked without a container runtime or a
Kubernetes cluster.

- Every manifest parses (compose and Kubernetes YAML; systemd units and environment files).
- Every ``vasctl`` command line in them (compose commands, Kubernetes container args,
  systemd ExecStart with its EnvironmentFile) goes through vasctl's own parser
  (``build_parser().parse_args``, nothing executed) with that process's environment, so
  flags, sub-commands and VAS_* values (sizes, ports) are all ones vasctl accepts; every
  VAS_* variable they set is one vas reads.
- The ports agree across files: coordinator gRPC 7300, agent gRPC 7400, agent bulk channel
  7401 (compose, Kubernetes Services, container ports, probes, health checks, systemd
  environment files, the Dockerfile's EXPOSE); advertised addresses carry the listen port.
- deploy/health.py (the image's ``vas-health``) answers 0 for a serving coordinator,
  plaintext and over mutual TLS, and 1 with one stderr line otherwise.
- Where the tools are present: ``kubectl kustomize`` renders the manifests,
  ``systemd-analyze verify`` accepts the units, docker or podman builds the image;
  each skipped with its reason otherwise.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from vas.cli.main import build_parser
from vas.cluster import ClusterCerts, CoordinatorProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
HEALTH = DEPLOY / "health.py"

#: The ports every file must agree on (deploy/README.md "Ports").
COORDINATOR_PORT = 7300
NODE_PORT = 7400
BULK_PORT = 7401
ETCD_PORT = 2379

#: Stand-ins for Kubernetes downward-API values (valueFrom.fieldRef.fieldPath).
FIELD_VALUES = {"status.hostIP": "10.0.0.7", "spec.nodeName": "k8s-node-7",
                "metadata.name": "pod-0"}


@dataclass
class Launch:
    """One ``vasctl`` process a deploy file starts: where, its argv after ``vasctl``, its
    environment, and the ports its file declares for it beside the command line
    (container ports, probes, health checks), by role."""

    where: str
    argv: list[str]
    env: dict[str, str]
    declared: dict[str, set[int]] = field(default_factory=dict)

    def declare(self, role: str, port: int) -> None:
        self.declared.setdefault(role, set()).add(int(port))


def port_of(address: str) -> int:
    """The port of HOST:PORT or of a URL (``http://etcd:2379``)."""
    return int(address.rstrip("/").rpartition(":")[2])


def host_of(address: str) -> str:
    return address.split("://")[-1].rpartition(":")[0]


def vas_variables() -> set[str]:
    """Every VAS_* name the sources of vas mention (the variables vas reads)."""
    names = set()
    for folder in ("src/vas", "node", "coordinator"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"\bVAS_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return names


# ---- reading the files ------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_launches() -> list[Launch]:
    launches = []
    for name, service in compose()["services"].items():
        if not str(service.get("image", "")).startswith("vas:"):
            continue
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        launch = Launch(f"compose.yaml service {name}", [str(a) for a in service["command"]], env)
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            assert test[:2] == ["CMD", "vas-health"], f"{launch.where}: healthcheck {test}"
            server = test[test.index("--server") + 1]
            launch.declare(f"{server} health", port_of(test[2]))
        launches.append(launch)
    return launches


def kubernetes_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    return None


def container_env(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            env[item["name"]] = FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(NAME) substitution in args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], text)


def kubernetes_launches() -> list[Launch]:
    launches = []
    for filename, doc in kubernetes_documents():
        spec = pod_spec(doc)
        if spec is None:
            continue
        for container in spec["containers"]:
            if not container["image"].startswith("vas:"):
                continue
            env = container_env(container)
            launch = Launch(f"kubernetes/{filename} {doc['kind']} {doc['metadata']['name']}",
                            [expand(str(a), env) for a in container["args"]], env)
            role = "coordinator" if container["args"][0] == "coordinator" else "node"
            named = {p["name"]: p for p in container.get("ports", [])}
            for port in named.values():
                if "hostPort" in port:  # host network: the same number on both sides
                    assert port["hostPort"] == port["containerPort"], launch.where
            launch.declare(f"{role} container", named["grpc"]["containerPort"])
            if "bulk" in named:
                launch.declare("bulk container", named["bulk"]["containerPort"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    launch.declare(f"{role} health", container[probe]["grpc"]["port"])
            launches.append(launch)
    return launches


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}:{number}: {line!r}"
        env[key] = value
    return env


def systemd_launches() -> list[Launch]:
    launches = []
    for path in sorted(SYSTEMD.glob("*.service")):
        service = unit(path)["Service"]
        words = shlex.split(service["ExecStart"])
        assert words[0].endswith("/vasctl"), f"{path.name}: ExecStart {words}"
        environment = Path(service["EnvironmentFile"].lstrip("-"))
        example = SYSTEMD / environment.name
        assert example.is_file(), f"{path.name} reads {environment}: no {example} beside it"
        launches.append(Launch(f"systemd/{path.name} with {example.name}", words[1:],
                               env_file(example)))
    return launches


def all_launches() -> list[Launch]:
    return compose_launches() + kubernetes_launches() + systemd_launches()


def parsed(launch: Launch, monkeypatch):
    """``launch.argv`` through vasctl's parser, with exactly ``launch.env`` as the VAS_*
    environment (the parser reads its defaults from the environment when built)."""
    with monkeypatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("VAS_")]:
            patch.delenv(key)
        for key, value in launch.env.items():
            patch.setenv(key, value)
        try:
            return build_parser().parse_args(launch.argv)
        except SystemExit as exc:
            pytest.fail(f"{launch.where}: vasctl {shlex.join(launch.argv)} does not parse "
                        f"(exit {exc.code}; stderr above)")


# ---- the checks ---------------------------------------------------------------------

def test_every_manifest_parses():
    assert compose()["services"]
    kinds = sorted({doc["kind"] for _, doc in kubernetes_documents()})
    assert kinds == ["DaemonSet", "Deployment", "Kustomization", "Namespace", "Service",
                     "StatefulSet"]
    for path in SYSTEMD.glob("*.service"):
        assert {"Unit", "Service", "Install"} <= set(unit(path).sections()), path.name
    for path in SYSTEMD.glob("*.env"):
        assert env_file(path), path.name
    kustomized = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomized["resources"]) == sorted(
        p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_files_start_every_daemon_they_should():
    where = {launch.where: tuple(launch.argv[:2]) for launch in all_launches()}
    daemons = sorted(where.values())
    assert daemons.count(("node", "serve")) == 3 + 1 + 1      # compose, DaemonSet, systemd
    assert daemons.count(("coordinator", "serve")) == 2 + 1 + 1
    assert where["compose.yaml service client"] == ("status",)


@pytest.mark.parametrize("launch", all_launches(), ids=lambda launch: launch.where)
def test_every_vasctl_command_line_parses(launch, monkeypatch):
    unknown = set(launch.env) - vas_variables()
    assert not {k for k in unknown if k.startswith("VAS_")}, \
        f"{launch.where} sets variables vas never reads: {sorted(unknown)}"
    args = parsed(launch, monkeypatch)
    if launch.argv[:2] == ["node", "serve"]:
        assert args.func.__name__ == "serve_node"
        assert args.coordinator and args.memory > 0 and args.node_id
    elif launch.argv[:2] == ["coordinator", "serve"]:
        assert args.func.__name__ == "serve_coordinator"
        assert args.etcd


def daemon_ports(monkeypatch) -> dict[str, dict[str, set[int]]]:
    """role -> {where: ports} over every file: from the parsed command lines and from
    what each file declares beside them."""
    seen: dict[str, dict[str, set[int]]] = {}

    def note(role: str, where: str, port: int) -> None:
        seen.setdefault(role, {}).setdefault(where, set()).add(int(port))

    for launch in all_launches():
        args = parsed(launch, monkeypatch)
        if launch.argv[:2] == ["node", "serve"]:
            note("node", f"{launch.where} --listen", port_of(args.listen))
            assert args.advertise, f"{launch.where}: no --advertise / VAS_ADVERTISE"
            note("node", f"{launch.where} --advertise", port_of(args.advertise))
            note("bulk", f"{launch.where} --bulk-port", args.bulk_port)
            note("coordinator", f"{launch.where} --coordinator", port_of(args.coordinator))
        elif launch.argv[:2] == ["coordinator", "serve"]:
            note("coordinator", f"{launch.where} --listen", port_of(args.listen))
            note("etcd", f"{launch.where} --etcd", port_of(args.etcd))
        for role, ports in launch.declared.items():
            for port in ports:
                note(role.split()[0], f"{launch.where} {role}", port)
    return seen


def test_ports_agree_across_files(monkeypatch):
    expected = {"coordinator": COORDINATOR_PORT, "node": NODE_PORT, "bulk": BULK_PORT,
                "etcd": ETCD_PORT}
    seen = daemon_ports(monkeypatch)
    for role, port in expected.items():
        wrong = {where: ports for where, ports in seen[role].items() if ports != {port}}
        assert not wrong, f"{role} port is not {port} in: {wrong}"
    # Each kind of file says each port somewhere.
    for role in ("coordinator", "node", "bulk"):
        for kind in ("compose.yaml", "kubernetes/", "systemd/"):
            assert any(where.startswith(kind) for where in seen[role]), (role, kind)

    exposed = re.findall(r"^EXPOSE (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert {COORDINATOR_PORT, NODE_PORT, BULK_PORT} <= {int(p) for line in exposed
                                                        for p in line.split()}


def test_kubernetes_services_match_their_pods():
    docs = kubernetes_documents()
    services = {doc["metadata"]["name"]: doc for _, doc in docs if doc["kind"] == "Service"}
    pods = {doc["metadata"]["name"]: doc for _, doc in docs if pod_spec(doc) is not None}

    coordinator = services["vas-coordinator"]["spec"]
    assert coordinator["selector"] == pods["vas-coordinator"]["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in coordinator["ports"]] == [
        (COORDINATOR_PORT, "grpc")]

    # The agents dial the coordinators' Service; the coordinators dial etcd's.
    agent = pod_spec(pods["vas-node"])["containers"][0]
    target = container_env(agent)["VAS_COORDINATOR"]
    assert (host_of(target), port_of(target)) == ("vas-coordinator", COORDINATOR_PORT)
    assert pod_spec(pods["vas-node"])["hostNetwork"] is True
    assert pod_spec(pods["vas-node"])["dnsPolicy"] == "ClusterFirstWithHostNet"
    args = pod_spec(pods["vas-coordinator"])["containers"][0]["args"]
    etcd_url = args[args.index("--etcd") + 1]
    etcd = services[host_of(etcd_url)]["spec"]
    assert [p["port"] for p in etcd["ports"]] == [port_of(etcd_url)]
    assert etcd["selector"] == pods["vas-etcd"]["spec"]["selector"]["matchLabels"]
    etcd_pod = pod_spec(pods["vas-etcd"])["containers"][0]
    assert {p["name"]: p["containerPort"] for p in etcd_pod["ports"]}["client"] == ETCD_PORT
    assert pods["vas-etcd"]["spec"]["serviceName"] in services
    members = pods["vas-etcd"]["spec"]["replicas"]
    initial = next(a for a in etcd_pod["args"] if a.startswith("--initial-cluster="))
    assert initial.count("=http://") == members

    # The agent's socket is on the host, where the node's other pods find it.
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(pods["vas-node"])["volumes"]}
    assert volumes[next(n for n, p in mounts.items() if p == "/run/vas")]["hostPath"][
        "path"] == "/run/vas"
    assert "/run/vas/node.sock" in agent["args"]


def test_compose_agents_reach_both_coordinators():
    services = compose()["services"]
    for name in ("coordinator1", "coordinator2"):
        assert "coordinator" in services[name]["networks"]["default"]["aliases"]
    for name in ("node1", "node2", "node3"):
        command = services[name]["command"]
        assert command[command.index("--advertise") + 1] == f"{name}:{NODE_PORT}"
        assert command[command.index("--id") + 1] == name
        assert services[name]["environment"]["VAS_COORDINATOR"] == f"coordinator:{COORDINATOR_PORT}"
        assert set(services[name]["depends_on"]) == {"coordinator1", "coordinator2"}
    etcd = services["etcd"]["command"]
    assert f"--listen-client-urls=http://0.0.0.0:{ETCD_PORT}" in etcd


# ---- deploy/health.py -------------------------------------------------------------------

def health(address: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VAS_TLS_")}
    return subprocess.run([sys.executable, str(HEALTH), address, *args], capture_output=True,
                          text=True, timeout=30, env={**clean, **(env or {})})


def test_health_check_of_a_plaintext_coordinator(coordinator):
    done = health(coordinator.address, "--server", "coordinator")
    assert (done.returncode, done.stderr) == (0, "")
    closed = f"127.0.0.1:{free_port()}"
    done = health(closed, "--timeout", "1")
    assert done.returncode == 1
    assert done.stderr.startswith(f"vas-health: {closed}: ") and done.stderr.count("\n") == 1


def test_health_check_over_mutual_tls(etcd, world_dir):
    certs = ClusterCerts(os.path.join(world_dir, "tls"))
    process = CoordinatorProcess(world_dir, etcd.url, tls=certs.coordinator).start()
    try:
        done = health(process.address, "--server", "coordinator", env=certs.admin.env())
        assert (done.returncode, done.stderr) == (0, "")
        # The daemon's own files do too (its certificate is also a client's).
        done = health(process.address, "--server", "coordinator", env=certs.coordinator.env())
        assert (done.returncode, done.stderr) == (0, "")
        refused = health(process.address, "--server", "coordinator", "--timeout", "2")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        wrong_name = health(process.address, "--server", "node", "--timeout", "2",
                            env=certs.admin.env())
        assert wrong_name.returncode == 1
    finally:
        process.stop()


# ---- the tools, where present ---------------------------------------------------------

def test_kubectl_kustomize_renders_every_object():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests were only parsed")
    done = subprocess.run([kubectl, "kustomize", str(KUBERNETES)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rendered = sorted((d["kind"], d["metadata"]["name"])
                      for d in yaml.safe_load_all(done.stdout) if d)
    assert rendered == sorted((d["kind"], d["metadata"]["name"])
                              for _, d in kubernetes_documents() if d["kind"] != "Kustomization")


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units were only parsed")
    vasctl = Path(sys.executable).with_name("vasctl")
    assert vasctl.exists(), f"no {vasctl}: vas is not installed in this venv"
    names = []
    for path in SYSTEMD.glob("*.service"):  # the installed paths, pointed at this checkout
        text = path.read_text().replace("/opt/vas/.venv/bin/vasctl", str(vasctl))
        (tmp_path / path.name).write_text(text.replace("/etc/vas/", f"{SYSTEMD}/"))
        names.append(str(tmp_path / path.name))
    done = subprocess.run([analyze, "verify", *names], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line for line in (done.stdout + done.stderr).splitlines()
            if str(tmp_path) in line] == []


def container_engine() -> str | None:
    """docker or podman when one can build here (its daemon answers), else None."""
    for name in ("docker", "podman"):
        binary = shutil.which(name)
        if binary and subprocess.run([binary, "info"], capture_output=True,
                                     timeout=60).returncode == 0:
            return binary
    return None


@pytest.mark.timeout(1800)
def test_the_image_builds_and_runs_vasctl():
    engine = container_engine()
    if engine is None:
        present = [n for n in ("docker", "podman") if shutil.which(n)]
        pytest.skip(f"{' and '.join(present)} present but no daemon answers `info`"
                    if present else "neither docker nor podman is installed")
    tag = "vas-deploy-test:latest"
    built = subprocess.run([engine, "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag,
                            str(ROOT)], capture_output=True, text=True, timeout=1700)
    assert built.returncode == 0, built.stderr[-4000:]
    try:
        run = subprocess.run([engine, "run", "--rm", tag, "node", "serve", "--help"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "--bulk-port" in run.stdout and "--advertise" in run.stdout
        compiler = subprocess.run([engine, "run", "--rm", "--entrypoint", "sh", tag, "-c",
                                   "command -v gcc cc || echo none"],
                                  capture_output=True, text=True, timeout=120)
        assert compiler.stdout.strip() == "none"
    finally:
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=120)
