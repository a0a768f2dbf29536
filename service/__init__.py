"""kvcodec.service: the gRPC cache-server daemon and its load/recompute controller.

Modules, in the order a call flows through them::

    cli.py        ``kvcodec serve`` flags -> config.py (defaults < TOML < env < flags)
    server.py     CacheServer: grpc server, TLS, health, reflection, SIGTERM drain
    auth.py       bearer token -> caller (tenant namespace, salt, admin) interceptor
    servicer.py   the KVCache handlers (Lookup/Get/Put/Delete/Stats/Plan)
    putstream.py  assembling and verifying client-streamed chunks
    naming.py     contexts -> chunk keys; namespaces (tenant, salt); request limits
    usage.py      per-tenant usage counters; the tenant-scoped Stats reply
    controller.py LOAD_KV / LOAD_TEXT / BLEND decisions from measured speeds
    metrics.py    Prometheus metrics, JSON logs

Errors: :mod:`kvcodec.service.errors` (root ``ServiceError``).
"""
