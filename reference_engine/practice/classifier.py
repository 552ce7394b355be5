"""The two programming problems interviewers pose about fast inference, made real: a text
classifier that runs on the accelerator, and the same classifier quantized, with its
accuracy and speed measured. Both stand on SmolLM2-135M's hidden states, on a labelled set
built from text every Python installation ships (the pydoc topics), so nothing is
downloaded:

  - texts: paragraphs of five groups of pydoc topics (errors, numbers, text, classes,
    control flow), cut into 32-token pieces; the label is the group;
  - features: SmolLM2's final-norm hidden states, averaged over the 32 tokens (576 numbers);
  - drill D.1: train a linear softmax classifier on those features, on a given device;
  - drill D.2: its logits with int8 weights and int8 activations (per row, symmetric);
  - `practice classifier`: accuracy and texts per second of the whole classifier with an
    fp32 and an int8 backbone and head, measured side by side.

Held-out pieces come from paragraphs never seen in training (a split by paragraph), so a
piece's neighbours cannot leak its label.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

GROUPS = {
    "errors": ("try", "raise", "exceptions", "assert"),
    "numbers": ("numbers", "integers", "floating", "imaginary", "numeric-types", "binary", "bitwise", "power",
                "shifting", "unary"),
    "text": ("strings", "string-methods", "formatstrings"),
    "classes": ("class", "customization", "specialnames", "attribute-access", "objects", "specialattrs"),
    "control": ("if", "while", "for", "break", "continue", "compound", "else", "pass", "return"),
}
PIECE = 32  # tokens per text
PER_CLASS = 40  # pieces per group, at most


def paragraphs() -> list[tuple[str, int]]:
    """(paragraph, label) for every prose paragraph of the groups' topics (code examples left out)."""
    from pydoc_data.topics import topics

    out = []
    for label, names in enumerate(GROUPS.values()):
        for name in names:
            for para in topics[name].split("\n\n"):
                para = " ".join(para.split())
                if len(para) >= 80 and not para.startswith(">>>") and sum(c.isalpha() for c in para) / len(para) > 0.7:
                    out.append((para, label))
    return out


def pieces(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (N, 32), labels (N,), paragraph number (N,): up to PER_CLASS pieces per group."""
    ids, labels, source = [], [], []
    taken = [0] * len(GROUPS)
    for number, (para, label) in enumerate(paragraphs()):
        tokens = tokenizer.encode(para)
        for start in range(0, len(tokens) - PIECE + 1, PIECE):
            if taken[label] < PER_CLASS:
                ids.append(tokens[start:start + PIECE])
                labels.append(label)
                source.append(number)
                taken[label] += 1
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(source)


def hidden_features(model, ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Mean over tokens of the final-norm hidden states: (N, d_model) float32."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            B, T = chunk.shape
            x, rope, mask = model.embed(chunk, 0, torch.arange(T).expand(B, T), None)
            for layer in model.layers:
                x = layer(x, rope, 0, mask)
            out.append(model.norm(x).float().mean(1))  # (B, d_model)
    return torch.cat(out)


CACHE_VERSION = 1  # bump when pieces() or hidden_features() change what they compute


def cache_path() -> Path:
    """Where the features are kept between processes: keyed by the model file (path, size,
    time), the Python version (its pydoc topics are the texts) and the way they are made.
    Only trusted processes write there: the grader's sandbox refuses a child's writes
    outside its own folder."""
    from ..gguf_loader import default_model_path

    model = default_model_path()
    stat = model.stat()
    key = hashlib.sha256(f"{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{sys.version_info[:2]}|"
                         f"{PIECE}|{PER_CLASS}|{GROUPS}|{CACHE_VERSION}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("DOJO_CACHE_DIR", Path.home() / ".cache" / "inference-dojo"))
    return root / f"classifier_features_{key}.pt"


@lru_cache(maxsize=1)
def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, 576), labels (N,), paragraph (N,): SmolLM2 runs once per machine (about
    7 s on 2 cores), then the features are read from the cache."""
    from ..load import load_model

    path = cache_path()
    try:
        saved = torch.load(path, weights_only=True)
        return saved["features"], saved["labels"], saved["source"]
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError):
        pass  # absent or unreadable: computed again below, and rewritten
    model, tokenizer = load_model(pack=False)
    ids, labels, source = pieces(tokenizer)
    features = hidden_features(model, ids)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"features": features, "labels": labels, "source": source}, tmp)
        tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
    except OSError:
        pass  # a read-only home: computed every time, still correct
    return features, labels, source


