"""BERT WordPiece tokenization of the subject category ("dog") for the Q-Former.

Uses the bert-base-uncased vocabulary shipped in `assets/` (the released checkpoints
do not include it and the reference would fetch it from the network).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

VOCAB_FILE = Path(__file__).parent / "assets" / "bert-base-uncased-vocab.txt"


@lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import BertWordPieceTokenizer

    return BertWordPieceTokenizer(str(VOCAB_FILE), lowercase=True)


def tokenize_subjects(subjects: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] words [SEP]` ids and the 0/1 attention mask, padded to the longest subject."""
    encodings = _tokenizer().encode_batch(subjects)
    length = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(subjects), length, dtype=torch.long)
    mask = torch.zeros(len(subjects), length, dtype=torch.long)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask
