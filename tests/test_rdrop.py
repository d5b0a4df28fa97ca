"""fusionlib.rdrop: the KL term against the paper's reference code, the loss and its gradients, the two-pass helpers."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlib import data, models, rdrop, zoo
from fusionlib.rdrop import RDropStep, compute_kl_loss, rdrop_forward, rdrop_loss
from fusionlib.train import fit
from model_fingerprint import assert_unchanged, fingerprint


def reference_compute_kl_loss(p, q, pad_mask=None):
    """The R-Drop paper's reference code (github.com/dropreg/R-Drop, README), verbatim apart from `self`."""
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction='none')
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction='none')

    # pad_mask is for seq-level tasks
    if pad_mask is not None:
        p_loss.masked_fill_(pad_mask, 0.)
        q_loss.masked_fill_(pad_mask, 0.)

    # You can choose whether to use function "sum" and "mean" depending on your task
    p_loss = p_loss.sum()
    q_loss = q_loss.sum()

    loss = (p_loss + q_loss) / 2
    return loss


def symmetric_kl_by_formula(p_logits, q_logits, keep=None):
    """(KL(P||Q) + KL(Q||P)) / 2 summed over rows, in float64, from the definition KL(P||Q) = sum P (log P - log Q)."""
    lp, lq = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    rows = 0.5 * ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1))
    return rows[keep].sum() if keep is not None else rows.sum()


def mlp(p: float = 0.5) -> nn.Sequential:
    """A small network with two dropout layers on the 8x8 digits (64 inputs): fast enough to sample 50 seeds.

    Two dropout layers, so that the two helpers consume the random stream in a different order (with a single
    dropout layer, CPU masks of one [2B, F] draw are those of two [B, F] draws in a row)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(32, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits8():
    x_train, y_train, _, _ = data.digits_tensors(image_size=8, channels=1)
    return x_train[:32], y_train[:32]


@pytest.fixture(scope="module")
def digits32():
    x_train, y_train, _, _ = data.digits_tensors(image_size=32)
    return x_train[:8], y_train[:8]


# ----------------------------------------------------------------------------- the KL term
def test_reduced_precision_kl_is_computed_in_float32():
    """fp16 logits whose KL sum passes 65504 stay finite; near-identical passes keep their tiny KL; per sample too."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4096, 1000, generator=g) * 6, torch.randn(4096, 1000, generator=g) * 6
    p16, q16 = p.half(), q.half()
    exact = symmetric_kl_by_formula(p16, q16)
    assert exact > 65504
    kl = compute_kl_loss(p16, q16)
    assert kl.dtype == torch.float32 and math.isclose(float(kl), float(exact), rel_tol=1e-4)
    near = p[:8] + 1e-3 * torch.randn(8, 1000, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        a, b = p[:8].to(dtype), near.to(dtype)
        exact = float(symmetric_kl_by_formula(a, b))  # float32 cancels to ~10% here; fp16 / bf16 were 100x off
        assert math.isclose(float(compute_kl_loss(a, b)), exact, rel_tol=0.2), dtype
        per_sample = rdrop.symmetric_kl_per_sample(a, b)
        assert per_sample.dtype == torch.float32 and math.isclose(float(per_sample.sum()), exact, rel_tol=0.2)


def test_kl_under_autocast_is_the_float32_answer():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(8, 100, generator=g) * 4
    q = p + 1e-3 * torch.randn(8, 100, generator=g)
    expected = compute_kl_loss(p, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compute_kl_loss(p, q), expected)
        assert torch.equal(compute_kl_loss(p.bfloat16(), q.bfloat16()), compute_kl_loss(p.bfloat16().float(),
                                                                                        q.bfloat16().float()))


@pytest.mark.parametrize("shape", [(4, 10), (3, 5, 7), (10,)])
def test_compute_kl_loss_is_the_reference_code_exactly(shape):
    torch.manual_seed(0)
    p, q = torch.randn(shape) * 3, torch.randn(shape) * 3
    assert torch.equal(compute_kl_loss(p, q), reference_compute_kl_loss(p, q))
    torch.testing.assert_close(compute_kl_loss(p, q).double(), symmetric_kl_by_formula(p, q), rtol=1e-5, atol=1e-6)
    assert torch.equal(compute_kl_loss(p, q), compute_kl_loss(q, p))  # symmetric
    assert compute_kl_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)


