"""Request bodies: every numeric limit comes from one table, and one SamplingParams builder."""

from __future__ import annotations

import pytest

from moekit.model.sampling_rules import SAMPLING_BOUNDS
from moekit.serve.openai_schemas import ChatRequest, CompletionRequest
from moekit.serve.schemas import BOUNDS, GenerateRequest
from moekit.serve.sequence import SamplingParams

LIMITS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}


@pytest.mark.parametrize(
    "body, field, bound",
    [
        (GenerateRequest, "max_new_tokens", "max_new_tokens"),
        (GenerateRequest, "temperature", "temperature"),
        (GenerateRequest, "top_p", "top_p"),
        (GenerateRequest, "logprobs", "logprobs"),
        (CompletionRequest, "max_tokens", "max_new_tokens"),
        (CompletionRequest, "temperature", "openai_temperature"),
        (CompletionRequest, "top_p", "top_p"),
        (CompletionRequest, "seed", "seed"),
        (CompletionRequest, "n", "n"),
        (ChatRequest, "max_completion_tokens", "max_new_tokens"),
        (ChatRequest, "top_logprobs", "logprobs"),
    ],
)
def test_each_limit_is_the_tables(body, field, bound):
    schema = body.model_json_schema()["properties"][field]
    options = schema.get("anyOf", [schema])  # optional fields: the number, or null
    number = next(o for o in options if o.get("type") != "null")
    want = {LIMITS[k]: v for k, v in vars(BOUNDS[bound]).items() if v is not None}
    assert {k: number[k] for k in LIMITS.values() if k in number} == want


def test_the_server_keeps_every_sampling_bound_of_the_cli():
    assert all(BOUNDS[name] == bound for name, bound in SAMPLING_BOUNDS.items())


def test_sampling_params_from_a_native_and_an_openai_request():
    native = GenerateRequest(prompt="x", temperature=0.5, top_k=3, top_p=1.0, seed=2)
    assert SamplingParams.from_request(native, 7, 1) == SamplingParams(7, 0.5, 3, None, 2, 1)
    openai = CompletionRequest(model="m", prompt="x", top_p=0.5)
    want = SamplingParams(16, 1.0, None, 0.5, None, None)  # OpenAI's have no top_k
    assert SamplingParams.from_request(openai, 16, None) == want
    assert SamplingParams.from_request(CompletionRequest(model="m", prompt="x"), 1, 0).top_p is None
