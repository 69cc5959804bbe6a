"""DINO's weighted k-NN vote, in NumPy: the one implementation behind ``POST /v1/classify`` and
``dinoserve eval-knn``.

Wu et al. (2018), as used by Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*
(ICCV 2021), official ``eval_knn.py`` (``knn_classifier``): features are L2-normalised so that a dot
product is the cosine similarity; each query takes its ``k`` most similar reference vectors, and each of
them votes for its class with weight ``exp(similarity / T)``; classes rank by their summed votes.

The weights here are ``exp((similarity - s_max) / T)`` with ``s_max`` the query's best similarity: the
same weights up to one positive factor per query, so rankings and vote shares are unchanged, but no
``exp`` overflows at a small ``T``.
"""

from __future__ import annotations

import numpy as np

DEFAULT_K = 20  # the paper's headline k
DEFAULT_TEMPERATURE = 0.07  # the paper's T
CHUNK_SIZE = 1024  # queries per similarity matrix; bounds memory at chunk × reference vectors


def class_votes(similarities: np.ndarray, labels: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """Votes per class, ``(num_queries, num_classes)``, from each query's neighbours.

    ``similarities`` ``(num_queries, k)`` are cosine similarities of the neighbours (best first or in any
    order) and ``labels`` ``(num_queries, k)`` their integer classes below ``num_classes``. Each row is
    scaled so that its best neighbour weighs 1 (see the module docstring).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    similarities = np.asarray(similarities, dtype=np.float64)
    weights = np.exp((similarities - similarities.max(axis=1, keepdims=True)) / temperature)
    votes = np.zeros((len(similarities), num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(similarities)), similarities.shape[1])
    np.add.at(votes, (rows, np.asarray(labels).ravel()), weights.ravel())
    return votes


def rank_classes(votes: np.ndarray) -> np.ndarray:
    """Class indices of each row, most voted first; equal votes rank by class index."""
    return np.argsort(-votes, axis=1, kind="stable")


def nearest(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Similarities and indices ``(num_queries, k)`` of each query's ``k`` largest dot products, best first."""
    similarity = queries @ references.T
    if k < similarity.shape[1]:
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(similarity.shape[1]), (len(similarity), similarity.shape[1]))
    top_sim = np.take_along_axis(similarity, top, axis=1)
    order = np.argsort(-top_sim, axis=1, kind="stable")
    return np.take_along_axis(top_sim, order, axis=1), np.take_along_axis(top, order, axis=1)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy, in percent, of the weighted k-NN classifier (see ``eval-knn``).

    ``train_features`` ``(num_train, dim)`` and ``test_features`` ``(num_test, dim)`` are L2-normalised;
    labels are integer classes below ``num_classes``. A test image is top-5 correct when its label is
    among the ``min(5, k, num_classes)`` highest-voted classes: the usual top-5 for ``k >= 5`` and five
    classes or more, the official code's ``min(5, k)`` below that.
    """
    num_train, num_test = len(train_features), len(test_features)
    if not 1 <= k <= num_train:
        raise ValueError(f"k must be between 1 and the number of training images ({num_train}), got {k}")
    if num_test == 0:
        raise ValueError("no test images to classify")
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    ranked = min(5, k, num_classes)
    top1 = top5 = 0
    for start in range(0, num_test, chunk_size):
        similarity, neighbours = nearest(test_features[start:start + chunk_size], train_features, k)
        votes = class_votes(similarity, train_labels[neighbours], num_classes, temperature)
        correct = rank_classes(votes)[:, :ranked] == test_labels[start:start + chunk_size, None]
        top1 += int(correct[:, 0].sum())
        top5 += int(correct.sum())
    return top1 * 100.0 / num_test, top5 * 100.0 / num_test


def label_shares(similarities: np.ndarray, labels: list[str], temperature: float) -> list[tuple[str, float]]:
    """One query's neighbours (cosine similarities and string labels) → ``(label, vote share)`` of every
    label voted for, most voted first; equal votes rank by label, as ``eval-knn`` ranks class folders."""
    classes = sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    votes = class_votes(np.asarray(similarities, dtype=np.float64)[None],
                        np.array([[index[label] for label in labels]]), len(classes), temperature)
    shares = votes[0] / votes[0].sum()
    return [(classes[i], float(shares[i])) for i in rank_classes(votes)[0]]
