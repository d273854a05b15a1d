"""Text in and out: the codec a token model's prompts and completions pass through.

A checkpoint that carries a tokenizer (a converted Hugging Face checkpoint, or any directory
with `tokenizer.json` / `tokenizer_config.json`) is served with it: its ids, its chat template
and its end-of-sequence ids. transformers reads it when installed (chat templates need it);
otherwise `moekit.model.tokenizer.load_tokenizer` does, through `tokenizers` (no template).
Byte-level models (vocab_size 256: the ids are the bytes) read text as UTF-8 and, having no
template of their own, format chats with `BYTE_CHAT_TEMPLATE`. Decoders are incremental: a
piece goes out once it is whole text, never half of a multi-byte character or of a word the
tokenizer spells with several ids.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Protocol

from moekit.model.transformer import Transformer

# byte-level chat: each message on its own lines, the reply opened after the last one
BYTE_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
BYTE_CHAT_REPLY = "<|assistant|>\n"


class Decoder(Protocol):
    def feed(self, token: int) -> str: ...

    def flush(self) -> str: ...


class Codec(Protocol):
    """What the HTTP layer needs from a tokenizer."""

    eos_ids: tuple[int, ...]  # a sequence stops ('stop') when it draws one of these

    def encode(self, text: str, chat: bool = False) -> list[int]: ...

    def decoder(self) -> Decoder: ...

    def token_text(self, token: int) -> str: ...

    def token_bytes(self, token: int) -> bytes: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...


class ByteDecoder:
    """Token ids -> text pieces; bytes of a multi-byte character wait for the rest of it."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(bytes([token])) if token < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteCodec:
    """UTF-8 bytes as token ids 0..255 (ids past 255 decode to nothing)."""

    eos_ids: tuple[int, ...] = ()

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> Decoder:
        return ByteDecoder()

    def token_text(self, token: int) -> str:
        """The byte as text; a byte that is not a character alone is written like '\\xe2'."""
        return self.token_bytes(token).decode("utf-8", "backslashreplace")

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        turns = "".join(
            BYTE_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages
        )
        return turns + BYTE_CHAT_REPLY


class TokenizerDecoder:
    """Incremental detokenizer: decodes a short window of ids and sends what became final."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self.ids = tokenizer, []
        self.start = 0  # first id of the window decoded again (context for the next ones)
        self.sent = 0  # ids whose text has gone out

    def _text(self, lo: int, hi: int | None = None) -> str:
        return self.tok.decode(self.ids[lo:hi], skip_special_tokens=True)

    def feed(self, token: int) -> str:
        self.ids.append(token)
        before, now = self._text(self.start, self.sent), self._text(self.start)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # not a whole character yet
            return ""
        self.start, self.sent = self.sent, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        before, now = self._text(self.start, self.sent), self._text(self.start)
        self.start = self.sent = len(self.ids)
        return now[len(before) :]


class PlainTokenizer:
    """A bare `tokenizers.Tokenizer` (as `load_tokenizer` returns it) with transformers' calls."""

    chat_template = None

    def __init__(self, tokenizer: Any, eos_token_id: int | None) -> None:
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class TokenizerCodec:
    """A Hugging Face tokenizer: transformers' `PreTrainedTokenizer[Fast]`, or moekit's
    `TextTokenizer` (a `tokenizers.Tokenizer`, used through `PlainTokenizer`)."""

    def __init__(self, tokenizer: Any) -> None:
        if not hasattr(tokenizer, "apply_chat_template"):  # moekit's TextTokenizer
            tokenizer = PlainTokenizer(tokenizer.tokenizer, tokenizer.eos_token_id)
        self.tok = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = tuple(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Completions get the tokenizer's special tokens (e.g. BOS); a chat's come from its
        template."""
        return list(self.tok.encode(text, add_special_tokens=not chat))

    def decoder(self) -> Decoder:
        return TokenizerDecoder(self.tok)

    def token_text(self, token: int) -> str:
        return self.tok.decode([token])

    def token_bytes(self, token: int) -> bytes:
        return self.token_text(token).encode("utf-8")

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _hf_tokenizer(path: Path) -> Any:
    """The tokenizer saved beside a checkpoint, or None."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer  # reads chat templates too
    except ImportError:
        from moekit.model.tokenizer import load_tokenizer  # tokenizer.json alone

        return load_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def load_codec(model: Transformer, checkpoint: str | Path | None = None) -> Codec | None:
    """The model's tokenizer (its `tokenizer` attribute, or files beside the checkpoint),
    else UTF-8 bytes for a byte-level model; None for models that take no text."""
    if not model.is_lm:
        return None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and checkpoint is not None:
        tokenizer = _hf_tokenizer(Path(checkpoint))
    if tokenizer is not None:
        return TokenizerCodec(tokenizer)
    if model.cfg.vocab_size == 256:  # UTF-8 bytes; a larger vocabulary needs its tokenizer
        return ByteCodec()
    return None
