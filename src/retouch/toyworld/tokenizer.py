"""A word-level CLIP tokenizer for the ToyWorld vocabulary, built deterministically.

The files follow CLIP's layout (``vocab.json`` + ``merges.txt``): the 256 byte symbols, the same
with ``</w>``, then one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Merges
are made so that every vocabulary word is one token: for each word in sorted order, merge the
first two symbols of its current tokenization until one symbol is left. A new merge always has
the highest rank, so it never changes how an earlier word tokenizes. (The ``tokenizers`` BPE
trainer is not deterministic, hence this recipe.) ``CLIPTokenizer.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_vocab", "save_tokenizer", "BOS", "EOS"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    symbols = list(word[:-1]) + [word[-1] + END]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, None), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) such that each of ``words`` is a single token."""
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + END for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def save_tokenizer(words: tuple[str, ...], directory: Path, *, max_length: int) -> dict[str, int]:
    """Write a CLIP tokenizer for ``words`` into ``directory``; returns the vocabulary."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return vocab
