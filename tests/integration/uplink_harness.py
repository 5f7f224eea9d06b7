"""One way to drive an uplink plugin in tests: the real UplinkRunner over a real store file,
against a service emulator over real HTTP (or a real broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from gateway.configbase import StoreConfig, UplinkConfigBase
from gateway.sandbox.emulator import Emulator
from gateway.store import Store
from gateway.uplinks.base import Uplink
from gateway.uplinks.dispatch import UplinkRunner

E = TypeVar("E", bound=Emulator)
U = TypeVar("U")


class Harness(Generic[E, U]):
    """``store``, ``emu``, ``runner`` and ``uplink`` of one uplink under test."""

    def __init__(self, store: Store, emu: E, runner: UplinkRunner, uplink: U) -> None:
        self.store, self.emu, self.runner, self.uplink = store, emu, runner, uplink
        self.name = runner.name
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.runner.run(), name=f"uplink:{self.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.runner.uplink.aclose()

    def stats(self) -> dict[str, Any]:
        return self.store.uplink_stats(self.name)

    async def until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        """Wait for ``predicate``, re-checked after every store commit (or every 50 ms)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.store.wait_for_data(0.05)

    async def drained(self) -> None:
        await self.until(lambda: self.stats()["backlog"] == 0)


class Harnesses:
    """Builds harnesses for one test and closes everything it built (use as a fixture body)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._made: list[tuple[Harness[Any, Any], asyncio.Task[None]]] = []
        self._emus: list[Emulator] = []

    async def serve(self, emu: E) -> E:
        await emu.start()
        self._emus.append(emu)
        return emu

    async def build(self, cfg: UplinkConfigBase, uplink: U, emu: E) -> Harness[E, U]:
        path = self.tmp_path / f"{cfg.name}{len(self._made)}.db"
        store = await Store.open(
            StoreConfig(path=path, commit_interval_ms=10), {cfg.name: cfg.routed_series()}
        )
        writer = asyncio.create_task(store.run(), name="store:writer")
        runner = UplinkRunner(uplink, cfg, store)  # type: ignore[arg-type]
        h: Harness[E, U] = Harness(store, emu, runner, uplink)
        self._made.append((h, writer))
        return h

    async def aclose(self) -> None:
        for h, writer in self._made:
            await h.stop()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await h.store.aclose()
        for emu in self._emus:
            await emu.aclose()


__all__ = ["Harness", "Harnesses", "Uplink"]