def test_compute_kl_loss_masked_is_the_reference_code_exactly():
    torch.manual_seed(1)
    p, q = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    pad = torch.zeros(3, 5, 1, dtype=torch.bool)
    pad[0, 3:] = True
    pad[2, 1:] = True  # sequence lengths 3, 5, 1
    assert torch.equal(compute_kl_loss(p, q, pad_mask=pad), reference_compute_kl_loss(p, q, pad))
    keep = ~pad[..., 0]
    torch.testing.assert_close(compute_kl_loss(p, q, pad_mask=pad).double(), symmetric_kl_by_formula(p, q, keep),
                               rtol=1e-5, atol=1e-6)
    # A full-shape mask and a [B, 1, 1] mask broadcast too.
    full = pad.expand(3, 5, 7).clone()
    assert torch.equal(compute_kl_loss(p, q, pad_mask=full), reference_compute_kl_loss(p, q, full))
    rows = torch.tensor([True, False, False]).view(3, 1, 1)
    torch.testing.assert_close(compute_kl_loss(p, q, pad_mask=rows), compute_kl_loss(p[1:], q[1:]))
    # The caller's logits are never modified (the reference masks its own intermediate tensors).
    p0 = p.clone()
    compute_kl_loss(p, q, pad_mask=pad)
    assert torch.equal(p, p0)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_batchmean_and_mean_reductions_match_kl_div():
    torch.manual_seed(2)
    p, q = torch.randn(6, 10), torch.randn(6, 10)
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    for reduction in ("batchmean", "mean"):
        expected = 0.5 * (F.kl_div(lp, lq.exp(), reduction=reduction) + F.kl_div(lq, lp.exp(), reduction=reduction))
        torch.testing.assert_close(compute_kl_loss(p, q, reduction=reduction), expected)
    total = compute_kl_loss(p, q)
    torch.testing.assert_close(compute_kl_loss(p, q, reduction="batchmean"), total / 6)
    torch.testing.assert_close(compute_kl_loss(p, q, reduction="mean"), total / 60)


def test_sum_grows_with_the_batch_and_batchmean_does_not():
    """The docstring's note: with "sum", alpha's pull doubles when the batch doubles."""
    torch.manual_seed(3)
    p, q = torch.randn(8, 10), torch.randn(8, 10)
    p2, q2 = torch.cat([p, p]), torch.cat([q, q])
    torch.testing.assert_close(compute_kl_loss(p2, q2), 2 * compute_kl_loss(p, q))
    torch.testing.assert_close(compute_kl_loss(p2, q2, reduction="batchmean"), compute_kl_loss(p, q, reduction="batchmean"))


# ----------------------------------------------------------------------------- the loss and its gradients
@pytest.mark.parametrize("reduction", rdrop.REDUCTIONS)
def test_rdrop_loss_is_mean_ce_plus_alpha_kl(reduction):
    torch.manual_seed(4)
    z1, z2, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    loss, parts = rdrop_loss(z1, z2, y, alpha=0.7, reduction=reduction)
    ce1, ce2 = F.cross_entropy(z1, y), F.cross_entropy(z2, y)
    kl = compute_kl_loss(z1, z2, reduction=reduction)
    torch.testing.assert_close(loss, 0.5 * (ce1 + ce2) + 0.7 * kl)
    torch.testing.assert_close(parts.ce, 0.5 * (ce1 + ce2))
    torch.testing.assert_close(parts.kl, kl)
    assert torch.equal(parts.ce1, ce1) and torch.equal(parts.ce2, ce2) and parts.alpha == 0.7
    torch.testing.assert_close(rdrop_loss(z1, z2, y, alpha=0)[0], 0.5 * (ce1 + ce2))


def test_rdrop_loss_on_sequence_logits_with_a_mask():
    torch.manual_seed(5)
    z1, z2, y = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]]).unsqueeze(-1)
    loss, parts = rdrop_loss(z1, z2, y, alpha=1.0, pad_mask=pad)
    ce = 0.5 * (F.cross_entropy(z1.reshape(-1, 6), y.reshape(-1)) + F.cross_entropy(z2.reshape(-1, 6), y.reshape(-1)))
    torch.testing.assert_close(loss, ce + reference_compute_kl_loss(z1, z2, pad))


