"""The config file as tables: where each path is defined, every problem form with its line, the
effective configuration read back, the schema against the flags and README, and fuzzing (any bytes or
any TOML document give Problems, never a traceback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy import Address, configfile
from l4proxy.cli import FILE_FORMS, OPTIONS
from l4proxy.config import MemberConfig, Service, parse_duration, parse_escapes
from l4proxy.configfile import SCHEMA, ConfigFileError, dump, locate
from l4proxy.outlier import OutlierPolicy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "l4proxy.toml"


def load(text: str | bytes, base: str = "/cfg") -> Any:
    source = text if isinstance(text, bytes) else text.encode()
    return configfile.load(source, FILE_FORMS, base, lambda path: not path.endswith("missing.pem"))


def problems(text: str | bytes) -> list[str]:
    with pytest.raises(ConfigFileError) as caught:
        load(text)
    caught.value.filename = "f.toml"
    return caught.value.lines()


# --- the locator -----------------------------------------------------------------------------------

LOCATED = [
    ("a = 1\nb = 'x'\n", {"a": 1, "b": 2}),
    ("\n\n# c = 1\n[t] # [u]\nk = 1 # k2 = 2\n", {"t": 4, "t.k": 5}),
    ("[a.b.c]\nx = 1\n[a]\ny = 2\n", {"a": 3, "a.b": 1, "a.b.c": 1, "a.b.c.x": 2, "a.y": 4}),  # own header wins
    ("p.q = 1\np.r = 2\n", {"p": 1, "p.q": 1, "p.r": 2}),
    ('[t]\n"quoted.key" = 1\n\'lit\' = 2\n', {"t": 1, "t.quoted.key": 2, "t.lit": 3}),
    ("m = [\n  'a',\n  # note\n  'b', 'c'\n]\n", {"m": 1, "m[0]": 2, "m[1]": 4, "m[2]": 4}),
    ("i = {x = 1, y = {z = [1, 2]}}\n", {"i": 1, "i.x": 1, "i.y": 1, "i.y.z": 1, "i.y.z[0]": 1, "i.y.z[1]": 1}),
    ("m = [{a = 1},\n     {a = 2}]\n", {"m": 1, "m[0]": 1, "m[0].a": 1, "m[1]": 2, "m[1].a": 2}),
    ('s = """one\n"two"\n""""\nt = 1\n', {"s": 1, "t": 4}),  # a multi-line string, closed by four quotes
    ("s = '''a\n'b'\n'''\nt = 1\n", {"s": 1, "t": 4}),
    ('s = "a \\" # not a comment [x]"\nt = 1\n', {"s": 1, "t": 2}),
    ("[[l]]\nk = 1\n[[l]]\nk = 2\n[l.sub]\nz = 3\n", {"l": 1, "l[0]": 1, "l[0].k": 2, "l[1]": 3, "l[1].k": 4,
                                                      "l[1].sub": 5, "l[1].sub.z": 6}),
    ("[[a]]\n[[a.b]]\n[[a]]\n[[a.b]]\n[[a.b]]\n", {"a": 1, "a[0]": 1, "a[0].b": 2, "a[0].b[0]": 2, "a[1]": 3,
                                                  "a[1].b": 4, "a[1].b[0]": 4, "a[1].b[1]": 5}),
    ("d = 1979-05-27 07:32:00Z\nn = -inf\n", {"d": 1, "n": 2}),
    ("a = 1\r\nb = 2\r\n", {"a": 1, "b": 2}),
    ("[ spaced . table ]\nk = 1\n", {"spaced": 1, "spaced.table": 1, "spaced.table.k": 2}),
]  # fmt: skip


@pytest.mark.parametrize(("text", "lines"), LOCATED)
def test_locate_maps_each_path_to_its_line(text: str, lines: dict[str, int]) -> None:
    assert locate(text) == lines


# --- every problem form ----------------------------------------------------------------------------

BASE = '[listeners.a]\naddress = "127.0.0.1:7000"\npool = "p"\n\n[pools.p]\nmembers = ["127.0.0.1:7001"]\n'

PROBLEMS = [
    # (file text, every line the check prints)
    ('log_level = "info\n', ["f.toml:1: syntax: Illegal character '\\n' at column 18"]),
    ("[listeners.a]\n[pools.p]\n[listeners.a]\n",
     ["f.toml:3: syntax: Cannot declare ('listeners', 'a') twice at column 13"]),
    ("a = 1\na = 2\n", ["f.toml:2: syntax: Cannot overwrite a value at column 6"]),
    ("a = [1,\n", ["f.toml:2: syntax: Invalid value"]),  # tomllib: 'at end of document', the last line
    (b"# caf\xe9\n", ["f.toml:1: syntax: not UTF-8 text (byte 0xe9)"]),
    ("", ["f.toml:1: listeners: at least one listener is required"]),
    ('log_levle = "debug"\n' + BASE, ["f.toml:1: log_levle: no such setting; did you mean 'log_level'?"]),
    (BASE + "zzz = 1\nconect_timeout = 1\n", ["f.toml:7: pools.p.zzz: no such setting",
                                              "f.toml:8: pools.p.conect_timeout: no such setting; did you mean"
                                              " 'connect_timeout'?"]),
    (BASE + "[pool.q]\n", ["f.toml:7: pool: no such setting; did you mean 'pools'?"]),
    ('workers = "many"\nlog_level = 3\n' + BASE + "retries = 1.5\nhealth.enabled = 1\n", [
        "f.toml:1: workers: expected a number of processes from 1 to 256, or 'auto' (got 'many')",
        "f.toml:2: log_level: expected text (got 3)",
        "f.toml:9: pools.p.retries: expected a whole number (got 1.5)",
        "f.toml:10: pools.p.health.enabled: expected true or false (got 1)"]),
    (BASE.replace('"p"\n', '"q"\n'), ["f.toml:3: listeners.a.pool: no such pool; known: p (got 'q')"]),
    (BASE.replace('"p"\n', '"pp"\n'), ["f.toml:3: listeners.a.pool: no such pool; did you mean 'p'? (got 'pp')"]),
    (BASE.replace('pool = "p"\n', ""), ["f.toml:1: listeners.a.pool: no such pool; known: p (got 'default')"]),
    ('[pools.p]\nmembers = ["a:1"]\n', ["f.toml:1: listeners: at least one listener is required"]),
    (BASE.replace('address = "127.0.0.1:7000"\n', ""), ["f.toml:1: listeners.a.address: is required"]),
    (BASE + '[listeners.b]\naddress = "127.0.0.1:7000"\npool = "p"\n[listeners.c]\naddress = ":7000"\npool = "p"\n', [
        "f.toml:8: listeners.b.address: overlaps listeners.a.address '127.0.0.1:7000' (got '127.0.0.1:7000')",
        "f.toml:11: listeners.c.address: overlaps listeners.a.address '127.0.0.1:7000' (got ':7000')"]),
    (BASE.replace('address = "127.0.0.1:7000"', 'address = ":0"'), [
        "f.toml:2: listeners.a.address: port must be 1..65535 (got ':0')"]),
    (BASE.replace('["127.0.0.1:7001"]', '[\n  "127.0.0.1:7001",\n  "127.0.0.1:7002",\n  "127.0.0.1:7001",\n'
                  '  "a b",\n  "redis-a",\n  7,\n]'), [
        "f.toml:9: pools.p.members[2]: listed twice (also members[0]) (got '127.0.0.1:7001')",
        "f.toml:10: pools.p.members[3]: an address has no spaces in it (got 'a b')",
        "f.toml:11: pools.p.members[4]: a port is required, as HOST:PORT or :PORT (got 'redis-a')",
        "f.toml:12: pools.p.members[5]: expected \"HOST:PORT\" text or a table with an address (got 7)"]),
    (BASE.replace('["127.0.0.1:7001"]', "[]"), ["f.toml:6: pools.p.members: at least one upstream is required"]),
    (BASE.replace('["127.0.0.1:7001"]', '[\n  {address = "127.0.0.1:7001", weight = 0},\n  {weight = 2},\n'
                  '  {address = "127.0.0.1:7003", colour = "red"},\n  {address = "127.0.0.1:7004", backup = 1},\n'
                  '  {address = "127.0.0.1:7005", max_conns = "x"},\n'
                  '  {address = "127.0.0.1:7006"},\n  "127.0.0.1:7006",\n]'), [
        "f.toml:7: pools.p.members[0].weight: must be a whole number 1..256 (got 0)",
        "f.toml:8: pools.p.members[1].address: required: \"HOST:PORT\" or \"srv:NAME\"",
        "f.toml:9: pools.p.members[2].colour: no such member setting",
        "f.toml:10: pools.p.members[3].backup: expected true or false (got 1)",
        "f.toml:11: pools.p.members[4].max_conns: expected a whole number (got 'x')",
        "f.toml:13: pools.p.members[6]: listed twice (also members[5]) (got '127.0.0.1:7006')"]),
    (BASE.replace('["127.0.0.1:7001"]', '"127.0.0.1:7001"'), [
        "f.toml:6: pools.p.members: expected a list of members, as [\"HOST:PORT\", ...] (got '127.0.0.1:7001')"]),
    (BASE.replace("members", "# no members"), ["f.toml:5: pools.p.members: is required"]),
    (BASE + '[pools.p.tls]\nca = "certs/missing.pem"\ncert = "c.pem"\n', [
        "f.toml:7: pools.p.tls.key: a client certificate needs both a cert and a key",
        "f.toml:8: pools.p.tls.ca: no such file (got '/cfg/certs/missing.pem')"]),
    (BASE.replace('"p"\n', '"p"\ntls = {cert = "/abs/missing.pem", key = "k.pem", min_version = "1.1"}\n'), [
        "f.toml:4: listeners.a.tls.cert: no such file (got '/abs/missing.pem')",
        "f.toml:4: listeners.a.tls.min_version: expected 1.2 or 1.3 (got '1.1')"]),
    (BASE.replace('"p"\n', '"p"\ntls = {key = "k.pem"}\n'), ["f.toml:4: listeners.a.tls.cert: is required"]),
    (BASE.replace('"p"\n', '"p"\ntls = {cert = ["a.pem", "certs/missing.pem"], key = ["a.key", "b.key"]}\n'), [
        "f.toml:4: listeners.a.tls.cert[1]: no such file (got '/cfg/certs/missing.pem')"]),
    (BASE.replace('"p"\n', '"p"\ntls = {cert = ["a.pem", "b.pem"], key = "a.key"}\n'), [
        "f.toml:4: listeners.a.tls.key: expected one key per certificate, in the same order; got 2 certificates"
        " and 1 key"]),
    (BASE.replace('"p"\n', '"p"\ntls = {cert = [], key = "a.key"}\n'), [
        "f.toml:4: listeners.a.tls.cert: expected a file path, or a list of them, as \"server.pem\" or"
        " [\"a.pem\", \"b.pem\"] (got [])"]),
    (BASE + '[listeners."a b"]\naddress = ":1"\n', ["f.toml:7: listeners.a b: a name is letters, digits, '-' and '_'"]),
    ('[[listeners]]\naddress = ":1"\n', [
        "f.toml:1: listeners: expected a table, as [listeners.NAME] (got [{'address': ':1'}])"]),
    (BASE + 'health = "on"\n', ["f.toml:7: pools.p.health: expected a table, as [pools.p.health] (got 'on')"]),
    ("workers = 1000\n" + BASE, ["f.toml:1: workers: expected a number of processes from 1 to 256, or 'auto'"
                                 " (got 1000)"]),
    ("drain_timeout = 0\n" + BASE + 'connect_timeout = "5 parsecs"\nhealth.interval = inf\nhealth.rise = 0\n', [
        "f.toml:1: drain_timeout: must be greater than 0 (got 0)",
        "f.toml:8: pools.p.connect_timeout: expected a duration such as 250ms, 5s, 1m, 1h or 2.5 (got '5 parsecs')",
        "f.toml:9: pools.p.health.interval: expected a finite number of seconds (got inf)",
        "f.toml:10: pools.p.health.rise: must be at least 1 (got 0)"]),
    (BASE.replace('"p"\n', '"p"\nbuffer_size = "64q"\nrelay = "fast"\nbacklog = "9"\n'), [
        "f.toml:4: listeners.a.buffer_size: expected bytes such as 65536, 64k or 1m (got '64q')",
        "f.toml:5: listeners.a.relay: expected one of auto, splice, transport (got 'fast')",
        "f.toml:6: listeners.a.backlog: expected a whole number (got '9')"]),
    (BASE + '[pools.p.health]\nsend = "\\\\x4"\n', [
        "f.toml:8: pools.p.health.send: \\x needs two hex digits, as in \\x0d (got '\\\\x4')"]),
    (BASE + "[pools.p.tls]\nalpn = [1]\n", ["f.toml:8: pools.p.tls.alpn: expected a list of names, as"
                                            " [\"h2\", \"http/1.1\"] (got [1])"]),
    (BASE + "[pools.q]\nmembers = []\n[listeners.b]\naddress = ':1'\npool = 'q'\n", [  # b goes with its pool
        "f.toml:8: pools.q.members: at least one upstream is required"]),
    # outlier ejection: pool settings (health.eject_time was the ejection of --no-health-checks)
    (BASE + 'eject_after = 0\nmax_ejected_percent = 150\neject_time = "0s"\n', [
        "f.toml:7: pools.p.eject_after: must be at least 1 (got 0)",
        "f.toml:8: pools.p.max_ejected_percent: must be a percent, 0..100 (got 150)",
        "f.toml:9: pools.p.eject_time: must be greater than 0 (got '0s')"]),
    (BASE + 'max_eject_time = "10s"\n', [
        "f.toml:7: pools.p.max_eject_time: must be at least the eject time (30s) (got '10s')"]),
    (BASE + '[pools.p.health]\neject_time = "10s"\n', ["f.toml:8: pools.p.health.eject_time: no such setting"]),
    # SNI routes
    (BASE.replace('"p"\n', '"p"\nsni = { "a.example" = "p", "*.b.example" = "pq", "a.*.x" = "p" }\n'), [
        "f.toml:4: listeners.a.sni.*.b.example: no such pool; did you mean 'p'? (got 'pq')",
        "f.toml:4: listeners.a.sni.a.*.x: expected a server name such as a.example, or *.b.example for a suffix"
        " (got 'a.*.x')"]),
    (BASE.replace('"p"\n', '"p"\nsni = { "a.example" = "p" }\ntls = {cert = "a.pem", key = "a.key"}\n'), [
        "f.toml:4: listeners.a.sni: routes TLS through untouched, so it cannot be combined with tls (termination)"]),
    (BASE + '[listeners.a.sni]\n"a.example" = "q"\n"B.example" = 7\n[pools.q]\nmembers = ["127.0.0.1:7002"]\n'
     'tls = {}\n', [
        "f.toml:8: listeners.a.sni.a.example: this pool originates TLS, but SNI routes pass the client's TLS on as"
        " it is (got 'q')",
        "f.toml:9: listeners.a.sni.B.example: expected the name of a pool (got 7)"]),
    (BASE.replace('"p"\n', '"p"\nsni_strict = true\nsni = "a.example"\n'), [
        "f.toml:4: listeners.a.sni_strict: needs sni routes (got true)",
        "f.toml:5: listeners.a.sni: expected a table of server names and pools, as { \"a.example\" = \"pool_a\","
        " \"*.b.example\" = \"pool_b\" } (got 'a.example')"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "lines"), PROBLEMS)
def test_each_problem_is_one_line_with_its_line_number(text: str | bytes, lines: list[str]) -> None:
    assert problems(text) == lines


# --- values as the flags take them, and the effective configuration read back ----------------------


@pytest.mark.parametrize(("lines", "effective"), [("", "close"), ('on_member_down = "keep"\n', "keep")])
def test_a_primary_pool_closes_a_down_members_sessions_unless_the_file_says_keep(lines: str, effective: str) -> None:
    config = load(BASE + 'health.check = "redis-primary"\n' + lines)
    assert config.pool("p").on_member_down == effective


def test_values_take_the_flags_text_forms_or_plain_toml() -> None:
    text = BASE.replace('"p"\n', '"p"\nidle_timeout = "10m"\nbuffer_size = "1m"\n') + (
        'connect_timeout = 2.5\nhealth = {interval = 3, send = "PING\\\\r\\\\n", expect = "+PONG"}\n'
        'tls = {alpn = "h2,http/1.1", ca = "ca.pem"}\n'
    )
    config = load('workers = "auto"\naccess_log = "logs/a.log"\n' + text)
    listener, pool = config.listeners[0], config.pools[0]
    assert (listener.name, listener.idle_timeout, listener.buffer_size) == ("a", 600.0, 1 << 20)
    assert (pool.name, pool.connect_timeout, pool.health.interval) == ("p", 2.5, 3.0)
    assert (pool.health.send, pool.health.expect) == (b"PING\r\n", b"+PONG")
    assert pool.tls is not None and (pool.tls.alpn, pool.tls.ca) == (("h2", "http/1.1"), "/cfg/ca.pem")
    assert config.access_log == "/cfg/logs/a.log" and config.workers >= 1


def test_ejection_settings_take_durations_and_percents() -> None:
    config = load(BASE + 'eject_after = 2\neject_time = "200ms"\nmax_eject_time = "1m"\nmax_ejected_percent = 100\n')
    assert config.pools[0].outlier == OutlierPolicy(eject_after=2, eject_time=0.2, max_eject_time=60.0,
                                                    max_ejected_percent=100)  # fmt: skip


def test_members_are_text_or_tables_with_their_options_and_print_back_so() -> None:
    members = (
        '["127.0.0.1:7001", {address = "127.0.0.1:7002", weight = 3, max_conns = 10, backup = true},'
        ' {address = "srv:_r._tcp.x", weight = 2}]'
    )
    config = load(BASE.replace('["127.0.0.1:7001"]', members))
    assert config.pools[0].members == (
        MemberConfig(Address("127.0.0.1", 7001)),
        MemberConfig(Address("127.0.0.1", 7002), weight=3, max_conns=10, backup=True),
        MemberConfig(Service("_r._tcp.x"), weight=2),
    )
    printed = dump(config)
    table = '{address = "127.0.0.1:7002", weight = 3, max_conns = 10, backup = true}'
    assert f'members = ["127.0.0.1:7001", {table}, {{address = "srv:_r._tcp.x", weight = 2}}]' in printed
    assert load(printed) == config


def test_several_certificates_are_a_list_of_paths_and_read_back() -> None:
    text = BASE.replace('"p"\n', '"p"\n[listeners.a.tls]\ncert = ["a.pem", "/abs/b.pem"]\nkey = ["a.key", "b.key"]\n')
    config = load(text)
    tls = config.listeners[0].tls
    assert tls is not None and tls.pairs == (("/cfg/a.pem", "/cfg/a.key"), ("/abs/b.pem", "/cfg/b.key"))
    printed = dump(config)
    assert '\ncert = ["/cfg/a.pem", "/abs/b.pem"]\n' in printed
    assert load(printed) == config
    single = dump(load(BASE.replace('"p"\n', '"p"\ntls = {cert = "a.pem", key = "a.key"}\n')))
    assert '\ncert = "/cfg/a.pem"\n' in single  # one certificate reads as it was written


def test_the_example_loads_as_written() -> None:
    config = load(EXAMPLE.read_bytes(), str(EXAMPLE.parent))
    assert [(x.name, x.pool, x.tls is not None) for x in config.listeners] == [
        ("cache", "cache", False), ("cache-tls", "cache", True), ("vault", "vault", False)]  # fmt: skip
    pools = [(p.name, len(p.members), p.tls is not None) for p in config.pools]
    assert pools == [("cache", 2, False), ("vault", 1, True)]
    assert config.listeners[1].tls is not None and config.listeners[1].tls.cert == (str(ROOT / "certs/out/server.pem"),)


def test_the_effective_configuration_reads_back_as_the_same_config() -> None:
    config = load(EXAMPLE.read_bytes(), str(EXAMPLE.parent))
    printed = dump(config)
    assert load(printed, "/elsewhere") == config  # paths were made absolute
    assert dump(load(printed)) == printed
    assert "\n# client_ca is not set\n" in printed and '\nidle_timeout = "10m"\n' in printed


SNI_FILE = BASE.replace('pool = "p"\n', 'pool = "p"\nsni = { "A.example" = "q", "*.b.example" = "p" }\n'
                        'sni_strict = true\nsni_timeout = "250ms"\n') + '[pools.q]\nmembers = ["127.0.0.1:7002"]\n'


def test_sni_routes_load_in_canonical_form_and_read_back() -> None:
    config = load(SNI_FILE)
    listener = config.listeners[0]
    assert (listener.sni, listener.sni_strict, listener.sni_timeout) == (
        (("a.example", "q"), ("*.b.example", "p")), True, 0.25)  # fmt: skip
    printed = dump(config)
    assert 'sni = {"a.example" = "q", "*.b.example" = "p"}\n' in printed
    assert load(printed) == config


def test_sni_routes_may_be_a_table_of_their_own() -> None:
    table = BASE + '[listeners.a.sni]\n"A.example" = "q"\n"*.b.example" = "p"\n'
    table += '[pools.q]\nmembers = ["127.0.0.1:7002"]\n'
    assert load(table).listeners[0].sni == (("a.example", "q"), ("*.b.example", "p"))


@given(st.floats(min_value=1e-6, max_value=1e7, allow_nan=False))
def test_a_duration_prints_as_text_that_parses_back_exactly(seconds: float) -> None:
    text = configfile.duration_text(seconds)
    assert (parse_duration(text, "x") if isinstance(text, str) else text) == seconds


@given(st.binary(max_size=40))
def test_probe_bytes_print_in_the_escapes_they_parse_from(data: bytes) -> None:
    assert parse_escapes(configfile.escapes_text(data), "x") == data


# --- the schema ------------------------------------------------------------------------------------


def test_every_flag_is_a_key_of_the_file() -> None:
    assert [o.flag for o in OPTIONS if configfile.generic(o.path) not in SCHEMA] == []
    assert set(FILE_FORMS) <= set(SCHEMA)
    assert set(SCHEMA) >= configfile.PATHS


def readme_schema_rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration file\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return {row[0][3:-1]: [cell.strip() for cell in row[1:]] for row in rows}


def test_the_readme_table_lists_every_key_with_its_default_and_flag() -> None:
    rows = readme_schema_rows()
    assert list(rows) == [key.path for key in SCHEMA.values() if key.leaf]
    flags = {configfile.generic(o.path): o.flag for o in OPTIONS}
    for path, (default, flag, _meaning) in rows.items():
        key = SCHEMA[path]
        if key.default is configfile.MISSING:
            assert default == "required", path
        elif key.default is None:
            assert default == "not set", path
        else:
            assert default == f"`{configfile.toml_value(configfile.file_value(key, key.default))}`", path
        assert flag == (f"`{flags[path]}`" if path in flags else ""), path


# --- fuzzing: problems, never a traceback ----------------------------------------------------------

_NAMES = st.sampled_from(sorted({part for path in SCHEMA for part in path.split(".") if part != "*"} | {"a", "p"}))
_SCALARS = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=12),
    st.sampled_from(["1s", "64k", ":7000", "127.0.0.1:7001", "auto", "PING\\r\\n", "h2,http/1.1", "-", "off"]),
)  # fmt: skip
_TREES = st.recursive(
    _SCALARS | st.lists(_SCALARS, max_size=3),
    lambda children: st.dictionaries(_NAMES | st.text(max_size=6), children, max_size=5),
    max_leaves=25,
)


def as_toml(tree: dict[str, Any], path: str = "") -> str:
    """A document with a header per table, so the locator sees tables, keys and arrays."""
    keys = [f"{configfile.toml_key(k)} = {configfile.toml_value(v)}" for k, v in tree.items()
            if not isinstance(v, dict)]  # fmt: skip
    head = [f"[{path}]"] if path else []
    subtables = [as_toml(v, f"{path}.{configfile.toml_key(k)}" if path else configfile.toml_key(k))
                 for k, v in tree.items() if isinstance(v, dict)]  # fmt: skip
    return "\n".join([*head, *keys, *subtables]) + "\n"


def paths_of(tree: Any, path: str = "") -> list[str]:
    """Every path in plain data: tables' keys and lists' items, nested."""
    found: list[str] = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        found += [where, *paths_of(value, where)]
    return found


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_NAMES, _TREES, max_size=6))
def test_any_toml_document_gives_a_config_or_problems_and_every_path_is_located(tree: dict[str, Any]) -> None:
    text = as_toml(tree)
    lines = locate(text)
    assert set(paths_of(tree)) <= set(lines)
    rows = text.splitlines()
    for path, line in lines.items():
        assert 1 <= line <= len(rows), path
    try:
        load(text)
    except ConfigFileError as exc:
        assert exc.problems and all(1 <= p.line <= len(rows) + 1 and p.path for p in exc.problems)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_give_a_config_or_problems(source: bytes) -> None:
    try:
        load(source)
    except ConfigFileError as exc:
        assert exc.problems and all(p.line >= 1 for p in exc.problems)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([line for text, _ in PROBLEMS if isinstance(text, str) for line in
                                 text.splitlines()]), max_size=14))  # fmt: skip
def test_lines_of_real_files_shuffled_give_a_config_or_problems(lines: list[str]) -> None:
    try:
        config = load("\n".join(lines))
    except ConfigFileError as exc:
        assert exc.problems
    else:
        assert load(dump(config)) == config
        assert all(isinstance(m, Address) for p in config.pools for m in p.members)
