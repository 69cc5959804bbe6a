"""Weighted k-NN evaluation against the rule of the DINO paper / official ``eval_knn.py``
(``knn_classifier``): hand-computed cases, a loop reference in NumPy, and ``dinoserve eval-knn`` end to
end on a tiny trained run and its exported bundle."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import run_cli
from core.transform import preprocess
from core.model_card import Preprocess
from training.data import open_dataset
from training.evaluate import evaluate_knn, extract_features, knn_classifier, random_backbone
from training.export import build_model, load_backbone


def unit(*angles_deg):
    a = np.radians(angles_deg)
    return torch.tensor(np.stack([np.cos(a), np.sin(a)], axis=1), dtype=torch.float32)


def labels(*values):
    return torch.tensor(values)


def test_low_temperature_lets_one_close_neighbour_outvote_two_farther_ones():
    # Neighbours of the query [1, 0] at cosine 1 (class 0), 0.8 and 0.6 (both class 1), k = 3.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    train_labels = labels(0, 1, 1, 2, 2)
    query, query_label = torch.tensor([[1.0, 0.0]]), labels(0)
    # T = 1: class 0 scores e^1 = 2.72 < class 1's e^0.8 + e^0.6 = 4.05, so class 1 wins.
    assert knn_classifier(train, train_labels, query, query_label, k=3, T=1.0, num_classes=3)[0] == 0.0
    # T = 0.1: e^10 = 22026 > e^8 + e^6 = 3384, so the closest neighbour decides.
    assert knn_classifier(train, train_labels, query, query_label, k=3, T=0.1, num_classes=3)[0] == 100.0


def test_top5_counts_a_label_among_the_five_highest_voted_classes():
    # Seven training images at 0°, 10°, ..., 60°, one per class; the query at 0° with k = 6 ranks
    # classes 0, 1, 2, 3, 4, 5 by decreasing similarity (class 6 gets no vote).
    train, train_labels = unit(0, 10, 20, 30, 40, 50, 60), labels(0, 1, 2, 3, 4, 5, 6)
    queries = unit(0, 0, 0)
    top1, top5 = knn_classifier(train, train_labels, queries, labels(0, 4, 5), k=6, T=0.07, num_classes=7)
    assert top1 == pytest.approx(100 / 3)  # only label 0 is the best class
    assert top5 == pytest.approx(200 / 3)  # labels 0 and 4 are in the top 5, label 5 is 6th


def test_with_fewer_than_five_classes_top5_counts_every_class():
    train, train_labels = unit(0, 10, 20, 90), labels(0, 1, 1, 2)
    # k = 4: class 2 is voted for least but with three classes every class is in the "top 5".
    top1, top5 = knn_classifier(train, train_labels, unit(0), labels(2), k=4, T=0.07, num_classes=3)
    assert (top1, top5) == (0.0, 100.0)


def test_with_k_below_five_top5_counts_only_the_k_best_classes_as_the_official_code():
    train, train_labels = unit(0, 10, 170, 180), labels(3, 4, 1, 2)
    # k = 2 votes for classes 3 and 4 only; label 0 would be 3rd of 6 if five classes were counted.
    top1, top5 = knn_classifier(train, train_labels, unit(0, 0), labels(0, 4), k=2, T=0.07, num_classes=6)
    assert (top1, top5) == (0.0, 50.0)


def reference_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """Per test image: cosine to every train image, k largest, class score = sum of exp(sim / T)."""
    top1 = top5 = 0
    for x, y in zip(test, test_labels):
        sims = train @ x
        nearest = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[train_labels[j]] += math.exp(sims[j] / T)
        ranking = list(np.argsort(-scores, kind="stable")[:min(5, k, num_classes)])
        top1 += ranking[0] == y
        top5 += y in ranking
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("k", [1, 3, 20, 50])
def test_knn_classifier_matches_a_loop_reference_on_random_features_in_several_chunks(k):
    rng = np.random.default_rng(k)
    normalise = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    train, test = normalise(rng.normal(size=(50, 8))), normalise(rng.normal(size=(37, 8)))
    train_labels, test_labels = rng.integers(0, 10, size=50), rng.integers(0, 10, size=37)

    got = knn_classifier(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test),
                         torch.from_numpy(test_labels), k, 0.07, 10, chunk_size=16)
    expected = reference_knn(train, train_labels, test, test_labels, k, 0.07, 10)
    assert got == pytest.approx(expected)


def test_knn_classifier_rejects_k_above_the_number_of_training_images():
    with pytest.raises(ValueError, match="between 1 and the number of training images \\(3\\)"):
        knn_classifier(unit(0, 1, 2), labels(0, 1, 2), unit(0), labels(0), k=4, T=0.07, num_classes=3)


class ChannelMeans(nn.Module):
    """A stand-in backbone whose feature is the mean of each input channel; records input shapes."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x.mean(dim=(2, 3)) + self.anchor


