"""A seeded family of small transformers from ``transformers`` configs, for checking projections on models
nobody tuned them on.

:func:`sample_configs` draws BERT-, GPT-2-, RoBERTa- and ViT-style configurations (widths 32–128, 1–3
layers, 1–8 heads, vocabularies 200–1,000, sequences of 12–24 tokens, tied or untied output heads; BERT
as a classifier or masked LM, GPT-2 as a causal LM, RoBERTa as a classifier, ViT on digit patches);
:func:`build_case` makes the model from its config (never from a hub), synthetic data it can learn
(class-dependent token mixtures, a sparse Markov chain for language modelling, scikit-learn digits as
2×2 patches for ViT), trains it a few AdamW steps and keeps checkpoints; :func:`projection_spearman` then
measures how well projected stores rank against exact influence, computed from per-example autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import DataLoader, Dataset

FAMILIES = ("bert", "gpt2", "roberta", "vit")
CLASSES = 4
IGNORE = -100


@dataclass(frozen=True)
class TransformerConfig:
    """One member of the family. ``task``: "classify" (a sequence or image classifier), "mlm" (masked
    language modelling, BERT/RoBERTa) or "lm" (causal language modelling, GPT-2); ``tied``: the output
    head shares the word embeddings (language-model tasks)."""

    family: str
    task: str
    hidden: int
    layers: int
    heads: int
    vocab: int
    length: int
    tied: bool
    seed: int

    def describe(self) -> str:
        tie = " tied" if self.tied else ""
        vocab = "" if self.family == "vit" else f" V{self.vocab}"
        return f"{self.family} {self.task}{tie} h{self.hidden} L{self.layers} H{self.heads}{vocab} T{self.length}"


def sample_configs(n: int, seed: int = 0) -> list[TransformerConfig]:
    """``n`` configurations drawn with ``seed``, the families in turn (BERT, GPT-2, RoBERTa, ViT, ...)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        heads = int(rng.choice([1, 2, 4, 8]))
        per_head = [w for w in range(32, 129, 8) if w % heads == 0 and w // heads >= 8]
        hidden = int(rng.choice(per_head))
        layers = int(rng.integers(1, 4))
        vocab = int(rng.integers(200, 1001))
        length = int(rng.integers(12, 25))
        if family == "gpt2":
            task, tied = "lm", bool(rng.integers(2))
        elif family == "vit":
            task, tied, length = "classify", False, 17  # 16 patches of 2×2 pixels and [CLS]
        elif family == "roberta":  # masked LM: its per-example lm_head.bias gradient fails in vmap and the loop
            task, tied = "classify", False
        else:
            task = str(rng.choice(["classify", "mlm"]))
            tied = task == "mlm" and bool(rng.integers(2))
        out.append(
            TransformerConfig(family, task, hidden, layers, heads, vocab, length, tied, int(rng.integers(0, 2**31 - 1)))
        )
    return out


# ---- models -------------------------------------------------------------------------------------------
def build_model(cfg: TransformerConfig) -> nn.Module:
    """The model of ``cfg`` from a ``transformers`` config (eager attention, no dropout), seeded."""
    import transformers as hf

    torch.manual_seed(cfg.seed)
    # PretrainedConfig keywords (num_labels, attn_implementation) lie outside the typed signatures.
    eager: dict[str, Any] = {"attn_implementation": "eager"}
    common: dict[str, Any] = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **eager)
    labelled: dict[str, Any] = {"num_labels": CLASSES}
    digit_classes: dict[str, Any] = {"num_labels": 10}  # ViT reads digits as patches
    config: Any
    if cfg.family == "gpt2":
        config = hf.GPT2Config(
            vocab_size=cfg.vocab,
            n_embd=cfg.hidden,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            n_positions=cfg.length,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=cfg.tied,
            **eager,
        )
        return hf.GPT2LMHeadModel(config)
    if cfg.family == "vit":
        config = hf.ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=2 * cfg.hidden,
            **common,
            **digit_classes,
        )
        return hf.ViTForImageClassification(config)
    kind = {
        "bert": (hf.BertConfig, hf.BertForSequenceClassification, hf.BertForMaskedLM),
        "roberta": (hf.RobertaConfig, hf.RobertaForSequenceClassification, hf.RobertaForMaskedLM),
    }[cfg.family]
    extra: dict[str, Any] = dict(max_position_embeddings=cfg.length + 2 + (2 if cfg.family == "roberta" else 0))
    if cfg.family == "roberta":
        extra.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    config = kind[0](
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=2 * cfg.hidden,
        tie_word_embeddings=cfg.tied,
        **extra,
        **common,
        **labelled,
    )
    return (kind[1] if cfg.task == "classify" else kind[2])(config)


