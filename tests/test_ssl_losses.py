"""MoCo v3, NT-Xent, BYOL, SimSiam and SwAV losses against the papers' formulas, written out
independently in NumPy with explicit loops over anchors, negatives and crops, and on two gloo ranks
against one process with the whole batch."""

import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.losses import (
    BYOLLoss,
    MoCoV3Loss,
    NegativeQueue,
    NTXentLoss,
    SimSiamLoss,
    SwAVLoss,
    sinkhorn_knopp,
)


def normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def info_nce(q, keys, temperature, extra_negatives=()):
    """Mean over queries i of -log exp(q_i·k_i/T) / (Σ_j exp(q_i·k_j/T) + Σ_n exp(q_i·n/T))."""
    q, keys = normalize(np.float64(q)), normalize(np.float64(keys))
    losses = []
    for i in range(len(q)):
        positive = np.exp(q[i] @ keys[i] / temperature)
        denominator = sum(np.exp(q[i] @ k / temperature) for k in keys)
        denominator += sum(np.exp(q[i] @ n / temperature) for n in extra_negatives)
        losses.append(-np.log(positive / denominator))
    return np.mean(losses)


def nt_xent(z1, z2, temperature):
    """SimCLR eq. 1 averaged over the 2N anchors; also returns the number of negatives per anchor."""
    views = normalize(np.float64(np.concatenate([z1, z2])))
    n = len(z1)
    losses, negatives = [], set()
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        others = [b for b in range(2 * n) if b != a]
        negatives.add(len([b for b in others if b != p]))
        positive = np.exp(views[a] @ views[p] / temperature)
        losses.append(-np.log(positive / sum(np.exp(views[a] @ views[b] / temperature) for b in others)))
    return np.mean(losses), negatives


def cosines(a, b):
    return np.array([x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(np.float64(a), np.float64(b))])


def sinkhorn_scaling(scores, epsilon, iterations):
    """Sinkhorn-Knopp in scaling-vector form (Cuturi 2013): codes = B · diag(r) P diag(c) with
    P = exp(scores / ε) / Σ exp(scores / ε), prototype marginals 1/K and sample marginals 1/B."""
    p = np.exp(np.float64(scores) / epsilon)
    p /= p.sum()
    batch, k = p.shape
    r, c = np.ones(batch), np.ones(k)
    for _ in range(iterations):
        c = 1 / (k * (p.T @ r))
        r = 1 / (batch * (p @ c))
    return batch * r[:, None] * p * c[None, :]


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def swav(scores, temperature, epsilon, iterations, crops_for_assign):
    """Swapped prediction of main_swav.py, sample by sample."""
    per_assigned = []
    for a in crops_for_assign:
        codes = sinkhorn_scaling(scores[a], epsilon, iterations)
        per_crop = []
        for v in range(len(scores)):
            if v == a:
                continue
            per_crop.append(np.mean([-(codes[b] * log_softmax(np.float64(scores[v][b]) / temperature)).sum()
                                     for b in range(len(codes))]))
        per_assigned.append(np.mean(per_crop))
    return np.mean(per_assigned)


def tensors(*arrays, grad=False):
    return [torch.tensor(a, requires_grad=grad) for a in arrays]


# ---- MoCo v3 -------------------------------------------------------------------------------------------

def test_moco_v3_on_basis_vectors_is_four_t_log_one_plus_two_exp_minus_one_over_t():
    basis = np.eye(3, dtype=np.float32)  # each query matches its key (cos 1) and no other (cos 0)
    loss = MoCoV3Loss(temperature=0.2)(*tensors(basis, 2 * basis, basis, 5 * basis))
    # per term: -log(e^{1/T} / (e^{1/T} + 2)), times 2T, two terms
    assert loss.item() == pytest.approx(2 * 2 * 0.2 * np.log(1 + 2 * np.exp(-1 / 0.2)), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_moco_v3_is_symmetric_info_nce_scaled_by_two_temperatures(temperature):
    rng = np.random.default_rng(0)
    q1, q2, k1, k2 = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(4))
    loss = MoCoV3Loss(temperature)(*tensors(q1, q2, k1, k2))
    expected = 2 * temperature * (info_nce(q1, k2, temperature) + info_nce(q2, k1, temperature))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_moco_v3_keys_are_targets_without_gradient():
    rng = np.random.default_rng(1)
    q1, q2, k1, k2 = tensors(*(rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)), grad=True)
    MoCoV3Loss()(q1, q2, k1, k2).backward()
    assert k1.grad is None and k2.grad is None
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0


