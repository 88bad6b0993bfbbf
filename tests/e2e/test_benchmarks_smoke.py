"""The benchmark runner still works end to end: ``benchmarks/run.py --smoke`` against direct, l4proxy and
l4proxy with two workers.

Checks the shape and sanity of the JSON it writes (positive rates, ordered percentiles, byte counts that
match), never speed: the numbers of a shared machine are not a test. A second smoke run takes HAProxy and
nginx through plain and TLS scenarios, so the configurations the runner writes for them keep working
(CI installs both; a missing one fails, it never skips). A third takes the feature variants
(``--variant weights,edge,admin``) through rr and connect beside plain l4proxy and HAProxy, and a fourth
takes older trees (``--baseline``) from temporary git worktrees beside them.
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


VARIANT_RUN = ("weights", "edge", "admin")


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The smoke run of the feature variants: rr and connect, plain l4proxy and HAProxy beside them."""
    require("haproxy")
    out = tmp_path_factory.mktemp("bench-variants")
    smoke(out, "--variant", ",".join(VARIANT_RUN))
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_variants_run_beside_plain_l4proxy_and_haproxy_in_rr_and_connect(
    variants: tuple[dict[str, Any], str],
) -> None:
    results, _ = variants
    assert results["run"]["scenarios"] == ["rr", "connect"]
    assert results["run"]["targets"] == ["haproxy", "l4proxy", "l4proxy+weights", "l4proxy+edge", "l4proxy+admin"]
    assert results["run"]["variants"]["l4proxy+edge"]["flags"] == "--upstream '{a}' --send-proxy v2 --allow 127.0.0.0/8"
    assert results["run"]["variants"]["l4proxy"]["variant"] == "plain"


@pytest.mark.parametrize("scenario", ["rr", "connect"])
@pytest.mark.parametrize("target", ["l4proxy+edge", "l4proxy+admin", "l4proxy+weights"])
def test_each_variant_carries_the_load_or_says_why_not(
    variants: tuple[dict[str, Any], str], scenario: str, target: str
) -> None:
    results, _ = variants
    entry = results["scenarios"][scenario]["targets"][target]
    if target == "l4proxy+weights" and entry["status"] == "unsupported":  # until member options exist
        assert "--upstream" in entry["reason"] and "weight=3" in entry["reason"]
        return
    (s,) = samples(results, scenario, target)
    assert s["rate"] > 0 and s["requests"] > 0 and s["errors"] == 0 and s["cpu_s"] >= 0


def test_the_admin_variant_is_scraped_without_failures(variants: tuple[dict[str, Any], str]) -> None:
    results, _ = variants
    for scenario in ("rr", "connect"):
        scrapes = results["scenarios"][scenario]["targets"]["l4proxy+admin"]["scrapes"]
        assert scrapes["url"].endswith("/metrics") and scrapes["ok"] >= 1 and scrapes["failed"] == 0, scrapes


def test_variant_ratios_are_to_haproxy_and_to_plain(variants: tuple[dict[str, Any], str]) -> None:
    results, md = variants
    rows = {(r["scenario"], r["variant"], r["metric"]): r for r in results["variant_ratios"]}
    assert set(rows) == {(s, v, m) for s in ("rr", "connect") for v in ("plain", *VARIANT_RUN)
                         for m in ("rate", "cpu_us_per_req")}
    plain = rows["rr", "plain", "rate"]
    assert plain["to_plain"] == 1.0 and plain["to_haproxy"] > 0
    edge = rows["rr", "edge", "rate"]
    assert edge["to_plain"] == pytest.approx(edge["to_haproxy"] / plain["to_haproxy"])
    assert "### Variants (l4proxy with features on, or an older tree, same run)" in md
    assert "| rr | req/s | edge |" in md and "- `admin` (l4proxy+admin): `--upstream '{a}' --admin '{admin}'`" in md


def test_an_unknown_variant_is_a_one_line_error() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--variant", "edge,colour", "--plan"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "run.py: error: --variant 'colour': unknown; expected some of plain,weights,edge,admin"
    )


