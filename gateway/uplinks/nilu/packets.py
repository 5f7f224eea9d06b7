"""Pure building blocks of NILU sensor packets: timestamps, coordinates, endpoints, error bodies.

Nothing here does I/O; :mod:`gateway.uplinks.nilu.uplink` puts the pieces together. Callers
may rely on:

- :func:`parse_pattern` accepts exactly the StringEpochTime ``input-format`` subset documented in
  :data:`SUPPORTED` and raises ValueError naming the offending part otherwise;
- :func:`timestamp_value` gives epoch seconds (``int``) when there is no pattern, else the local
  time text in the pattern; both are whole seconds unless the pattern has a fraction token;
- :func:`coord` never writes exponents and never ``-0`` (URL path segments must be plain
  doubles);
- :func:`fill_endpoint` substitutes the document's ``{longitude}/{latitude}/{altitude}``
  placeholders and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Literal
from urllib.parse import urljoin, urlsplit

from gateway.models import Position, Value

#: Avro field names, which NILU parameter names are: ``[A-Za-z_][A-Za-z0-9_]*``.
AVRO_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"

Field = Literal["year", "month", "day", "hour", "minute", "second", "millis"]

#: Pattern letter runs we can write, as the service's converter reads them (.NET/Java style).
SUPPORTED: Mapping[str, Field] = {
    "yyyy": "year",
    "MM": "month",
    "dd": "day",
    "HH": "hour",
    "mm": "minute",
    "ss": "second",
    "fff": "millis",
    "SSS": "millis",
}
_WIDTH: Mapping[Field, int] = {
    "year": 4,
    "month": 2,
    "day": 2,
    "hour": 2,
    "minute": 2,
    "second": 2,
    "millis": 3,
}
_REQUIRED: frozenset[Field] = frozenset({"year", "month", "day", "hour", "minute", "second"})

#: A parsed pattern: literal text (str) or a field token.
Token = str | tuple[Field]

PLACEHOLDERS = ("{longitude}", "{latitude}", "{altitude}")


def parse_pattern(pattern: str) -> tuple[Token, ...]:
    """Tokens of a StringEpochTime ``input-format`` such as ``yyyy/MM/dd HH:mm:ss``.

    Letters outside quotes must form one of the :data:`SUPPORTED` runs; ``'text'`` and ``\\x``
    are literals (``''`` is a quote). Year, month, day, hour, minute and second must each appear
    exactly once, so a written time always names one instant (up to a clock change).
    """
    out: list[Token] = []
    seen: list[Field] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise ValueError(f"unclosed quote in time pattern {pattern!r}")
            out.append(pattern[i + 1 : end] if end > i + 1 else "'")
            i = end + 1
        elif c == "\\":
            if i + 1 >= n:
                raise ValueError(f"time pattern {pattern!r} ends with a backslash")
            out.append(pattern[i + 1])
            i += 2
        elif c.isascii() and c.isalpha():
            j = i
            while j < n and pattern[j] == c:
                j += 1
            run = pattern[i:j]
            field = SUPPORTED.get(run)
            if field is None:
                known = " ".join(SUPPORTED)
                raise ValueError(
                    f"time pattern part {run!r} is not supported (supported: {known}; "
                    "quote literal letters, e.g. 'T')"
                )
            out.append((field,))
            seen.append(field)
            i = j
        else:
            out.append(c)
            i += 1
    repeated = sorted({f for f in seen if seen.count(f) > 1})
    missing = sorted(_REQUIRED - set(seen))
    if repeated:
        raise ValueError(f"time pattern {pattern!r} repeats {', '.join(repeated)}")
    if missing:
        raise ValueError(f"time pattern {pattern!r} lacks {', '.join(missing)}")
    return tuple(out)


def format_local(ts_ms: int, tokens: tuple[Token, ...], zone: tzinfo) -> str:
    """``ts_ms`` as local wall time in ``zone``, written with ``tokens``."""
    dt = datetime.fromtimestamp(ts_ms // 1000, UTC).astimezone(zone)
    values: dict[Field, int] = {
        "year": dt.year,
        "month": dt.month,
        "day": dt.day,
        "hour": dt.hour,
        "minute": dt.minute,
        "second": dt.second,
        "millis": ts_ms % 1000,
    }
    parts: list[str] = []
    for tok in tokens:
        if isinstance(tok, str):
            parts.append(tok)
        else:
            parts.append(f"{values[tok[0]]:0{_WIDTH[tok[0]]}d}")
    return "".join(parts)


def timestamp_value(ts_ms: int, tokens: tuple[Token, ...] | None, zone: tzinfo) -> int | str:
    """The packet's timestamp attribute: epoch seconds, or local time text (StringEpochTime)."""
    if tokens is None:
        return ts_ms // 1000
    return format_local(ts_ms, tokens, zone)


