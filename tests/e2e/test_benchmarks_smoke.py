"""The benchmark runner still works end to end: ``benchmarks/run.py --smoke`` against direct, l4proxy and
l4proxy with two workers.

Checks the shape and sanity of the JSON it writes (positive rates, ordered percentiles, byte counts that
match), never speed: the numbers of a shared machine are not a test. A second smoke run takes HAProxy and
nginx through plain and TLS scenarios, so the configurations the runner writes for them keep working
(CI installs both; a missing one fails, it never skips).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..servers import require

ROOT = Path(__file__).resolve().parents[2]
PCTS = ("p50", "p90", "p99", "p99.9")


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    done = smoke(out)
    assert "| scenario | metric |" in done.stdout
    assert (out / "results.md").read_text().startswith("## Results")
    return out


def smoke(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--no-charts", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def results(bench_out: Path) -> dict[str, Any]:
    return json.loads((bench_out / "results.json").read_text())


@pytest.fixture(scope="module")
def results_md(bench_out: Path) -> str:
    return (bench_out / "results.md").read_text()


def samples(results: dict[str, Any], scenario: str, target: str) -> list[dict[str, Any]]:
    entry = results["scenarios"][scenario]["targets"][target]
    assert entry["status"] == "ok", entry
    assert len(entry["samples"]) == results["run"]["repeats"] == 1
    return entry["samples"]


def test_machine_and_run_are_recorded(results: dict[str, Any]) -> None:
    m = results["machine"]
    assert m["nproc"] >= 1 and m["python"] and m["uvloop"] and m["kernel"]
    assert results["run"]["targets"] == ["direct", "l4proxy", "l4proxy-w2"]
    assert {"rr", "bulk", "connect", "memory", "tls-term-rr", "tls-connect", "bulk-tls"} <= set(results["scenarios"])


@pytest.mark.parametrize("scenario", ["rr", "connect"])
@pytest.mark.parametrize("target", ["direct", "l4proxy", "l4proxy-w2"])
def test_request_scenarios_have_positive_rates_and_ordered_percentiles(
    results: dict[str, Any], scenario: str, target: str
) -> None:
    for s in samples(results, scenario, target):
        assert s["rate"] > 0 and s["requests"] > 0 and s["errors"] == 0
        lat = [s["latency_us"][p] for p in PCTS]
        assert lat[0] > 0 and lat == sorted(lat) and lat[-1] <= s["latency_us"]["max"]
        if target != "direct":
            assert s["cpu_s"] >= 0 and s["cpu_us_per_req"] >= 0
        else:
            assert s["cpu_s"] is None


def test_workers_target_runs_where_it_applies_and_both_workers_take_sessions(results: dict[str, Any]) -> None:
    for name, scn in results["scenarios"].items():
        assert ("l4proxy-w2" in scn["targets"]) == (name in ("rr", "connect", "tls-connect")), name
    (s,) = samples(results, "connect", "l4proxy-w2")
    split = results["scenarios"]["connect"]["targets"]["l4proxy-w2"]["worker_sessions"]
    assert set(split) == {"0", "1"} and all(n > 0 for n in split.values())
    assert sum(split.values()) >= s["requests"]


def test_tls_connect_does_a_full_handshake_per_request(results: dict[str, Any]) -> None:
    tls = results["scenarios"]["tls-connect"]["targets"]
    assert tls["direct"]["status"] == "ok"
    for target in ("direct", "l4proxy"):
        if tls[target]["status"] == "unsupported":
            assert tls[target]["reason"]
            continue
        for s in samples(results, "tls-connect", target):
            assert s["tls"] and s["rate"] > 0 and s["requests"] > 0 and s["errors"] == 0
            assert s["tls_resumed"] == 0


def test_bulk_tls_has_a_plain_l4proxy_twin_in_the_same_scenario(results: dict[str, Any]) -> None:
    scn = results["scenarios"]["bulk-tls"]["targets"]
    assert list(scn) == ["direct", "l4proxy", "l4proxy-plain"]
    for target in ("direct", "l4proxy", "l4proxy-plain"):
        if scn[target]["status"] == "unsupported":
            assert target == "l4proxy" and scn[target]["reason"]
            continue
        for s in samples(results, "bulk-tls", target):
            assert s["complete"] and s["gbps"] > 0 and s["bytes_down"] == s["expected_down"] > 0
            assert s["tls"] == (target != "l4proxy-plain")


@pytest.mark.parametrize("target", ["direct", "l4proxy"])
def test_bulk_moves_every_byte(results: dict[str, Any], target: str) -> None:
    for s in samples(results, "bulk", target):
        assert s["complete"] and s["gbps"] > 0
        assert s["bytes_down"] == s["expected_down"] > 0
        assert s["bytes_up"] == s["expected_up"] == 0


def test_memory_measures_the_proxy_only(results: dict[str, Any]) -> None:
    mem = results["scenarios"]["memory"]["targets"]
    assert mem["direct"]["status"] == "skipped"
    (s,) = samples(results, "memory", "l4proxy")
    assert s["sessions"] == results["run"]["budgets"]["sessions"] and s["errors"] == 0
    assert s["rss_with_kib"] >= s["rss_before_kib"] > 0


def test_tls_scenario_is_measured_or_marked_unsupported(results: dict[str, Any]) -> None:
    tls = results["scenarios"]["tls-term-rr"]["targets"]
    assert tls["direct"]["status"] == "ok"
    assert tls["l4proxy"]["status"] in ("ok", "unsupported")
    if tls["l4proxy"]["status"] == "unsupported":
        assert tls["l4proxy"]["reason"]


def test_bar_and_medians_are_present(results: dict[str, Any]) -> None:
    assert len(results["bar"]) == 8
    assert results["scenarios"]["rr"]["targets"]["l4proxy"]["median"]["rate"] > 0


def test_markdown_has_the_workers_and_tls_tables(results_md: str) -> None:
    assert "### Workers (l4proxy --workers 2 vs 1)" in results_md
    assert "| connect | sessions per worker (access log) |" in results_md
    assert "### TLS termination vs plain" in results_md
    assert "| tls-connect | handshakes/s |" in results_md


OTHER_PROXIES = ("haproxy", "nginx")
OTHER_SCENARIOS = ("rr", "connect", "tls-term-rr", "tls-orig-rr")


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The smoke run with the other proxies users choose between, in plain and both TLS directions."""
    for command in OTHER_PROXIES:
        require(command)
    out = tmp_path_factory.mktemp("bench-others")
    smoke(out, "--targets", ",".join(("direct", *OTHER_PROXIES)), "--scenarios", ",".join(OTHER_SCENARIOS))
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


@pytest.mark.parametrize("scenario", OTHER_SCENARIOS)
@pytest.mark.parametrize("target", OTHER_PROXIES)
def test_haproxy_and_nginx_carry_plain_and_tls_load(
    others: tuple[dict[str, Any], str], scenario: str, target: str
) -> None:
    results, _ = others
    (s,) = samples(results, scenario, target)
    assert s["rate"] > 0 and s["requests"] > 0 and s["errors"] == 0
    assert s["cpu_s"] >= 0
    assert s.get("tls", False) == scenario.startswith("tls-term")  # the client speaks TLS only to a terminator


def test_the_report_names_nginx_and_compares_with_it(others: tuple[dict[str, Any], str]) -> None:
    results, md = others
    assert results["machine"]["nginx"].startswith("nginx version: nginx/")
    assert "| l4proxy / haproxy | l4proxy / nginx | l4proxy / direct |" in md
    assert "| direct | haproxy | nginx |" in md
