"""The deployment artefacts in ``deploy/``: the Dockerfile, the Kubernetes manifests, the systemd unit.

No container engine runs here, so the image's contract is tested as far as it reaches without one: the
wheels the Dockerfile builds (l4proxy's and its dependencies', none compiled here) are installed with
``--no-index`` in a fresh virtualenv, and the image's own entrypoint command
(its ENTRYPOINT and CMD, the config at the documented path swapped for a file of ours) serves Redis and
answers the HEALTHCHECK. The manifests are validated with ``kubernetes-validate --strict`` for two
Kubernetes versions, their embedded TOML passes ``l4proxy check``, and their termination settings add
up. The unit is checked by ``systemd-analyze verify`` and by its fields.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from l4proxy.config import parse_duration

from ..servers import RedisServer, free_port, require, started, wait_listening

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIG_PATH = "/etc/l4proxy/l4proxy.toml"  # where the image reads its config (documented in README)
K8S_VERSIONS = ("1.29.0", "1.33.0")  # native sidecars need 1.29


def run_ok(*argv: str | Path, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{shlex.join(map(str, argv))}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


# --- the Dockerfile ----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(name: str) -> list[str]:
    return [args for kind, args in dockerfile() if kind == name]


def test_the_dockerfile_is_multi_stage_slim_and_unprivileged() -> None:
    stages = instruction("FROM")
    assert len(stages) == 2 and all(re.match(r"python:\$\{PYTHON\}-slim\b", s) for s in stages), stages
    assert stages[0].endswith(" AS build")
    runs = instruction("RUN")
    assert "pip wheel" in runs[0] and "--wheel-dir /wheels" in runs[0]  # wheels built in the first stage
    assert "--no-index --find-links /wheels l4proxy" in runs[1]  # the second installs only those
    [user] = instruction("USER")
    assert user.split(":")[0] not in ("0", "root")
    [healthcheck] = instruction("HEALTHCHECK")
    assert "http://127.0.0.1:9901/healthz" in healthcheck
    assert json.loads(instruction("ENTRYPOINT")[0]) == ["l4proxy"]
    assert json.loads(instruction("CMD")[0]) == ["--config", CONFIG_PATH]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with only the wheel built from this tree (as the image's build stage does)."""
    tmp = tmp_path_factory.mktemp("image")
    source = tmp / "src"
    source.mkdir()
    for copy in instruction("COPY"):  # what the build stage copies, and nothing else
        *names, _into = copy.split()
        for name in names:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / name, source / name)
    dist = tmp / "dist"
    run_ok(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", dist, source, cwd=tmp)  # deps too, as there
    # slim has no compiler: every dependency must come as a published wheel, none built here for this machine
    built = [w.name for w in dist.glob("*.whl") if re.search(r"-linux_\w+\.whl$", w.name)]
    assert not built, built
    run_ok(sys.executable, "-m", "venv", tmp / "venv")
    run_ok(tmp / "venv" / "bin" / "pip", "install", "-q", "--no-index", "--find-links", dist, "l4proxy")  # only those
    return tmp / "venv"


def test_the_image_entrypoint_serves_from_a_fresh_virtualenv(fresh_venv: Path, tmp_path: Path) -> None:
    """deploy/l4proxy.toml (the image's config), its addresses moved to free loopback ports, run by the
    ENTRYPOINT and CMD in a venv holding only the wheel: Redis answers through it, the HEALTHCHECK
    passes, SIGTERM exits 0."""
    listen, admin = free_port(), free_port()
    redis = RedisServer(tmp_path)
    with started(redis):
        text = (DEPLOY / "l4proxy.toml").read_text()
        for old, new in ((':9901"', f'127.0.0.1:{admin}"'), (':6379"', f'127.0.0.1:{listen}"'),
                         ('"redis:6379"', f'"127.0.0.1:{redis.port}"')):  # fmt: skip
            assert old in text, old
            text = text.replace(old, new, 1)
        config = tmp_path / "l4proxy.toml"
        config.write_text(text)
        entrypoint = json.loads(instruction("ENTRYPOINT")[0])
        cmd = [str(config) if arg == CONFIG_PATH else arg for arg in json.loads(instruction("CMD")[0])]
        argv = [str(fresh_venv / "bin" / entrypoint[0]), *cmd]
        err = tmp_path / "stderr"
        with err.open("wb") as stderr:
            proc = subprocess.Popen([*argv, "--shutdown-delay", "0s"], stdout=subprocess.DEVNULL, stderr=stderr,
                                    cwd=tmp_path, env={"PATH": f"{fresh_venv / 'bin'}:/usr/bin:/bin"})
        try:
            wait_listening(listen)
            wait_listening(admin)
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as client:
                client.sendall(b"PING\r\n")
                assert client.recv(64) == b"+PONG\r\n"
            health = json.loads(instruction("HEALTHCHECK")[0].split("CMD", 1)[1])
            health = [str(fresh_venv / "bin" / "python"), *(a.replace(":9901/", f":{admin}/") for a in health[1:])]
            run_ok(*health, timeout=10)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert b"Traceback" not in err.read_bytes(), err.read_text()


# --- Kubernetes ----------------------------------------------------------------------------------------


def manifests() -> dict[str, list[dict[str, Any]]]:
    paths = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in paths}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_strict_validation(version: str) -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    done = run_ok(tool, "--strict", "-k", version, *files, timeout=120)
    resources = sum(len(docs) for docs in manifests().values())
    assert done.stdout.count("passed for resource") == resources, done.stdout


