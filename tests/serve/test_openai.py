"""The official openai client against /v1/completions, streaming and not."""

import openai
import torch

import moekit


def test_openai_client_completions(server, byte_ckpt):
    model = moekit.load(byte_ckpt)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    prompt = "class Foo:"
    ids = list(prompt.encode())
    want = bytes(model.generate(torch.tensor([ids]), 12)[0, len(ids) :].tolist())
    r = client.completions.create(model="ck", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.decode("utf-8", errors="replace")
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    stream = client.completions.create(
        model="ck",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_sampling_seed_and_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="ck", prompt="import ", max_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    try:
        client.completions.create(model="ck", prompt="x", max_tokens=-1)
    except openai.UnprocessableEntityError as err:
        assert err.body["field"] == "max_tokens" or "max_tokens" in str(err)
    else:
        raise AssertionError("max_tokens=-1 was accepted")
