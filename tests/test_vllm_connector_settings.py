"""The connector's kv_connector_extra_config: defaults, and bad values refused by field and value."""

from __future__ import annotations

import pytest

from kvcodec.client.vllm.errors import ConnectorConfigError
from kvcodec.client.vllm.settings import ConnectorSettings


def test_defaults_and_levels() -> None:
    s = ConnectorSettings.from_extra_config(None)
    assert (s.store, s.server, s.level, s.floor, s.levels_to_load) == ("", "", "balanced", "balanced",
                                                                       ("balanced",))
    s = ConnectorSettings.from_extra_config({"level": "high", "load_levels": ["balanced", "high"],
                                             "lookup_timeout_s": 1})
    assert s.levels_to_load == ("high", "balanced") and s.lookup_timeout_s == 1.0


@pytest.mark.parametrize("extra, message", [
    ({"levle": "high"}, "kv_connector_extra_config: unknown field 'levle'"),
    ({"level": "fast"}, "kv_connector_extra_config.level: 'fast' not one of"),
    ({"load_levels": ["high", 3]}, "kv_connector_extra_config.load_levels: ['high', 3] must be a list"),
    ({"quality_floor": "exact"}, "kv_connector_extra_config.quality_floor: 'exact' not one of"),
    ({"save_queue_chunks": 0}, "kv_connector_extra_config.save_queue_chunks: 0 must be >= 1"),
    ({"save_queue_chunks": "8"}, "kv_connector_extra_config.save_queue_chunks: '8' must be an integer"),
    ({"controller": "yes"}, "kv_connector_extra_config.controller: 'yes' must be true or false"),
    ({"lookup_timeout_s": 0}, "kv_connector_extra_config.lookup_timeout_s: 0.0 must be > 0"),
    ({"server": "localhost"}, "kv_connector_extra_config.server: 'localhost' expected HOST:PORT"),
    ({"tls_ca": "/nonexistent/ca.pem"}, "kv_connector_extra_config.tls_ca: '/nonexistent/ca.pem' no such"),
    ({"store": 5}, "kv_connector_extra_config.store: 5 must be a string"),
])
def test_bad_values_name_the_field_and_the_value(extra: dict, message: str) -> None:
    with pytest.raises(ConnectorConfigError) as info:
        ConnectorSettings.from_extra_config(extra)
    assert message in str(info.value)
