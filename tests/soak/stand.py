"""The soak's stand-ins: every service emulator, a real mosquitto behind the Energydata front, the
river logger on a pty, and the chaos that makes them fail at random.

What a caller may rely on::

    async with Stand(workdir, plan) as stand:
        stand.endpoints                    # for soakconfig.render
        stand.start_chaos(); ...; await stand.calm()   # faults on, then all healthy again
        stand.chaos_counts                 # faults injected, by kind
    # every server, process, pty and task is gone here

Chaos is load, not synchronisation: its pauses (the gap between faults, how long the broker stays
down) are drawn from a seeded RNG and may be any length; nothing waits on them to be "done".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Self

from gateway.sandbox.datacooee import DatacooeeEmulator
from gateway.sandbox.emulator import Emulator
from gateway.sandbox.energydata_broker import EnergydataBroker
from gateway.sandbox.energydata_import import Datastream, EnergydataImportEmulator
from gateway.sandbox.mosquitto import Mosquitto
from gateway.sandbox.nilu import NiluEmulator, SensorSchema
from gateway.sandbox.qatium import QatiumEmulator
from gateway.sandbox.serial_sim import LineLoggerSim
from gateway.sandbox.vanda import VandaEmulator

from .soakconfig import (
    DATACOOEE_KEY,
    DATACOOEE_ORG,
    ENERGYDATA_TOKEN,
    LOGGER_SLOT_S,
    NILU_SENSORS,
    NILU_TOKEN,
    QATIUM_TOKEN,
    VANDA_CLIENT,
    VANDA_SECRET,
    Endpoints,
    SoakPlan,
)

#: The logger's history starts this far back; it stops writing an hour before now.
LOGGER_HISTORY_S = 60 * 86_400
#: A delayed request outlives the uplinks' 3 s timeout: the client gives up (a timeout).
TIMEOUT_DELAY_S = 5.0


class Stand:
    """The services and devices of one soak run (module docstring)."""

    def __init__(self, workdir: Path, plan: SoakPlan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.rng = random.Random(plan.seed * 7919 + 1)
        # Qatium's own limit, as the config's: the daemon's persisted limiter must respect it.
        self.qatium = QatiumEmulator(QATIUM_TOKEN, rate_limit=120, rate_period_s=60)
        self.nilu = NiluEmulator(
            [
                SensorSchema(
                    sid,
                    {"p0": "double", "p1": "double"},
                    timestamp="t",
                    resolution_s=plan.nilu_resolution_s,
                    name=f"soak{sid}",
                )
                for sid in NILU_SENSORS
            ],
            NILU_TOKEN,
        )
        self.vanda = VandaEmulator({VANDA_CLIENT: VANDA_SECRET})
        self.datacooee = DatacooeeEmulator(
            DATACOOEE_ORG, DATACOOEE_KEY, inputs=list(plan.datacooee_routes().values())
        )
        streams = [
            Datastream(ds_id, f"soak-{dataset}/{series}")
            for series, (dataset, ds_id) in plan.energydata_routes().items()
        ]
        self.importer = EnergydataImportEmulator(ENERGYDATA_TOKEN, datastreams=streams)
        self.mosquitto = Mosquitto(workdir / "mosquitto")
        self.front: EnergydataBroker | None = None
        self.logger = LineLoggerSim(workdir / "ttyRIVER")
        self.chaos_counts: Counter[str] = Counter()
        self._chaos: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def broker(self) -> EnergydataBroker:
        assert self.front is not None, "the stand is not running"
        return self.front

    @property
    def http_emulators(self) -> dict[str, Emulator]:
        return {
            "qatium": self.qatium,
            "nilu": self.nilu,
            "vanda": self.vanda,
            "datacooee": self.datacooee,
            "energydata-import": self.importer,
        }

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(
            self.qatium.url,
            self.nilu.url,
            self.vanda.url,
            self.datacooee.url,
            self.broker.port,
            self.importer.url,
            self.logger.path,
        )

    async def __aenter__(self) -> Self:
        stack = self._stack
        try:
            for emu in self.http_emulators.values():
                await stack.enter_async_context(emu)
            await stack.enter_async_context(self.mosquitto)
            self.front = EnergydataBroker(
                ("127.0.0.1", self.mosquitto.port), tokens={ENERGYDATA_TOKEN: ["#"]}
            )
            await stack.enter_async_context(self.front)
            await stack.enter_async_context(self.logger)
            self.logger.start_task(self._feed_logger(), "soak:river-logger")
            stack.push_async_callback(self._stop_chaos)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    # -- the river logger --------------------------------------------------------------------

    async def _feed_logger(self) -> None:
        """Past-dated records, one per 5-minute slot, at ``logger_hz``; never into the last hour.

        Records written while the daemon is down wait in the pty (or are flushed when it opens
        the port: then they were never captured, which the verification allows)."""
        now = time.time()
        first = int(now - LOGGER_HISTORY_S) // LOGGER_SLOT_S * LOGGER_SLOT_S
        last = now - 3600
        k = 0
        interval = 1 / self.plan.logger_hz
        while first + k * LOGGER_SLOT_S < last:
            t = first + k * LOGGER_SLOT_S
            level1 = 120.0 + 15.0 * math.sin(k / 40)
            level2 = 80.0 + 10.0 * math.cos(k / 25)
            await self.logger.write_line(f"R{t},{level1:.1f},{level2:.1f}")
            k += 1
            await asyncio.sleep(interval)

    # -- chaos -------------------------------------------------------------------------------

    def start_chaos(self) -> None:
        if self._chaos is None and self.plan.fault_mean_s > 0:
            self._chaos = asyncio.create_task(self._run_chaos(), name="soak:chaos")

    async def _stop_chaos(self) -> None:
        task, self._chaos = self._chaos, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def calm(self) -> None:
        """Stop injecting, forget queued faults, bring the broker back: every service healthy."""
        await self._stop_chaos()
        for emu in self.http_emulators.values():
            emu.faults.clear()
        self.broker.release()
        if not self.mosquitto.running:
            await self.mosquitto.start()

    async def _run_chaos(self) -> None:
        actions = self._actions()
        names = list(actions)
        # The broker's faults are one action each against four per HTTP service: weigh them up.
        weights = [4 if n.startswith("broker:") else 1 for n in names]
        while True:
            await asyncio.sleep(self.rng.expovariate(1 / self.plan.fault_mean_s))
            name = self.rng.choices(names, weights)[0]
            self.chaos_counts[name] += 1
            await actions[name]()

    def _actions(self) -> dict[str, Callable[[], Awaitable[None]]]:
        rng = self.rng
        out: dict[str, Callable[[], Awaitable[None]]] = {}
        prefixes = {
            "qatium": "/ingest",
            "nilu": "/api/sensors",
            "vanda": "/api/measurements",
            "datacooee": "/api/external",
            "energydata-import": "/api/v1/import",
        }
        for name, emu in self.http_emulators.items():
            prefix = prefixes[name]

            async def fail(emu: Emulator = emu, prefix: str = prefix) -> None:
                emu.faults.fail_next(rng.randint(1, 3), rng.choice([500, 502, 503]), prefix=prefix)

            async def throttle(emu: Emulator = emu, prefix: str = prefix) -> None:
                emu.faults.fail_next(1, 429, retry_after=rng.choice([1, 2]), prefix=prefix)

            async def timeout(emu: Emulator = emu, prefix: str = prefix) -> None:
                emu.faults.delay_next(1, TIMEOUT_DELAY_S, prefix=prefix)

            async def drop(emu: Emulator = emu, prefix: str = prefix) -> None:
                emu.faults.drop_next(1, prefix=prefix)

            out |= {
                f"{name}:5xx": fail,
                f"{name}:429": throttle,
                f"{name}:timeout": timeout,
                f"{name}:drop": drop,
            }

        async def token_endpoint_down() -> None:
            self.vanda.faults.fail_next(rng.randint(1, 2), 503, prefix="/runtime")

        async def tokens_expire() -> None:
            self.vanda.expire_tokens()

        async def stored_unanswered() -> None:
            # Vanda commits, then the answer is lost: the uplink must re-send (duplicates).
            self.vanda.drop_answer_next(1)

        async def broker_restart() -> None:
            await self.mosquitto.kill()
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            await self.mosquitto.start()

        async def broker_stall() -> None:
            # The front stops dequeuing: publishes wait past the uplink's 3 s ack timeout.
            self.broker.hold()
            try:
                await asyncio.sleep(rng.uniform(0.5, 4.0))
            finally:
                self.broker.release()

        out |= {
            "vanda:token-503": token_endpoint_down,
            "vanda:tokens-expired": tokens_expire,
            "vanda:stored-unanswered": stored_unanswered,
            "broker:restart": broker_restart,
            "broker:stall": broker_stall,
        }
        return out
