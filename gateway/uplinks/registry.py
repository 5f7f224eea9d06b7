"""The uplink registry: one case per service, from its config model to its plugin.

``gateway.config`` lists the config models (the ``UplinkConfig`` union); this module is the one
place that knows which plugin each model builds and hands it the secrets its config names
(resolved when the config was loaded: :meth:`gateway.configbase.SecretRef.secret`). A new
service is one folder (config.py, uplink.py) and one case here; mypy's ``assert_never`` fails
the build if a case is missing. Optional capabilities are protocols the plugin implements
(gateway/uplinks/base.py: ``ReportsStatus``, ``SendsWholeGroups``, ``SettlesEarly``,
``ChecksUplink``; gateway/probe.py: ``Probes``), never looked up by name.

Each case imports its plugin when it builds one: a gateway loads only the services its config
uses (httpx, aiomqtt and the plugins weigh several MiB of RSS on a Pi). Plugin modules import
their transport libraries at module level; only this registry defers them.
"""

from __future__ import annotations

from typing import assert_never

from gateway.config import UplinkConfig
from gateway.uplinks.base import Uplink
from gateway.uplinks.datacooee.config import DatacooeeConfig
from gateway.uplinks.energydata.config import EnergydataConfig
from gateway.uplinks.nilu.config import NiluConfig
from gateway.uplinks.qatium.config import QatiumConfig
from gateway.uplinks.vanda.config import VandaConfig


def build_uplink(cfg: UplinkConfig) -> Uplink:
    """The plugin for ``cfg``, with the secrets its config references."""
    match cfg:
        case QatiumConfig():
            from gateway.uplinks.qatium.uplink import QatiumUplink

            return QatiumUplink(cfg, cfg.token.secret())
        case NiluConfig():
            from gateway.uplinks.nilu.uplink import NiluUplink

            return NiluUplink(cfg, cfg.token.secret())
        case EnergydataConfig():
            from gateway.uplinks.energydata.uplink import EnergydataUplink

            backfill = cfg.backfill
            imp = backfill.token.secret() if backfill is not None and backfill.token else None
            return EnergydataUplink(cfg, cfg.token.secret(), imp)
        case DatacooeeConfig():
            from gateway.uplinks.datacooee.uplink import DatacooeeUplink

            return DatacooeeUplink(cfg, cfg.api_key.secret())
        case VandaConfig():
            from gateway.uplinks.vanda.uplink import VandaUplink

            return VandaUplink(cfg, cfg.client_id.secret(), cfg.client_secret.secret())
        case _:
            assert_never(cfg)
