"""fusionlib.train: seeding, the training loop on real digits, evaluate."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from fusionlib.data import digits_loaders
from fusionlib.train import evaluate, fit, seed_everything



def small_cnn() -> nn.Module:
    """A ~3k-parameter CNN for 8x8 digits: trains to > 80% in two epochs in well under a second."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def loaders8():
    return digits_loaders(batch_size=32, image_size=8, channels=1)


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    seed_everything(124)
    assert random.random() != first[0]


def test_fit_learns_digits_and_reports_history(loaders8):
    train_loader, test_loader = loaders8
    torch.manual_seed(0)
    model = small_cnn()
    before = evaluate(model, test_loader)
    history = fit(model, train_loader, epochs=3, lr=0.1, test_loader=test_loader, progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "train_loss", "train_acc", "test_acc", "seconds"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.8 > before + 0.3
    assert all(row["seconds"] > 0 and 0 <= row["train_acc"] <= 1 for row in history)
    assert history[-1]["test_acc"] == evaluate(model, test_loader)
    assert model.training  # fit leaves the model in train mode


def test_fit_is_reproducible_with_the_same_seed():
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = small_cnn()
        train_loader, _ = digits_loaders(batch_size=64, image_size=8, channels=1)
        fit(model, train_loader, epochs=1, seed=5, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fit_without_test_loader_and_progress_output(loaders8, capsys):
    train_loader, _ = loaders8
    history = fit(small_cnn(), train_loader, epochs=1, progress=False)
    assert "test_acc" not in history[0]
    assert capsys.readouterr().err == ""
    fit(small_cnn(), train_loader, epochs=1, progress=True)
    assert "epochs" in capsys.readouterr().err  # tqdm writes its bars to stderr


@pytest.mark.parametrize("kwargs, match", [({"epochs": 0}, "epochs"), ({"epochs": 1, "lr": 0.0}, "lr")])
def test_fit_rejects_bad_arguments(loaders8, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(small_cnn(), loaders8[0], **kwargs)


class _Recorder(nn.Module):
    """Predicts class (x.sum() > 0), and records the mode it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        positive = (x.flatten(1).sum(1) > 0).float()
        return torch.stack([1 - positive, positive], dim=1) * self.weight


def test_evaluate_counts_correct_predictions_in_eval_and_inference_mode():
    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0], [5.0]])
    y = torch.tensor([1, 0, 0, 0, 1])  # the third is predicted 1 but labelled 0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    model = _Recorder().train()
    assert evaluate(model, loader) == pytest.approx(4 / 5)
    assert model.calls == [(False, True)] * 3  # three batches, eval mode, inference mode
    assert model.training  # the previous flag is restored
    model.eval()
    evaluate(model, loader)
    assert not model.training


def test_evaluate_restores_mixed_training_flags(loaders8):
    model = small_cnn().train()
    model[1].eval()  # e.g. a frozen BatchNorm
    evaluate(model, loaders8[1])
    assert model.training and not model[1].training and model[5].training


def test_eval_mode_is_the_shared_helper_and_still_importable_from_train():
    from fusionlib import modules, train

    assert train.eval_mode is modules.eval_mode
    model = small_cnn().train()
    with train.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_recalibrate_batchnorm_sets_running_stats_to_the_average_of_batch_stats():
    """running_mean = mean of per-batch means, running_var = mean of per-batch unbiased variances."""
    from fusionlib.train import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.Dropout(0.5), nn.ReLU()).eval()
    model[1].running_mean.fill_(5.0)  # stale statistics
    batches = [torch.randn(8, 3, 6, 6) * (i + 1) for i in range(3)]
    with torch.no_grad():
        feats = [model[0](x) for x in batches]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    expected_var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    returned = recalibrate_batchnorm(model, [(x, 0) for x in batches])
    assert returned is model
    torch.testing.assert_close(model[1].running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.1 and not any(m.training for m in model.modules()), "flags and momentum restored"
    assert model[1].num_batches_tracked.item() == 3
    recalibrate_batchnorm(model, batches, num_batches=1)  # plain tensors, first batch only
    torch.testing.assert_close(model[1].running_mean, feats[0].mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_recalibrate_batchnorm_recovers_accuracy_lost_to_stale_statistics():
    """Stale running statistics wreck eval accuracy; recalibration on the training data gives it back."""
    from fusionlib.data import digits_loaders
    from fusionlib.train import evaluate, fit, recalibrate_batchnorm

    torch.manual_seed(0)
    train, test = digits_loaders(batch_size=64, image_size=8, channels=1, seed=0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    fit(model, train, epochs=3, lr=0.05, progress=False)
    good = evaluate(model, test)
    with torch.no_grad():
        model[1].running_mean.add_(3.0)
        model[1].running_var.mul_(20.0)
    stale = evaluate(model, test)
    recalibrate_batchnorm(model, train)
    assert good > 0.9 and stale < good - 0.5, f"the corruption should hurt: {good:.3f} -> {stale:.3f}"
    assert evaluate(model, test) >= good - 0.02


@pytest.mark.parametrize("bad, match", [
    (dict(model=nn.Linear(2, 2)), "has no BatchNorm"),
    (dict(num_batches=0), "num_batches must be a positive int"),
    (dict(num_batches=True), "num_batches must be a positive int, got True"),  # a bool is not a count
    (dict(loader=[]), "yielded no batch"),
])
def test_recalibrate_batchnorm_bad_input(bad, match):
    from fusionlib.train import recalibrate_batchnorm

    args = dict(model=nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), loader=[torch.randn(2, 1, 3, 3)])
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        recalibrate_batchnorm(args["model"], args["loader"], num_batches=args.get("num_batches"))


def test_fit_refuses_a_bool_for_epochs():
    from fusionlib.train import fit

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="epochs must be a positive int, got True"):
        fit(model, [(torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))], epochs=True)