def test_gradients_flow_through_both_passes():
    """dL/dz1 = (softmax(z1) - onehot) / (2N) + alpha * dKL/dz1, with (per row, d = log P1 - log P2)
    dKL/dz1 = ((P1 - P2) + P1 * (d - sum(P1 * d))) / 2; symmetric for z2."""
    torch.manual_seed(6)
    n, c, alpha = 4, 7, 0.8
    z1 = (torch.randn(n, c, dtype=torch.float64) * 2).requires_grad_()
    z2 = (torch.randn(n, c, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, c, (n,))
    loss, _ = rdrop_loss(z1, z2, y, alpha)
    loss.backward()
    onehot = F.one_hot(y, c).double()
    for a, b, grad in ((z1, z2, z1.grad), (z2, z1, z2.grad)):
        pa, pb = F.softmax(a.detach(), -1), F.softmax(b.detach(), -1)
        d = torch.log(pa) - torch.log(pb)
        dkl = 0.5 * ((pa - pb) + pa * (d - (pa * d).sum(-1, keepdim=True)))
        torch.testing.assert_close(grad, (pa - onehot) / (2 * n) + alpha * dkl, rtol=1e-10, atol=1e-12)


def test_model_gradients_include_both_passes(digits8):
    """rdrop_forward's parameter gradients are those of the loss of two hand-run passes, and differ from a
    version that stops the gradient through the second pass."""
    x, y = digits8
    model = mlp()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(7)
    helper = grads(rdrop_forward(model, x, y, alpha=1.0).loss)
    torch.manual_seed(7)
    z1, z2 = model(x), model(x)
    by_hand = grads(0.5 * (F.cross_entropy(z1, y) + F.cross_entropy(z2, y)) + compute_kl_loss(z1, z2))
    torch.manual_seed(7)
    z1, z2 = model(x), model(x)
    stopped = grads(0.5 * (F.cross_entropy(z1, y) + F.cross_entropy(z2.detach(), y)) + compute_kl_loss(z1, z2.detach()))
    for a, b in zip(helper, by_hand):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(helper, stopped))


# ----------------------------------------------------------------------------- two forwards vs one concatenated forward
@pytest.mark.parametrize("name", sorted(models.BUILDERS))
def test_two_forwards_and_concat_are_identical_without_dropout_and_with_frozen_batchnorm(name, digits32):
    x, y = digits32
    torch.manual_seed(0)
    model = models.build(name, dropout=0.0).train()
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # frozen: normalizes with its running statistics, updates nothing
    before = fingerprint(model)
    two = rdrop_forward(model, x, y, alpha=1.0, concat=False)
    one = rdrop_forward(model, x, y, alpha=1.0, concat=True)
    torch.testing.assert_close(one.logits1, two.logits1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.loss, two.loss, rtol=1e-5, atol=1e-6)
    assert two.parts.kl.item() == pytest.approx(0.0, abs=1e-6)  # no dropout: both passes are the same network
    assert_unchanged(model, before)


def test_batchnorm_in_training_mode_updates_once_with_concat_and_twice_with_two_forwards(digits32):
    """Same normalization (the concatenated batch has x's mean and biased variance), different running statistics."""
    x, y = digits32
    torch.manual_seed(0)
    model_two = models.build("resnet18", dropout=0.0).train()
    model_one = models.build("resnet18", dropout=0.0).train()
    model_one.load_state_dict(model_two.state_dict())
    two = rdrop_forward(model_two, x, y, alpha=1.0, concat=False)
    one = rdrop_forward(model_one, x, y, alpha=1.0, concat=True)
    torch.testing.assert_close(one.loss, two.loss, rtol=1e-4, atol=1e-5)
    assert int(model_two.bn1.num_batches_tracked) == 2 and int(model_one.bn1.num_batches_tracked) == 1
    assert not torch.allclose(model_two.bn1.running_mean, model_one.bn1.running_mean)