KEYS = (
    "repeats,rr_requests,rr_seconds,bulk_bytes,bulk_seconds,connect_requests,connect_seconds,sessions,"
    "redis_requests,tls_connect_requests"
)
BAD_BUDGETS = [
    ("foo=1", f"--budget 'foo=1': expected KEY=NUMBER with KEY one of {KEYS}"),
    ("rr_seconds", f"--budget 'rr_seconds': expected KEY=NUMBER with KEY one of {KEYS}"),
    ("rr_seconds=x", "--budget 'rr_seconds=x': expected a positive number for rr_seconds"),
    ("connect_requests=0", "--budget 'connect_requests=0': expected a positive whole number for connect_requests"),
]


@pytest.mark.parametrize(("given", "error"), BAD_BUDGETS)
def test_a_bad_budget_is_a_one_line_error(given: str, error: str) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--budget", given, "--plan"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"run.py: error: {error}"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, dict[str, str]]:
    """The smoke run with two older trees beside plain l4proxy and HAProxy: the commit before this one,
    and the last one before TLS, whose command line has no --tls-cert."""
    require("haproxy")
    out = tmp_path_factory.mktemp("bench-baseline")
    first_tls = git("log", "--reverse", "--format=%H", "-S", '"--tls-cert"', "--", "l4proxy/cli.py").split()[0]
    refs = {"previous": "HEAD~1", "pre-tls": f"{first_tls}~1"}
    smoke(out, "--baseline", ",".join(refs.values()), "--scenarios", "rr,tls-term-rr", "--targets", "l4proxy,haproxy")
    names = {what: "l4proxy@" + git("rev-parse", "--short", ref) for what, ref in refs.items()}
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), names


def test_a_baseline_runs_from_its_own_tree_beside_plain_l4proxy(
    baselines: tuple[dict[str, Any], str, dict[str, str]],
) -> None:
    results, md, names = baselines
    target = names["previous"]
    assert results["run"]["targets"] == ["l4proxy", "haproxy", target, names["pre-tls"]]
    old = results["run"]["baselines"][target]
    assert old["ref"] == "HEAD~1" and old["commit"] == git("rev-parse", "HEAD~1")
    tree = Path(old["tree"])
    assert old["imports"] == str(tree / "l4proxy" / "__init__.py") and tree != ROOT
    for scenario in ("rr", "tls-term-rr"):
        entry = results["scenarios"][scenario]["targets"][target]
        assert entry["source"] == old["imports"]  # what the running process printed it imported
        (s,) = samples(results, scenario, target)
        assert s["rate"] > 0 and s["requests"] > 0 and s["errors"] == 0 and s["cpu_s"] >= 0
    assert not tree.exists() and str(tree) not in git("worktree", "list", "--porcelain")
    rows = {(r["scenario"], r["target"], r["metric"]): r for r in results["variant_ratios"]}
    mine, plain = rows["rr", target, "rate"], rows["rr", "l4proxy", "rate"]
    assert mine["to_plain"] == pytest.approx(mine["to_haproxy"] / plain["to_haproxy"])
    assert f"| rr | req/s | {target} | " in md and f"| l4proxy | haproxy | {target} | {names['pre-tls']} |" in md


def test_a_baseline_without_a_flag_the_scenario_needs_is_unsupported_there(
    baselines: tuple[dict[str, Any], str, dict[str, str]],
) -> None:
    results, _, names = baselines
    target = names["pre-tls"]
    assert samples(results, "rr", target)[0]["rate"] > 0
    entry = results["scenarios"]["tls-term-rr"]["targets"][target]
    assert entry["status"] == "unsupported"
    pre_tls = results["run"]["baselines"][target]["ref"]
    assert entry["reason"] == f"{target} ({pre_tls}) has no --tls-cert, which the l4proxy target passes here"


def test_an_unknown_baseline_is_a_one_line_error() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--baseline", "HEAD,no-such-ref", "--plan"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"run.py: error: --baseline 'no-such-ref': not a commit of the repository at {ROOT}"
    )
