"""RELIABILITY case 27: odd tenant names and tokens are configuration errors, named without
echoing a token; the request limits are settable from TOML, environment and flags."""

from __future__ import annotations

import json

import pytest

from kvcodec.service.config import build_config
from kvcodec.service.errors import ConfigError

SECRET = "s3cr3t-9f2c"


def _toml(tmp_path, body: str) -> str:
    path = tmp_path / "kvcodec.toml"
    path.write_text(body, encoding="utf-8")
    return str(path)


def _tokens(tmp_path, table: dict[str, str], extra: str = "") -> str:
    lines = "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in table.items())
    return _toml(tmp_path, extra + "[auth.tokens]\n" + lines)


@pytest.mark.parametrize("tenant,message", [
    ("", "empty"),
    ("cafe\u0301", r"not in Unicode NFC form \(write 'café'\)"),
    ("team\x00a", r"contains U\+0000"),
    ("team\na", r"contains U\+000A"),
    ("team\x1fa", r"contains U\+001F"),
    ("team a", r"contains U\+0020 SPACE"),
    ("\u200bteam", r"contains U\+200B ZERO WIDTH SPACE"),
    ("t" * 129, "is 129 bytes, at most 128"),
    ("é" * 65, "is 130 bytes, at most 128"),
])
def test_odd_tenant_names_are_configuration_errors(tmp_path, tenant, message):
    with pytest.raises(ConfigError, match=f"auth.tokens: tenant .*{message}") as info:
        build_config(_tokens(tmp_path, {SECRET: tenant}), environ={})
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("pair", [("team-a", "Team-A"), ("café", "CAFÉ"), ("ﬁle", "file")])
def test_names_that_read_the_same_are_ambiguous(tmp_path, pair):
    with pytest.raises(ConfigError, match="differ only by case or Unicode form"):
        build_config(_tokens(tmp_path, {"tok-1": pair[0], "tok-2": pair[1]}), environ={})


def test_unicode_names_in_nfc_are_accepted_and_one_tenant_may_have_many_tokens(tmp_path):
    cfg = build_config(_tokens(tmp_path, {"tok-1": "équipe", "tok-2": "équipe", "tok-3": "a:b/c"}),
                       environ={})
    assert set(cfg.auth_tokens.values()) == {"équipe", "a:b/c"}


@pytest.mark.parametrize("token,message", [
    ("", "the token of tenant 'team-a' is empty"),
    ("with space", "the token of tenant 'team-a' has whitespace"),
    ("tok\u00e9n", "the token of tenant 'team-a' has whitespace, control or non-ASCII"),
])
def test_unusable_tokens_are_named_by_their_tenant(tmp_path, token, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(_tokens(tmp_path, {token: "team-a"}), environ={})
    assert not token or token not in str(info.value)


def test_non_string_tenant_is_refused_without_echoing_tokens(tmp_path):
    path = _toml(tmp_path, f'[auth.tokens]\n"{SECRET}" = 5\n')
    with pytest.raises(ConfigError, match="auth.tokens: expected a table of token = tenant") as info:
        build_config(path, environ={})
    assert SECRET not in str(info.value)


def test_one_token_for_two_tenants_is_ambiguous(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{SECRET} team-a\n{SECRET} team-b\n")
    with pytest.raises(ConfigError, match="tokens:2: the token is already given to tenant 'team-a'"):
        build_config(environ={"KVCODEC_AUTH_TOKENS_FILE": str(tokens)})
    tokens.write_text(f"{SECRET} team-a\n")
    path = _tokens(tmp_path, {SECRET: "team-b"}, extra=f'[auth]\ntokens_file = "{tokens}"\n')
    with pytest.raises(ConfigError, match="given to tenant 'team-b' and, in auth_tokens_file, "
                                          "to 'team-a'") as info:
        build_config(path, environ={})
    assert SECRET not in str(info.value)


def test_admin_tokens_from_toml_and_env_and_their_rules(tmp_path):
    path = _toml(tmp_path, '[auth]\nadmin_tokens = ["op-1"]\n[auth.tokens]\n"t" = "team-a"\n')
    assert build_config(path, environ={}).auth_admin_tokens == ["op-1"]
    env = {"KVCODEC_AUTH_ADMIN_TOKENS": "op-1, op-2"}
    assert build_config(environ=env).auth_admin_tokens == ["op-1", "op-2"]
    clash = _toml(tmp_path, '[auth]\nadmin_tokens = ["t"]\n[auth.tokens]\n"t" = "team-a"\n')
    with pytest.raises(ConfigError, match=r"auth.admin_tokens\[0\]: the token is also the token "
                                          "of tenant 'team-a'"):
        build_config(clash, environ={})


def test_request_limits_from_file_env_and_flags(tmp_path):
    path = _toml(tmp_path, "max_chunks_per_request = 100\nmax_context_tokens = 5000\n")
    env = {"KVCODEC_MIN_PIECE_BYTES": "4096"}
    cfg = build_config(path, {"max_call_s": 2.5}, environ=env)
    assert (cfg.max_chunks_per_request, cfg.max_context_tokens) == (100, 5000)
    assert (cfg.min_piece_bytes, cfg.max_call_s) == (4096, 2.5)
    for text, message in (("max_chunks_per_request = 0", "max_chunks_per_request: 0 must be >= 1"),
                          ("min_piece_bytes = 2097152", "min_piece_bytes: 2097152 > piece_bytes"),
                          ("max_call_s = -1.0", "max_call_s: -1.0 must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            build_config(_toml(tmp_path, text + "\n"), environ={})


def test_serve_refuses_an_empty_tenant_with_exit_2(tmp_path, capsys):
    from kvcodec.cli import main

    path = _tokens(tmp_path, {SECRET: ""})
    assert main(["serve", "--config", path, "--max-chunks-per-request", "10"]) == 2
    err = capsys.readouterr().err
    assert "auth.tokens: tenant empty" in err and SECRET not in err


def test_a_server_built_from_an_unvalidated_config_refuses_them_too():
    from kvcodec.service.config import ServerConfig
    from kvcodec.service.server import CacheServer, open_server_store

    for tokens in ({SECRET: ""}, {"t1": "café", "t2": "cafe\u0301"}):
        config = ServerConfig(listen="127.0.0.1:0", calibrate=False, auth_tokens=tokens)
        with pytest.raises(ConfigError, match="auth.tokens: tenant") as info:
            CacheServer(config, open_server_store("memory://"))
        assert SECRET not in str(info.value)
