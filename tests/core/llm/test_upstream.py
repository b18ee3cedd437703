"""The fake upstream itself, run in a background thread the way sync tests
and benchmarks use it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from llm_upstream import Upstream


def post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def threaded():
    upstream, base_url = Upstream.start_in_thread()
    yield upstream, base_url
    upstream.stop()


def test_openai_sse_stream_ends_with_usage_and_done(threaded):
    upstream, base_url = threaded
    status, body = post(
        f"{base_url}/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "a b"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]

    assert status == 200
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]]
    assert "".join(deltas) == "echo a b"
    assert upstream.requests == 1


def test_injected_failures_carry_retry_after_then_clear(threaded):
    upstream, base_url = threaded
    upstream.fail_with(429, times=1, retry_after=2)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    status, payload = post(f"{base_url}/chat/completions", body)
    assert status == 429
    assert json.loads(payload)["error"]["message"] == "injected failure 429"
    assert post(f"{base_url}/chat/completions", body)[0] == 200


def test_down_refuses_connections_until_up(threaded):
    upstream, base_url = threaded
    upstream.down()
    with pytest.raises(urllib.error.URLError):
        post(f"{base_url}/embeddings", {"model": "m", "input": ["x"]})

    upstream.up_threadsafe()

    status, payload = post(f"{base_url}/embeddings", {"model": "m", "input": ["x"]})
    assert status == 200
    assert len(json.loads(payload)["data"][0]["embedding"]) == 8
