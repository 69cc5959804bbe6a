"""IBOTLoss against the formulas of the iBOT paper (Zhou et al., ICLR 2022) / official ``main_ibot.py``
``iBOTLoss``, recomputed independently in NumPy with explicit loops."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from training.losses import IBOTLoss


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def cross_entropy(p_teacher, student_logits):
    return float(-(p_teacher * log_softmax(student_logits)).sum())


def reference_ibot_loss(s_cls, s_patch, t_cls, t_patch, s_local, masks, center, center2,
                        temp, temp2, ngcrops, student_temp=0.1, lambda1=1.0, lambda2=1.0):
    """(cls, patch) terms of iBOT written out image by image.

    CLS: H(P_t(global q), P_s(view v)) averaged over images and over all pairs v != q.
    Patch: for global view q, image b, the mean over the masked patches i of
    H(P_t(q, b, i), P_s(q, b, i)) (0 when nothing is masked), averaged over images then views.
    """
    batch = len(t_cls) // ngcrops
    student_views = np.concatenate([s_cls] + ([s_local] if s_local is not None else []))
    nviews = len(student_views) // batch
    cls_terms, patch_terms = [], []
    for q in range(ngcrops):
        for v in range(nviews):
            if v == q:
                per_image = []
                for b in range(batch):
                    row = q * batch + b
                    masked = np.flatnonzero(masks[q][b].reshape(-1))
                    ces = [cross_entropy(softmax((t_patch[row, i] - center2) / temp2),
                                         s_patch[row, i] / student_temp) for i in masked]
                    per_image.append(np.mean(ces) if ces else 0.0)
                patch_terms.append(np.mean(per_image))
            else:
                cls_terms.append(np.mean([
                    cross_entropy(softmax((t_cls[q * batch + b] - center) / temp),
                                  student_views[v * batch + b] / student_temp)
                    for b in range(batch)
                ]))
    return lambda1 * np.mean(cls_terms), lambda2 * np.mean(patch_terms)


def random_inputs(rng, batch, ngcrops, nlcrops, grid, out_dim, patch_dim):
    n = grid * grid
    f = np.float32
    s_cls = rng.normal(size=(ngcrops * batch, out_dim)).astype(f)
    s_patch = rng.normal(size=(ngcrops * batch, n, patch_dim)).astype(f)
    t_cls = rng.normal(size=(ngcrops * batch, out_dim)).astype(f)
    t_patch = rng.normal(size=(ngcrops * batch, n, patch_dim)).astype(f)
    s_local = rng.normal(size=(nlcrops * batch, out_dim)).astype(f) if nlcrops else None
    masks = [rng.random((batch, grid, grid)) < 0.4 for _ in range(ngcrops)]
    return s_cls, s_patch, t_cls, t_patch, s_local, masks


def call(loss_fn, s_cls, s_patch, t_cls, t_patch, s_local, masks, epoch):
    t = torch.from_numpy
    return loss_fn((t(s_cls), t(s_patch)), (t(t_cls), t(t_patch)), None if s_local is None else t(s_local),
                   [t(m) for m in masks], epoch)


def test_ibot_loss_matches_the_published_formulas_with_local_crops_and_an_empty_mask():
    rng = np.random.default_rng(0)
    batch, ngcrops, nlcrops, out_dim, patch_dim = 3, 2, 3, 5, 7
    inputs = random_inputs(rng, batch, ngcrops, nlcrops, 2, out_dim, patch_dim)
    masks = inputs[-1]
    masks[0][1] = False  # image 1 of the first global view has no masked patch
    masks[1][2] = True
    loss_fn = IBOTLoss(out_dim, patch_dim, ngcrops, nlcrops, 0.04, 0.07, 0.05, 0.08, 3, 6,
                       lambda1=0.7, lambda2=1.3)

    got = call(loss_fn, *inputs, epoch=1)
    # epoch 1 of a 3-epoch warm-up: halfway between the warm-up and final temperatures
    cls, patch = reference_ibot_loss(*inputs, np.zeros(out_dim), np.zeros(patch_dim), 0.055, 0.065, ngcrops,
                                     lambda1=0.7, lambda2=1.3)
    assert got["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert got["patch"].item() == pytest.approx(patch, rel=1e-5)
    assert got["loss"].item() == pytest.approx(cls + patch, rel=1e-5)


def test_ibot_loss_without_local_crops_takes_none_for_their_cls():
    rng = np.random.default_rng(1)
    inputs = random_inputs(rng, batch=4, ngcrops=2, nlcrops=0, grid=3, out_dim=6, patch_dim=4)
    loss_fn = IBOTLoss(6, 4, 2, 0, 0.04, 0.07, 0.04, 0.07, 2, 4)

    got = call(loss_fn, *inputs, epoch=3)
    cls, patch = reference_ibot_loss(*inputs, np.zeros(6), np.zeros(4), 0.07, 0.07, 2)
    assert got["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert got["patch"].item() == pytest.approx(patch, rel=1e-5)


def test_image_without_masked_patches_contributes_zero_but_counts_in_the_mean_over_images():
    rng = np.random.default_rng(2)
    s_cls, s_patch, t_cls, t_patch, _, _ = random_inputs(rng, 2, 2, 0, 2, 3, 5)
    masks = [np.array([np.ones((2, 2), bool), np.zeros((2, 2), bool)]) for _ in range(2)]
    loss_fn = IBOTLoss(3, 5, 2, 0, 0.04, 0.04, 0.04, 0.04, 1, 1)
    s_patch_t = torch.from_numpy(s_patch).requires_grad_()

    t = torch.from_numpy
    got = loss_fn((t(s_cls), s_patch_t), (t(t_cls), t(t_patch)), None, [t(m) for m in masks], 0)
    got["patch"].backward()

    # Rows 0 and 2 are image 0 (fully masked) of the two views; image 1 adds 0 but halves the mean.
    ce = [np.mean([cross_entropy(softmax(t_patch[r, i] / 0.04), s_patch[r, i] / 0.1) for i in range(4)])
          for r in (0, 2)]
    assert got["patch"].item() == pytest.approx(np.mean([c / 2 for c in ce]), rel=1e-5)
    assert torch.isfinite(s_patch_t.grad).all()
    assert s_patch_t.grad[[1, 3]].abs().max() == 0  # unmasked images get no patch gradient


def test_centers_are_emas_of_teacher_cls_and_patch_means_and_are_subtracted_next_step():
    rng = np.random.default_rng(3)
    first = random_inputs(rng, 3, 2, 1, 2, 4, 6)
    second = random_inputs(rng, 3, 2, 1, 2, 4, 6)
    loss_fn = IBOTLoss(4, 6, 2, 1, 0.04, 0.04, 0.05, 0.05, 1, 2, center_momentum=0.9, center_momentum2=0.8)

    call(loss_fn, *first, epoch=0)
    t_cls1, t_patch1 = first[2], first[3]
    center1 = 0.1 * t_cls1.mean(0)
    center2_1 = 0.2 * t_patch1.mean((0, 1))
    assert loss_fn.center.shape == (1, 4) and loss_fn.center2.shape == (1, 1, 6)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], center1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss_fn.center2.numpy()[0, 0], center2_1, rtol=1e-5, atol=1e-7)

    got = call(loss_fn, *second, epoch=1)
    cls, patch = reference_ibot_loss(*second, center1, center2_1, 0.04, 0.05, 2)
    assert got["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert got["patch"].item() == pytest.approx(patch, rel=1e-5)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], 0.9 * center1 + 0.1 * second[2].mean(0),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss_fn.center2.numpy()[0, 0], 0.8 * center2_1 + 0.2 * second[3].mean((0, 1)),
                               rtol=1e-5, atol=1e-7)


def test_patch_temperature_holds_its_warmup_value_until_mim_start_then_warms_up():
    loss_fn = IBOTLoss(4, 4, 2, 0, 0.04, 0.07, 0.03, 0.05, 3, 7, mim_start_epoch=2)
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(loss_fn.teacher_temp2_schedule, [0.03, 0.03, 0.03, 0.04, 0.05, 0.05, 0.05])


def test_ibot_loss_rejects_local_cls_that_do_not_match_nlcrops():
    rng = np.random.default_rng(4)
    inputs = list(random_inputs(rng, 2, 2, 2, 2, 3, 3))
    loss_fn = IBOTLoss(3, 3, 2, 2, 0.04, 0.04, 0.04, 0.04, 1, 1)
    inputs[4] = None
    with pytest.raises(ValueError, match="2 global \\+ 2 local"):
        call(loss_fn, *inputs, epoch=0)


def test_centers_are_averaged_over_all_ranks_when_distributed(monkeypatch):
    rng = np.random.default_rng(5)
    # Ranks hold different batch sizes, so a mean of per-rank means would differ from the global mean.
    teacher = [(rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n, 4, 2)).astype(np.float32))
               for n in (2, 6)]
    # A two-rank world simulated in one process: collectives run in the same order on every rank, so
    # rank 1's contributions are recorded first and then summed into rank 0's, call by call.
    contributions = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: contributions.append(tensor.clone()))
    IBOTLoss(3, 2, 2, 0, 0.04, 0.04, 0.04, 0.04, 1, 1).update_center(*map(torch.from_numpy, teacher[1]))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.add_(contributions.pop(0)))
    loss_fn = IBOTLoss(3, 2, 2, 0, 0.04, 0.04, 0.04, 0.04, 1, 1)
    loss_fn.update_center(*map(torch.from_numpy, teacher[0]))

    assert contributions == []
    all_cls = np.concatenate([t[0] for t in teacher])
    all_patch = np.concatenate([t[1] for t in teacher])
    np.testing.assert_allclose(loss_fn.center.numpy()[0], 0.1 * all_cls.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss_fn.center2.numpy()[0, 0], 0.1 * all_patch.mean((0, 1)), rtol=1e-5, atol=1e-7)
