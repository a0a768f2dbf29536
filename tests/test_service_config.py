"""Configuration precedence: defaults < TOML file < environment < flags; errors name the field."""

from __future__ import annotations

import pytest

from kvcodec.service.config import ServerConfig, build_config
from kvcodec.service.errors import ConfigError


def test_defaults():
    cfg = build_config(environ={})
    assert cfg == ServerConfig().validate()
    assert cfg.listen == "127.0.0.1:50051" and cfg.store == "" and cfg.metrics_port == 0


def test_file_env_flag_precedence(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# token tenant\nfile-token team-f\n")
    path = tmp_path / "kvcodec.toml"
    path.write_text('listen = "0.0.0.0:6000"\nstore = "memory://"\nmetrics_port = 9464\n'
                    'max_concurrent_rpcs = 8\n[auth]\ntokens = { "t1" = "team-1" }\n'
                    f'tokens_file = "{tokens}"\n')
    env = {"KVCODEC_CONFIG": str(path), "KVCODEC_LISTEN": "127.0.0.1:7000",
           "KVCODEC_CALIBRATE": "off"}
    cfg = build_config(None, {"max_concurrent_rpcs": 4, "store": None}, environ=env)
    assert cfg.listen == "127.0.0.1:7000"  # env beats file
    assert cfg.max_concurrent_rpcs == 4  # flag beats file
    assert cfg.store == "memory://" and cfg.metrics_port == 9464 and cfg.calibrate is False
    assert cfg.auth_tokens == {"t1": "team-1", "file-token": "team-f"}


@pytest.mark.parametrize("text,message", [
    ('listen = "nohost"', "listen: 'nohost' is not HOST:PORT"),
    ("max_workers = 0", "max_workers: 0 must be >= 1"),
    ('max_workers = "many"', "max_workers: 'many' is not a valid int"),
    ("colour = 1", "unknown key 'colour'"),
    ('tls_cert = "a.pem"', "tls_cert/tls_key: set both or neither"),
    ("piece_bytes = 9000000", "piece_bytes: 9000000 must leave 64 KiB headroom"),
    ("listen = [", "is not valid TOML"),
])
def test_bad_values_are_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build_config(str(path), environ={})


def test_bad_env_value_is_named():
    with pytest.raises(ConfigError, match=r"\$KVCODEC_METRICS_PORT: 'x' is not a valid int"):
        build_config(environ={"KVCODEC_METRICS_PORT": "x"})


def test_serve_usage_errors_exit_2(tmp_path):
    from kvcodec.cli import main

    assert main(["serve", "--listen", "nonsense"]) == 2
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
