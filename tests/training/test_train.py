"""The training module's loss and probabilities agree on what the logit means."""

import pytest
import torch

from cxrlab.config import RunConfig
from cxrlab.deploy.inference import probabilities
from cxrlab.models import create_model
from cxrlab.training.loop import ClassifierModule


@pytest.mark.parametrize("positive", [0, 1])
def test_positive_class_does_not_flip_the_logit(positive):
    # `--positive NORMAL` (index 0) once trained the logit towards class 0 while
    # `probabilities` read it as class 1: every prediction came out inverted. Train a
    # one-weight model with the module's loss, then follow its scores through everything that
    # reads `positive`: threshold, metrics, the per-epoch summary and the decisions.
    import numpy as np

    from cxrlab.deploy.inference import decide
    from cxrlab.evaluation.metrics import choose_threshold, compute_metrics
    from cxrlab.training.loop import epoch_summary

    logits = torch.tensor([[4.0], [-4.0]])
    probs = probabilities(logits)
    assert probs[0, 1] > 0.98 and probs[1, 0] > 0.98  # the logit is evidence for class 1

    y = torch.tensor([0, 1] * 8)
    x = (2.0 * y - 1).float()[:, None] + torch.linspace(-0.5, 0.5, 16)[:, None]
    torch.manual_seed(0)
    net = torch.nn.Linear(1, 1)
    module = ClassifierModule(net, RunConfig(data="x", model="cnn"), 2,
                              torch.tensor([1.0, 3.0]), positive)  # weighted path too
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        module.loss(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        P = probabilities(net(x)).numpy()
    yy = y.numpy()
    assert (P[np.arange(16), yy] > 0.75).all()  # each image's own class is the likely one
    t = choose_threshold(yy == positive, P[:, positive])
    m = compute_metrics(yy, P, ["NORMAL", "PNEUMONIA"], positive=positive, threshold=t,
                        n_boot=0)
    assert (m["accuracy"], m["roc_auc"], m["recall"]) == (1.0, 1.0, 1.0)
    assert list(decide(P, positive, t)) == list(yy)
    summary = epoch_summary(yy, P, positive, 0.0)
    assert (summary["acc"], summary["auc"], summary["recall"]) == (1.0, 1.0, 1.0)


def test_error_messages_stay_on_one_line():
    from cxrlab.errors import CxrlabError

    e = CxrlabError("m.csv: first missing: a\nb\t\udce9.jpg")
    assert str(e) == "m.csv: first missing: a\\nb\\t\\udce9.jpg"


def test_inference_puts_a_loaded_model_in_the_input_layout():
    # A loaded run's weights are contiguous; channels-last inputs against them made oneDNN
    # reorder the weights on every call. predict_probs aligns the model once; same numbers.
    import numpy as np

    from cxrlab.deploy.inference import predict_probs
    from cxrlab.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=1, in_chans=1).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    plain = predict_probs(model, images, channels_last=False)
    assert model.conv1.weight.is_contiguous()
    aligned = predict_probs(model, images)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(aligned, plain, atol=1e-5)


@pytest.mark.parametrize("balanced", [False, True])
def test_fewer_training_images_than_a_batch_still_train(balanced):
    # The balanced sampler dropped the last partial batch: 24 images with --batch-size 64
    # gave no batch at all and "training produced no checkpoint".
    import numpy as np

    from cxrlab.training.loop import ArrayDataset, make_loader

    labels = np.array([0] * 6 + [1] * 18)
    ds = ArrayDataset(np.zeros((24, 1, 8, 8), np.uint8), labels)
    batches = list(make_loader(ds, 64, train=True, seed=0, balanced=balanced))
    assert [len(y) for _, y in batches] == [24]
    full = list(make_loader(ds, 16, train=True, seed=0, balanced=balanced))
    assert [len(y) for _, y in full] == [16]  # more than a batch: whole batches only


def test_validation_batches_are_never_augmented(tmp_path, monkeypatch):
    # Augmenting validation would make val loss, early stopping and the chosen checkpoint
    # depend on random warps. Every augmented image must be a training image.
    import numpy as np

    import cxrlab.training.loop as train

    seen = []

    def spy(x, policy, generator=None):
        seen.append(len(x))
        return real(x, policy, generator)

    real = train.augment_batch
    monkeypatch.setattr(train, "augment_batch", spy)
    rng = np.random.default_rng(0)
    tx = rng.integers(0, 256, (24, 1, 32, 32), dtype=np.uint8)
    vx = rng.integers(0, 256, (10, 1, 32, 32), dtype=np.uint8)
    cfg = RunConfig.build(dict(data="x", model="cnn", image_size=32, batch_size=8, epochs=1,
                               augment="light", precision="fp32", pretrained="none"))
    model = create_model("cnn", num_classes=1, in_chans=1, image_size=32)
    res = train.fit(model, cfg, tx, np.arange(24) % 2, vx, np.arange(10) % 2, 2, 1, tmp_path,
                    progress=False)
    assert res.epochs_run == 1
    assert seen == [8, 8, 8]  # the epoch's training batches, not the validation batch
