"""Turning raw samples into medians, ratios, the performance-bar checks, Markdown and charts.

Medians (not means) because the machine is shared: one sample hit by a neighbour's burst should not move
the summary. Ratios are l4proxy / HAProxy, / nginx and / direct of those medians; for latency the
interesting figure is the latency a proxy *adds* over the direct connection, so that is reported too.
Small tables follow the main one: l4proxy with 2 workers against 1 (and HAProxy), bulk through TLS
termination against a plain l4proxy session of the same run, and, with ``run.py --variant``, l4proxy with
features on against HAProxy and against plain l4proxy of the same run (``--baseline``: an older tree's
l4proxy, in the same table). Beside each ratio of medians stands its paired figure: the median of the
ratios taken round by round, with a distribution-free interval (``stats``), the figure a bar of a few
percent can be read against.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import stats

PCTS = ("p50", "p90", "p99", "p99.9")
TARGET_ORDER = ("direct", "l4proxy", "l4proxy-w2", "l4proxy-plain", "haproxy", "nginx", "pproxy")
COLORS = {"direct": "#888888", "l4proxy": "#22aa77", "l4proxy-w2": "#116644", "l4proxy-plain": "#88ddbb",
          "haproxy": "#2277cc", "nginx": "#7744bb", "pproxy": "#cc7722"}
VARIANT_COLOR = "#55bb99"  # every l4proxy+NAME target (run.py --variant)
BASELINE_COLOR = "#99aa33"  # every l4proxy@SHORT target (run.py --baseline)


def color(target: str) -> str:
    return COLORS.get(target) or (BASELINE_COLOR if target.startswith("l4proxy@") else VARIANT_COLOR)


def ordered(names: list[str]) -> list[str]:
    """The run's targets in report order: the known ones first, then the variants as the run named them."""
    return [t for t in TARGET_ORDER if t in names] + [t for t in names if t not in TARGET_ORDER]


def flat(sample: dict[str, Any]) -> dict[str, float]:
    """Numeric fields of a sample, with latency percentiles lifted to the top level."""
    out = {k: float(v) for k, v in sample.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    out |= {k: float(v) for k, v in sample.get("latency_us", {}).items()}
    return out


def medians(samples: list[dict[str, Any]]) -> dict[str, float]:
    rows = [flat(s) for s in samples]
    keys = {k for r in rows for k in r}
    return {k: statistics.median(r[k] for r in rows if k in r) for k in sorted(keys)}


# by scenario kind: the metrics whose spread over the samples a target's entry records
SPREAD_METRICS = {"rr": ("rate", "cpu_us_per_req"), "connect": ("rate", "cpu_us_per_req"),
                  "redis": ("rate", "cpu_us_per_req"), "bulk": ("gbps", "cpu_us_per_gb"),
                  "memory": ("kib_per_session",)}


def spreads(samples: list[dict[str, Any]], kind: str) -> dict[str, float | None]:
    """Coefficient of variation of each headline metric over a target's samples (None below 2 samples)."""
    return {k: stats.cv([flat(s)[k] for s in samples if k in flat(s)]) for k in SPREAD_METRICS[kind]}


# --- which metrics a scenario reports ------------------------------------------------------------------

# (metric key, label, higher is better)
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "rr": [("rate", "req/s", True), ("p50", "p50 us", False), ("p99", "p99 us", False),
           ("p99.9", "p99.9 us", False), ("added_p99", "p99 added over direct, us", False),
           ("cpu_us_per_req", "proxy CPU us/req", False)],
    "connect": [("rate", "conn/s", True), ("p50", "p50 us", False), ("p99", "p99 us", False),
                ("added_p99", "p99 added over direct, us", False), ("cpu_us_per_req", "proxy CPU us/conn", False)],
    "bulk": [("gbps", "Gbit/s", True), ("cpu_us_per_gb", "proxy CPU us/GB", False)],
    "memory": [("kib_per_session", "KiB RSS per idle session pair", False),
               ("rss_before_kib", "RSS before, KiB", False)],
    "redis": [("rate", "req/s (SET+GET)", True), ("p99", "p99 us (worst of SET/GET)", False),
              ("cpu_us_per_req", "proxy CPU us/req", False)],
    # by scenario name, where the kind's labels would mislead
    "rr1": [("rate", "req/s", True), ("p50", "p50 us", False), ("p99", "p99 us", False),
            ("added_p50", "p50 added over direct, us", False), ("added_p99", "p99 added over direct, us", False),
            ("cpu_us_per_req", "proxy CPU us/req", False)],
    "tls-connect": [("rate", "handshakes/s", True), ("p50", "p50 us", False), ("p99", "p99 us", False),
                    ("added_p99", "p99 added over direct, us", False),
                    ("cpu_us_per_req", "proxy CPU us/handshake", False)],
}


