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

    max_chunks_per_request = 4096
    max_context_tokens = 524288

    [auth]
    admin_tokens = ["s3cr3t-token-of-the-operator"]   # store-wide Stats only

    [auth.tokens]
    "s3cr3t-token-of-team-a" = "team-a"

Tenant names must be non-empty, at most 128 UTF-8 bytes, in Unicode NFC, printable and
without whitespace, and no two may differ only by case or compatibility form
(:func:`kvcodec.service.naming.tenant_name_problem`); tokens must be printable ASCII
without whitespace (they travel in an HTTP/2 header). Anything else is a
:class:`ConfigError` at start, whose message names the tenant, never the token.
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
SECRET_FIELDS = {"auth_tokens": "a table of token = tenant strings",
                 "auth_admin_tokens": "a list of token strings"}


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
        auth_admin_tokens: bearer tokens that may call Stats for store-wide figures (and
            nothing else); every other caller sees its own tenant's figures only. TOML
            ``[auth] admin_tokens = [...]``; ``$KVCODEC_AUTH_ADMIN_TOKENS`` comma-separated.
        max_context_tokens: most token ids one request's context may carry; more ->
            RESOURCE_EXHAUSTED before any key is derived.
        max_chunks_per_request: most chunks one request may name: a context's chunks (tokens
            / chunk_tokens), Lookup's or Delete's keys, Get's refs. Lookup and Plan probe each
            chunk at up to 4 levels (Plan: in 2 key modes), so their store reads are bounded by
            this times 4 (8).
        min_piece_bytes: smallest Get piece a client may ask for (``piece_bytes``); smaller ->
            INVALID_ARGUMENT (one-byte pieces would turn a chunk into a million messages).
        max_call_s: longest a Lookup, Delete, Stats or Plan call works, whatever deadline the
            caller set or left out (0 = no cap); past it the work stops and the call ends
            DEADLINE_EXCEEDED.
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
    auth_admin_tokens: list[str] = field(default_factory=list)
    log_level: str = "info"
    log_format: str = "json"
    default_bandwidth_bytes_per_s: float = 125e6
    default_prefill_tokens_per_s: float = 500.0
    ewma_alpha: float = 0.3
    calibrate: bool = True
    verify_processes: int = 0
    health_interval_s: float = 5.0
    max_context_tokens: int = 1 << 19
    max_chunks_per_request: int = 4096
    min_piece_bytes: int = 64 * 1024
    max_call_s: float = 60.0

    def validate(self) -> ServerConfig:
        """Check ranges and cross-field rules; returns self.

        Raises:
            ConfigError: naming the field and the value.
        """
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen: {self.listen!r} is not HOST:PORT")
        for name in ("max_workers", "max_concurrent_rpcs", "max_message_bytes",
                     "max_chunk_bytes", "max_put_bytes", "piece_bytes", "max_context_tokens",
                     "max_chunks_per_request", "min_piece_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.min_piece_bytes > self.piece_bytes:
            raise ConfigError(f"min_piece_bytes: {self.min_piece_bytes} > piece_bytes "
                              f"{self.piece_bytes}")
        if not self.max_call_s >= 0:
            raise ConfigError(f"max_call_s: {self.max_call_s} must be >= 0 (0 = no cap)")
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
            self.auth_tokens = merge_tokens(read_tokens_file(self.auth_tokens_file),
                                            self.auth_tokens)
        check_tokens(self.auth_tokens, self.auth_admin_tokens)
        return self


def merge_tokens(from_file: Mapping[str, str], from_config: Mapping[str, str]) -> dict[str, str]:
    """Tokens of the tokens file and of ``[auth.tokens]`` together.

    Raises:
        ConfigError: one token given to two different tenants.
    """
    for token, tenant in from_config.items():
        if token in from_file and from_file[token] != tenant:
            raise ConfigError(f"auth.tokens: one token is given to tenant {tenant!r} and, in "
                              f"auth_tokens_file, to {from_file[token]!r}")
    return {**from_file, **from_config}


def _token_problem(token: object) -> str | None:
    if not isinstance(token, str) or not token:
        return "is empty"
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        return "has whitespace, control or non-ASCII characters"
    return None


def check_tokens(tokens: Mapping[str, str], admin_tokens: list[str]) -> None:
    """Refuse unusable tokens and tenant names (messages name tenants, never tokens).

    Raises:
        ConfigError: an empty or unprintable token, a bad or ambiguous tenant name, or a
            token that is both a tenant's and an admin token.
    """
    from kvcodec.service.naming import ambiguous_tenants, tenant_name_problem

    for token, tenant in tokens.items():
        problem = tenant_name_problem(tenant)
        if problem is not None:
            raise ConfigError(f"auth.tokens: tenant {problem}")
        problem = _token_problem(token)
        if problem is not None:
            raise ConfigError(f"auth.tokens: the token of tenant {tenant!r} {problem}")
    pair = ambiguous_tenants(tokens.values())
    if pair is not None:
        raise ConfigError(f"auth.tokens: tenants {pair[0]!r} and {pair[1]!r} differ only by case "
                          "or Unicode form; give them distinct names")
    for i, token in enumerate(admin_tokens):
        problem = _token_problem(token)
        if problem is not None:
            raise ConfigError(f"auth.admin_tokens[{i}]: the token {problem}")
        if token in tokens:
            raise ConfigError(f"auth.admin_tokens[{i}]: the token is also the token of tenant "
                              f"{tokens[token]!r}; an admin token must be its own")


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
        if parts[0] in tokens and tokens[parts[0]] != parts[1]:
            raise ConfigError(f"auth_tokens_file: {path}:{lineno}: the token is already given "
                              f"to tenant {tokens[parts[0]]!r}")
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
            if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
                raise ValueError(value)
            return {str(k): v for k, v in value.items()}
        if isinstance(default, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(value)
            return list(value)
        return type(default)(value)
    except (TypeError, ValueError):
        if name in SECRET_FIELDS:  # never echo tokens
            raise ConfigError(f"{label}: expected {SECRET_FIELDS[name]}") from None
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
        if not isinstance(auth, Mapping) or set(auth) - {"tokens", "tokens_file", "admin_tokens"}:
            raise ConfigError(f"config: {path}: [auth] takes only 'tokens', 'tokens_file' and "
                              "'admin_tokens'")
        if "tokens" in auth:
            out["auth_tokens"] = _coerce("auth_tokens", auth["tokens"], f"{path}: auth.tokens")
        if "admin_tokens" in auth:
            out["auth_admin_tokens"] = _coerce("auth_admin_tokens", auth["admin_tokens"],
                                               f"{path}: auth.admin_tokens")
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
