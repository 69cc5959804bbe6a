"""DINOLoss and the schedules against the formulas of the paper / official main_dino.py, computed
independently in NumPy."""

import numpy as np
import pytest
import torch

from training.losses import DINOLoss, teacher_temperature_schedule
from training.schedules import cosine_scheduler


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def reference_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """H(P_t, P_s) averaged over every (teacher global view, student view of another crop) pair."""
    s_views = np.split(student / student_temp, ncrops)
    t_views = np.split(softmax((teacher - center) / teacher_temp), 2)
    losses = [(-t * log_softmax(s)).sum(-1).mean()
              for i, t in enumerate(t_views) for j, s in enumerate(s_views) if i != j]
    return np.mean(losses), len(losses)


def test_teacher_temperature_warms_up_linearly_then_stays_constant():
    schedule = teacher_temperature_schedule(0.04, 0.07, 3, 5)
    np.testing.assert_allclose(schedule, [0.04, 0.055, 0.07, 0.07, 0.07])


def test_dino_loss_equals_cross_entropy_over_cross_view_pairs():
    rng = np.random.default_rng(0)
    batch, out_dim, ncrops = 3, 5, 4
    student = rng.normal(size=(ncrops * batch, out_dim)).astype(np.float32)
    teacher = rng.normal(size=(2 * batch, out_dim)).astype(np.float32)
    loss_fn = DINOLoss(out_dim, ncrops, 0.04, 0.07, 2, 4, student_temp=0.1)

    got = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), epoch=1).item()
    expected, pairs = reference_dino_loss(student, teacher, np.zeros(out_dim), ncrops, 0.1, 0.07)
    assert pairs == 2 * (ncrops - 1)  # a view is never compared with itself
    assert got == pytest.approx(expected, rel=1e-5)


def test_center_is_an_ema_of_the_teacher_batch_mean_and_is_subtracted_next_step():
    rng = np.random.default_rng(1)
    t1, t2 = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2))
    s = rng.normal(size=(6, 6)).astype(np.float32)
    loss_fn = DINOLoss(6, 3, 0.04, 0.04, 1, 2, center_momentum=0.9)

    loss_fn(torch.from_numpy(s), torch.from_numpy(t1), epoch=0)
    center1 = 0.1 * t1.mean(0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], center1, rtol=1e-5, atol=1e-7)

    got = loss_fn(torch.from_numpy(s), torch.from_numpy(t2), epoch=1).item()
    expected, _ = reference_dino_loss(s, t2, center1, 3, 0.1, 0.04)
    assert got == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], 0.9 * center1 + 0.1 * t2.mean(0), rtol=1e-5, atol=1e-7)


def test_cosine_schedule_warms_up_from_zero_and_decays_to_the_final_value():
    schedule = cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=4, warmup_epochs=1)
    assert len(schedule) == 12
    np.testing.assert_allclose(schedule[:4], np.linspace(0, 1, 4))
    n = 8  # cosine part: value_i = final + (base - final) * (1 + cos(pi * i / n)) / 2
    expected = 0.1 + 0.45 * (1 + np.cos(np.pi * np.arange(n) / n))
    np.testing.assert_allclose(schedule[4:], expected)
