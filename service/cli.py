"""``kvcodec serve``: run the gRPC cache server.

Settings come from, in increasing precedence: defaults, a TOML file
(``--config`` or ``$KVCODEC_CONFIG``), ``KVCODEC_<FIELD>`` environment
variables, and these flags. See :mod:`kvcodec.service.config`.
"""

from __future__ import annotations

import argparse
from typing import Any

_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--listen", "listen", str, "HOST:PORT to bind (default 127.0.0.1:50051; port 0 = any free)"),
    ("--store", "store", str, "store URL: /path, file://, memory://, redis://, redis+cluster://, "
                              "s3://bucket/prefix (default: the embedded local store)"),
    ("--metrics-port", "metrics_port", int, "serve Prometheus /metrics on this port (0 = off)"),
    ("--metrics-host", "metrics_host", str, "address of the metrics endpoint (default 127.0.0.1)"),
    ("--max-workers", "max_workers", int, "RPC handler threads (default 16)"),
    ("--max-concurrent-rpcs", "max_concurrent_rpcs", int,
     "calls beyond this get RESOURCE_EXHAUSTED (default 64)"),
    ("--max-message-bytes", "max_message_bytes", int, "largest gRPC message (default 8 MiB)"),
    ("--max-chunk-bytes", "max_chunk_bytes", int, "largest chunk a Put may send (default 256 MiB)"),
    ("--max-context-tokens", "max_context_tokens", int,
     "most token ids in one request's context (default 524288)"),
    ("--max-chunks-per-request", "max_chunks_per_request", int,
     "most chunks or keys one request may name (default 4096)"),
    ("--min-piece-bytes", "min_piece_bytes", int, "smallest Get piece a client may ask for "
                                                  "(default 64 KiB)"),
    ("--max-call-s", "max_call_s", float, "longest a Lookup/Delete/Stats/Plan call works, "
                                          "whatever its deadline (default 60; 0 = no cap)"),
    ("--verify-processes", "verify_processes", int,
     "verify uploads in N worker processes (default 0: in the RPC thread)"),
    ("--grace", "grace_s", float, "seconds to drain calls on SIGTERM (default 10)"),
    ("--tls-cert", "tls_cert", str, "PEM certificate (with --tls-key: TLS on)"),
    ("--tls-key", "tls_key", str, "PEM private key"),
    ("--tls-client-ca", "tls_client_ca", str, "PEM CA: require client certificates"),
    ("--auth-tokens-file", "auth_tokens_file", str, "file of 'TOKEN TENANT' lines: bearer auth on"),
    ("--log-level", "log_level", str, "debug, info, warning, error (default info)"),
    ("--log-format", "log_format", str, "json (default) or text"),
)


def register(subparsers: Any) -> None:
    """Add ``kvcodec serve``."""
    p = subparsers.add_parser(
        "serve",
        help="run the gRPC cache server",
        description=(
            "Serve kvcodec.v1.KVCache (plus grpc.health.v1 and reflection) over a chunk store. "
            "With no arguments: 127.0.0.1:50051 on the embedded local store. Stops gracefully "
            "on SIGTERM (health NOT_SERVING, in-flight calls drained)."
        ),
        epilog="Environment: KVCODEC_CONFIG, KVCODEC_LISTEN, KVCODEC_STORE, KVCODEC_METRICS_PORT, "
               "… (any field as KVCODEC_<FIELD>).",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    for flag, dest, kind, text in _FLAGS:
        p.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    p.add_argument("--no-calibrate", dest="calibrate", action="store_const", const=False,
                   default=None, help="skip the start-up decode-speed calibration")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from kvcodec.cli import UsageError
    from kvcodec.service.config import build_config
    from kvcodec.service.errors import ConfigError

    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS}
    overrides["calibrate"] = args.calibrate
    try:
        config = build_config(args.config, overrides)
        from kvcodec.service.server import serve

        return serve(config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
