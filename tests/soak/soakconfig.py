"""What the soak runs: its plan (sizes, rates, kill count) and the daemon's TOML config.

Three sources feed five uplinks, each route chosen so that the uplink's own rules hold and the
final drain finishes within seconds of the last reading:

- ``fast`` (synthetic, ``fast_hz``): ``5 x fast_replicas`` series. All go to Qatium (rows, one
  request per batch), ``energydata_replicas`` of each waveform to Energydata (multi-value MQTT,
  batch-import backfill for old backlogs) and four to NILU (two sensors, two parameters each,
  ``nilu_resolution_s`` windows: closed by the wall clock a few seconds after the last reading).
- ``slow`` (synthetic, 5 Hz, two series): Datacooee, which takes one reading per request.
- ``river`` (a serial line logger on a pty): past-dated records, one per 5-minute slot, to Vanda
  (whose water-level examination type has a 5-minute minimum interval; ``window_grace_s = 2``
  closes the last window 2 s after the logger went quiet instead of one window later) and to
  Energydata as single-value messages (old enough for the batch import).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings

WAVEFORMS = ("sine", "random_walk", "sawtooth", "square", "constant")

QATIUM_TOKEN = "soak-qatium-token"
NILU_TOKEN = "soak-nilu-token"
VANDA_CLIENT = "soak-client"
VANDA_SECRET = "soak-vanda-secret"
ENERGYDATA_TOKEN = "soak-energydata-token"
DATACOOEE_ORG = "soak-org"
DATACOOEE_KEY = "soak-datacooee-key"

#: The daemon reads its secrets from these variables (the mechanism a real install uses).
TOKEN_ENV = {
    "SOAK_QATIUM_TOKEN": QATIUM_TOKEN,
    "SOAK_NILU_TOKEN": NILU_TOKEN,
    "SOAK_VANDA_CLIENT": VANDA_CLIENT,
    "SOAK_VANDA_SECRET": VANDA_SECRET,
    "SOAK_ENERGYDATA_TOKEN": ENERGYDATA_TOKEN,
    "SOAK_DATACOOEE_KEY": DATACOOEE_KEY,
}

UPLINKS = ("qatium", "energydata", "nilu", "vanda", "datacooee")

#: The river logger's record: "R<epoch s>,<level1>,<level2>". The leading R and the full match
#: mean a line cut short at a restart (the pty's buffer is flushed when the port opens) can never
#: parse as a record with a wrong, shorter timestamp.
LOGGER_PATTERN = r"R(?P<time>\d{10}),(?P<level1>-?\d+\.\d),(?P<level2>-?\d+\.\d)"
LOGGER_SLOT_S = 300

NILU_SENSORS = (501, 502)
VANDA_STATION = "52000001"
VANDA_EXAMINATION = 25  # Water Level, cm: 5-minute minimum interval


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """Sizes and knobs of one soak run. Defaults: the issue's 50 series at 20 Hz."""

    kills: int = 10
    seed: int = 1
    fast_replicas: int = 10
    fast_hz: float = 20.0
    slow_hz: float = 5.0
    energydata_replicas: int = 4
    nilu_resolution_s: int = 2
    logger_hz: float = 10.0
    #: Every Nth kill cycle first drains everything (sources off) until the store is empty, so
    #: the next start finds a fully delivered store (0: never).
    drain_every: int = 4
    #: Mean seconds between injected faults (service errors, timeouts, broker restarts).
    fault_mean_s: float = 1.0
    #: Longest wait for a chosen kill moment; the daemon is killed anyway when it passes.
    kill_wait_s: float = 10.0
    drain_timeout_s: float = 90.0
    rss_every_s: float = 1.0
    #: Seconds of wall time the run may take before the kill loop stops early (0: no limit).
    max_kill_loop_s: float = 0.0

    @property
    def fast_series(self) -> list[str]:
        return [f"fast.{w}.{i}" for w in WAVEFORMS for i in range(1, self.fast_replicas + 1)]

    @property
    def slow_series(self) -> list[str]:
        return ["slow.temp", "slow.hum"]

    @property
    def river_series(self) -> list[str]:
        return ["river.level1", "river.level2"]

    def energydata_routes(self) -> dict[str, tuple[str, int]]:
        """series -> (dataset, datastream id)."""
        out: dict[str, tuple[str, int]] = {}
        n = 1000
        for w in WAVEFORMS:
            for i in range(1, self.energydata_replicas + 1):
                n += 1
                out[f"fast.{w}.{i}"] = ("fast", n)
        out["river.level1"] = ("river", 2001)
        return out

    def nilu_routes(self) -> dict[str, tuple[int, str]]:
        """series -> (sensor, parameter)."""
        return {
            "fast.sine.1": (501, "p0"),
            "fast.random_walk.1": (501, "p1"),
            "fast.sawtooth.1": (502, "p0"),
            "fast.square.1": (502, "p1"),
        }

    def vanda_routes(self) -> dict[str, int]:
        """series -> measurement point number."""
        return {"river.level1": 1, "river.level2": 2}

    def datacooee_routes(self) -> dict[str, str]:
        """series -> input id."""
        return {"slow.temp": "sensoaktemp", "slow.hum": "sensoakhum"}

    def routes(self) -> dict[str, list[str]]:
        """uplink -> the series routed to it."""
        return {
            "qatium": self.fast_series,
            "energydata": list(self.energydata_routes()),
            "nilu": list(self.nilu_routes()),
            "vanda": list(self.vanda_routes()),
            "datacooee": list(self.datacooee_routes()),
        }


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the stand-ins listen."""

    qatium: str
    nilu: str
    vanda: str
    datacooee: str
    mqtt_port: int
    energydata_import: str
    logger_tty: Path


def clock_section() -> str:
    """``[clock] trust = "always"`` where the gateway has that section: the test machine's clock
    is right but need not report itself synchronised (containers), and readings would otherwise
    wait for a sync that never comes (gateway/clock.py)."""
    return '\n[clock]\ntrust = "always"\n' if "clock" in Settings.model_fields else ""


def render(plan: SoakPlan, where: Endpoints, db: Path, *, sources: bool = True) -> str:
    """The daemon's config. ``sources=False`` switches every source off (a drain run)."""
    on = "true" if sources else "false"
    knobs = "backoff_initial_s = 0.2\nbackoff_max_s = 2.0\nauth_retry_s = 3.0\n"
    clock = clock_section()
    out = [
        f"""# Generated by tests/soak/soakconfig.py.
[store]
path = "{db}"
retention_days = 365

[health]
port = 0

[log]
format = "json"
level = "info"
{clock}
[[sources]]
name = "fast"
type = "synthetic"
enabled = {on}
interval_s = {1 / plan.fast_hz!r}
replicas = {plan.fast_replicas}
"""
    ]
    for w in WAVEFORMS:
        out.append(f"""  [[sources.series]]
  name = "fast.{w}"
  waveform = "{w}"
  min = 1.0
  max = 9.0
  period_s = 30
""")
    out.append(f"""
[[sources]]
name = "slow"
type = "synthetic"
enabled = {on}
interval_s = {1 / plan.slow_hz!r}
  [[sources.series]]
  name = "slow.temp"
  waveform = "sine"
  min = 4.0
  max = 14.0
  [[sources.series]]
  name = "slow.hum"
  waveform = "random_walk"
  min = 30.0
  max = 90.0

[[sources]]
name = "river"
type = "serial_lines"
enabled = {on}
port = "{where.logger_tty}"
baudrate = 115200
reconnect_min_s = 0.2
reconnect_max_s = 1.0
series_prefix = "river."
  [sources.parser]
  kind = "regex"
  pattern = '{LOGGER_PATTERN}'
  [sources.timestamp]
  field = "time"
  format = "epoch_s"

[[uplinks]]
name = "qatium"
type = "qatium"
url = "{where.qatium}/ingest"
token = {{ env = "SOAK_QATIUM_TOKEN" }}
rate_limit_requests = 120
rate_limit_period_s = 60
timeout_s = 3.0
{knobs}""")
    for s in plan.fast_series:
        out.append(f"""  [[uplinks.routes]]
  series = "{s}"
  asset = "{s}"
  metric = "level"
  unit = "m"
""")
    out.append(f"""
[[uplinks]]
name = "energydata"
type = "energydata"
host = "127.0.0.1"
port = {where.mqtt_port}
tls = false
token = {{ env = "SOAK_ENERGYDATA_TOKEN" }}
client_id = "fieldgate-soak"
keepalive_s = 5
ack_timeout_s = 3.0
connect_timeout_s = 3.0
timeout_s = 40.0
{knobs}  [[uplinks.datasets]]
  name = "fast"
  prefix = "soak-fast"
  messages = "multi"
  [[uplinks.datasets]]
  name = "river"
  prefix = "soak-river"
  messages = "single"
  [uplinks.backfill]
  url = "{where.energydata_import}/api/v1"
  older_than_s = 3
  larger_than = 500
  live_s = 1
  min_readings = 50
  timeout_s = 5.0
  poll_s = 0.2
  max_wait_s = 10.0
""")
    for s, (dataset, ds_id) in plan.energydata_routes().items():
        out.append(f"""  [[uplinks.routes]]
  series = "{s}"
  dataset = "{dataset}"
  suffix = "{s}"
  datastream = {ds_id}
""")
    out.append(f"""
[[uplinks]]
name = "nilu"
type = "nilu"
url = "{where.nilu}"
token = {{ env = "SOAK_NILU_TOKEN" }}
rate_limit_requests = 0
timeout_s = 3.0
{knobs}""")
    for sid in NILU_SENSORS:
        out.append(f"""  [[uplinks.sensors]]
  id = {sid}
  resolution_s = {plan.nilu_resolution_s}
  timestamp_field = "t"
""")
    for s, (sid, param) in plan.nilu_routes().items():
        out.append(f"""  [[uplinks.routes]]
  series = "{s}"
  sensor = {sid}
  parameter = "{param}"
""")
    out.append(f"""
[[uplinks]]
name = "vanda"
type = "vanda"
api_url = "{where.vanda}/api"
token_url = "{where.vanda}/runtime/oauth2/token.idp"
client_id = {{ env = "SOAK_VANDA_CLIENT" }}
client_secret = {{ env = "SOAK_VANDA_SECRET" }}
rate_limit_requests = 0
timeout_s = 3.0
# One record per 5-minute slot: each window holds one reading, so it may close 2 s after the
# logger went quiet (the default, one window, would hold the last one 5 minutes past the drain).
window_grace_s = 2.0
{knobs}""")
    for s, point in plan.vanda_routes().items():
        out.append(f"""  [[uplinks.routes]]
  series = "{s}"
  station_id = "{VANDA_STATION}"
  measurement_point_number = {point}
  examination_type_sc = {VANDA_EXAMINATION}
  reason_code_sc = 5
""")
    out.append(f"""
[[uplinks]]
name = "datacooee"
type = "datacooee"
url = "{where.datacooee}"
organization_id = "{DATACOOEE_ORG}"
api_key = {{ env = "SOAK_DATACOOEE_KEY" }}
rate_limit_requests = 0
concurrency = 4
timeout_s = 3.0
{knobs}""")
    for s, input_pk in plan.datacooee_routes().items():
        out.append(f"""  [[uplinks.routes]]
  series = "{s}"
  input_pk = "{input_pk}"
""")
    return "".join(out)
