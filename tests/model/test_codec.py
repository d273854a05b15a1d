"""Codecs: UTF-8 bytes held back until whole, and a converted checkpoint's tokenizer.json."""

import pytest
from tests.serve.conftest import make_model

from moekit.model.codec import ByteCodec, TokenizerCodec, load_codec


def test_bytes_wait_for_whole_characters_and_chat_has_a_fixed_template():
    codec = ByteCodec()
    ids = codec.encode("é!")
    decoder = codec.decoder()
    assert [decoder.feed(t) for t in ids] == ["", "é", "!"] and decoder.flush() == ""
    assert codec.token_text(ids[0]) == "\\xc3" and codec.token_bytes(ids[0]) == b"\xc3"
    chat = codec.chat_prompt([{"role": "user", "content": "hi"}])
    assert chat == "<|user|>\nhi\n<|assistant|>\n"
    assert load_codec(make_model()).__class__ is ByteCodec
    assert load_codec(make_model(vocab_size=100)) is None  # token ids only
    # ids past 255 would decode to nothing: without its tokenizer such a model takes ids only
    assert load_codec(make_model(vocab_size=300)) is None


def test_a_converted_checkpoints_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from moekit.model.tokenizer import load_tokenizer

    words = ["<unk>", "<eos>", "hello", "world"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    codec = TokenizerCodec(load_tokenizer(tmp_path))  # tokenizers alone, no transformers
    assert codec.encode("hello world") == [2, 3] and codec.eos_ids == (1,)
    decoder = codec.decoder()
    assert "".join(decoder.feed(t) for t in (2, 3)) + decoder.flush() == "hello world"
    with pytest.raises(ValueError, match="chat template"):
        codec.chat_prompt([{"role": "user", "content": "hi"}])
    found = load_codec(make_model(vocab_size=4), tmp_path)  # beside the checkpoint
    assert isinstance(found, TokenizerCodec) and found.encode("world hello") == [3, 2]
