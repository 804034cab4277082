"""Figures for evaluation reports (matplotlib's object API: no pyplot, no global backend change)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_confusion_matrix", "plot_roc_curves", "plot_confidence", "plot_training_curves"]


def _figure(w: float, h: float):  # noqa: ANN202
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Counts and row-normalised recall in each cell."""
    fig = _figure(5.6, 4.8)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (count, row fraction)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path)
    return Path(path)


def plot_roc_curves(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC curve per class with its AUC (classes absent from ``y_true`` are skipped)."""
    from sklearn.metrics import auc, roc_curve

    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    for k, name in enumerate(classes):
        pos = y_true == k
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, proba[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f}, n={int(pos.sum())})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path)
    return Path(path)


def plot_confidence(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Per true class: histogram of the top probability, correct vs wrong predictions."""
    fig = _figure(2.4 * len(classes), 2.6)
    axes = fig.subplots(1, len(classes), sharey=True)
    pred, conf = proba.argmax(1), proba.max(1)
    bins = np.linspace(0, 1, 21)
    for k, (ax, name) in enumerate(zip(np.atleast_1d(axes), classes, strict=True)):
        m = y_true == k
        ax.hist(conf[m & (pred == k)], bins=bins, color="tab:green", alpha=0.7, label="correct")
        ax.hist(conf[m & (pred != k)], bins=bins, color="tab:red", alpha=0.7, label="wrong")
        ax.set_title(f"{name} (n={int(m.sum())})", fontsize=8)
        ax.set_xlabel("top probability", fontsize=7)
    first = np.atleast_1d(axes)[0]
    if len(y_true):  # one log axis shared by all (a class without crops has an empty panel on it)
        first.set_yscale("log")
    first.legend(fontsize=7)
    fig.savefig(path)
    return Path(path)


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Training/validation loss and accuracy per epoch (plus validation macro-F1)."""
    fig = _figure(9, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [h["epoch"] for h in history]
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(ep, [h["train_acc"] for h in history], "o-", label="train accuracy")
    ax2.plot(ep, [h["val_acc"] for h in history], "o-", label="val accuracy")
    ax2.plot(ep, [h["val_macro_f1"] for h in history], "s--", label="val macro-F1")
    ax2.set_xlabel("epoch")
    ax2.legend()
    fig.savefig(path)
    return Path(path)
