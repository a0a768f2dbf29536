"""Server configuration: defaults < TOML file < environment < command-line flags.

Every field of :class:`ServerConfig` can be set in a TOML file (top-level keys,
or an ``[auth.tokens]`` table mapping bearer tokens to tenants), by an
environment variable ``KVCODEC_<FIELD>`` (``KVCODEC_LISTEN``,
``KVCODEC_STORE``, ``KVCODEC_METRICS_PORT`` …) or by a ``kvcodec serve`` flag.
``KVCODEC_CONFIG`` names the file when ``--config`` is not given.

Example ``kvcodec.toml``::

    listen = "0.0.0.0:50051"
    store = "redis://10.0.0.5:6379/0"
    metrics_port = 9464
    max_concurrent_rpcs = 128
    tls_cert = "/etc/kvcodec/tls.crt"
    tls_key = "/etc/kvcodec/tls.key"

    [auth.tokens]
    "s3cr3t-token-of-team-a" = "team-a"
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcodec.service.errors import ConfigError

MiB = 1 << 20
ENV_PREFIX = "KVCODEC_"


@dataclass
class ServerConfig:
    """Everything ``kvcodec serve`` can be told.

    Attributes:
        listen: HOST:PORT to bind (port 0 picks a free one).
        store: store URL (kvcodec.store.open_store); "" = the store package's default.
        metrics_port: Prometheus /metrics port; 0 = off.
        metrics_host: address the metrics endpoint binds.
        max_workers: RPC handler threads.
        max_concurrent_rpcs: calls beyond this get RESOURCE_EXHAUSTED (load shedding).
        max_message_bytes: largest gRPC message accepted or sent.
        max_chunk_bytes: largest single chunk a Put may declare.
        max_put_bytes: most bytes one Put call may buffer before committing.
        piece_bytes: size of Get stream pieces.
        grace_s: seconds in-flight calls get to finish on SIGTERM.
        tls_cert / tls_key: PEM files; both set = TLS on.
        tls_client_ca: PEM CA bundle; set = clients must present a certificate.
        auth_tokens: bearer token -> tenant; non-empty = auth on.
        auth_tokens_file: file of "TOKEN TENANT" lines merged into auth_tokens.
        log_level: debug, info, warning, error.
        log_format: "json" (one object per line) or "text".
        default_bandwidth_bytes_per_s: throughput assumed for a client never measured.
        default_prefill_tokens_per_s: prefill speed assumed when the client reports none.
        ewma_alpha: weight of a new bandwidth sample in the per-client EWMA.
        calibrate: measure decode speed per level at start (background thread).
        health_interval_s: how often the store's health is checked; a failing store turns
            the gRPC health status NOT_SERVING until it recovers.
        verify_processes: verify uploaded streams in this many worker processes (0 = in
            the RPC thread). The full check decodes every substream and holds the GIL, so
            Put throughput scales with cores only through processes.
    """

    listen: str = "127.0.0.1:50051"
    store: str = ""
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    max_workers: int = 16
    max_concurrent_rpcs: int = 64
    max_message_bytes: int = 8 * MiB
    max_chunk_bytes: int = 256 * MiB
    max_put_bytes: int = 1024 * MiB
    piece_bytes: int = 1 * MiB
    grace_s: float = 10.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_tokens: dict[str, str] = field(default_factory=dict)
    auth_tokens_file: str = ""
    log_level: str = "info"
    log_format: str = "json"
    default_bandwidth_bytes_per_s: float = 125e6
    default_prefill_tokens_per_s: float = 500.0
    ewma_alpha: float = 0.3
    calibrate: bool = True
    verify_processes: int = 0
    health_interval_s: float = 5.0

    def validate(self) -> ServerConfig:
        """Check ranges and cross-field rules; returns self.

        Raises:
            ConfigError: naming the field and the value.
        """
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen: {self.listen!r} is not HOST:PORT")
        for name in ("max_workers", "max_concurrent_rpcs", "max_message_bytes",
                     "max_chunk_bytes", "max_put_bytes", "piece_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.piece_bytes > self.max_message_bytes - 64 * 1024:
            raise ConfigError(
                f"piece_bytes: {self.piece_bytes} must leave 64 KiB headroom below "
                f"max_message_bytes {self.max_message_bytes}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: {self.metrics_port} outside 0..65535")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert/tls_key: set both or neither")
        if self.health_interval_s <= 0:
            raise ConfigError(f"health_interval_s: {self.health_interval_s} must be > 0")
        if not 0 < self.ewma_alpha <= 1:
            raise ConfigError(f"ewma_alpha: {self.ewma_alpha} outside (0, 1]")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format: {self.log_format!r} not 'json' or 'text'")
        if self.auth_tokens_file:
            self.auth_tokens = {**read_tokens_file(self.auth_tokens_file), **self.auth_tokens}
        return self


def read_tokens_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a file of ``TOKEN TENANT`` lines (``#`` comments allowed).

    Raises:
        ConfigError: unreadable file or a malformed line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"auth_tokens_file: cannot read {path}: {exc.strerror}") from None
    tokens: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"auth_tokens_file: {path}:{lineno}: expected 'TOKEN TENANT'")
        tokens[parts[0]] = parts[1]
    return tokens


def _coerce(name: str, value: Any, label: str) -> Any:
    """Convert ``value`` to the type of field ``name``; ``label`` names its source in errors."""
    default = getattr(ServerConfig(), name)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ValueError(value)
            return {str(k): str(v) for k, v in value.items()}
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label}: {value!r} is not a valid {type(default).__name__}") from None


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file into ServerConfig field values.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or bad value.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    out: dict[str, Any] = {}
    auth = data.pop("auth", None)
    if auth is not None:
        if not isinstance(auth, Mapping) or set(auth) - {"tokens", "tokens_file"}:
            raise ConfigError(f"config: {path}: [auth] takes only 'tokens' and 'tokens_file'")
        if "tokens" in auth:
            out["auth_tokens"] = _coerce("auth_tokens", auth["tokens"], f"{path}: auth.tokens")
        if "tokens_file" in auth:
            out["auth_tokens_file"] = str(auth["tokens_file"])
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"config: {path}: unknown key {key!r}")
        out[key] = _coerce(key, value, f"{path}: {key}")
    return out


def load_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """ServerConfig field values from ``KVCODEC_<FIELD>`` environment variables."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        if f.name == "auth_tokens":
            continue
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            out[f.name] = _coerce(f.name, raw, f"${ENV_PREFIX}{f.name.upper()}")
    return out


def build_config(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Merge defaults, the TOML file, the environment and explicit overrides.

    Args:
        config_file: TOML path; None = ``$KVCODEC_CONFIG`` if set.
        overrides: values from flags (None values are ignored).
        environ: the environment (default ``os.environ``).

    Returns:
        A validated :class:`ServerConfig`.

    Raises:
        ConfigError: any unusable value, naming its source.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(load_file(path))
    values.update(load_env(environ))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, "--" + key.replace("_", "-"))
    return ServerConfig(**values).validate()
