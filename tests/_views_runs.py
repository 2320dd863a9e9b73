"""Small real runs for the views' tests: digits (pictures), generated sentences with a Hugging Face
tokenizer built offline (text), and scikit-learn's wine table (tabular). Each trains a model by SGD,
saves checkpoints and captures train and test stores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import trackin_ooc as to
from trackin_ooc.demo import digits_cnn, load_digits_split, train_with_checkpoints

SCRIPT_TEXT = "<script>document.title='pwned';document.body.innerHTML='owned'</script>"
IMG_TEXT = "<img src=x onerror=\"document.title='pwned'\">"


@dataclass
class Run:
    train: to.GradientStore
    test: to.GradientStore
    train_data: Any
    test_data: Any
    true_labels: np.ndarray | None = None
    tokenizer: Any = None
    extra: dict | None = None


def digits_run(folder: Path, *, n_train: int = 240, n_test: int = 40, projection_dim: int = 64) -> Run:
    torch.manual_seed(0)
    split = load_digits_split(n_train=n_train, flip_fraction=0.1, seed=0)
    model = digits_cnn(seed=0)
    ckpts = train_with_checkpoints(model, split.train, folder / "ckpt", epochs=6, checkpoint_every=2, lr=0.1)
    test_data = Subset(split.test, range(n_test))
    kw = dict(projection_dim=projection_dim, seed=0, progress=False)
    train = to.capture(model, ckpts, split.train, folder / "train.zarr", **kw)
    test = to.capture(model, ckpts, test_data, folder / "test.zarr", **kw)
    return Run(
        train,
        test,
        split.train,
        test_data,
        true_labels=split.true_train_labels,
        extra={"split": split, "model": model, "checkpoints": ckpts},
    )


# ---- text --------------------------------------------------------------------------------------
GOOD = ["great", "wonderful", "superb", "lovely", "fine", "brilliant", "moving", "fresh"]
BAD = ["awful", "boring", "dull", "poor", "weak", "clumsy", "bland", "tired"]
FILLER = ["the", "film", "was", "a", "plot", "with", "acting", "and", "story", "truly", "very", "music"]
LENGTH = 12


def make_tokenizer(extra_tokens: list[str]):
    """A word-level Hugging Face fast tokenizer built in memory (no hub, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", *GOOD, *BAD, *FILLER, *extra_tokens]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


class DictTexts(Dataset):
    """Hugging Face style items: input_ids, attention_mask, labels."""

    def __init__(self, texts: list[str], labels: list[int], tokenizer):
        enc = tokenizer(texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.labels = torch.tensor(labels)
        self.texts = texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class BagOfWords(nn.Module):
    """Embedding → per-token tanh layer → masked mean → Linear; returns a dict with logits (and loss when
    labels are given). The per-token layer makes each token's gradient its own."""

    def __init__(self, vocab: int, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.token = nn.Linear(8, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        h = torch.tanh(self.token(self.embed(input_ids)))
        logits = self.head((h * m).sum(1) / m.sum(1).clamp(min=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return _Out(out)


class _Out(dict):
    """A Mapping with attribute access, like a Hugging Face ModelOutput."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(0, 2))
        words = list(rng.choice(FILLER, size=6)) + list(rng.choice(GOOD if y else BAD, size=3))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


def text_run(folder: Path, *, n_train: int = 120, n_test: int = 12, hostile_at: int = 3) -> Run:
    """Sentences labelled by their good or bad words; training text ``hostile_at`` holds a <script> and an
    <img onerror> (as tokens of the vocabulary, so they survive decoding)."""
    torch.manual_seed(0)
    texts, labels = sentences(n_train, 0)
    texts[hostile_at] = f"the film {SCRIPT_TEXT} was {IMG_TEXT} great"
    tokenizer = make_tokenizer([SCRIPT_TEXT, "<img", "src=x", "onerror=\"document.title='pwned'\">"])
    train_data = DictTexts(texts, labels, tokenizer)
    test_texts, test_labels = sentences(n_test, 1)
    test_data = DictTexts(test_texts, test_labels, tokenizer)
    model = BagOfWords(len(tokenizer))
    ckpts = train_with_checkpoints(model, train_data, folder / "ckpt", epochs=4, checkpoint_every=2, lr=0.5)
    kw = dict(projection_dim=None, seed=0, progress=False)
    train = to.capture(model, ckpts, train_data, folder / "train.zarr", **kw)
    test = to.capture(model, ckpts, test_data, folder / "test.zarr", **kw)
    return Run(
        train,
        test,
        train_data,
        test_data,
        tokenizer=tokenizer,
        extra={"texts": texts, "test_texts": test_texts, "model": model, "checkpoints": ckpts},
    )


# ---- tabular -----------------------------------------------------------------------------------
def wine_run(folder: Path, *, n_test: int = 30) -> Run:
    from sklearn.datasets import load_wine

    torch.manual_seed(0)
    d = load_wine()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    train_data = TensorDataset(torch.from_numpy(x[n_test:]), torch.from_numpy(y[n_test:]))
    test_data = TensorDataset(torch.from_numpy(x[:n_test]), torch.from_numpy(y[:n_test]))
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
    ckpts = train_with_checkpoints(model, train_data, folder / "ckpt", epochs=4, checkpoint_every=2, lr=0.1)
    kw = dict(projection_dim=None, seed=0, progress=False)
    train = to.capture(model, ckpts, train_data, folder / "train.zarr", **kw)
    test = to.capture(model, ckpts, test_data, folder / "test.zarr", **kw)
    return Run(train, test, train_data, test_data, extra={"feature_names": list(d.feature_names)})