def ambiguous_local_time(ts_ms: int, zone: tzinfo) -> bool:
    """True when the local wall time of ``ts_ms`` occurs twice in ``zone`` (clock set back).

    Such a time written without an offset names two instants an hour apart; the service picks
    one of them, which may be the wrong one.
    """
    dt = datetime.fromtimestamp(ts_ms // 1000, UTC).astimezone(zone).replace(tzinfo=None)
    first = dt.replace(tzinfo=zone, fold=0)
    second = dt.replace(tzinfo=zone, fold=1)
    return first.utcoffset() != second.utcoffset() and _exists(dt, zone)


def _exists(naive: datetime, zone: tzinfo) -> bool:
    # In a spring-forward gap fold=0/1 also differ; a time taken from a real instant is never in
    # one, but check rather than assume.
    aware = naive.replace(tzinfo=zone)
    return aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == naive


def coord(x: float, decimals: int = 7) -> str:
    """A plain decimal for a URL path segment: ``60``, ``5.312691``, ``-0.1``; never ``1e-05``."""
    text = f"{x:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def default_endpoint(base_url: str, sensor_id: int, gps: bool) -> str:
    """The document's inbound URL for a sensor; GPS ones carry the position placeholders."""
    base = base_url.rstrip("/")
    if gps:
        return f"{base}/api/sensors/{sensor_id}/{'/'.join(PLACEHOLDERS)}/inbound"
    return f"{base}/api/sensors/{sensor_id}/inbound"


def needs_position(endpoint: str) -> bool:
    return any(p in endpoint for p in PLACEHOLDERS)


def fill_endpoint(
    endpoint: str, position: Position | None, altitude_if_unknown: float | None
) -> str:
    """``endpoint`` with the position filled in; raises ValueError when it needs one we lack."""
    if not needs_position(endpoint):
        return endpoint
    if position is None:
        raise ValueError("endpoint needs a position and the readings carry none")
    alt = position.alt if position.alt is not None else altitude_if_unknown
    if alt is None:
        raise ValueError("endpoint needs an altitude and the GPS fix has none")
    return (
        endpoint.replace("{longitude}", coord(position.lon))
        .replace("{latitude}", coord(position.lat))
        .replace("{altitude}", coord(alt, 2))
    )


def pushtest_url(endpoint: str) -> str:
    """The document's push-test form of an inbound URL: ``.../inbound/?pushtest=true``."""
    return endpoint.rstrip("/") + "/?pushtest=true"


def resolve_endpoint(header: str, request_url: str) -> str:
    """An ``endpoint`` header (absolute or relative) as an absolute URL template."""
    # urljoin would percent-encode nothing here, but braces must survive as they are.
    return urljoin(request_url, header.strip())


def same_origin(url: str, base_url: str) -> bool:
    """True when ``url`` is on the configured service's scheme, host and port.

    The bearer token goes with every request, so an ``endpoint`` elsewhere is not followed.
    """
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme, a.hostname, _port(a.scheme, a.port)) == (
        b.scheme,
        b.hostname,
        _port(b.scheme, b.port),
    )


def _port(scheme: str, port: int | None) -> int | None:
    if port is not None:
        return port
    return {"http": 80, "https": 443}.get(scheme)


@dataclass(frozen=True, slots=True)
class ServiceError:
    """The document's error body: ``{"error-code", "error-message", "http-status-code"}``."""

    code: int | None
    message: str


def service_error(body: bytes | str) -> ServiceError:
    """The error code and message of an error answer (code None when the body has none)."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return ServiceError(None, text.strip()[:500])
    if not isinstance(data, dict):
        return ServiceError(None, str(data)[:500])
    raw = data.get("error-code")
    code: int | None
    if isinstance(raw, bool):
        code = None
    elif isinstance(raw, int):
        code = raw
    elif isinstance(raw, str) and raw.strip().isdigit():
        code = int(raw)
    else:
        code = None
    message = data.get("error-message") or data.get("message") or ""
    return ServiceError(code, str(message)[:500])


def build_packet(
    values: Mapping[str, Value], timestamp_field: str, timestamp: int | str
) -> dict[str, Value]:
    """The JSON object of one packet: the parameters' values plus the mapped timestamp."""
    packet: dict[str, Value] = dict(values)
    packet[timestamp_field] = timestamp
    return packet


def encode(packet: Mapping[str, Value]) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity raise ValueError (they are refused by ``check``)."""
    return json.dumps(packet, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


_TZ_NAME = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")


def valid_zone_name(name: str) -> bool:
    """Cheap shape check before asking zoneinfo (which would read arbitrary paths)."""
    return bool(_TZ_NAME.fullmatch(name)) and ".." not in name


#: Redirects (300 with an endpoint header) followed in a row before giving up.
MAX_HOPS = 3
#: Answers that mean the packet is stored.
DELIVERED = frozenset({200, 201, 202, 204})