def split(source: torch.Tensor, seed: int, held_out: float = 1 / 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out), whole paragraphs on one side: about `held_out` of the pieces."""
    g = torch.Generator().manual_seed(seed)
    paragraphs_ = source.unique()
    order = paragraphs_[torch.randperm(len(paragraphs_), generator=g)]
    test, budget = [], int(len(source) * held_out)
    for p in order.tolist():
        idx = (source == p).nonzero().flatten().tolist()
        if len(test) + len(idx) <= budget:
            test += idx
    mask = torch.zeros(len(source), dtype=torch.bool)
    mask[test] = True
    return (~mask).nonzero().flatten(), mask.nonzero().flatten()


def train_linear(features: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 300,
                 lr: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference D.1: standardize, fit softmax regression with AdamW, fold the
    standardization back into (weight (C, d), bias (C,)) so they apply to raw features."""
    x = features.double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(z @ weight.T + bias, labels).backward()
        opt.step()
    weight, bias = weight.detach(), bias.detach()
    return weight / std, bias - (weight / std) @ mean  # w.(x - m)/s + b = (w/s).x + (b - (w/s).m)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, in x's precision: codes = round(x / s), s = max|row| / 127 (a
    zero row gets s = 1 and codes 0): chapter 4's `scale_and_zero` and `quantize_codes`."""
    from ..compression.formats import quantize_codes, scale_and_zero

    scale, _ = scale_and_zero(x.amin(dim=1), x.amax(dim=1), 8, symmetric=True)
    return quantize_codes(x, scale[:, None], None, 8, symmetric=True), scale


def int8_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference D.2: logits = (qx @ qw^T) * sx * sw + bias, int32-exact sums (float64 here)."""
    qx, sx = quantize_rows(features.double())
    qw, sw = quantize_rows(weight.double())
    return (qx @ qw.T) * sx[:, None] * sw[None, :] + bias.double()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def measure(seed: int = 0, repeats: int = 3, progress=None, texts: int | None = None) -> dict:
    """The classifier end to end (backbone + head) with fp32 and int8 weights, side by side in
    one process: held-out accuracy, and texts per second through the backbone (batch 64 of
    32 tokens). The int8 backbone is the engine's W8A8 (int8 weights per channel, int8
    activations per token, compiled integer matmuls where the kernels are built).
    texts: use only the first pieces of each class (a quick run; accuracy then means little)."""
    from ..load import load_model

    fp32, tokenizer = load_model(pack=False)
    int8, _ = load_model(quantize="w8a8")
    ids, labels, source = pieces(tokenizer)
    if texts is not None:
        keep = torch.cat([(labels == c).nonzero().flatten()[: max(texts // len(GROUPS), 2)] for c in range(len(GROUPS))])
        ids, labels, source = ids[keep], labels[keep], source[keep]
    train, test = split(source, seed)
    rows = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        start = time.perf_counter()
        feats = hidden_features(model, ids)
        timings = [time.perf_counter() - start]
        for _ in range(repeats - 1):
            start = time.perf_counter()
            hidden_features(model, ids[:128])
            timings.append((time.perf_counter() - start) * len(ids) / min(len(ids), 128))
        weight, bias = train_linear(feats[train], labels[train], len(GROUPS))
        x = feats[test].double()
        rows[name] = {"texts_per_s": len(ids) / min(timings),
                      "accuracy_fp32_head": accuracy(x @ weight.T + bias, labels[test]),
                      "accuracy_int8_head": accuracy(int8_logits(x, weight, bias), labels[test])}
        if progress:
            progress(name)
    rows["texts"] = {"train": len(train), "held_out": len(test), "classes": len(GROUPS), "tokens": PIECE}
    return rows


def format_measure(rows: dict) -> str:
    t = rows["texts"]
    lines = [f"{t['train']} training and {t['held_out']} held-out texts of {t['tokens']} tokens, {t['classes']} classes "
             "(pydoc topics); features: SmolLM2-135M's mean final hidden state",
             f"{'backbone':<10}{'texts/s':>10}{'acc (fp32 head)':>18}{'acc (int8 head)':>18}"]
    for name in ("fp32", "int8"):
        r = rows[name]
        lines.append(f"{name:<10}{r['texts_per_s']:>10.1f}{r['accuracy_fp32_head']:>18.1%}{r['accuracy_int8_head']:>18.1%}")
    lines.append(f"int8 backbone speed: {rows['int8']['texts_per_s'] / rows['fp32']['texts_per_s']:.2f}x fp32 "
                 "(measured in this run)")
    return "\n".join(lines)