def test_negative_queue_starts_empty_and_drops_its_oldest_keys_first():
    queue = NegativeQueue(dim=2, size=4)
    assert queue.negatives().shape == (0, 2)
    first = torch.tensor([[1.0, 0], [2, 0], [3, 0]])
    second = torch.tensor([[4.0, 0], [5, 0], [6, 0]])
    queue.enqueue(first)
    assert sorted(queue.negatives()[:, 0].tolist()) == [1, 2, 3]
    queue.enqueue(second)
    assert sorted(queue.negatives()[:, 0].tolist()) == [3, 4, 5, 6]
    queue.enqueue(torch.arange(7.0, 13.0)[:, None].repeat(1, 2))  # more keys than slots: the newest stay
    assert sorted(queue.negatives()[:, 0].tolist()) == [9, 10, 11, 12]


def test_moco_v3_with_a_queue_adds_the_previous_steps_keys_as_negatives():
    rng = np.random.default_rng(2)
    steps = [[rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)] for _ in range(2)]
    loss_fn = MoCoV3Loss(0.2, queue=NegativeQueue(dim=4, size=8))

    first = loss_fn(*tensors(*steps[0])).item()
    second = loss_fn(*tensors(*steps[1])).item()

    q1, q2, k1, k2 = steps[0]
    assert first == pytest.approx(0.4 * (info_nce(q1, k2, 0.2) + info_nce(q2, k1, 0.2)), rel=1e-5)
    queued = normalize(np.float64(np.concatenate([k1, k2])))[-8:]  # 6 keys, all fit
    q1, q2, k1, k2 = steps[1]
    expected = 0.4 * (info_nce(q1, k2, 0.2, queued) + info_nce(q2, k1, 0.2, queued))
    assert second == pytest.approx(expected, rel=1e-5)
    assert len(loss_fn.queue.negatives()) == 8


# ---- SimCLR --------------------------------------------------------------------------------------------

def test_nt_xent_on_basis_vectors_is_log_one_plus_two_exp_minus_one_over_t():
    basis = np.eye(2, dtype=np.float32)  # anchor: positive at cos 1, negatives e.g. (e2, e2') at cos 0
    loss = NTXentLoss(temperature=0.5)(*tensors(basis, 3 * basis))
    assert loss.item() == pytest.approx(np.log(1 + 2 * np.exp(-1 / 0.5)), rel=1e-5)


def test_nt_xent_is_the_mean_over_two_n_anchors_with_two_n_minus_two_negatives_each():
    rng = np.random.default_rng(3)
    z1, z2 = (rng.normal(size=(5, 6)).astype(np.float32) for _ in range(2))
    loss = NTXentLoss(temperature=0.5)(*tensors(z1, z2))
    expected, negatives = nt_xent(z1, z2, 0.5)
    assert negatives == {2 * (5 - 1)}
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- BYOL and SimSiam ----------------------------------------------------------------------------------

def test_byol_loss_is_the_normalised_mse_which_equals_two_minus_two_cosine():
    rng = np.random.default_rng(4)
    p1, p2, z1, z2 = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(4))
    loss = BYOLLoss()(*tensors(p1, p2, z1, z2)).item()
    mse = [np.mean([((p / np.linalg.norm(p) - z / np.linalg.norm(z)) ** 2).sum() for p, z in zip(ps, zs)])
           for ps, zs in ((np.float64(p1), np.float64(z2)), (np.float64(p2), np.float64(z1)))]
    assert loss == pytest.approx(sum(mse), rel=1e-5)
    assert loss == pytest.approx((2 - 2 * cosines(p1, z2)).mean() + (2 - 2 * cosines(p2, z1)).mean(), rel=1e-5)


def test_byol_loss_is_zero_for_targets_aligned_with_the_predictions():
    rng = np.random.default_rng(5)
    p1, p2 = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(2))
    assert BYOLLoss()(*tensors(p1, p2, 0.5 * p2, 3 * p1)).item() == pytest.approx(0, abs=1e-6)


