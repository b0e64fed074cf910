"""The `tiny` model's training data: packed synthetic "conversations" a Medusa head can learn.

The tiny model has no tokenizer, so the stages train it on rows whose assistant part walks a fixed cycle of 32
token ids: token t + 2 + k is a function of token t, and top-1 accuracy rises from chance within tens of steps.
"""

from __future__ import annotations

import numpy as np

from train.data import DataReport, TokenDataset


def synthetic_dataset(vocab_size: int, rows: int, seq_len: int, seed: int) -> TokenDataset:
    """A TokenDataset of `rows` packed synthetic conversations, each row [seq_len].

    Each conversation is a "user" part of 3-8 random ids (no loss) then an "assistant" part (loss) that walks a
    fixed random cycle of 32 ids from a random start: the next assistant token is always cycle-successor of the
    current one, so the token at t + 2 + k is determined by the token at t. Conversations are 12-40 tokens,
    packed whole into rows; ids 0-2 (pad, bos, eos) are never used.
    """
    rng = np.random.default_rng(seed)
    cycle = np.random.default_rng(1234).choice(np.arange(3, vocab_size), size=min(32, vocab_size - 3), replace=False)
    shape = (rows, seq_len)
    tokens, mask = np.zeros(shape, np.int32), np.zeros(shape, bool)
    seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    convs = 0
    for r in range(rows):
        start, s = 0, 1
        while True:
            user, answer = int(rng.integers(3, 9)), int(rng.integers(9, 33))
            n = min(user + answer, seq_len - start)
            if n < user + 3:
                break
            first = int(rng.integers(len(cycle)))
            walk = cycle[(first + np.arange(n - user)) % len(cycle)]
            conv = np.concatenate([rng.integers(3, vocab_size, user), walk])
            tokens[r, start:start + n], seg[r, start:start + n] = conv, s
            mask[r, start + user:start + n] = True
            pos[r, start:start + n] = np.arange(n)
            start, s, convs = start + n, s + 1, convs + 1
    attn = (seg > 0).sum(1).astype(np.int32)
    report = DataReport(path="<synthetic>", records=convs, used=convs, skipped={}, examples=rows,
                        tokens=int(attn.sum()), supervised_tokens=int(mask.sum()))
    return TokenDataset(tokens, mask, attn, seg, pos, report)
