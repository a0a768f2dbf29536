"""Prometheus metrics and structured (JSON) logs of the cache server.

Each server owns a :class:`ServerMetrics` with its own registry (several servers
in one process, as in tests, do not collide). ``kvcodec serve --metrics-port
9464`` exposes it at ``http://HOST:9464/metrics``. Names::

    kvcodec_rpc_total{method,code}            calls by final status
    kvcodec_rpc_seconds{method}               latency histogram
    kvcodec_rpc_in_flight                     calls being handled
    kvcodec_rpc_cancelled_total{method}       calls abandoned on cancel / deadline
    kvcodec_chunk_hits_total / _misses_total  Get outcomes per chunk
    kvcodec_bytes_sent_total / _received_total  chunk payload bytes
    kvcodec_chunks_stored_total{created}      Put outcomes per chunk
    kvcodec_decisions_total{action}           controller decisions by type
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """The server's counters, gauges and histograms in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_total = Counter("kvcodec_rpc_total", "RPCs by method and status code",
                                 ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("kvcodec_rpc_seconds", "RPC latency", ["method"],
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("kvcodec_rpc_in_flight", "RPCs being handled", registry=r)
        self.cancelled = Counter("kvcodec_rpc_cancelled_total",
                                 "RPCs abandoned on cancellation or deadline", ["method"], registry=r)
        self.hits = Counter("kvcodec_chunk_hits_total", "chunks found by Get", registry=r)
        self.misses = Counter("kvcodec_chunk_misses_total", "chunks missing on Get", registry=r)
        self.bytes_sent = Counter("kvcodec_bytes_sent_total", "chunk bytes streamed by Get", registry=r)
        self.bytes_received = Counter("kvcodec_bytes_received_total", "chunk bytes received by Put",
                                      registry=r)
        self.stored = Counter("kvcodec_chunks_stored_total", "chunks acknowledged by Put",
                              ["created"], registry=r)
        self.decisions = Counter("kvcodec_decisions_total", "controller decisions", ["action"],
                                 registry=r)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (tests and Stats use it); 0 when absent."""
        v = self.registry.get_sample_value(name, labels or None)
        return float(v or 0.0)

    def start_http(self, port: int, host: str = "127.0.0.1") -> Any:
        """Serve /metrics on ``host:port``; returns the (server, thread) pair."""
        from prometheus_client import start_http_server

        return start_http_server(port, addr=host, registry=self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra=`` fields."""

    _SKIP = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._SKIP and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Send ``kvcodec`` logs to stderr as JSON lines (or plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("kvcodec")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
