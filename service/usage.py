"""Per-tenant usage counters and the Stats reply, scoped to who asks.

A tenant's Stats shows only what that tenant did on this replica since it
started (calls, chunk hits and misses, bytes sent and received, chunks put),
this tenant's clients' bandwidth estimates, the server's decode calibration and
whether the store is healthy. Store-wide figures — entry count, bytes, the
backend's own counters and health detail, every tenant's usage and every
client's bandwidth — go only to a caller that presented an admin token
(``[auth] admin_tokens``), with auth on or off.

Example reply for tenant ``team-a``::

    {"scope": "tenant", "tenant": "team-a",
     "server": {"calls": 12, "chunk_hits": 30, "chunk_misses": 2, "bytes_sent": 31457280,
                "bytes_received": 8388608, "chunks_put": 8},
     "store": {"backend": "redis"}, "store_health": {"ok": true, "status": "ok"},
     "decode_elements_per_s": {...}, "bandwidth_bytes_per_s": {"py-3f…": 1.2e9}}
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Any

FIELDS = ("calls", "chunk_hits", "chunk_misses", "bytes_sent", "bytes_received", "chunks_put")
CLIENT_KEY_SEP = "\x1f"  # tenant names hold no control characters: the pair splits back


def bandwidth_key(tenant: str, client: str) -> str:
    """The bandwidth estimator's key of ``client`` within ``tenant`` (estimates never cross
    tenants: one tenant naming another's client id neither reads nor moves its estimate)."""
    return f"{tenant}{CLIENT_KEY_SEP}{client}"


def split_bandwidth_key(key: str) -> tuple[str, str]:
    """``(tenant, client)`` of a :func:`bandwidth_key`."""
    tenant, _, client = key.partition(CLIENT_KEY_SEP)
    return tenant, client


class TenantUsage:
    """What each tenant did on this replica, counted per call (thread-safe).

    Tenants are the configured ones plus the open namespace (""), so the table
    stays as small as the token map.
    """

    def __init__(self) -> None:
        self._counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._lock = threading.Lock()

    def record(self, tenant: str, method: str, ok: bool, info: dict[str, Any]) -> None:
        """Fold one finished call into ``tenant``'s counters.

        Args:
            tenant: the caller's tenant ("" = open namespace).
            method: the RPC's name.
            ok: whether it ended OK (a Put counts its chunks only then).
            info: what the handler noted (``hits``, ``misses``, ``bytes``, ``chunks``).
        """
        with self._lock:
            counts = self._counts[tenant]
            counts["calls"] += 1
            if method == "Get":
                counts["chunk_hits"] += info.get("hits", 0)
                counts["chunk_misses"] += info.get("misses", 0)
                counts["bytes_sent"] += info.get("bytes", 0)
            elif method == "Put" and ok:
                counts["chunks_put"] += info.get("chunks", 0)
                counts["bytes_received"] += info.get("bytes", 0)

    def of(self, tenant: str) -> dict[str, int]:
        """``tenant``'s counters (zeros if it made no call)."""
        with self._lock:
            counts = dict(self._counts.get(tenant, {}))
        return {name: counts.get(name, 0) for name in FIELDS}

    def every(self) -> dict[str, dict[str, int]]:
        """Every tenant's counters (admin Stats); the open namespace is listed as ""."""
        with self._lock:
            names = list(self._counts)
        return {name: self.of(name) for name in names}


def stats_body(servicer: Any, tenant: str, admin: bool) -> dict[str, Any]:
    """The Stats reply for a caller of ``tenant`` (store-wide when ``admin``).

    Args:
        servicer: the :class:`~kvcodec.service.servicer.KVCacheServicer`.
        tenant: the caller's tenant ("" = open namespace).
        admin: the caller presented an admin token.
    """
    bandwidth = servicer.bandwidth.snapshot()
    body: dict[str, Any] = {"decode_elements_per_s": dict(servicer.decode_speeds)}
    if admin:
        m = servicer.metrics
        body.update(
            scope="store",
            store=servicer.store.stats(),
            store_health=servicer.store.health(),
            server={name: m.value(f"kvcodec_{name}_total") for name in
                    ("chunk_hits", "chunk_misses", "bytes_sent", "bytes_received")},
            tenants=servicer.usage.every(),
            bandwidth_bytes_per_s={"/".join(split_bandwidth_key(k)): v for k, v in bandwidth.items()},
        )
        return body
    health = servicer.store.health()
    body.update(
        scope="tenant",
        tenant=tenant or None,
        store={"backend": getattr(servicer.store, "scheme", "unknown")},
        store_health={"ok": bool(health.get("ok")), "status": health.get("status", "unknown")},
        server=servicer.usage.of(tenant),
        bandwidth_bytes_per_s={split_bandwidth_key(k)[1]: v for k, v in bandwidth.items()
                               if split_bandwidth_key(k)[0] == tenant},
    )
    return body