def mlm_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Per-example masked-LM loss: cross-entropy at the positions whose target is not -100, summed."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return per_token.sum(1)


def loss_for(cfg: TransformerConfig) -> Callable | None:
    """The per-example loss a capture of ``cfg`` uses (None: trackin-ooc's default)."""
    return mlm_loss if cfg.task == "mlm" else None


# ---- data ---------------------------------------------------------------------------------------------
class DictExamples(Dataset):
    """Examples as dicts of tensors (what a Hugging Face collator yields), ``labels`` the target."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def make_data(cfg: TransformerConfig, n: int, seed: int) -> DictExamples:
    """``n`` synthetic examples of ``cfg``'s task, drawn with ``seed``; the structure (class token mixtures,
    the Markov chain) is fixed by the config's seed, so train and test share it."""
    structure = np.random.default_rng(cfg.seed)
    rng = np.random.default_rng(seed)
    if cfg.family == "vit":
        from .digits import load_digits_split

        split = load_digits_split(n_train=1500, seed=0)
        x = torch.cat([split.train.tensors[0], split.test.tensors[0]])
        y = torch.cat([split.train.tensors[1], split.test.tensors[1]])
        idx = torch.from_numpy(rng.integers(0, len(y), n))
        return DictExamples({"pixel_values": (x[idx] - 0.3) / 0.35, "labels": y[idx].clone()})
    low = 3  # ids below are special (padding, [CLS], masks)
    if cfg.task == "classify":
        favoured = [structure.choice(np.arange(low, cfg.vocab), 12, replace=False) for _ in range(CLASSES)]
        labels = rng.integers(0, CLASSES, n)
        ids = rng.integers(low, cfg.vocab, (n, cfg.length))
        pick = rng.random((n, cfg.length)) < 0.4
        for i in range(n):
            ids[i, pick[i]] = rng.choice(favoured[labels[i]], int(pick[i].sum()))
        ids[:, 0] = 2
        return DictExamples(
            {
                "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.ones(n, cfg.length, dtype=torch.int64),
                "labels": torch.from_numpy(labels),
            }
        )
    successors = structure.integers(low, cfg.vocab, (cfg.vocab, 3))
    ids = np.empty((n, cfg.length), dtype=np.int64)
    ids[:, 0] = rng.integers(low, cfg.vocab, n)
    for t in range(1, cfg.length):
        follow = successors[ids[:, t - 1], rng.integers(0, 3, n)]
        ids[:, t] = np.where(rng.random(n) < 0.85, follow, rng.integers(low, cfg.vocab, n))
    ids_t = torch.from_numpy(ids)
    mask = torch.ones(n, cfg.length, dtype=torch.int64)
    if cfg.task == "lm":
        return DictExamples({"input_ids": ids_t, "attention_mask": mask, "labels": ids_t.clone()})
    masked = torch.from_numpy(rng.random((n, cfg.length)) < 0.2)
    masked[:, 0] |= ~masked.any(1)  # at least one masked position per example
    targets = torch.where(masked, ids_t, torch.full_like(ids_t, IGNORE))
    return DictExamples(
        {
            "input_ids": torch.where(masked, torch.full_like(ids_t, low - 1), ids_t),
            "attention_mask": mask,
            "labels": targets,
        }
    )


def collate(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


# ---- a trained case -------------------------------------------------------------------------------------
@dataclass
class Case:
    """A config's model factory, checkpoints (state dicts), learning rates, train and test examples and loss."""

    cfg: TransformerConfig
    make: Callable[[], nn.Module]
    checkpoints: list[dict[str, torch.Tensor]]
    learning_rates: list[float]
    train: DictExamples
    test: DictExamples
    loss_fn: Callable | None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.make().parameters())


