"""Weighted k-NN evaluation of frozen features (``dinoserve eval-knn``).

Follows Wu et al. (2018) as used by Caron et al., *Emerging Properties in Self-Supervised Vision
Transformers* (ICCV 2021), and the official ``eval_knn.py`` (``extract_feature_pipeline``,
``knn_classifier``): images go through the evaluation transform (resize 256 bicubic, centre crop 224,
ImageNet normalisation), the backbone's CLS features are L2-normalised, and each validation image is
classified by its ``k`` most cosine-similar training images, each voting for its label with weight
``exp(similarity / T)``.

Features come from one of our checkpoints (run in PyTorch) or from a model bundle (its ONNX file run in
onnxruntime with the preprocessing its model card prescribes), optionally next to the same
architecture at random initialisation, the baseline that learning must beat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms
from tqdm import tqdm

from core.knn import knn_accuracy
from core.knn import DEFAULT_TEMPERATURE
from core.model_card import CARD_FILENAME, IMAGENET_MEAN, IMAGENET_STD, ModelCard, latest_model_file

from .data import open_dataset
from .export import build_model, load_backbone
from .models import BackboneSpec, build_backbone

DEFAULT_KS = (10, 20, 100, 200)
KNN_CHUNK_SIZE = 1024  # test images per similarity matrix; bounds memory at chunk × train images


@torch.no_grad()
def knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    T: float,
    num_classes: int,
    chunk_size: int = KNN_CHUNK_SIZE,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy, in percent, of DINO's weighted k-NN classifier.

    ``train_features`` ``(num_train, dim)`` and ``test_features`` ``(num_test, dim)`` must already be
    L2-normalised (as in the official code), so that their dot product is the cosine similarity; labels
    are integer class indices below ``num_classes``. Each test image's class scores are
    ``sum(exp(sim_j / T))`` over its ``k`` nearest training images ``j`` of that class.

    Top-5 counts a test image as correct when its label is among the ``min(5, k, num_classes)``
    highest-scored classes: with ``k >= 5`` and at least 5 classes that is the usual top-5, with
    ``k < 5`` it is the official code's rule (``min(5, k)``), and with fewer than 5 classes it is every
    class. Classes with equal scores (in practice: classes no neighbour voted for) rank by class index,
    where the official code leaves their order to the sort implementation.

    Unlike the official function, which splits the test set into 100 chunks and fails below 100 test
    images, any number of test images works; they are processed ``chunk_size`` at a time. The vote is
    :func:`core.knn.knn_accuracy`, the one ``POST /v1/classify`` uses too.
    """
    return knn_accuracy(train_features.float().cpu().numpy(), train_labels.cpu().numpy(),
                        test_features.float().cpu().numpy(), test_labels.cpu().numpy(), k, T, num_classes,
                        chunk_size)


