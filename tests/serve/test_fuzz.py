"""Schemathesis drives every operation from the OpenAPI schema: no answer may be a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import ServerProcess

OPTS = ("--max-new-tokens", "8", "--max-prompt-tokens", "64", "--request-timeout-s", "5")


@pytest.fixture(scope="module")
def fuzz_server(byte_ckpt):
    srv = ServerProcess(byte_ckpt, *OPTS)
    yield srv
    srv.stop()


def _fuzz(server: ServerProcess, examples: int) -> int:
    """Valid and schema-violating cases for every operation; returns the calls made."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    calls = 0
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
                nonlocal calls
                response = case.call(base_url=server.url, timeout=30)
                calls += 1
                assert response.status_code < 500, (case.as_curl_command(), response.text)
                if response.status_code == 422:
                    assert response.json()["error"]["field"]

            try:
                check()
            except Unsatisfiable:  # nothing to break in an operation without inputs
                assert mode == GenerationMode.NEGATIVE
    return calls


def test_fuzz_quick(fuzz_server):
    assert _fuzz(fuzz_server, examples=8) > 40


@pytest.mark.slow
def test_fuzz_long(fuzz_server):
    assert _fuzz(fuzz_server, examples=200) > 1000
