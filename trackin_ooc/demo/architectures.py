"""Small versions of the architectures users bring, built from code or configs (never downloaded),
and real digits data shaped for them.

- :func:`cifar_resnet`: a CIFAR-style ResNet with BatchNorm (the TracIn paper's model family);
  :func:`resnet18_cifar` is the 11M-parameter ResNet-18 for 32×32 inputs.
- :func:`tiny_bert`, :func:`tiny_gpt2`: Hugging Face ``BertForSequenceClassification`` and
  ``GPT2LMHeadModel`` from small config objects (needs ``transformers``).
- :func:`digits_rgb32`: digits upsampled to 3×32×32 images; :func:`digit_token_dicts`: digits as token
  sequences of varying length in Hugging Face style dict examples, with :func:`pad_collate` padding them.
- :func:`train_dict_batches`: plain SGD with TracIn checkpoints for models that take dict batches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .training import train_with_checkpoints

# ---- ResNets with BatchNorm -----------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3×3 conv + BatchNorm layers with an identity (or 1×1 conv + BatchNorm) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3×3 stem conv + BatchNorm, stages of BasicBlocks (stride 2 between stages), global pool, Linear."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] | int = 1,
        classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        blocks = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c, w, stride=2 if i > 0 and j == 0 else 1))
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(
    widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] | int = 1, classes: int = 10, *, seed: int = 0
) -> CifarResNet:
    """A CIFAR-style ResNet with BatchNorm (16-32-64 channels, one block per stage by default)."""
    torch.manual_seed(seed)
    return CifarResNet(widths, blocks, classes)


def resnet18_cifar(classes: int = 10, *, seed: int = 0) -> CifarResNet:
    """ResNet-18 for 32×32 inputs (64-128-256-512 channels, two blocks per stage; 11.2M parameters)."""
    return cifar_resnet((64, 128, 256, 512), (2, 2, 2, 2), classes, seed=seed)


# ---- Hugging Face models from configs --------------------------------------------------------------
DIGIT_LEVELS = 17  # pixel intensities 0..16 of scikit-learn's digits
PAD_ID, CLS_ID, FIRST_PIXEL_ID = 0, 1, 2
TOKEN_VOCAB = FIRST_PIXEL_ID + DIGIT_LEVELS


def tiny_bert(
    classes: int = 10,
    *,
    vocab: int = TOKEN_VOCAB,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 80,
    seed: int = 0,
) -> nn.Module:
    """``BertForSequenceClassification`` from a small ``BertConfig`` (eager attention, no dropout)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    # num_labels and attn_implementation are PretrainedConfig keywords, outside BertConfig's typed signature.
    options: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        num_labels=classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD_ID,
        attn_implementation="eager",
    )
    config = BertConfig(**options)
    return BertForSequenceClassification(config)


def tiny_gpt2(
    *,
    vocab: int = TOKEN_VOCAB,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 80,
    seed: int = 0,
) -> nn.Module:
    """``GPT2LMHeadModel`` from a small ``GPT2Config`` (lm_head tied to wte; eager attention, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    options: dict[str, Any] = dict(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD_ID,
        bos_token_id=CLS_ID,
        eos_token_id=CLS_ID,
        attn_implementation="eager",
    )
    config = GPT2Config(**options)
    return GPT2LMHeadModel(config)


# ---- digits shaped for these models ----------------------------------------------------------------
def digits_rgb32(dataset: TensorDataset) -> TensorDataset:
    """(1, 8, 8) digit images → (3, 32, 32), bilinear upsampling, normalised per channel."""
    x, y = dataset.tensors
    big = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    big = (big - 0.3) / 0.35
    return TensorDataset(big.expand(-1, 3, -1, -1).contiguous(), y.clone())


class DigitTokens(Dataset):
    """Digits as token sequences, Hugging Face style: ``{"input_ids", "attention_mask", "labels"}`` per example.

    Each image is read row by row (pixel intensity 0..16 → token 2..18) after a [CLS] token, and cut after
    its last non-blank row, so lengths vary (a collator pads them). ``task="classify"``: ``labels`` is the
    digit; ``task="lm"``: ``labels`` are the input ids (causal language modelling; padding → -100).
    """

    def __init__(self, dataset: TensorDataset, task: str = "classify"):
        if task not in ("classify", "lm"):
            raise ValueError(f"task must be 'classify' or 'lm', got {task!r}")
        x, y = dataset.tensors
        levels = torch.round(x[:, 0] * 16).to(torch.int64)  # (n, 8, 8)
        self.examples = []
        for img, label in zip(levels, y):
            rows = torch.nonzero(img.sum(1)).flatten()
            last = int(rows.max()) + 1 if len(rows) else 1
            ids = torch.cat([torch.tensor([CLS_ID]), img[:last].reshape(-1) + FIRST_PIXEL_ID])
            self.examples.append((ids, int(label)))
        self.task = task

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, label = self.examples[i]
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        out["labels"] = torch.tensor(label) if self.task == "classify" else ids.clone()
        return out


def digit_token_dicts(dataset: TensorDataset, task: str = "classify") -> DigitTokens:
    return DigitTokens(dataset, task)


def pad_collate(examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad a list of dict examples to the longest (what a Hugging Face data collator does):
    ``input_ids`` with PAD_ID, ``attention_mask`` with 0, sequence ``labels`` with -100."""
    longest = max(int(e["input_ids"].shape[0]) for e in examples)
    out: dict[str, list[torch.Tensor]] = {}
    for e in examples:
        for key, value in e.items():
            if value.ndim == 1:
                fill = {"input_ids": PAD_ID, "attention_mask": 0, "labels": -100}.get(key, 0)
                value = F.pad(value, (0, longest - value.shape[0]), value=fill)
            out.setdefault(key, []).append(value)
    return {k: torch.stack(v) for k, v in out.items()}


def train_dict_batches(
    model: nn.Module,
    dataset: Dataset,
    checkpoint_dir: str | os.PathLike,
    *,
    epochs: int = 6,
    lr: float = 0.05,
    batch_size: int = 32,
    checkpoint_every: int = 2,
    seed: int = 0,
) -> list[Path]:
    """SGD on padded dict batches (``model(**batch)`` computes the loss from ``labels``), saving TracIn
    checkpoints every few epochs (:func:`~.training.train_with_checkpoints` with :func:`pad_collate`)."""
    return train_with_checkpoints(
        model,
        dataset,
        checkpoint_dir,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        seed=seed,
        collate_fn=pad_collate,
    )


def accuracy(model: nn.Module, dataset: Dataset) -> float:
    """Share of examples whose arg-max logit is the label (tuples or dict batches)."""
    model.eval()
    hits, n = 0, 0
    with torch.no_grad():
        for item in DataLoader(
            dataset, batch_size=256, collate_fn=pad_collate if isinstance(dataset, DigitTokens) else None
        ):
            if isinstance(item, Mapping):
                logits, y = model(**{k: v for k, v in item.items() if k != "labels"}).logits, item["labels"]
            else:
                logits, y = model(item[0]), item[1]
            hits += int((logits.argmax(-1) == y).sum())
            n += len(y)
    return hits / max(n, 1)


__all__ = [
    "BasicBlock",
    "CifarResNet",
    "cifar_resnet",
    "resnet18_cifar",
    "tiny_bert",
    "tiny_gpt2",
    "digits_rgb32",
    "DigitTokens",
    "digit_token_dicts",
    "pad_collate",
    "train_dict_batches",
    "accuracy",
    "TOKEN_VOCAB",
]
