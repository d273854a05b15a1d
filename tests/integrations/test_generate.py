"""`moekit generate` on a converted HF checkpoint reads and writes text with its tokenizer."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.integrations.hf_models import VOCAB, WORDS, hf_model, save_hf  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.integrations.hf import hf_to_moekit  # noqa: E402

PROMPT = "the router gate token"


def every_id_tokenizer():
    """A word-level tokenizer with a word for every id below VOCAB, so any output reads back."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [*WORDS, *(f"w{i}" for i in range(len(WORDS), VOCAB))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="the"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def converted(family: str, directory, seed: int = 0):
    """The HF model, saved with `every_id_tokenizer` and converted to moekit in directory/moekit."""
    hf = hf_model(family, seed=seed)
    save_hf(hf, directory / "hf")
    every_id_tokenizer().save(str(directory / "hf" / "tokenizer.json"))
    hf_to_moekit(directory / "hf", directory / "moekit")
    return hf


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_greedy_generate_prints_transformers_text(family, tmp_path, capsys):
    hf = converted(family, tmp_path, seed=4)
    tokenizer = every_id_tokenizer()
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    want = hf.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=None)
    argv = ["generate", str(tmp_path / "moekit"), "--prompt", PROMPT, "--max-new", "7"]
    assert main([*argv, "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(want[0].tolist()) + "\n"
    assert printed.startswith(PROMPT) and len(printed.split()) == 4 + 7


@pytest.mark.parametrize(
    "prompt, named",
    [(" ", "--prompt is empty once tokenized"), (" ".join(WORDS * 7), "max_seq_len=64")],
    ids=["no-tokens", "too-long"],
)
def test_a_prompt_the_model_cannot_read_is_refused_by_name(prompt, named, tmp_path, capsys):
    converted("qwen3_moe", tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path / "moekit"), "--prompt", prompt])
    assert exit_.value.code == 2 and named in capsys.readouterr().err
