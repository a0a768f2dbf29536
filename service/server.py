"""The cache-server daemon: gRPC server lifecycle around :class:`KVCacheServicer`.

Why the synchronous gRPC server with a thread pool, not ``grpc.aio``: every
store backend (local files, redis-py, boto3) is a blocking library, and the
codec's CPU work (full stream verification on Put, encoding raw KV) holds the
GIL in pure-Python/numba/constriction code. Under ``grpc.aio`` each of those
calls would have to hop to a thread anyway (``asyncio.to_thread``) and the
event loop would only add a second scheduler. The sync server runs each call
on a worker of a bounded pool (``max_workers``), gives load shedding for free
(``maximum_concurrent_rpcs`` answers RESOURCE_EXHAUSTED beyond the limit), and
streams Get responses from a generator that gRPC's flow control paces.
Byte-moving (protobuf, HTTP/2) happens in gRPC's C core outside the GIL.

Lifecycle: :meth:`CacheServer.start` binds (TLS optional), marks the health
service SERVING, starts the Prometheus endpoint and a background decode
calibration; :meth:`CacheServer.stop` marks health NOT_SERVING, refuses new
calls and drains in-flight ones for ``grace_s`` seconds. :func:`serve` wires
SIGTERM/SIGINT to that graceful stop.

Example::

    server = CacheServer(build_config(overrides={"listen": "127.0.0.1:0"}))
    server.start(); print(server.address); ...; server.stop()
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvcodec.proto import SERVICE_NAME
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.proto import kvcodec_pb2_grpc as pb_grpc
from kvcodec.service.auth import AuthInterceptor, TokenAuthenticator
from kvcodec.service.config import ServerConfig
from kvcodec.service.errors import ConfigError
from kvcodec.service.metrics import ServerMetrics, configure_logging
from kvcodec.service.servicer import KVCacheServicer

log = logging.getLogger("kvcodec.service")



def open_server_store(url: str, **options: Any) -> Any:
    """Open the server's store (tenant ""); "" = the store package's default local store.

    Reads check every CRC without decoding (``verify(full=False)``): the store's
    envelope SHA-256 already proves the bytes are the ones fully verified on Put.

    Raises:
        kvcodec.store.errors.StoreError: bad URL or unreachable backend.
    """
    from kvcodec.codec import verify
    from kvcodec.store import open_store

    options.setdefault("verifier", functools.partial(verify, full=False))
    return open_store(url or None, **options)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    try:
        cert = Path(config.tls_cert).read_bytes()
        key = Path(config.tls_key).read_bytes()
        ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _full_verify(blob: bytes) -> Any:
    from kvcodec.codec import verify

    return verify(blob)


def _verify_worker_init() -> None:
    """One torch thread per worker (the pool is the parallelism); JIT-compile the decoders now."""
    import torch

    from kvcodec.codec import encode, verify

    torch.set_num_threads(1)
    kv = torch.zeros(1, 1, 4, 8, dtype=torch.float16)
    for level in ("lossless", "high"):
        verify(encode(kv, kv, level=level))


def _verify_pool(processes: int) -> Any:
    """A spawn-context process pool for stream verification (fork is unsafe under gRPC);
    workers are started and warmed up here, not on the first Put."""
    if processes <= 0:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_verify_worker_init)
    wait([pool.submit(int) for _ in range(processes)])
    return pool


class CacheServer:
    """One cache-server replica.

    Args:
        config: a validated :class:`ServerConfig`.
        store: an open chunk store; default: ``open_server_store(config.store)``.

    Raises:
        ConfigError: unusable TLS files or listen address.
    """

    def __init__(self, config: ServerConfig, store: Any = None) -> None:
        self.config = config
        self.store = store if store is not None else open_server_store(config.store)
        self.metrics = ServerMetrics()
        self.authenticator = TokenAuthenticator(config.auth_tokens, config.auth_admin_tokens)
        self.servicer = KVCacheServicer(self.store, config, self.metrics, self.authenticator)
        self.health = health.HealthServicer()
        self._verify_pool = _verify_pool(config.verify_processes)
        if self._verify_pool is not None:
            pool = self._verify_pool
            self.servicer.verifier = lambda blob: pool.submit(_full_verify, blob).result()
        self._stopped = threading.Event()
        self._metrics_http: Any = None
        limit = config.max_message_bytes
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="kvcodec-rpc"),
            interceptors=[AuthInterceptor(self.authenticator)] if self.authenticator.intercepts
            else None,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        pb_grpc.add_KVCacheServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["KVCache"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        creds = _credentials(config)
        try:
            if creds is None:
                self.port = self.server.add_insecure_port(config.listen)
            else:
                self.port = self.server.add_secure_port(config.listen, creds)
        except RuntimeError as exc:
            raise ConfigError(f"listen: cannot bind {config.listen}: {exc}") from None
        if self.port == 0:
            raise ConfigError(f"listen: cannot bind {config.listen}")

    @property
    def address(self) -> str:
        """HOST:PORT clients should dial (the bound port, also when 0 was asked)."""
        host = self.config.listen.rpartition(":")[0]
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
        return f"{host}:{self.port}"

    def start(self) -> CacheServer:
        """Start serving; returns self."""
        self.server.start()
        self._set_health(True)
        if self.config.metrics_port:
            self._metrics_http = self.metrics.start_http(self.config.metrics_port,
                                                         self.config.metrics_host)
        threading.Thread(target=self._watch_store, name="kvcodec-health", daemon=True).start()
        if self.config.calibrate:
            threading.Thread(target=self._calibrate, name="kvcodec-calibrate", daemon=True).start()
        log.info("serving", extra={"address": self.address, "tls": bool(self.config.tls_cert),
                                   "auth": self.authenticator.enabled,
                                   "store": getattr(self.store, "scheme", "unknown")})
        return self

    def stop(self, grace: float | None = None) -> None:
        """Health -> NOT_SERVING, refuse new calls, drain in-flight ones, close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace})
        self.server.stop(grace).wait()
        if self._metrics_http is not None:
            server, _thread = self._metrics_http
            server.shutdown()
        self.store.close()
        if self._verify_pool is not None:
            self._verify_pool.shutdown(cancel_futures=True)
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (True) or ``timeout`` passes (False)."""
        return self._stopped.wait(timeout)

    def _set_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _watch_store(self) -> None:
        healthy = True
        while not self._stopped.wait(self.config.health_interval_s):
            ok = bool(self.store.health().get("ok", False))
            if ok != healthy and not self._stopped.is_set():
                log.warning("store health changed", extra={"ok": ok})
                self._set_health(ok)
                healthy = ok

    def _calibrate(self) -> None:
        from kvcodec.service.controller import calibrate_decode

        try:
            self.servicer.decode_speeds = dict(calibrate_decode())  # one atomic swap
            log.info("calibrated", extra={"decode_elements_per_s": self.servicer.decode_speeds})
        except Exception as exc:  # calibration is an optimisation; defaults remain
            log.warning("decode calibration failed: %s", exc)


def serve(config: ServerConfig) -> int:
    """Run a replica until SIGTERM/SIGINT, then stop gracefully. Returns the exit code."""
    configure_logging(config.log_level, config.log_format)
    server = CacheServer(config).start()
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal", extra={"signal": signal.Signals(signum).name})
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"kvcodec serve: listening on {server.address}", flush=True)
        done.wait()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
