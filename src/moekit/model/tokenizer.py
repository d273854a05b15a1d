"""Reading `tokenizer.json` with the `tokenizers` library: text in and out of a checkpoint
that carries a tokenizer (a converted Hugging Face one) without transformers."""

from __future__ import annotations

import json
from pathlib import Path


class TextTokenizer:
    """Text <-> token ids through a `tokenizers.Tokenizer`; special tokens dropped on decode."""

    def __init__(self, tokenizer, eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _eos(directory: Path, tokenizer) -> int | None:
    """eos id from generation_config.json, else tokenizer_config.json's eos_token."""
    gen = directory / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    conf = directory / "tokenizer_config.json"
    token = json.loads(conf.read_text()).get("eos_token") if conf.is_file() else None
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def load_tokenizer(directory: str | Path) -> TextTokenizer | None:
    """The tokenizer saved in a checkpoint directory, or None when it holds no tokenizer.json."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ImportError(
            "reading tokenizer.json needs the tokenizers package: pip install 'moekit[hf]'"
        ) from err
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return TextTokenizer(tokenizer, _eos(directory, tokenizer))
