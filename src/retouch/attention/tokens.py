"""Token bookkeeping for prompt edits: word positions and source-to-target token maps.

A token map for a target prompt of ``T`` encoder positions is ``(mapper, mask)``: target token
``j`` takes its cross-attention map from source token ``mapper[j]`` where ``mask[j] = 1`` and
keeps its own where ``mask[j] = 0`` (new words). Word swap maps every position to itself;
refinement aligns the two token sequences.

Every function takes a tokenizer (the network reads its padded sequence: SD1/2, SDXL) or a
:class:`TextSequence` of several tokenizers' sequences one after another (SD3: CLIP's 77
positions, then T5's): maps are made segment by segment, and a word's positions are its
positions in every segment that holds it.

References: Hertz et al. 2022 (Prompt-to-Prompt, Sec. 3.2, word swap and prompt refinement
with the alignment function M); Needleman & Wunsch 1970 (global alignment; with scores
match 1, mismatch -1, gap 0 it is a longest common subsequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TextSequence",
    "segments",
    "prompt_positions",
    "sequence_length",
    "token_ids",
    "word_positions",
    "swap_map",
    "refinement_map",
]


@dataclass(frozen=True)
class TextSequence:
    """The text tokens a network reads: segments ``(tokenizer, length)`` one after another, each
    the tokenizer's sequence padded to ``length`` (a None tokenizer: positions holding no
    prompt's tokens, e.g. SD3's zeros without T5)."""

    segments: tuple[tuple[Any, int], ...]


def segments(tokenizer) -> list[tuple[Any, int, int]]:
    """``(tokenizer, offset, length)`` of each segment of a tokenizer or TextSequence."""
    if not isinstance(tokenizer, TextSequence):
        return [(tokenizer, 0, int(tokenizer.model_max_length))]
    out, offset = [], 0
    for tok, length in tokenizer.segments:
        out.append((tok, offset, int(length)))
        offset += int(length)
    return out


def sequence_length(tokenizer) -> int:
    """Encoder positions T (a tokenizer's ``model_max_length``, SD: 77; a TextSequence's sum)."""
    return sum(length for _, _, length in segments(tokenizer))


def prompt_positions(tokenizer, prompt: str) -> list[int]:
    """Encoder positions of ``prompt``'s own tokens (start and end tokens included, padding
    not), in every segment."""
    return [offset + i for tok, offset, length in segments(tokenizer) if tok is not None
            for i in range(min(len(_ids(tok, prompt, length)), length))]


def token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with start/end tokens, unpadded, truncated to T (a TextSequence:
    its first segment's)."""
    tok, _, length = segments(tokenizer)[0]
    return _ids(tok, prompt, length)


def _ids(tokenizer, prompt: str, length: int) -> list[int]:
    return list(tokenizer(prompt, truncation=True, max_length=length).input_ids)


def _word_ids(tokenizer, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False).input_ids)


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Encoder positions of every occurrence of ``word`` (one or more words) in ``prompt``, in
    every segment.

    Raises ValueError naming the prompt if the word does not occur.
    """
    pos = []
    for tok, offset, length in segments(tokenizer):
        if tok is None:
            continue
        ids, sub = _ids(tok, prompt, length), _word_ids(tok, word)
        n = len(sub)
        pos += [offset + i + j for i in range(len(ids) - n + 1) if n and ids[i : i + n] == sub
                for j in range(n)]
    if not pos:
        raise ValueError(f"the word {word!r} is not in the prompt {prompt!r}")
    return pos


def swap_map(tokenizer, source: str, target: str) -> tuple[Tensor, Tensor]:
    """Word-swap token map: identity, after checking the prompts swap words one for one.

    Refused (ValueError) unless the prompts have the same number of words and every swapped
    word pair has the same number of tokens; the message names the words and suggests
    refinement, which aligns prompts of different lengths.
    """
    for tok, _, length in segments(tokenizer):
        if tok is not None:
            _check_swap(tok, length, source, target)
    t = sequence_length(tokenizer)
    return torch.arange(t), torch.ones(t)


def _check_swap(tokenizer, length: int, source: str, target: str) -> None:
    src_words, tgt_words = source.split(), target.split()
    if len(src_words) != len(tgt_words):
        raise ValueError(
            f"word swap needs prompts with the same number of words: {source!r} has "
            f"{len(src_words)}, {target!r} has {len(tgt_words)}; use refinement "
            "(mode='refine') to add or remove words"
        )
    bad = [
        (a, b, len(_word_ids(tokenizer, a)), len(_word_ids(tokenizer, b)))
        for a, b in zip(src_words, tgt_words, strict=True)
        if a != b and len(_word_ids(tokenizer, a)) != len(_word_ids(tokenizer, b))
    ]
    if bad:
        pairs = ", ".join(f"{a!r} ({n} tokens) -> {b!r} ({m} tokens)" for a, b, n, m in bad)
        raise ValueError(
            f"word swap needs swapped words with equal token counts, but {pairs}; "
            "use refinement (mode='refine'), which aligns tokens of different counts"
        )
    if len(_ids(tokenizer, source, length)) != len(_ids(tokenizer, target, length)):
        raise ValueError(f"{source!r} and {target!r} tokenize to different lengths; "
                         "use refinement (mode='refine')")


def _lcs_pairs(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """Index pairs (i, j) of a longest common subsequence of x and y (x[i] == y[j])."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            table[i][j] = (table[i + 1][j + 1] + 1 if x[i] == y[j]
                           else max(table[i + 1][j], table[i][j + 1]))
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if x[i] == y[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def refinement_map(tokenizer, source: str, target: str) -> tuple[Tensor, Tensor]:
    """Refinement token map: target tokens aligned to equal source tokens keep their maps.

    Tokens common to both prompts (a longest common subsequence, start/end tokens included)
    map to their source position; added tokens get ``mask = 0``. Padding after the end token
    maps to the source's padding at the same offset from its end.
    Returns mapper (T,) int64 and mask (T,) float (segment by segment; a None segment maps to
    itself).
    """
    maps = []
    for tok, offset, t in segments(tokenizer):
        if tok is None:
            maps.append((torch.arange(offset, offset + t), torch.ones(t)))
            continue
        x, y = _ids(tok, source, t), _ids(tok, target, t)
        mapper, mask = torch.zeros(t, dtype=torch.long), torch.zeros(t)
        for i, j in _lcs_pairs(x, y):
            mapper[j], mask[j] = i, 1.0
        for j in range(len(y), t):  # padding: same offset from the end of each prompt
            i = j - len(y) + len(x)
            if i < t:
                mapper[j], mask[j] = i, 1.0
        maps.append((mapper + offset, mask))
    return torch.cat([m for m, _ in maps]), torch.cat([k for _, k in maps])
