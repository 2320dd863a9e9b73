"""A small text classifier on generated token sequences (50k vocabulary), for the factored projection.

Zipf-distributed background tokens plus 4 keywords of each example's class: learnable, and the
embedding's vocabulary is large enough that a dense projection of its gradient is the expensive path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

VOCAB, EMBED, HIDDEN, CLASSES, LENGTH = 50_000, 16, 32, 4, 16


class TokenClassifier(nn.Module):
    """Embedding(50k, 16) → Linear over tokens → ReLU → mean-pool → Linear (800k parameters)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.token = nn.Linear(EMBED, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):
        return self.head(F.relu(self.token(self.embed(ids))).mean(1))


def token_data(n: int, seed: int) -> TensorDataset:
    """Zipf-distributed tokens plus 4 keywords of the example's class ."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    tokens = torch.multinomial(probs / probs.sum(), n * LENGTH, replacement=True, generator=g).view(n, LENGTH)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    keywords = 1000 + torch.arange(CLASSES * 25).view(CLASSES, 25)
    where = torch.rand(n, LENGTH, generator=g).argsort(1)[:, :4]
    tokens.scatter_(1, where, keywords[labels[:, None], torch.randint(0, 25, (n, 4), generator=g)])
    return TensorDataset(tokens, labels)