def test_with_dropout_on_both_helpers_have_the_same_expected_loss(digits8):
    """Over 50 seeds each, the means of the two helpers' losses agree within 2 standard errors of their difference;
    single draws differ (the random stream is consumed differently)."""
    x, y = digits8
    torch.manual_seed(123)
    model = mlp(p=0.5)
    losses = {False: [], True: []}
    with torch.no_grad():
        for concat in (False, True):
            for seed in range(50):
                torch.manual_seed(seed)
                losses[concat].append(rdrop_forward(model, x, y, alpha=1.0, concat=concat).loss.item())
    two, one = losses[False], losses[True]
    se = math.sqrt(statistics.variance(two) / 50 + statistics.variance(one) / 50)
    assert abs(statistics.mean(two) - statistics.mean(one)) <= 2 * se
    assert se > 0 and two[0] != one[0]


# ----------------------------------------------------------------------------- bad input
def _logits(*shape):
    return torch.zeros(*shape)


BAD_INPUTS = {
    "different logit shapes": (lambda: compute_kl_loss(_logits(4, 10), _logits(4, 9)), ValueError, r"same shape.*\(4, 10\).*\(4, 9\)"),
    "different batch sizes": (lambda: rdrop_loss(_logits(4, 10), _logits(3, 10), torch.zeros(4, dtype=torch.long), 1.0),
                              ValueError, "same shape"),
    "pad_mask does not broadcast": (lambda: compute_kl_loss(_logits(2, 5, 7), _logits(2, 5, 7),
                                                            pad_mask=torch.zeros(2, 4, 1, dtype=torch.bool)),
                                    ValueError, r"pad_mask of shape \(2, 4, 1\) does not broadcast.*\(2, 5, 7\)"),
    "pad_mask without the class dimension": (lambda: compute_kl_loss(_logits(2, 5, 7), _logits(2, 5, 7),
                                                                     pad_mask=torch.zeros(2, 5, dtype=torch.bool)),
                                             ValueError, r"unsqueeze\(-1\)"),
    "pad_mask larger than the logits": (lambda: compute_kl_loss(_logits(5, 7), _logits(5, 7),
                                                                pad_mask=torch.zeros(3, 5, 7, dtype=torch.bool)),
                                        ValueError, "does not broadcast"),
    "pad_mask not bool": (lambda: compute_kl_loss(_logits(2, 7), _logits(2, 7), pad_mask=torch.zeros(2, 1)),
                          TypeError, "bool tensor"),
    "negative alpha": (lambda: rdrop_loss(_logits(4, 10), _logits(4, 10), torch.zeros(4, dtype=torch.long), -0.5),
                       ValueError, r"alpha.*>= 0.*-0\.5"),
    "nan alpha": (lambda: rdrop_loss(_logits(4, 10), _logits(4, 10), torch.zeros(4, dtype=torch.long), float("nan")),
                  ValueError, "alpha"),
    "unknown reduction": (lambda: compute_kl_loss(_logits(4, 10), _logits(4, 10), reduction="avg"),
                          ValueError, r"unknown reduction 'avg'.*'sum', 'batchmean', 'mean'"),
    "integer logits": (lambda: compute_kl_loss(torch.zeros(4, 10, dtype=torch.long), _logits(4, 10)),
                       TypeError, "floating-point"),
    "target shape": (lambda: rdrop_loss(_logits(4, 10), _logits(4, 10), torch.zeros(4, 1, dtype=torch.long), 1.0),
                     ValueError, r"target of shape \(4, 1\).*expected \(4,\)"),
    "step: negative alpha": (lambda: RDropStep(-1.0), ValueError, "alpha"),
    "step: unknown reduction": (lambda: RDropStep(1.0, reduction="none"), ValueError, "unknown reduction 'none'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(case):
    call, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        call()


FORWARD_BAD_INPUTS = {
    "negative alpha": (dict(alpha=-1.0), ValueError, "alpha"),
    "unknown reduction": (dict(alpha=1.0, reduction="batch"), ValueError, "unknown reduction 'batch'"),
    "target batch": (dict(alpha=1.0, target=torch.zeros(3, dtype=torch.long)), ValueError, r"target.*\(3,\).*32 samples"),
}


@pytest.mark.parametrize("case", list(FORWARD_BAD_INPUTS))
@pytest.mark.parametrize("concat", [False, True])
def test_rdrop_forward_rejects_bad_input_before_running_the_model(case, concat, digits8):
    """Checked before any forward: a model with BatchNorm in training mode keeps its running statistics."""
    x, y = digits8
    kwargs, error, pattern = FORWARD_BAD_INPUTS[case]
    kwargs = dict(kwargs)
    target = kwargs.pop("target", y)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 10)).train()
    before = fingerprint(model)
    with pytest.raises(error, match=pattern):
        rdrop_forward(model, x, target, concat=concat, **kwargs)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- training