def per_example_loss(cfg: TransformerConfig, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example losses of a batch, as the capture computes them (default loss or masked-LM)."""
    from ..capturing.per_example.losses import default_loss

    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return (loss_for(cfg) or default_loss)(out, batch["labels"])


def build_case(
    cfg: TransformerConfig,
    n_train: int = 120,
    n_test: int = 20,
    *,
    steps: int = 30,
    checkpoints: int = 2,
    lr: float = 2e-3,
    batch_size: int = 16,
) -> Case:
    """Train ``cfg``'s model ``steps`` AdamW steps on ``n_train`` synthetic examples, keeping ``checkpoints``
    evenly spaced state dicts (the last one after the last step)."""
    train, test = make_data(cfg, n_train, seed=cfg.seed + 1), make_data(cfg, n_test, seed=cfg.seed + 2)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=gen)
    keep = {round(steps * (i + 1) / checkpoints) for i in range(checkpoints)}
    states, step = [], 0
    model.train()
    while step < steps:
        for batch in loader:
            opt.zero_grad()
            per_example_loss(cfg, model, batch).mean().backward()
            opt.step()
            step += 1
            if step in keep:
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            if step >= steps:
                break
    return Case(cfg, lambda: build_model(cfg), states, [lr] * len(states), train, test, loss_for(cfg))


# ---- exact influence and the projections' ranking ---------------------------------------------------------
def exact_gradients(case: Case, data: DictExamples, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, D) per-example gradients of every parameter by autograd, one example at a time (eval mode)."""
    model = case.make()
    model.load_state_dict(state)
    model.eval()
    params = [p for p in model.parameters()]
    rows = []
    for i in range(len(data)):
        loss = per_example_loss(case.cfg, model, collate([data[i]]))[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    return torch.stack(rows)


def exact_influence(case: Case) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
    """(test × train exact TracInCP scores, the Gram matrix of every checkpoint's test and train gradients
    stacked checkpoint by checkpoint ((C·N) × (C·N)), and those gradients: per checkpoint (N, D), test rows
    first)."""
    n_test = len(case.test)
    rows = [
        torch.cat([exact_gradients(case, case.test, s), exact_gradients(case, case.train, s)]) for s in case.checkpoints
    ]
    x = torch.cat(rows).to(torch.float64)
    gram = (x @ x.T).numpy()
    del x
    n = len(rows[0])
    scores = sum(
        lr * gram[c * n : c * n + n_test, c * n + n_test : (c + 1) * n] for c, lr in enumerate(case.learning_rates)
    )
    return np.asarray(scores), gram, rows


def factored_map_scores(case: Case, grads: Sequence[torch.Tensor], dim: int, seed: int) -> np.ndarray:
    """Scores of the factored projection applied to exact per-example gradients (``project_gradients``: the
    linear map a factored capture computes through its hooks, see :func:`factored_scores`)."""
    from ..capturing.projection.factored import factored_spec, project_gradients

    model = case.make()
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    spec = factored_spec(model, [n for n, _ in shapes], dim, seed)
    n_test = len(case.test)
    scores: Any = 0.0
    for g, lr in zip(grads, case.learning_rates):
        parts, start = {}, 0
        for name, shape in shapes:
            size = int(np.prod(shape))
            parts[name] = g[:, start : start + size].reshape(len(g), *shape)
            start += size
        f = project_gradients(spec, parts).to(torch.float64)
        scores = scores + lr * (f[:n_test] @ f[n_test:].T).numpy()
    return np.asarray(scores)


def gaussian_scores(gram: np.ndarray, lrs: Sequence[float], n_test: int, dim: int, seed: int) -> np.ndarray:
    """Scores of a dense Gaussian projection to ``dim`` (entries N(0, 1/dim), one matrix for every checkpoint,
    as ``projection="gaussian"`` uses), drawn exactly in distribution from the stacked gradients' Gram matrix:
    for X = U S Vᵀ, X R = U S (Vᵀ R) and Vᵀ R has i.i.d. N(0, 1/dim) entries, so the projected gradients are
    U S W with W Gaussian (no D × dim matrix is needed)."""
    rng = np.random.default_rng(seed)
    vals, vecs = np.linalg.eigh(gram)
    keep = vals > vals.max() * 1e-12
    z = (vecs[:, keep] * np.sqrt(vals[keep])) @ (rng.standard_normal((int(keep.sum()), dim)) / np.sqrt(dim))
    n = len(gram) // len(lrs)
    return np.asarray(
        sum(lr * z[c * n : c * n + n_test] @ z[c * n + n_test : (c + 1) * n].T for c, lr in enumerate(lrs))
    )


def mean_row_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Spearman rank correlation of a[i] and b[i]."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return float(np.mean((ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))))


def factored_scores(case: Case, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, object]:
    """Scores of factored stores captured separately for train and test (in memory, through
    ``trackin_ooc.capture``), the train store's features, and the train store."""
    import trackin_ooc as to

    kw: dict[str, Any] = dict(
        learning_rates=case.learning_rates,
        projection="factored",
        projection_dim=dim,
        seed=seed,
        loss_fn=case.loss_fn,
        device="cpu",
        batch_size=32,
        progress=False,
    )
    train = to.capture(
        case.make(), case.checkpoints, DataLoader(case.train, batch_size=32, collate_fn=collate), None, **kw
    )
    test = to.capture(
        case.make(), case.checkpoints, DataLoader(case.test, batch_size=32, collate_fn=collate), None, **kw
    )
    return np.asarray(to.influence(test, train).values), np.asarray(train.read_grads()), train