def metrics(name: str, scn: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return METRICS.get(name) or METRICS[scn["kind"]]


def value(scn: dict[str, Any], target: str, key: str) -> float | None:
    """Median of one metric; `added_p50`/`added_p99` are the target's percentile minus direct's."""
    t = scn["targets"].get(target)
    if not t or t.get("status") != "ok":
        return None
    if key in ("added_p50", "added_p99"):
        pct = key.removeprefix("added_")
        mine, base = t["median"].get(pct), value(scn, "direct", pct)
        return None if mine is None or base is None else mine - base
    return t["median"].get(key)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; undefined when b is not positive (e.g. a proxy that added no measurable latency)."""
    return a / b if a is not None and b is not None and b > 0 else None


def round_values(scn: dict[str, Any], target: str, key: str) -> list[dict[str, Any]]:
    """A target's samples as ``{"round", key}``; for ``added_p50``/``added_p99`` the target's percentile
    minus direct's in the same round."""
    t = scn["targets"].get(target)
    if not t or t.get("status") != "ok":
        return []
    if key not in ("added_p50", "added_p99"):
        return [{"round": s.get("round", i), key: flat(s)[key]} for i, s in enumerate(t["samples"]) if key in flat(s)]
    pct = key.removeprefix("added_")
    mine, base = (stats.by_round(round_values(scn, t, pct), pct) for t in (target, "direct"))
    return [{"round": r, key: mine[r] - base[r]} for r in sorted(mine) if r in base]


def paired(scn: dict[str, Any], target: str, ref: str, key: str) -> stats.Interval | None:
    """``target`` over ``ref`` round by round: their median and its interval (None below 2 rounds)."""
    return stats.median_interval(stats.paired_ratios(round_values(scn, target, key), round_values(scn, ref, key), key))


def interval_dict(iv: stats.Interval | None) -> dict[str, float] | None:
    return None if iv is None else {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(iv).items()}


# --- the performance bar -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of the performance bar: a measured ratio (or value) against its threshold."""

    what: str
    measured: float | None
    threshold: float
    higher_is_better: bool
    passed: bool | None
    note: str = ""
    paired: dict[str, float] | None = None  # the per-round ratios' median and interval (stats.Interval)


def check(what: str, measured: float | None, threshold: float, higher: bool, note: str = "",
          paired: stats.Interval | None = None) -> Check:
    passed = None if measured is None else (measured >= threshold if higher else measured <= threshold)
    return Check(what, measured, threshold, higher, passed, note, interval_dict(paired))


def bar_checks(doc: dict[str, Any]) -> list[Check]:
    """The issue's targets for l4proxy, computed from the medians of this run (a record, not a test)."""
    s = doc["scenarios"]

    def r(scn: str, key: str) -> float | None:
        return ratio(value(s[scn], "l4proxy", key), value(s[scn], "haproxy", key)) if scn in s else None

    def rc(what: str, scn: str, key: str, threshold: float, higher: bool) -> Check:
        return check(what, r(scn, key), threshold, higher,
                     paired=paired(s[scn], "l4proxy", "haproxy", key) if scn in s else None)

    mem = value(s["memory"], "l4proxy", "kib_per_session") if "memory" in s else None
    sessions = doc["run"]["budgets"]["sessions"]
    return [
        rc("rr 50 conns 64 B: req/s vs HAProxy", "rr", "rate", 1.0, True),
        rc("rr 50 conns 64 B: CPU us/req vs HAProxy", "rr", "cpu_us_per_req", 1.1, False),
        rc("bulk 1 conn: Gbit/s vs HAProxy", "bulk", "gbps", 1.0, True),
        rc("connect: conn/s vs HAProxy", "connect", "rate", 0.8, True),
        rc("rr: p99 added over direct vs HAProxy's", "rr", "added_p99", 1.2, False),
        rc("rr 1 conn: p50 added over direct vs HAProxy's", "rr1", "added_p50", 1.0, False),
        rc("rr 1 conn: p99 added over direct vs HAProxy's", "rr1", "added_p99", 1.0, False),
        check("memory: KiB per idle session pair", mem, 16.0, False,
              f"at {sessions} sessions" + ("" if sessions >= 10_000 else " (the bar is at 10,000)")),
    ]


# --- Markdown ------------------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def status_cell(scn: dict[str, Any], target: str) -> str | None:
    t = scn["targets"].get(target)
    if t is None:
        return None
    return None if t.get("status") == "ok" else t.get("status", "-")


def scenario_rows(name: str, scn: dict[str, Any], targets: list[str]) -> list[str]:
    rows = []
    for key, label, _ in metrics(name, scn):
        cells = [status_cell(scn, t) or fmt(value(scn, t, key)) for t in targets]
        l4 = value(scn, "l4proxy", key)
        ratios = [fmt(ratio(l4, value(scn, t, key))) for t in ("haproxy", "nginx", "direct")]
        rows.append(f"| {name} | {label} | " + " | ".join(cells + ratios) + " |")
    return rows


def markdown(doc: dict[str, Any]) -> str:
    m, run = doc["machine"], doc["run"]
    targets = ordered(run["targets"])
    head = (f"| scenario | metric | {' | '.join(targets)} | l4proxy / haproxy | l4proxy / nginx | l4proxy / direct |\n"
            f"|---|---|{'---|' * len(targets)}---|---|---|")
    body = [row for name, scn in doc["scenarios"].items() for row in scenario_rows(name, scn, targets)]
    lines = [
        f"## Results ({run['profile']} run, {run['started']}, {run['seconds']} s)",
        "",
        f"Machine: {m['cpu_model']}, {m['nproc']} cores, Linux {m['kernel']}; Python {m['python']}, "
        f"uvloop {m['uvloop']}, l4proxy {m['l4proxy']} (git {str(m['git']['commit'])[:12]}"
        f"{', dirty tree' if m['git']['dirty'] else ''}), {m['haproxy'] or 'no haproxy'}, "
        f"{m.get('nginx') or 'no nginx'}, "
        f"pproxy {m['pproxy'] or '-'}; load average at start {m.get('loadavg_at_start')}.",
        f"Medians of {run['repeats']} interleaved samples per target; load generator processes: {run['procs']}"
        + (f"; proxy pinned to CPU {run['pin']['proxy']}, everything else to {run['pin']['others']}."
           if run.get("pin") else "."),
        "",
        head, *body, "",
        *workers_table(doc), *tls_table(doc), *variants_table(doc),
        "### Performance bar (l4proxy)", "",
        "`measured` is the ratio of medians the result reads; `paired` the median of the ratios to HAProxy "
        "taken round by round [interval] and the interval's coverage.", "",
        "| check | measured | threshold | result | paired |", "|---|---|---|---|---|",
        *[bar_row(c) for c in doc["bar"]], "",
        *spread_table(doc),
        *notes(doc),
    ]
    return "\n".join(lines) + "\n"


def workers_table(doc: dict[str, Any]) -> list[str]:
    """l4proxy --workers 2 against 1 worker and HAProxy, with the per-worker session split."""
    rows = []
    for name, scn in doc["scenarios"].items():
        if "l4proxy-w2" not in scn["targets"]:
            continue
        for key, label, _ in metrics(name, scn):
            if key not in ("rate", "p99", "cpu_us_per_req"):
                continue
            w1, w2, ha = (value(scn, t, key) for t in ("l4proxy", "l4proxy-w2", "haproxy"))
            cells = [status_cell(scn, t) or fmt(v) for t, v in
                     (("l4proxy", w1), ("l4proxy-w2", w2), ("haproxy", ha))]
            cells += [fmt(ratio(w2, w1)), fmt(ratio(w2, ha))]
            rows.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        split = scn["targets"]["l4proxy-w2"].get("worker_sessions") or {}
        if split:
            txt = " / ".join(f"w{k}: {v:,}" for k, v in split.items())
            rows.append(f"| {name} | sessions per worker (access log) | - | {txt} | - | - | - |")
    if not rows:
        return []
    return ["### Workers (l4proxy --workers 2 vs 1)", "",
            "| scenario | metric | l4proxy | l4proxy-w2 | haproxy | w2 / w1 | w2 / haproxy |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def tls_table(doc: dict[str, Any]) -> list[str]:
    """bulk-tls: Gbit/s through TLS termination against a plain l4proxy session sampled in the same run."""
    scn = doc["scenarios"].get("bulk-tls")
    if not scn:
        return []
    plain = value(scn, "l4proxy-plain", "gbps")
    what = {"l4proxy-plain": "plain TCP through l4proxy", "l4proxy": "TLS terminated by l4proxy",
            "haproxy": "TLS terminated by HAProxy", "nginx": "TLS terminated by nginx",
            "direct": "TLS straight to the upstream"}
    rows = [f"| {t} | {what[t]} | {status_cell(scn, t) or fmt(value(scn, t, 'gbps'))} | "
            f"{fmt(value(scn, t, 'cpu_us_per_gb'))} | {fmt(ratio(value(scn, t, 'gbps'), plain))} |"
            for t in what if t in scn["targets"]]
    return ["### TLS termination vs plain (bulk-tls, one connection, same run)", "",
            "| target | session | Gbit/s | proxy CPU us/GB | Gbit/s / l4proxy plain |", "|---|---|---|---|---|",
            *rows, ""]


# by scenario kind: the headline figure and the proxy's CPU for it
VARIANT_METRICS = {"rr": ("rate", "cpu_us_per_req"), "connect": ("rate", "cpu_us_per_req"),
                   "redis": ("rate", "cpu_us_per_req"), "bulk": ("gbps", "cpu_us_per_gb"),
                   "memory": ("kib_per_session",)}


def variant_ratios(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant, scenario and metric: the median, its ratio to HAProxy, and that ratio divided by
    plain l4proxy's, which is the figure the feature bars name (within 3% or 5% of plain). Only the
    scenarios a variant (or an older tree, ``--baseline``) took part in, not plain l4proxy alone."""
    rows = []
    variants = doc["run"].get("variants", {})
    for target, info in variants.items():
        for name, scn in doc["scenarios"].items():
            if target not in scn["targets"] or not any(t in scn["targets"] for t in variants if t != "l4proxy"):
                continue
            for key in VARIANT_METRICS[scn["kind"]]:
                mine = value(scn, target, key)
                to_haproxy = ratio(mine, value(scn, "haproxy", key))
                plain = ratio(value(scn, "l4proxy", key), value(scn, "haproxy", key))
                rows.append({"scenario": name, "variant": info["variant"], "target": target, "metric": key,
                             "median": mine, "to_haproxy": to_haproxy, "to_plain": ratio(to_haproxy, plain),
                             "status": scn["targets"][target].get("status"),
                             "paired_to_haproxy": interval_dict(paired(scn, target, "haproxy", key)),
                             "paired_to_plain": interval_dict(paired(scn, target, "l4proxy", key))})
    return rows


def variants_table(doc: dict[str, Any]) -> list[str]:
    """``variant_ratios`` as Markdown, with each variant's flags."""
    rows = doc.get("variant_ratios") or []
    if not rows:
        return []
    labels = {key: label for m in METRICS.values() for key, label, _ in m}
    scns = doc["scenarios"]
    lines = []
    for r in rows:
        label = dict((k, lb) for k, lb, _ in metrics(r["scenario"], scns[r["scenario"]])).get(r["metric"])
        cell = status_cell(scns[r["scenario"]], r["target"]) or fmt(r["median"])
        lines.append(f"| {r['scenario']} | {label or labels[r['metric']]} | {r['variant']} | {cell} | "
                     f"{fmt(r['to_haproxy'])} | {fmt(r['to_plain'])} | {fmt_interval(r.get('paired_to_haproxy'))} | "
                     f"{fmt_interval(r.get('paired_to_plain'))} |")
    flags = [f"- `{info['variant']}`{'' if t == info['variant'] else f' ({t})'}: `{info['flags']}`: {info['about']}"
             for t, info in doc["run"]["variants"].items()]
    return ["### Variants (l4proxy with features on, or an older tree, same run)", "",
            "`/ plain` is the variant's ratio to HAProxy divided by plain l4proxy's: for rates above 1 is "
            "better, for CPU and memory below 1. The paired columns take the ratio in each round (to HAProxy's, "
            "or plain l4proxy's, sample of the same round; per round, the ratio of the two ratios to HAProxy is "
            "this one) and give their median [interval] and the interval's coverage (distribution-free; "
            "95% needs 6 rounds or more).", "",
            "| scenario | metric | variant | value | / haproxy | / plain | / haproxy, paired | / plain, paired |",
            "|---|---|---|---|---|---|---|---|",
            *lines, "", *flags, ""]


def fmt_interval(iv: dict[str, float] | None) -> str:
    """``median [low, high] coverage%`` of a paired ratio, three decimals (a bar of 3% needs them)."""
    if not iv:
        return "-"
    return f"{iv['median']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] {iv['coverage']:.0%}"


def bar_row(c: dict[str, Any]) -> str:
    result = {True: "pass", False: "miss", None: "not measured"}[c["passed"]]
    op = ">=" if c["higher_is_better"] else "<="
    note = f" ({c['note']})" if c["note"] else ""
    return (f"| {c['what']}{note} | {fmt(c['measured'])} | {op} {c['threshold']} | {result} | "
            f"{fmt_interval(c.get('paired'))} |")


def spread_table(doc: dict[str, Any]) -> list[str]:
    """Coefficient of variation of each target's samples: how far one sample can be trusted."""
    rows = []
    for name, scn in doc["scenarios"].items():
        for t in ordered(list(scn["targets"])):
            cvs = scn["targets"][t].get("spread") or {}
            if any(v is not None for v in cvs.values()):
                cells = ", ".join(f"{k} {'-' if v is None else f'{v:.1%}'}" for k, v in cvs.items())
                rows.append(f"| {name} | {t} | {len(scn['targets'][t]['samples'])} | {cells} |")
    if not rows:
        return []
    return ["### Spread (coefficient of variation over each target's samples)", "",
            "| scenario | target | samples | CV |", "|---|---|---|---|", *rows, ""]


def notes(doc: dict[str, Any]) -> list[str]:
    """Why a target has no numbers in a scenario (unsupported, skipped, failed)."""
    out = []
    for name, scn in doc["scenarios"].items():
        for t, r in scn["targets"].items():
            if r.get("status") != "ok":
                out.append(f"- {name} / {t}: {r.get('status')}: {str(r.get('reason', ''))[:200]}")
            for err in r.get("errors", [])[:1]:
                out.append(f"- {name} / {t}: a sample failed: {err[:200]}")
            scrapes = r.get("scrapes")
            if scrapes and scrapes["failed"]:
                out.append(f"- {name} / {t}: {scrapes['failed']} of {scrapes['ok'] + scrapes['failed']} scrapes of "
                           f"{scrapes['url']} failed, the last: {scrapes['last_error'][:200]}")
    return (["### Notes", "", *out, ""]) if out else []


# --- charts --------------------------------------------------------------------------------------------


def charts(doc: dict[str, Any], out: Path) -> list[str]:
    """Throughput bars (median, min-max whiskers) and latency percentile lines per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["charts skipped: matplotlib not importable (pip install matplotlib)"]
    targets = ordered(doc["run"]["targets"])
    scns = {n: s for n, s in doc["scenarios"].items() if s["kind"] != "memory"}
    written = []
    if scns:
        fig, axes = plt.subplots(1, len(scns), figsize=(3.2 * len(scns), 3.6), squeeze=False)
        for ax, (name, scn) in zip(axes[0], scns.items(), strict=True):
            throughput_axis(ax, name, scn, targets)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=90)
        plt.close(fig)
        written.append("throughput.png")
    lat = {n: s for n, s in scns.items() if s["kind"] in ("rr", "connect")}
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(3.4 * len(lat), 3.6), squeeze=False)
        for ax, (name, scn) in zip(axes[0], lat.items(), strict=True):
            latency_axis(ax, name, scn, targets)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=90)
        plt.close(fig)
        written.append("latency.png")
    return written


def throughput_axis(ax: Any, name: str, scn: dict[str, Any], targets: list[str]) -> None:
    key = "gbps" if scn["kind"] == "bulk" else "rate"
    targets = [t for t in ordered(list(scn["targets"])) if t in targets or t == "l4proxy-plain"]
    meds, lo, hi = [], [], []
    for t in targets:
        vals = [flat(s).get(key, 0.0) for s in scn["targets"].get(t, {}).get("samples", [])] or [0.0]
        med = statistics.median(vals)
        meds.append(med)
        lo.append(med - min(vals))
        hi.append(max(vals) - med)
    ax.bar(targets, meds, yerr=[lo, hi], capsize=3, color=[color(t) for t in targets])
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("Gbit/s" if key == "gbps" else "per second", fontsize=8)
    ax.tick_params(labelsize=7)


def latency_axis(ax: Any, name: str, scn: dict[str, Any], targets: list[str]) -> None:
    for t in [t for t in targets if t in scn["targets"]]:
        med = scn["targets"].get(t, {}).get("median", {})
        ys = [med.get(p) for p in PCTS]
        if all(y is not None for y in ys):
            ax.plot(PCTS, ys, marker="o", label=t, color=color(t))
    ax.set_yscale("log")
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("latency, us", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def write_all(doc: dict[str, Any], out: Path, charts_on: bool = True) -> str:
    """Write results.json, results.md and the charts; return the Markdown (the runner prints it)."""
    out.mkdir(parents=True, exist_ok=True)
    chart_notes = charts(doc, out) if charts_on else ["charts skipped: --no-charts"]
    doc["charts"] = chart_notes
    (out / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    md = markdown(doc)
    md += "".join(f"\n![{c}]({c})\n" if c.endswith(".png") else f"\n{c}\n" for c in chart_notes)
    (out / "results.md").write_text(md)
    return md