def eval_transform(size: int = 224) -> transforms.Compose:
    """DINO's evaluation transform (``eval_knn.py``): resize 256 bicubic, centre crop 224, normalise.

    Another ``size`` keeps the same 256 : 224 ratio (resize ``round(size * 8 / 7)``, crop ``size``), for
    models trained on smaller crops.
    """
    return transforms.Compose([
        transforms.Resize(round(size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _embed_dataset(
    embed: Callable[[list], torch.Tensor],
    transform: Callable[[Image.Image], object],
    dataset: Sequence,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``embed`` over transformed batches of ``(image, label)`` items; L2-normalised features."""
    features, labels = [], []
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            features.append(embed([transform(image) for image, _ in items]).float().cpu())
            labels.extend(label for _, label in items)
            bar.update(len(items))
    return F.normalize(torch.cat(features), dim=1, p=2), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset: Sequence, batch_size: int = 64, progress: bool = True, size: int = 224
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features ``(len(dataset), dim)`` and labels ``(len(dataset),)`` of a backbone.

    ``dataset`` yields ``(PIL image, label)`` pairs (``open_dataset(spec)`` without a transform); each
    image goes through :func:`eval_transform` at ``size``. ``model`` maps ``(batch, 3, size, size)`` to
    ``(batch, dim)``; it is put in eval mode and run on the device of its parameters.
    """
    model.eval()
    device = next(model.parameters()).device
    return _embed_dataset(lambda xs: model(torch.stack(xs).to(device)), eval_transform(size), dataset,
                          batch_size, progress, "features")


def extract_bundle_features(
    model_dir: Path, dataset: Sequence, batch_size: int = 64, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`extract_features`, for a model bundle: its ``1/model.onnx`` in onnxruntime, the
    ``embedding`` output, and the preprocessing written in its model card (as the gateway does)."""
    import onnxruntime as ort

    from core.transform import preprocess

    card = ModelCard.load(model_dir)
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = ort.InferenceSession(str(latest_model_file(model_dir)), providers=providers)
    output = card.output_name("embedding")

    def embed(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(session.run([output], {card.input_name: np.stack(arrays)})[0])

    return _embed_dataset(embed, lambda image: preprocess(image, card.preprocess), dataset, batch_size,
                          progress, f"features ({card.name})")


def is_bundle(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CARD_FILENAME).is_file()


def bundle_spec(card: ModelCard) -> BackboneSpec:
    """The backbone architecture a model card describes."""
    grid = card.raw["pos_embed"]["grid"][0]
    return BackboneSpec(card.arch, card.patch_size, card.embed_dim, card.raw["depth"], card.num_heads,
                        img_size=grid * card.patch_size)


def random_backbone(spec: BackboneSpec, seed: int) -> nn.Module:
    """``spec``'s architecture with timm's initialisation drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(spec).eval()


def class_count(train_set, val_set) -> int:
    """Number of classes shared by a labelled train and val set; raise when labels cannot be compared."""
    for name, dataset in (("train", train_set), ("val", val_set)):
        if not dataset.classes:
            raise ValueError(f"the {name} set has no labels: k-NN evaluation needs class sub-folders")
    if tuple(train_set.classes) != tuple(val_set.classes):
        raise ValueError(f"train and val classes differ: {', '.join(train_set.classes)} vs "
                         f"{', '.join(val_set.classes)}")
    return len(train_set.classes)


@dataclass(frozen=True)
class KnnRow:
    """Accuracies for one requested ``k``; ``used_k`` is ``k`` clamped to the train set size."""

    k: int
    used_k: int
    top1: float
    top5: float
    random_top1: float | None = None
    random_top5: float | None = None


@dataclass(frozen=True)
class KnnReport:
    source: str
    num_train: int
    num_val: int
    num_classes: int
    temperature: float
    rows: tuple[KnnRow, ...]

    def table(self) -> str:
        """Plain-text table: one line per k, random-initialisation columns when evaluated."""
        with_random = self.rows[0].random_top1 is not None
        lines = [f"weighted k-NN of {self.source}, T = {self.temperature}: {self.num_train} train / "
                 f"{self.num_val} val images, {self.num_classes} classes"]
        header = f"{'k':>9}  {'top-1':>7}  {'top-5':>7}"
        if with_random:
            header += f"  {'random top-1':>12}  {'random top-5':>12}"
        lines.append(header)
        for row in self.rows:
            k = str(row.k) if row.k == row.used_k else f"{row.k}->{row.used_k}"
            line = f"{k:>9}  {row.top1:7.2f}  {row.top5:7.2f}"
            if with_random:
                line += f"  {row.random_top1:12.2f}  {row.random_top5:12.2f}"
            lines.append(line)
        if any(row.k != row.used_k for row in self.rows):
            lines.append(f"(k above the {self.num_train} train images is clamped to {self.num_train})")
        return "\n".join(lines)


def evaluate_knn(
    model_path: Path,
    train: str,
    val: str,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    checkpoint_key: str = "teacher",
    random_init_seed: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    size: int = 224,
) -> KnnReport:
    """k-NN accuracy of a checkpoint or model bundle on labelled ``train`` / ``val`` sets.

    ``train`` and ``val`` are folders with class sub-folders or ``synthetic:N[:SIZE[:SEED]]`` specs. A
    ``k`` above the number of training images is clamped to it (every training image votes). With
    ``random_init_seed`` the same architecture is also evaluated at random initialisation. Checkpoints
    (and the random baseline) see ``size`` crops (:func:`eval_transform`); bundles their model card's.
    """
    model_path = Path(model_path)
    train_set, val_set = open_dataset(train), open_dataset(val)
    num_classes = class_count(train_set, val_set)
    if is_bundle(model_path):
        spec = bundle_spec(ModelCard.load(model_path))
        source = f"bundle {model_path}"

        def features(dataset):
            return extract_bundle_features(model_path, dataset, batch_size, progress)
    else:
        spec, _, weights = load_backbone(model_path, checkpoint_key)
        model = build_model(spec, weights)
        source = f"{checkpoint_key} of {model_path}"

        def features(dataset):
            return extract_features(model, dataset, batch_size, progress, size)

    def accuracies(train_feats, val_feats) -> dict[int, tuple[float, float]]:
        return {k: knn_classifier(*train_feats, *val_feats, min(k, len(train_set)), temperature, num_classes)
                for k in ks}

    trained = accuracies(features(train_set), features(val_set))
    random = {}
    if random_init_seed is not None:
        baseline = random_backbone(spec, random_init_seed)
        random = accuracies(extract_features(baseline, train_set, batch_size, progress, size),
                            extract_features(baseline, val_set, batch_size, progress, size))
    rows = tuple(
        KnnRow(k, min(k, len(train_set)), *trained[k], *random.get(k, (None, None))) for k in ks
    )
    return KnnReport(source, len(train_set), len(val_set), num_classes, temperature, rows)
