"""Transfer learning: freeze the backbone, unfreeze it later at a lower learning rate, keep
its first stages frozen for the whole run, and train a frozen backbone's head on cached
pooled features.

The backbone is everything but the model's head (`trainable_head_names()`). A frozen backbone
keeps its batch-norm layers in eval mode: their running statistics are the pretrained ones
(ImageNet's), and updating them from a few X-rays while the weights stay fixed would shift
every feature the head learns from.

Feature cache: with a frozen backbone (in eval mode, so deterministic) and no augmentation,
every epoch would recompute the same features (the notebook ran its frozen ResNet50 on every
batch of every epoch). They are computed once here and the head trains on them; the model is
unchanged, so the saved model.pt is the whole network.

Frozen stages (`--frozen-stages N`): the stem and the stages after it, up to N in all (the
model's `stage_names()`), keep their pretrained weights and batch-norm statistics for the whole
run. Their parameters do not require gradients and their input does not either, so autograd
keeps no activations for them and runs no backward through them: on a CPU that is the costly,
memory-bound part of a step (the largest feature maps). They hold generic edge and texture
filters, and the fewer pretrained weights one intake bends, the less there is to overfit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from cxrlab.deploy.inference import float_batches
from cxrlab.errors import CxrlabError
from cxrlab.models import starts_pretrained
from cxrlab.models.stages import model_stages
from cxrlab.training.distributed import rewrap_after_unfreeze

log = logging.getLogger("cxrlab")


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    names = model.trainable_head_names()
    return [p for n in names for p in model.get_submodule(n).parameters()]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The backbone's parameters that train at some point: all but the head's and the
    frozen stages'."""
    skip = {id(p) for p in (*head_parameters(model), *frozen_parameters(model))}
    return [p for p in model.parameters() if id(p) not in skip]


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    head = set(model.trainable_head_names())
    return [m for name, m in model.named_children() if name not in head]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """The backbone trains or not; frozen stages stay frozen either way."""
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)


def _bn_eval(parts) -> None:
    for part in parts:
        for m in part.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def backbone_bn_eval(model: nn.Module) -> None:
    """Batch norm of the backbone in eval mode: running stats used, never updated."""
    _bn_eval(backbone_modules(model))


# -- frozen stages ------------------------------------------------------------------------

def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the stages `freeze_stages` froze (none before it ran)."""
    n = getattr(model, "frozen_stages", 0)
    if not n:  # also any nn.Module without stage_names
        return []
    return [model.get_submodule(name) for stage in model.stage_names()[:n] for name in stage]


def frozen_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in frozen_modules(model) for p in m.parameters()]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the frozen stages': what the optimizer holds (a frozen backbone's
    parameters included; they get no gradient until it is unfrozen)."""
    frozen = {id(p) for p in frozen_parameters(model)}
    return [p for p in model.parameters() if id(p) not in frozen]


def _too_many_stages(n: int, owner: str, stages) -> CxrlabError:
    return CxrlabError(f"--frozen-stages {n}: {owner} has {len(stages)} stages "
                       f"({', '.join('+'.join(s) for s in stages)})")


def freeze_stages(model: nn.Module, n: int) -> None:
    """Keep the first `n` stages (`model.stage_names()`, the stem first) as they are for the
    whole run: no gradients; `frozen_bn_eval` keeps their batch norm in eval mode. The model
    remembers `n` (`frozen_stages`), so set_backbone_trainable never thaws them."""
    if n == 0 and not hasattr(model, "stage_names"):  # any nn.Module trains whole
        return
    stages = model.stage_names()
    if not 0 <= n <= len(stages):
        raise _too_many_stages(n, type(model).__name__, stages)
    model.frozen_stages = n
    for p in frozen_parameters(model):
        p.requires_grad_(False)


def check_frozen_stages(config) -> None:
    """`--frozen-stages` fits the model: refused before any data is read."""
    stages, _ = model_stages(config.model)
    if config.frozen_stages > len(stages):
        raise _too_many_stages(config.frozen_stages, config.model, stages)
    if config.frozen_stages and not starts_pretrained(config.model, config.pretrained):
        raise CxrlabError(f"--frozen-stages {config.frozen_stages}: {config.model} starts from "
                          f"random weights here (no --pretrained), and frozen stages would stay "
                          f"random; give --pretrained or --frozen-stages 0")


