"""The Hugging Face tokenizer that travels with a converted checkpoint.

`hf-to-moekit` copies the tokenizer files next to the moekit weights (and `moekit-to-hf`
copies them back); `moekit.model.tokenizer.load_tokenizer` reads them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy whichever tokenizer files src holds into dst; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