def test_extract_features_applies_dino_eval_transform_and_l2_normalises():
    dataset = open_dataset("synthetic:5:40x30:3")
    model = ChannelMeans()

    features, got_labels = extract_features(model, dataset, batch_size=2, progress=False)

    assert model.shapes == [(2, 3, 224, 224), (2, 3, 224, 224), (1, 3, 224, 224)]
    expected = np.stack([preprocess(image, Preprocess()).mean(axis=(1, 2)) for image, _ in dataset])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(features.numpy(), expected, atol=1e-5)
    assert got_labels.tolist() == [label for _, label in dataset]


def test_evaluate_knn_refuses_a_set_without_labels(tmp_path):
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="the val set has no labels"):
        evaluate_knn(tmp_path / "unused.pth", "synthetic:4:32", str(tmp_path))


TRAIN, VAL = "synthetic:60:64", "synthetic:30:64:7"
ROW = re.compile(r"^\s*(\d+)(?:->(\d+))?((?:\s+\d+\.\d\d)+)\s*$")


def parse_table(stdout: str) -> dict[int, tuple[int, list[float]]]:
    """requested k -> (k used, [top-1, top-5, (random top-1, random top-5)])."""
    rows = {}
    for line in stdout.splitlines():
        if match := ROW.match(line):
            k = int(match[1])
            rows[k] = (int(match[2] or k), [float(v) for v in match[3].split()])
    return rows


@pytest.fixture(scope="module")
def checkpoint_features(trained_run):
    """Train / val features of the tiny run's teacher, extracted in-process."""
    spec, _, weights = load_backbone(trained_run / "checkpoint.pth", "teacher")
    model = build_model(spec, weights)
    return spec, [extract_features(model, open_dataset(s), progress=False) for s in (TRAIN, VAL)]


@pytest.mark.slow
def test_eval_knn_cli_prints_teacher_and_random_init_accuracy_per_k_clamping_k(trained_run,
                                                                               checkpoint_features):
    spec, (train, val) = checkpoint_features
    result = run_cli("eval-knn", str(trained_run / "checkpoint.pth"), "--train", TRAIN, "--val", VAL,
                     "--k", "10", "20", "100", "--random-init", "--quiet")

    rows = parse_table(result.stdout)
    assert sorted(rows) == [10, 20, 100]
    assert rows[100][0] == 60  # clamped to the 60 training images
    assert "clamped to 60" in result.stdout
    baseline = random_backbone(spec, seed=0)
    random_train, random_val = (extract_features(baseline, open_dataset(s), progress=False)
                                for s in (TRAIN, VAL))
    for k, (used_k, printed) in rows.items():
        expected = (*knn_classifier(*train, *val, used_k, 0.07, 6),
                    *knn_classifier(*random_train, *random_val, used_k, 0.07, 6))
        assert printed == pytest.approx(expected, abs=0.006), f"k={k}"


@pytest.mark.slow
def test_eval_knn_cli_on_an_exported_bundle_matches_its_checkpoint(bundle, checkpoint_features):
    _, (train, val) = checkpoint_features
    result = run_cli("eval-knn", str(bundle), "--train", TRAIN, "--val", VAL, "--k", "10", "20", "--quiet")

    rows = parse_table(result.stdout)
    assert sorted(rows) == [10, 20]
    for k, (_, printed) in rows.items():
        assert printed == pytest.approx(knn_classifier(*train, *val, k, 0.07, 6), abs=0.006), f"k={k}"
