"""Transfer learning: freeze the backbone, unfreeze it later at a lower learning rate, and
train a frozen backbone's head on cached pooled features.

The backbone is everything but the model's head (`trainable_head_names()`). A frozen backbone
keeps its batch-norm layers in eval mode: their running statistics are the pretrained ones
(ImageNet's), and updating them from a few X-rays while the weights stay fixed would shift
every feature the head learns from.

Feature cache: with a frozen backbone (in eval mode, so deterministic) and no augmentation,
every epoch would recompute the same features (the notebook ran its frozen ResNet50 on every
batch of every epoch). They are computed once here and the head trains on them; the model is
unchanged, so the saved model.pt is the whole network.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from cxrlab.distributed import rewrap_after_unfreeze

log = logging.getLogger("cxrlab")


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    names = model.trainable_head_names()
    return [p for n in names for p in model.get_submodule(n).parameters()]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    head = set(model.trainable_head_names())
    return [m for name, m in model.named_children() if name not in head]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)


def backbone_bn_eval(model: nn.Module) -> None:
    """Batch norm of the backbone in eval mode: running stats used, never updated."""
    for part in backbone_modules(model):
        for m in part.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


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
    from cxrlab.inference import float_batches

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
    """WiSE-FT (Wortsman et al., CVPR 2022): every float weight and BatchNorm statistic becomes
    alpha x fine-tuned + (1 - alpha) x its value at the unfreeze (ImageNet backbone, trained
    head). Fine-tuning on one intake bends features that transfer; the interpolation keeps
    most of what fine-tuning gained in distribution and much of the pretrained robustness.
    False (and nothing changed) when the run never reached the unfreeze."""
    if not start.is_file():
        return False
    before = torch.load(start, map_location="cpu", weights_only=True)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in own.items():
            if value.is_floating_point():
                value.mul_(alpha).add_(before[key].to(value.dtype), alpha=1 - alpha)
    return True
