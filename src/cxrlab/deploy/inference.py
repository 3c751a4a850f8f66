"""Model -> probabilities -> decisions: the one inference path every command uses.

Training, evaluate, predict, serve, export, report, compare, crossval, shift and site
calibration all score images through `predict_probs` (or the fp32 ONNX graph built from the
same model) and decide through `decide`, so a run decides the same everywhere. `use_bf16` is
the training precision rule only: every evaluation and prediction is fp32, through a copy of
the model with its BatchNorms folded into their convolutions (`folded`).
"""

from __future__ import annotations

import copy
import weakref
from fractions import Fraction

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def use_bf16(precision: str, model: torch.nn.Module | None = None) -> bool:
    """Whether training runs in bf16 autocast (config `precision`); never used to predict.

    `auto`: on a GPU, wherever it supports bf16; on a CPU, where it has bf16 instructions
    and the model gains from them (`ImageClassifier.cpu_bf16`; None: assume it does)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if not getattr(model, "cpu_bf16", True):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) class probabilities from 1 logit (2 classes) or K logits."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def float_batches(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int,
                  channels_last: bool = True):
    """uint8 images (N, C, H, W) -> float [0, 1] batches on the model's device, for inference.

    With channels_last the model's weights are put in that layout too (a no-op after `fit`;
    a loaded run's weights come contiguous): with mixed layouts oneDNN reorders the weights
    on every call, and ResNet-18 inference at 224 px ran 1.2-1.5x slower here.
    """
    images = torch.as_tensor(images)
    device = next(model.parameters()).device
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float().div_(255.0)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: np.ndarray | torch.Tensor,
                  batch_size: int = 64, channels_last: bool = True) -> np.ndarray:
    """(N, K) probabilities for uint8 images (N, C, H, W), in fp32 whatever the run trained in.

    One precision from the threshold to the decision: every number or decision a run reports
    (the threshold, metrics.json, val_predictions.csv, evaluate, predict, serve, report) comes
    from here or from the fp32 ONNX graph, so every machine and backend decides as the run
    did. bf16 moves scores by ~1e-3, enough to flip a case near the threshold, and
    `precision: auto` resolves differently on machines with and without bf16.
    """
    model.eval()
    out = []
    for x in float_batches(model, images, batch_size, channels_last):
        out.append(probabilities(folded(model, x)(x)).cpu())
    if not out:
        return np.zeros((0, 2), dtype=np.float32)
    return torch.cat(out).numpy()


def decide(probs: np.ndarray, positive: int | None, threshold: float | None) -> np.ndarray:
    """Predicted class per row: the run's threshold for 2 classes, argmax otherwise."""
    if positive is not None:
        t = 0.5 if threshold is None else threshold
        # In float64, as compute_metrics compares: NumPy compares float32 scores with a Python
        # float in float32, where a threshold between two scores can round onto one of them.
        score = np.asarray(probs[:, positive], dtype=np.float64)
        return np.where(score >= t, positive, 1 - positive)
    return probs.argmax(1)


def decision_rule(probs: np.ndarray, classes: list[str], positive: int | None,
                  threshold: float | None) -> dict:
    """How one image's class was decided, for people to read beside it (predict, serve):
    2 classes: the positive class's score (exact: rounded, a score beside the threshold could
    read as deciding the other way), the threshold and "p(PNEUMONIA) 0.444 ≥ 0.410"; more:
    the highest probability. The comparison is `decide`'s, in float64."""
    if positive is None:
        return {"rule": "highest probability"}
    t = 0.5 if threshold is None else float(threshold)
    score = float(np.float64(probs[positive]))
    digits = 3  # more where needed: never "0.410 < 0.410"
    while digits < 17 and score != t and f"{score:.{digits}f}" == f"{t:.{digits}f}":
        digits += 1
    sign = "≥" if score >= t else "<"
    return {"positive_class": classes[positive], "positive_score": score, "threshold": t,
            "rule": f"p({classes[positive]}) {score:.{digits}f} {sign} {t:.{digits}f}"}


def complement_threshold(probs: np.ndarray, positive: int,
                         threshold: float | None) -> tuple[np.ndarray, float]:
    """The run's decision seen from its other class: (probs, t') such that
    P(other) > t' exactly when P(positive) < threshold, so every case keeps its class.

    The run's threshold was chosen on P(positive); applied to P(other) it would decide
    something else. P(other) becomes 1 - P(positive) in float64 (exact for the model's
    float32 scores) and t' is 1 - threshold rounded down, so that no case within a rounding
    error of the threshold flips either.
    """
    t = 0.5 if threshold is None else float(threshold)
    p = np.array(probs, dtype=np.float64)
    p[:, 1 - positive] = 1.0 - p[:, positive]
    t_other = 1.0 - t
    if Fraction(t_other) > 1 - Fraction(t):  # rounded up: take the float below
        t_other = float(np.nextafter(t_other, -np.inf))
    return p, t_other


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` (in eval mode) with each BatchNorm2d that only rescales a Conv2d's output folded
    into that convolution: the same function with one memory-bound pass less per block.

    Pairs are found by running `x[:1]` with hooks (which conv's output each BN reads), so no
    model needs to declare them; the copy is kept only if it gives the model's logits on that
    image, and is remade whenever the model's weights change (training validates every epoch).
    """
    state = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    hit = _FOLDED.get(model)
    if hit is not None and hit[0] == state:
        return hit[1]
    # id(output) -> (conv name, output kept alive, its version: an in-place op after the conv,
    # such as ReLU(inplace=True), bumps it, and a BN after that op must not be folded back)
    convs: dict[int, tuple[str, torch.Tensor, int]] = {}
    pairs: dict[str, str] = {}  # BN name -> the conv whose output it reads
    names = {m: n for n, m in model.named_modules()}

    def conv_out(m, _inputs, y):
        convs[id(y)] = (names[m], y, y._version)

    def bn_in(m, inputs):
        conv = convs.pop(id(inputs[0]), None)
        if conv is not None and conv[2] == inputs[0]._version:
            pairs[names[m]] = conv[0]

    hooks = [m.register_forward_hook(conv_out) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(bn_in) for m in model.modules()
              if type(m) is nn.BatchNorm2d and m.track_running_stats]
    try:
        with torch.no_grad():
            want = model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    fused = model
    if pairs:
        fused = copy.deepcopy(model)
        for bn, conv in pairs.items():
            new = fuse_conv_bn_eval(fused.get_submodule(conv), fused.get_submodule(bn))
            fused.set_submodule(conv, new.to(memory_format=torch.channels_last)
                                if x.is_contiguous(memory_format=torch.channels_last) else new)
            fused.set_submodule(bn, nn.Identity())
        with torch.no_grad():
            if not torch.allclose(fused(x[:1]), want, rtol=1e-3, atol=1e-4):
                fused = model  # a conv output read elsewhere too: folding would change that path
    _FOLDED[model] = (state, fused)
    return fused
