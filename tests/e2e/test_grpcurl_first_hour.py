"""The real grpcurl, with its default 4 MB receive limit, meets what a new user
tries: WatchTask of a 1024x1024 float32 result, Health/List, GetTask with no
name. (Skipped with test_grpcurl.py's reason when grpcurl is absent.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_grpcurl import grpcurl

from kernelmesh.clients import Client

pytestmark = pytest.mark.e2e


def json_stream(text: str) -> list[dict]:
    """grpcurl prints one JSON object per streamed message, one after another."""
    decoder, items, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        item, at = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        items.append(item)
    return items


def test_watch_task_of_a_4_mib_result_ends_cleanly_and_says_where_it_is(served):
    with Client(served.target) as km:
        handle = km.submit("relu", np.ones((1024, 1024), np.float32))
        handle.wait(timeout=60)

    watched = grpcurl(
        served.target, "kernelmesh.v1.TaskService/WatchTask", data={"name": handle.name}
    )
    assert watched.returncode == 0, watched.stderr
    last = json_stream(watched.stdout)[-1]
    assert last["state"] == "TASK_STATE_SUCCEEDED"
    assert "GetTask" in last["message"] and "-max-msg-sz" in last["message"]

    full = grpcurl(
        "-max-msg-sz",
        str(64 << 20),
        served.target,
        "kernelmesh.v1.TaskService/GetTask",
        data={"name": handle.name, "view": "TASK_VIEW_FULL"},
    )
    assert full.returncode == 0, full.stderr
    assert json.loads(full.stdout)["task"]["outputs"][0]["shape"] == ["1024", "1024"]


def test_health_list_answers(served):
    listed = grpcurl(served.target, "grpc.health.v1.Health/List")
    assert listed.returncode == 0, listed.stderr
    statuses = json.loads(listed.stdout)["statuses"]
    assert statuses["kernelmesh.v1.TaskService"]["status"] == "SERVING"


def test_get_task_without_a_name_is_invalid_argument(served):
    result = grpcurl(served.target, "kernelmesh.v1.TaskService/GetTask", data={"name": ""})
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr, result.stderr
    assert re.search(r'"field":\s*"name"', result.stderr), result.stderr