def thaw(model: nn.Module) -> None:
    """After training: every parameter requires gradients again (Grad-CAM, further use), and
    nothing counts as frozen."""
    model.frozen_stages = 0
    for p in model.parameters():
        p.requires_grad_(True)


def frozen_bn_eval(model: nn.Module) -> None:
    """Batch norm of the frozen stages in eval mode (after every model.train())."""
    _bn_eval(frozen_modules(model))


def can_cache_features(model: nn.Module, config) -> bool:
    """Frozen for the whole run, no augmentation, and a head that starts by pooling."""
    return (config.freeze_backbone and config.unfreeze_after is None
            and config.augment == "none" and getattr(model, "pooled_head", False))


@torch.no_grad()
def pooled_features(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 64,
                    bf16: bool = False, channels_last: bool = True) -> torch.Tensor:
    """(N, num_features) float32 global-average-pooled backbone features of uint8 images."""
    was_training = model.training
    model.eval()

    device = next(model.parameters()).device
    out = []
    for x in float_batches(model, images, batch_size, channels_last):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model.forward_features(x).float().mean(dim=(2, 3)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.num_features)


def cache_features(model: nn.Module, arrays: list, bf16: bool,
                   channels_last: bool) -> list[torch.Tensor]:
    t0 = time.perf_counter()
    feats = [pooled_features(model, a, bf16=bf16, channels_last=channels_last) for a in arrays]
    n = sum(len(f) for f in feats)
    log.info("frozen backbone, no augmentation: pooled features of %d images computed once "
             "(%.1f s); the head trains on them", n, time.perf_counter() - t0)
    return feats


class UnfreezeBackbone(Callback):
    """At the start of epoch `epoch` (0-based count of finished epochs), the backbone trains
    too; its parameter group already carries lr * backbone_lr_mult, and the schedule scales
    both groups alike. Under DDP the wrapper is rebuilt so the backbone's gradients are
    averaged across processes too."""

    def __init__(self, epoch: int, keep: Path | None = None):
        self.epoch = epoch
        self.keep = keep  # where the weights at the unfreeze go (WiSE-FT interpolates to them)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch and pl_module.backbone_frozen:  # >=: resumed runs
            if (self.keep is not None and trainer.current_epoch == self.epoch
                    and trainer.is_global_zero):
                save_weights(pl_module.model, self.keep)
            pl_module.set_backbone_frozen(False)
            rewrap_after_unfreeze(trainer)
            log.info("epoch %d: backbone unfrozen (lr x %g)", self.epoch + 1,
                     pl_module.cfg.backbone_lr_mult)


HEAD_TRAINED = "head_trained.pt"  # checkpoints/: the weights at the unfreeze


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)


def wise_ft(model: nn.Module, start: Path, alpha: float) -> bool:
    """WiSE-FT (Wortsman et al., CVPR 2022): every float weight becomes alpha x fine-tuned +
    (1 - alpha) x its value at the unfreeze (ImageNet backbone, trained head). Fine-tuning on
    one intake bends features that transfer; the interpolation keeps most of what fine-tuning
    gained in distribution and much of the pretrained robustness. BatchNorm statistics are
    mixed the same way here, which is not what the mixed network computes: `reestimate_bn`
    must follow. False (and nothing changed) when the run never reached the unfreeze."""
    if not start.is_file():
        return False
    before = torch.load(start, map_location="cpu", weights_only=True)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in own.items():
            if value.is_floating_point():
                value.mul_(alpha).add_(before[key].to(value.dtype), alpha=1 - alpha)
    return True


def trained_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BN layers whose statistics training estimated: all but the frozen stages' (those
    keep their pretrained statistics in both ends of WiSE-FT, so in the mix too)."""
    frozen = {id(m) for part in frozen_modules(model) for m in part.modules()}
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and id(m) not in frozen]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches) -> int:
    """Recompute the running statistics of `trained_batchnorms` as the model is now, from
    `batches` (float inputs as the model receives them): what torch.optim.swa_utils.update_bn
    does (reset, momentum None = the plain average over the batches), but with every other
    module in eval mode (no dropout) and every module's mode restored afterwards. Returns how
    many batches were seen (0: statistics left as they were)."""
    layers = trained_batchnorms(model)
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if n == 0:  # nothing seen: keep what was there rather than the reset values
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        for m, mode in modes.items():
            m.training = mode
    return n
