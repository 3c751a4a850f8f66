"""The training module's loss and probabilities agree on what the logit means."""

import torch

from cxrlab.config import RunConfig
from cxrlab.train import ClassifierModule, probabilities


def test_positive_class_does_not_flip_the_logit():
    # `--positive NORMAL` (index 0) once trained the logit towards class 0 while
    # `probabilities` read it as class 1: every prediction came out inverted.
    logits = torch.tensor([[4.0], [-4.0]])
    y = torch.tensor([1, 0])
    probs = probabilities(logits)
    assert probs[0, 1] > 0.98 and probs[1, 0] > 0.98
    for positive in (0, 1):
        module = ClassifierModule(torch.nn.Linear(1, 1), RunConfig(data="x"), 2, None, positive)
        assert module.loss(logits, y) < 0.05
        assert module.loss(-logits, y) > 3.0


def test_error_messages_stay_on_one_line():
    from cxrlab.errors import CxrlabError

    e = CxrlabError("m.csv: first missing: a\nb\t\udce9.jpg")
    assert str(e) == "m.csv: first missing: a\\nb\\t\\udce9.jpg"
