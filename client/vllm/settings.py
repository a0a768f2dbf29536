"""The connector's settings, read from ``kv_connector_extra_config``.

Every field is optional::

    {"store": "redis://10.0.0.5:6379/0",    # any store URL (default: the embedded local store)
     "server": "cache.internal:50051",      # or a kvcodec cache server (wins over "store")
     "token": "...", "token_file": "...",   # bearer token for the server
     "tls": true, "tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem", "server_name": "...",
     "level": "balanced",                   # level new chunks are saved at
     "load_levels": ["balanced", "high"],   # levels looked up (default: [level])
     "quality_floor": "balanced",           # lowest level the controller may load (default: level)
     "controller": true,                    # let the controller choose load vs recompute
     "model_name": "...", "model_fingerprint": "...", "tokenizer": "...",  # key identity overrides
     "save": true, "load": true,
     "save_queue_chunks": 64,               # encode queue bound; beyond it chunks are dropped
     "lookup_timeout_s": 2.0, "load_timeout_s": 10.0,
     "prefill_tokens_per_s": 0, "bandwidth_bytes_per_s": 0}   # starting estimates (0 = measure)

``lookup_timeout_s`` bounds how long a request waits for its lookup (then it is a
miss); ``load_timeout_s`` is the deadline of each call to the cache server (a store's
own timeouts come from its URL, e.g. ``redis://…?timeout_s=1&max_attempts=2``).
Chunks are always 256 tokens and keys are chained prefix keys, as ``kvcodec store
put`` and the Python client derive them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvcodec.client.vllm.errors import ConnectorConfigError

__all__ = ["ConnectorSettings", "CHUNK_TOKENS"]

CHUNK_TOKENS = 256
FLOORS = ("lossless", "high", "balanced", "compact")


def _levels() -> tuple[str, ...]:
    from kvcodec.codec import LEVELS

    return tuple(LEVELS)


@dataclass(frozen=True)
class ConnectorSettings:
    """Validated connector settings (see the module docstring for each field)."""

    store: str = ""
    server: str = ""
    token: str = ""
    token_file: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    server_name: str = ""
    level: str = "balanced"
    load_levels: tuple[str, ...] = ()
    quality_floor: str = ""
    controller: bool = True
    model_name: str = ""
    model_fingerprint: str = ""
    tokenizer: str = ""
    save: bool = True
    load: bool = True
    save_queue_chunks: int = 64
    lookup_timeout_s: float = 2.0
    load_timeout_s: float = 10.0
    prefill_tokens_per_s: float = 0.0
    bandwidth_bytes_per_s: float = 0.0

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ConnectorSettings:
        """Parse and check ``kv_connector_extra_config``.

        Args:
            extra: the mapping vLLM passes (None = all defaults).

        Returns:
            The settings.

        Raises:
            ConnectorConfigError: an unknown field or a value of the wrong kind,
                naming ``kv_connector_extra_config.<field>`` and the value.
        """
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConnectorConfigError(
                f"kv_connector_extra_config: unknown field {unknown[0]!r} "
                f"(known: {', '.join(sorted(known))})")
        values = {name: _coerce(name, known[name].default, value) for name, value in extra.items()}
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        levels = _levels()
        if self.level not in levels:
            _bad("level", self.level, f"not one of {', '.join(levels)}")
        for lv in self.load_levels:
            if lv not in levels:
                _bad("load_levels", lv, f"not one of {', '.join(levels)}")
        if self.quality_floor and self.quality_floor not in FLOORS:
            _bad("quality_floor", self.quality_floor, f"not one of {', '.join(FLOORS)}")
        if self.save_queue_chunks < 1:
            _bad("save_queue_chunks", self.save_queue_chunks, "must be >= 1")
        for name in ("lookup_timeout_s", "load_timeout_s"):
            if not getattr(self, name) > 0:
                _bad(name, getattr(self, name), "must be > 0")
        for name in ("prefill_tokens_per_s", "bandwidth_bytes_per_s"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        if self.server and ":" not in self.server:
            _bad("server", self.server, "expected HOST:PORT")
        for name in ("token_file", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().is_file():
                _bad(name, path, "no such file")
        if bool(self.tls_cert) != bool(self.tls_key):
            _bad("tls_cert", self.tls_cert, "tls_cert and tls_key go together")

    @property
    def levels_to_load(self) -> tuple[str, ...]:
        """Levels the scheduler looks up, the save level first."""
        return tuple(dict.fromkeys((self.level, *self.load_levels)))

    @property
    def floor(self) -> str:
        """The controller's quality floor (the save level unless set)."""
        return self.quality_floor or self.level

    def bearer_token(self) -> str:
        """The token (``token``, else the first line of ``token_file``)."""
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).expanduser().read_text(encoding="utf-8").strip()
        return ""

    def read_pem(self, name: str) -> bytes | None:
        """Contents of the PEM file named by field ``name`` (None if unset)."""
        path = getattr(self, name)
        return Path(path).expanduser().read_bytes() if path else None


def _bad(name: str, value: Any, why: str) -> None:
    raise ConnectorConfigError(f"kv_connector_extra_config.{name}: {value!r} {why}")


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Check one value against its default's type (JSON gives ints for floats, lists for tuples)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            _bad(name, value, "must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            _bad(name, value, "must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _bad(name, value, "must be a number")
        return float(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            _bad(name, value, "must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        _bad(name, value, "must be a string")
    return value
