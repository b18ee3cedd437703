"""The LLM config file: defaults, the always-present local embedding model,
and validation errors that name the key path."""

from __future__ import annotations

import pytest

from kernelmesh.core.llm import (
    LLMConfigError,
    ModelKind,
    ProviderKind,
    load_config,
    parse_config,
)

GOOD = """
models:
  gpt:
    kind: chat
    deployments:
      - name: openai
        provider: openai
        base_url: https://api.openai.com/v1
        model: gpt-4o-mini
        api_key_env: OPENAI_API_KEY
        input_cost_per_1k: 0.15
      - name: ollama
        provider: ollama
        base_url: http://127.0.0.1:11434
        model: llama3.2
breaker: {failure_threshold: 3, recovery_timeout_s: 10, success_threshold: 1}
tenants:
  default: {requests_per_minute: 60}
  acme: {tokens_per_minute: 10000, token_budget: 1000000}
cache: {max_entries: 10, ttl_s: 5}
"""


def deployments(*items: dict) -> dict:
    return {"models": {"gpt": {"kind": "chat", "deployments": list(items)}}}


def openai(**fields) -> dict:
    return {
        "name": "d",
        "provider": "openai",
        "base_url": "http://x/v1",
        "model": "m",
        **fields,
    }


def test_no_file_gives_only_the_local_embedding_model():
    config = load_config(None)
    assert list(config.models) == ["local"]
    local = config.models["local"]
    assert local.kind is ModelKind.EMBEDDING
    assert local.deployments[0].provider is ProviderKind.LOCAL
    assert config.default_embedding_model == "local"
    assert config.chat_models == []


def test_a_file_is_read_with_its_failover_order_and_limits(tmp_path):
    path = tmp_path / "llm.yaml"
    path.write_text(GOOD)

    config = load_config(path)

    gpt = config.models["gpt"]
    assert [d.name for d in gpt.deployments] == ["openai", "ollama"]
    assert gpt.deployments[0].api_key_env == "OPENAI_API_KEY"
    assert gpt.deployments[0].input_cost_per_1k == 0.15
    assert config.breaker.failure_threshold == 3
    assert config.limits_for("acme").token_budget == 1000000
    assert config.limits_for("someone-else").requests_per_minute == 60
    assert config.cache.max_entries == 10
    assert "local" in config.models


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (deployments(openai(api_key="abc")), r"models\.gpt\.deployments\[0\]\.api_key: secrets"),
        (
            deployments(openai(api_key_env="sk-proj-abcdefghijklmnop")),
            r"deployments\[0\]\.api_key_env: this looks like an API key",
        ),
        (deployments(openai(provider="anthropic")), r"deployments\[0\]\.provider: 'anthropic'"),
        (deployments(openai(base_url="localhost:8000")), r"deployments\[0\]\.base_url"),
        (deployments(openai(model="")), r"deployments\[0\]\.model"),
        (deployments(openai(max_retries=-1)), r"deployments\[0\]\.max_retries: must be at least"),
        (deployments(openai(timeout_s="fast")), r"deployments\[0\]\.timeout_s: expected a number"),
        (deployments(openai(colour="red")), r"deployments\[0\]: unknown keys colour"),
        (deployments(openai(), openai()), r"duplicate deployment names d"),
        ({"models": {"gpt": {"kind": "chat", "deployments": []}}}, r"gpt\.deployments"),
        ({"models": {"gpt": {"kind": "vision", "deployments": [openai()]}}}, r"gpt\.kind"),
        (
            deployments({"name": "l", "provider": "local"}),
            r"deployments\[0\]\.provider: the local provider serves embeddings only",
        ),
        ({"tenants": {"acme": {"requests_per_minute": "many"}}}, r"tenants\.acme\.requests"),
        ({"breaker": {"failure_threshold": 0}}, r"breaker\.failure_threshold"),
        ({"cache": {"size": 3}}, r"cache: unknown keys size"),
        ({"modles": {}}, r"unknown keys modles"),
        ({"default_embedding_model": "gpt"}, r"default_embedding_model: 'gpt'"),
    ],
)
def test_invalid_configs_name_the_key_path(document, message):
    with pytest.raises(LLMConfigError, match=message):
        parse_config(document, source="llm.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "llm.yaml"
    path.write_text("models: [unclosed")
    with pytest.raises(LLMConfigError, match=r"llm\.yaml: not valid YAML"):
        load_config(path)


HEX_LETTER_FIRST = "a3f9c2e17b5d4086a1c3e5f7092b4d6e"
HEX_DIGIT_FIRST = "3fa9c2e17b5d4086a1c3e5f7092b4d6e"
BASE64_KEY = "Zk9xR2hUbXA3d0JzS1l2TjNxTDhhWmVD"
KEY_SHAPES = [
    "sk-proj-abcdefghijklmnop1234",
    "sk-ant-api03-abcdefghijklmnop",
    HEX_LETTER_FIRST,
    HEX_DIGIT_FIRST,
    HEX_LETTER_FIRST.upper(),
    BASE64_KEY,
    BASE64_KEY + "+/a1==",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
]


@pytest.mark.parametrize("key", KEY_SHAPES)
@pytest.mark.parametrize("field", ["api_key_env", "model", "name"])
def test_a_key_in_any_field_is_refused_without_printing_it(key, field):
    with pytest.raises(LLMConfigError, match="looks like an API key") as caught:
        parse_config(deployments(openai(**{field: key})), source="llm.yaml")

    message = str(caught.value)
    assert f"deployments[0].{field}" in message
    # Not the key, nor any long piece of it.
    assert not any(key[i : i + 8] in message for i in range(len(key) - 7))


@pytest.mark.parametrize(
    "name",
    [
        "OPENAI_API_KEY",
        "GROQ_API_KEY",
        "KERNELMESH_PRODUCTION_OPENAI_API_KEY_FOR_THE_GATEWAY",
        "azure_openai_key_2",
    ],
)
def test_ordinary_variable_names_are_accepted(name):
    config = parse_config(deployments(openai(api_key_env=name)))
    assert config.models["gpt"].deployments[0].api_key_env == name


def test_an_invalid_variable_name_is_refused_without_printing_it():
    with pytest.raises(LLMConfigError, match="api_key_env: expected the NAME") as caught:
        parse_config(deployments(openai(api_key_env="my key=hunter2")))
    assert "hunter2" not in str(caught.value)