def test_byol_targets_receive_no_gradient():
    rng = np.random.default_rng(6)
    p1, p2, z1, z2 = tensors(*(rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)), grad=True)
    BYOLLoss()(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_simsiam_loss_is_minus_half_the_sum_of_mean_cosines():
    rng = np.random.default_rng(7)
    p1, p2, z1, z2 = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(4))
    loss = SimSiamLoss()(*tensors(p1, p2, z1, z2)).item()
    assert loss == pytest.approx(-0.5 * (cosines(p1, z2).mean() + cosines(p2, z1).mean()), rel=1e-5)
    assert SimSiamLoss()(*tensors(p1, p2, 2 * p2, p1)).item() == pytest.approx(-1, rel=1e-6)


def test_simsiam_stop_gradient_keeps_gradient_out_of_the_projections():
    rng = np.random.default_rng(8)
    p1, p2, z1, z2 = tensors(*(rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)), grad=True)
    SimSiamLoss()(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


# ---- SwAV ----------------------------------------------------------------------------------------------

def skewed_scores(rng, batch, k):
    """Cosine-like scores where every sample prefers prototype 0: only equipartition spreads them."""
    scores = rng.uniform(-0.5, 0.5, size=(batch, k))
    scores[:, 0] += 0.5
    return scores


def test_sinkhorn_codes_match_the_scaling_vector_form_of_sinkhorn_knopp():
    rng = np.random.default_rng(9)
    scores = skewed_scores(rng, 6, 4).astype(np.float32)
    codes = sinkhorn_knopp(torch.from_numpy(scores), epsilon=0.05, iterations=3)
    assert codes.shape == (6, 4)
    np.testing.assert_allclose(codes.numpy(), sinkhorn_scaling(scores, 0.05, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_rows_sum_to_one_and_columns_converge_to_b_over_k():
    rng = np.random.default_rng(10)
    batch, k = 8, 4
    scores = torch.from_numpy(skewed_scores(rng, batch, k))  # float64: exact marginals are reachable
    column_error = {}
    for iterations in (3, 30, 300):
        codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations)
        np.testing.assert_allclose(codes.sum(dim=1).numpy(), np.ones(batch), rtol=1e-12)
        column_error[iterations] = (codes.sum(dim=0) - batch / k).abs().max().item()
    # Without the balancing (a plain softmax per sample) prototype 0 takes more than twice its share.
    softmax_mass = torch.softmax(scores / 0.05, dim=1).sum(dim=0)
    assert softmax_mass[0] > 2 * batch / k
    softmax_error = (softmax_mass - batch / k).abs().max().item()
    assert column_error[3] < softmax_error / 5  # the default 3 iterations come close to B/K...
    assert column_error[3] > column_error[30] > column_error[300]  # ...more come closer...
    assert column_error[300] < 1e-9  # ...and converge to the exact marginals


def test_sinkhorn_codes_carry_no_gradient():
    scores = torch.randn(4, 3, requires_grad=True)
    assert not sinkhorn_knopp(scores).requires_grad


def test_swav_loss_is_the_swapped_prediction_of_main_swav():
    rng = np.random.default_rng(11)
    scores = [rng.uniform(-1, 1, size=(5, 6)).astype(np.float32) for _ in range(4)]  # 2 global + 2 local
    loss = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, crops_for_assign=(0, 1))
    expected = swav(scores, 0.1, 0.05, 3, (0, 1))
    assert loss(tensors(*scores)).item() == pytest.approx(expected, rel=1e-5)


def test_swav_assigned_crop_is_a_target_without_gradient():
    rng = np.random.default_rng(12)
    scores = tensors(*(rng.uniform(-1, 1, size=(4, 3)).astype(np.float32) for _ in range(2)), grad=True)
    SwAVLoss(crops_for_assign=(0,))(scores).backward()
    assert scores[0].grad is None  # crop 0 only supplies codes
    assert scores[1].grad.abs().sum() > 0


# ---- two gloo ranks with half the batch each = one process with the whole batch ----------------------

BATCH, DIM, PROTOTYPES, WORLD = 6, 5, 4, 2


def distributed_inputs():
    rng = np.random.default_rng(13)
    arrays = {f"moco{step}_{name}": rng.normal(size=(BATCH, DIM)) for step in range(2)
              for name in ("q1", "q2", "k1", "k2")}
    arrays.update({name: rng.normal(size=(BATCH, DIM)) for name in ("z1", "z2")})
    arrays.update({f"swav{crop}": rng.uniform(-1, 1, size=(BATCH, PROTOTYPES)) for crop in range(3)})
    return {name: a.astype(np.float32) for name, a in arrays.items()}


def losses_on(inputs, rows):
    """Every distributed loss on ``rows`` of the batch: values, input gradients, codes, queue."""
    leaf = {name: torch.tensor(a[rows], requires_grad=True) for name, a in inputs.items()}
    results = {}
    moco = MoCoV3Loss(0.2, queue=NegativeQueue(DIM, size=2 * BATCH + 4))  # step 2 wraps around
    for step in range(2):
        q1, q2, k1, k2 = (leaf[f"moco{step}_{name}"] for name in ("q1", "q2", "k1", "k2"))
        loss = moco(q1, q2, k1, k2)
        loss.backward()
        results[f"moco{step}"] = (loss.item(), torch.cat([q1.grad, q2.grad], dim=1).numpy())
    results["queue"] = moco.queue.negatives().numpy().copy()

    loss = NTXentLoss(0.5)(leaf["z1"], leaf["z2"])
    loss.backward()
    results["ntxent"] = (loss.item(), torch.cat([leaf["z1"].grad, leaf["z2"].grad], dim=1).numpy())

    scores = [leaf[f"swav{crop}"] for crop in range(3)]
    results["codes"] = sinkhorn_knopp(scores[0]).numpy()
    loss = SwAVLoss()(scores)
    loss.backward()
    results["swav"] = (loss.item(), torch.cat([s.grad for s in scores], dim=1).numpy())
    return results


def rank_worker(rank, port, inputs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        local = BATCH // WORLD
        results = losses_on(inputs, slice(rank * local, (rank + 1) * local))
    finally:
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_and_two_ranks(tmp_path_factory):
    inputs = distributed_inputs()
    whole = losses_on(inputs, slice(None))
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_worker, args=(free_port(), inputs, out_dir), nprocs=WORLD, join=True)
    return whole, [pickle.loads((out_dir / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD)]


def assert_same_as_one_process(whole, ranks, name):
    """The ranks' mean loss is the whole batch's loss; their gradients, averaged as DDP does, its gradient."""
    value, grad = whole[name]
    assert np.mean([r[name][0] for r in ranks]) == pytest.approx(value, rel=1e-5)
    np.testing.assert_allclose(np.concatenate([r[name][1] for r in ranks]) / WORLD, grad,
                               rtol=1e-4, atol=1e-7)


def test_moco_v3_on_two_ranks_with_half_the_batch_each_equals_one_process(one_process_and_two_ranks):
    whole, ranks = one_process_and_two_ranks
    assert_same_as_one_process(whole, ranks, "moco0")


def test_moco_v3_queue_holds_all_ranks_keys_and_gives_the_one_process_loss_next_step(one_process_and_two_ranks):
    whole, ranks = one_process_and_two_ranks
    assert_same_as_one_process(whole, ranks, "moco1")
    for r in ranks:
        assert len(r["queue"]) == 2 * BATCH + 4
        np.testing.assert_allclose(r["queue"], whole["queue"], rtol=1e-6, atol=1e-7)


def test_nt_xent_on_two_ranks_with_half_the_batch_each_equals_one_process(one_process_and_two_ranks):
    whole, ranks = one_process_and_two_ranks
    assert_same_as_one_process(whole, ranks, "ntxent")


def test_sinkhorn_codes_on_two_ranks_are_the_rows_of_the_whole_batch_codes(one_process_and_two_ranks):
    whole, ranks = one_process_and_two_ranks
    np.testing.assert_allclose(np.concatenate([r["codes"] for r in ranks]), whole["codes"],
                               rtol=1e-5, atol=1e-7)


def test_swav_on_two_ranks_with_half_the_batch_each_equals_one_process(one_process_and_two_ranks):
    whole, ranks = one_process_and_two_ranks
    assert_same_as_one_process(whole, ranks, "swav")
