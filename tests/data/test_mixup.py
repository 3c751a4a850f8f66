"""Mixup and CutMix (data/mixing.py) and the soft-target loss they train with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cxrlab.data.mixing import cut_box, mix_batch
from cxrlab.training.loop import soft_target_loss


def batch(b: int = 6, n_classes: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, size, size, generator=g)
    y = torch.randint(0, n_classes, (b,), generator=g)
    return x, y


def drawn_lambda(seed: int, alpha: float) -> float:
    """What the generator's second uniform draw gives as a Beta(alpha, alpha) quantile."""
    u = torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return float(stats.beta.ppf(float(u[1]), alpha, alpha))


def test_mixup_is_the_convex_combination_with_the_beta_drawn_lambda():
    x, y = batch(n_classes=3)
    m = mix_batch(x, y, 3, mixup=0.4, generator=torch.Generator().manual_seed(7))
    assert m.lam == pytest.approx(drawn_lambda(7, 0.4), abs=1e-9)
    assert 0 < m.lam < 1 and m.box is None
    partner = x.flip(0)
    assert torch.allclose(m.x, m.lam * x + (1 - m.lam) * partner, atol=1e-6)
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    assert torch.allclose(m.target, m.lam * one_hot + (1 - m.lam) * one_hot.flip(0))
    assert torch.allclose(m.target.sum(1), torch.ones(len(y)))


def test_lambda_follows_beta_alpha_alpha():
    g = torch.Generator().manual_seed(0)
    x, y = batch(b=2)
    lams = [mix_batch(x, y, 2, mixup=0.2, generator=g).lam for _ in range(2000)]
    assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue > 0.01
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # it can fail


def test_same_seed_same_mix_other_seed_another():
    x, y = batch()
    a = mix_batch(x, y, 2, mixup=0.4, cutmix=1.0, generator=torch.Generator().manual_seed(3))
    b = mix_batch(x, y, 2, mixup=0.4, cutmix=1.0, generator=torch.Generator().manual_seed(3))
    c = mix_batch(x, y, 2, mixup=0.4, cutmix=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.x, b.x) and torch.equal(a.target, b.target) and a.lam == b.lam
    assert a.lam != c.lam


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lambda():
    x, y = batch(size=32)
    boxes = 0
    for seed in range(20):
        m = mix_batch(x, y, 2, cutmix=1.0, generator=torch.Generator().manual_seed(seed))
        top, bottom, left, right = m.box
        area = (bottom - top) * (right - left)
        assert m.lam == pytest.approx(1 - area / (32 * 32))
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(m.x[..., inside], x.flip(0)[..., inside])
        assert torch.equal(m.x[..., ~inside], x[..., ~inside])
        one_hot = torch.nn.functional.one_hot(y, 2).float()
        assert torch.allclose(m.target, m.lam * one_hot + (1 - m.lam) * one_hot.flip(0))
        boxes += area > 0
    assert boxes > 10
    # unclipped (centred), the box is the Beta draw's: sides sqrt(1 - lam) of the image's
    assert cut_box(100, 100, 0.64, 0.5, 0.5) == (20, 80, 20, 80)


def test_both_on_switch_between_mixup_and_cutmix():
    x, y = batch()
    kinds = {mix_batch(x, y, 2, mixup=0.4, cutmix=1.0,
                       generator=torch.Generator().manual_seed(s)).box is None
             for s in range(16)}
    assert kinds == {True, False}


@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_loss_on_one_hot_targets_is_the_hard_loss(n_out, weighted):
    from cxrlab.config import RunConfig
    from cxrlab.models import create_model
    from cxrlab.training.loop import ClassifierModule

    n_classes = 2 if n_out == 1 else 3
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, n_out, generator=g)
    y = torch.randint(0, n_classes, (8,), generator=g)
    w = torch.tensor([0.5, 2.0, 1.5][:n_classes]) if weighted else None
    smoothing = 0.1 if n_out == 1 or not weighted else 0.0  # CE weighs smoothing per class
    cfg = RunConfig.build({"data": "x", "model": "cnn", "label_smoothing": smoothing})
    module = ClassifierModule(create_model("cnn", num_classes=n_out, in_chans=1), cfg,
                              n_classes, w, positive=1 if n_out == 1 else None)
    one_hot = torch.nn.functional.one_hot(y, n_classes).float()
    hard = module.loss(logits, y)
    assert torch.allclose(module.loss(logits, y, soft=one_hot), hard, atol=1e-6)
    # and, as both losses are linear in the target, the mixed loss is the mix of the losses
    if not weighted:
        lam = 0.3
        soft = lam * one_hot + (1 - lam) * one_hot.flip(0)
        mixed = soft_target_loss(logits, soft, None, smoothing)
        parts = lam * module.loss(logits, y) + (1 - lam) * module.loss(logits, y.flip(0))
        assert torch.allclose(mixed, parts, atol=1e-6)


def test_a_run_trains_with_mixup_and_cutmix(tmp_path):
    import cxrlab
    from tests.conftest import make_kermany_folder

    data = make_kermany_folder(tmp_path / "data", 8, 8, size=32)
    run = cxrlab.train(data, tmp_path / "run", model="cnn", image_size=32, epochs=1,
                       batch_size=8, augment="none", mixup=0.4, cutmix=1.0)
    assert (run.config.mixup, run.config.cutmix) == (0.4, 1.0)
    assert np.isfinite(run.history[0]["train_loss"])
