"""Keys from the environment / .env, redaction, and GraphQL-safe values for the RunPod SDK."""

from __future__ import annotations

import logging

import pytest
from graphql import GraphQLSyntaxError, parse, value_from_ast_untyped
from runpod.api.mutations.pods import generate_pod_deployment_mutation

from cbvae_ext.cloud import (
    GraphQLValueError,
    RedactingFilter,
    Secrets,
    SecretsError,
    check_value,
    encode_env,
    load_secrets,
)
from cbvae_ext.cloud.graphql_safety import decode_env

KEY = "rpa_ABCDEF0123456789secretkey"


def test_env_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(f'# keys\nexport RUNPOD_API_KEY={KEY}\nWANDB_API_KEY="wandb_from_file_0123"\n')
    secrets = load_secrets(env_file, environ={})
    assert secrets.runpod_api_key == KEY and secrets.wandb_api_key == "wandb_from_file_0123"
    secrets = load_secrets(env_file, environ={"WANDB_API_KEY": "wandb_from_env_4567"})
    assert secrets.runpod_api_key == KEY and secrets.wandb_api_key == "wandb_from_env_4567"
    assert load_secrets(tmp_path / "absent.env", environ={}) == Secrets()
    assert KEY not in repr(secrets) and "wandb_from_env" not in repr(secrets)


def test_malformed_key_is_rejected_without_echoing_it(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('RUNPOD_API_KEY="rpa_abc def0123"\n')
    with pytest.raises(SecretsError, match=r"RUNPOD_API_KEY from .*\.env is malformed") as err:
        load_secrets(env_file, environ={})
    assert "rpa_abc" not in str(err.value)
    with pytest.raises(SecretsError, match="RUNPOD_API_KEY is not set"):
        Secrets().require_runpod()


def test_redacting_filter_hides_keys_in_messages_args_and_tracebacks():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logger = logging.getLogger("test.redact")
    handler = Collect()
    handler.addFilter(RedactingFilter([KEY, "short_wandb_key"]))
    logger.addHandler(handler)
    try:
        logger.warning("key %s in args", KEY)
        try:
            raise RuntimeError(f'query failed: value: "{KEY}" and short_wandb_key')
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert records[0] == "key *** in args" and 'query failed: value: "***" and ***' in text
    assert KEY not in text and "short_wandb_key" not in text


@pytest.mark.parametrize("value", ['a"b', "a\\b", "a\nb", "a{b}", "tab\t", "é"])
def test_unsafe_values_are_rejected_naming_the_option(value):
    with pytest.raises(GraphQLValueError, match=r"^--image contains "):
        check_value("--image", value)


def test_safe_values_pass_unchanged():
    for value in ("ghcr.io/me/cbvae:1.0", "NVIDIA GeForce RTX 4090", "/workspace", "a=b,c;d@e+f%g-h_i", ""):
        assert check_value("x", value) == value


def _create_input(env: dict[str, str]) -> dict:
    query = generate_pod_deployment_mutation("pod", "img", "NVIDIA GeForce RTX 4090", env=env, gpu_count=1)
    field = parse(query).definitions[0].selection_set.selections[0]
    return value_from_ast_untyped(field.arguments[0].value)


def test_raw_env_value_would_inject_into_the_sdk_query_and_encoding_prevents_it():
    attack = 'x" }, { key: "LD_PRELOAD", value: "/tmp/evil.so'
    # the SDK's own mutation with the raw value: parses, but with an injected variable
    injected = _create_input({"NOTE": attack})
    assert [e["key"] for e in injected["env"]] == ["NOTE", "LD_PRELOAD"]
    with pytest.raises(GraphQLSyntaxError):
        _create_input({"NOTE": 'a"b'})
    # encoded: exactly one variable, decoding back to the original text
    env = encode_env({"NOTE": attack, "PLAIN": "ok value", "MULTI": "line1\nline2\\"})
    sent = _create_input(env)
    assert [e["key"] for e in sent["env"]] == ["CBVAE_B64_NOTE", "PLAIN", "CBVAE_B64_MULTI"]
    received = decode_env({e["key"]: e["value"] for e in sent["env"]})
    assert received == {"NOTE": attack, "PLAIN": "ok value", "MULTI": "line1\nline2\\"}


def test_bad_env_names_are_rejected():
    with pytest.raises(GraphQLValueError, match="name 'BAD NAME'"):
        encode_env({"BAD NAME": "x"})
    with pytest.raises(GraphQLValueError, match="CBVAE_B64_X is given twice"):
        encode_env({"X": 'a"', "CBVAE_B64_X": "eA=="})
