"""Prompt-lookup decoding's drafts: the tokens that followed the sequence's last n-gram where it
appeared before (arXiv 2304.04487's "LLMA", as prompt-lookup decoding in Hugging Face).

The model then checks a whole draft in one forward (the verify step) and keeps the longest prefix
that greedy decoding would have produced, plus the model's own next token: the output is greedy
decoding's, token for token, in fewer forwards when the text repeats its context (code edits,
summaries, quoting).
"""
from __future__ import annotations


def propose_draft(sequence: list[int], draft_len: int, max_ngram: int = 3) -> list[int]:
    """Up to `draft_len` tokens that followed the latest earlier match of the sequence's last
    n-gram, the longest n first (n = max_ngram .. 1); [] when nothing matches."""
    for n in range(min(max_ngram, len(sequence) - 1), 0, -1):
        tail = sequence[-n:]
        for start in range(len(sequence) - n - 1, -1, -1):  # latest match first
            if sequence[start:start + n] == tail:
                return sequence[start + n:start + n + draft_len]
    return []


def accepted_length(draft: list[int], greedy: list[int]) -> int:
    """How many draft tokens greedy decoding confirms: draft[i] must equal the model's choice
    after the tokens before it (greedy[i], chosen at the position before draft[i])."""
    n = 0
    while n < len(draft) and draft[n] == greedy[n]:
        n += 1
    return n