def test_rdrop_step_in_fit_logs_ce_and_kl_per_epoch(digits8):
    x, y = digits8
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    step = RDropStep(alpha=1.0, concat=True, reduction="batchmean")
    history = fit(mlp(0.3), loader, epochs=2, lr=0.05, progress=False, step=step)
    assert len(step.log) == 2 * len(loader)
    means = step.epoch_means(len(loader))
    assert len(means) == 2 and all(row["kl"] > 0 and row["ce"] > 0 for row in means)
    # fit's train_loss is the step's loss: ce + alpha * kl, averaged over the epoch's samples.
    assert history[0]["train_loss"] == pytest.approx(means[0]["ce"] + means[0]["kl"], rel=1e-6)


def test_rdrop_runs_are_cached_by_every_parameter(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    kwargs = dict(epochs=1, batch_size=256, image_size=8, seed=0, progress=False)
    model, first = zoo.trained_model("resnet18", "rdrop", alpha=1.0, **kwargs)
    assert not first["cached"] and set(first["history"][0]) >= {"kl", "ce", "test_acc", "seconds"}
    assert isinstance(model.fc, nn.Sequential) and model.fc[0].p == 0.2 and not model.training
    again, second = zoo.trained_model("resnet18", "rdrop", alpha=1.0, **kwargs)
    assert second["cached"] and second["key"] == first["key"] and second["history"] == first["history"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    keys = {first["key"], zoo.cache_key(dict(first["params"], alpha=0.5)), zoo.cache_key(dict(first["params"], concat=False)),
            zoo.cache_key(dict(first["params"], batch_size=128))}
    assert len(keys) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"rdrop-resnet18-{first['key']}.pt"]
    with pytest.raises(ValueError, match="rep_resnet18"):
        zoo.trained_model("rep_resnet18", "rdrop", **kwargs)


def _tiny_classifier(p: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Sequential(nn.Dropout(p), nn.Linear(16, 4)))


def test_classifier_dropout_finds_the_heads_of_both_course_models():
    for name in ("resnet18", "mobilenet_v2"):
        drop, linear = rdrop.classifier_dropout(models.build(name, dropout=0.2))
        assert isinstance(drop, nn.Dropout) and drop.p == 0.2 and isinstance(linear, nn.Linear)
    with pytest.raises(ValueError, match="no classifier ending in"):
        rdrop.classifier_dropout(nn.Sequential(nn.Linear(3, 2)))


def test_subnetwork_gap_without_dropout_is_the_full_network():
    x, y = torch.randn(32, 3, 2, 2), torch.randint(0, 4, (32,))
    gap = rdrop.subnetwork_gap(_tiny_classifier(0.0), x, y, mask_samples=3)
    assert gap.sub_accuracy == gap.full_accuracy
    assert gap.kl_sub_sub == 0.0 and gap.kl_sub_full == 0.0


def test_subnetwork_gap_matches_masks_drawn_by_hand():
    model = _tiny_classifier(0.5).train()
    x, y = torch.randn(32, 3, 2, 2), torch.randint(0, 4, (32,))
    gap = rdrop.subnetwork_gap(model, x, y, mask_samples=4, seed=3)
    assert model.training                                        # the caller's mode is restored
    drop, linear = model[3][0], model[3][1]
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))
        full = linear(h)
        generator = torch.Generator().manual_seed(3)
        kl = []
        for _ in range(4):
            masks = (torch.rand(2, *h.shape, generator=generator) >= 0.5).float() / 0.5
            kl.append(float(rdrop.symmetric_kl_per_sample(linear(h * masks[0]), linear(h * masks[1])).mean()))
    assert gap.full_accuracy == float((full.argmax(1) == y).float().mean())
    assert gap.kl_sub_sub == pytest.approx(sum(kl) / 4, rel=1e-6) and gap.kl_sub_sub > 0