def test_the_configmap_toml_passes_check(tmp_path: Path) -> None:
    [configmap] = [d for d in manifests()["fleet.yaml"] if d["kind"] == "ConfigMap"]
    config = tmp_path / "l4proxy.toml"
    config.write_text(configmap["data"]["l4proxy.toml"])
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "postgres").write_text("health postgres s3cret\n")  # the Secret's stand-in
    checked = tomllib.loads(run_ok(sys.executable, "-m", "l4proxy", "check", "--config", config).stdout)
    assert checked["admin"] == ":9901" and checked["shutdown_delay"] == "5s"
    run_ok(sys.executable, "-m", "l4proxy", "check", "--config", DEPLOY / "l4proxy.toml")


def _proxy_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in [*pod.get("initContainers", []), *pod["containers"]] if c["name"] == "l4proxy")


def _settings(proxy: dict[str, Any], configmap: dict[str, Any] | None) -> dict[str, Any]:
    """shutdown_delay, drain_timeout and admin of the l4proxy container, from its flags or its ConfigMap."""
    if configmap is not None:
        return tomllib.loads(configmap["data"]["l4proxy.toml"])
    args = proxy["args"]
    return {flag[2:].replace("-", "_"): value for flag, value in zip(args[::2], args[1::2], strict=True)}


@pytest.mark.parametrize("name", ["sidecar.yaml", "fleet.yaml"])
def test_probes_resources_budget_and_termination_add_up(name: str) -> None:
    docs = {d["kind"]: d for d in manifests()[name]}
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    proxy = _proxy_container(pod)
    settings = _settings(proxy, docs.get("ConfigMap"))
    assert settings["admin"] == ":9901"
    [admin_port] = [p for p in proxy["ports"] if p["containerPort"] == 9901]
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": admin_port["name"]}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": admin_port["name"]}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}, container["name"]
    delay = parse_duration(settings["shutdown_delay"], "shutdown_delay")
    drain = parse_duration(settings["drain_timeout"], "drain_timeout")
    pre_stop = [c["lifecycle"]["preStop"]["exec"]["command"] for c in pod["containers"] if "lifecycle" in c]
    assert all(command[0] == "sleep" for command in pre_stop), pre_stop
    waits = sum(float(command[1]) for command in pre_stop)
    if name == "sidecar.yaml":
        assert proxy in pod["initContainers"] and proxy["restartPolicy"] == "Always"  # a native sidecar
        assert waits == 5.0  # the app's endpoints catch up before the app stops ...
        assert delay == 0.0  # ... and l4proxy is stopped only after the app, its one client, has exited
    else:
        assert delay == 5.0 and waits == 0.0  # the delay is l4proxy's own: a preStop sleep would add to it
        readiness = proxy["readinessProbe"]
        assert readiness["periodSeconds"] * readiness["failureThreshold"] < delay  # 503 seen within the delay
    # the grace period covers every preStop, then l4proxy's delay and drain (its forced closes are inside it)
    assert pod["terminationGracePeriodSeconds"] >= waits + delay + drain + 2, (waits, delay, drain)
    budget = docs["PodDisruptionBudget"]["spec"]
    assert budget["selector"] == deployment["spec"]["selector"]


# --- systemd -------------------------------------------------------------------------------------------


def unit_fields(text: str) -> dict[str, dict[str, list[str]]]:
    """Each section's keys and their values (a key may repeat), comments left out."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze checks every field and that the commands exist: ours, from this virtualenv."""
    analyze = require("systemd-analyze")
    unit = tmp_path / "l4proxy.service"
    unit.write_text((DEPLOY / "l4proxy.service").read_text().replace("/usr/local/bin/l4proxy",
                                                                     str(Path(sys.executable).parent / "l4proxy")))
    done = run_ok(analyze, "verify", unit, timeout=60)
    assert "l4proxy.service" not in done.stderr, done.stderr


def test_the_unit_fields() -> None:
    text = (DEPLOY / "l4proxy.service").read_text()
    service = unit_fields(text)["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["all"]  # READY=1 from a worker too
    assert service["ExecStart"] == [f"/usr/local/bin/l4proxy --config {CONFIG_PATH}"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(service["LimitNOFILE"][0]) >= 65536
    assert service["DynamicUser"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"] and service["CapabilityBoundingSet"] == [""]
    assert "AmbientCapabilities" not in service  # only in the commented variant for low ports
    assert re.search(r"^#AmbientCapabilities=CAP_NET_BIND_SERVICE$", text, re.M)
    config = tomllib.loads((DEPLOY / "l4proxy.toml").read_text())
    stop = parse_duration(service["TimeoutStopSec"][0], "TimeoutStopSec")
    assert stop > parse_duration(config["shutdown_delay"], "") + parse_duration(config["drain_timeout"], "")
    assert os.path.basename(service["ExecStartPre"][0].split()[0]) == "l4proxy"  # 'l4proxy check' first
