"""Schemathesis drives every operation from the OpenAPI schema: no answer may be a 5xx.

The server requires an API key, as a deployment off loopback does. Valid cases send it and
must get in; schema-violating cases may drop it (schemathesis tests that), which must be a 401.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import ServerProcess

KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTS = ("--max-new-tokens", "8", "--max-prompt-tokens", "64", "--request-timeout-s", "5")


@pytest.fixture(scope="module")
def fuzz_server(byte_ckpt):
    srv = ServerProcess(byte_ckpt, *OPTS, "--api-key", KEY)
    yield srv
    srv.stop()


def _fuzz(server: ServerProcess, examples: int) -> tuple[int, int]:
    """Valid and schema-violating cases for every operation; returns (calls, valid cases refused
    as unauthenticated)."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
    calls = refused = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case) -> None:
                nonlocal calls, refused
                response = case.call(base_url=server.url, timeout=30, headers=AUTH)
                calls += 1
                has_key = response.request.headers.get("authorization") == AUTH["Authorization"]
                assert has_key or response.status_code == 401
                positive = mode == GenerationMode.POSITIVE  # noqa: B023 (runs within this loop turn)
                refused += positive and response.status_code == 401
                assert response.status_code < 500, (case.as_curl_command(), response.text)
                if response.status_code == 422:
                    assert response.json()["error"]["field"]

            try:
                check()
            except Unsatisfiable:  # nothing to break in an operation without inputs
                assert mode == GenerationMode.NEGATIVE
    return calls, refused


def test_fuzz_quick(fuzz_server):
    calls, refused = _fuzz(fuzz_server, examples=8)
    assert calls > 40 and refused == 0


@pytest.mark.slow
def test_fuzz_long(fuzz_server):
    calls, refused = _fuzz(fuzz_server, examples=200)
    assert calls > 1000 and refused == 0
