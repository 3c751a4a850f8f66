"""Training: the LightningModule, the in-memory batches, and the wiring of a whole run.

Images arrive as cached uint8 arrays; a batch is one tensor index (no per-sample work), moved
to the device, converted to float and augmented there as a whole batch. Lightning does the
loop, early stopping, checkpoints and the progress bar.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic as tud
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from sklearn.metrics import precision_score, recall_score, roc_auc_score
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from cxrlab.config import RunConfig
from cxrlab.data.augment import augment_batch
from cxrlab.data.mixing import mix_batch
from cxrlab.deploy.inference import folded, probabilities, use_bf16
from cxrlab.errors import CxrlabError
from cxrlab.run import HISTORY_COLUMNS, write_history
from cxrlab.training import finetune
from cxrlab.training.budget import BudgetWatch, RunProgressBar, head_epochs
from cxrlab.training.checkpoints import AtomicCheckpointIO, TrainingState
from cxrlab.training.distributed import gather_in_order
from cxrlab.training.finetune import (
    backbone_bn_eval,
    backbone_parameters,
    freeze_stages,
    frozen_bn_eval,
    head_parameters,
    set_backbone_trainable,
    trainable_parameters,
)
from cxrlab.training.optim import make_optimizer
from cxrlab.training.restarts import RestartingEarlyStopping, restart_epochs, restarted_cosine

log = logging.getLogger("cxrlab")


# ---------------------------------------------------------------------------------------
# batches


class ArrayDataset(Dataset):
    """uint8 images (N, C, H, W) and labels; `__getitems__` returns a whole batch at once."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def __getitems__(self, idx: list[int]):
        # DataLoader hands the sampler's whole batch here: one gather instead of N copies.
        t = torch.as_tensor(idx)
        return self.images[t], self.labels[t]


def _identity_collate(batch):
    return batch


def make_loader(
    ds: ArrayDataset, batch_size: int, *, train: bool, seed: int, balanced: bool = False
) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    if train and balanced:
        counts = torch.bincount(ds.labels).float()
        weights = (1.0 / counts)[ds.labels]
        sampler = WeightedRandomSampler(weights, len(ds), replacement=True, generator=gen)
        # As below: fewer images than a batch still make one (drop_last left none at all).
        return DataLoader(ds, batch_size=batch_size, sampler=sampler,
                          collate_fn=_identity_collate, drop_last=len(ds) > batch_size)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=train, generator=gen if train else None,
        collate_fn=_identity_collate, drop_last=train and len(ds) > batch_size,
    )


def augmentation_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The augmentation draws of process `rank`: seed + 1 + rank, so that under DDP each
    process augments its own images differently (one seed for all drew the same rotations,
    crops and noise on every rank), and one process (rank 0) draws what it always did."""
    return torch.Generator(device=device).manual_seed(seed + 1 + rank)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """The notebooks' weights: n_total / (n_classes * n_c)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# the module


class ClassifierModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, config: RunConfig, n_classes: int,
                 weights: torch.Tensor | None, positive: int | None):
        super().__init__()
        self.model = model
        self.cfg = config
        self.n_classes = n_classes
        self.positive = positive
        self.register_buffer("class_w", weights if weights is not None else torch.ones(n_classes))
        self.use_weights = weights is not None
        self._aug_gen: torch.Generator | None = None
        self._outputs: dict[str, list] = {"train": [], "val": []}
        self.history: HistoryCSV | None = None
        self._epoch_t0 = time.perf_counter()
        # Fine-tuning (see finetune.py): batches are pooled features when they are cached.
        self.features_cached = False
        self.backbone_frozen = False

        freeze_stages(model, config.frozen_stages)
        if config.freeze_backbone:
            self.set_backbone_frozen(True)
        self.train(self.training)

    def set_backbone_frozen(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        set_backbone_trainable(self.model, not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        """Lightning calls train() every epoch: a frozen backbone's BN stays in eval mode, and
        so does that of the frozen stages."""
        super().train(mode)
        if mode and hasattr(self, "backbone_frozen"):  # not while nn.Module.__init__ runs

            if self.backbone_frozen:
                backbone_bn_eval(self.model)
            frozen_bn_eval(self.model)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_cached:
            return self.model.forward_head(x)
        if self.backbone_frozen:
            with torch.no_grad():
                feats = self.model.forward_features(x)
            return self.model.forward_head(feats)
        return self.model(x)

    # -- data on the device -------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        x, y = batch
        if self.features_cached:
            return x.float(), y
        return self.model_input(x, augment=self.trainer.training), y

    def model_input(self, x: torch.Tensor, augment: bool) -> torch.Tensor:
        """uint8 images on the device -> what the model reads: [0, 1] floats, augmented when
        training, channels-last. One pipeline for training batches and BN re-estimation."""
        x = x.float().div_(255.0)
        if augment and self.cfg.augment != "none":
            x = augment_batch(x, self.cfg.augment, self.augmentation_gen(x.device))
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def augmentation_gen(self, device: torch.device) -> torch.Generator:
        """The augmentation (and Mixup / CutMix) draws' generator, made on first use."""
        if self._aug_gen is None or self._aug_gen.device != device:
            self._aug_gen = augmentation_generator(self.cfg.seed, self.trainer.global_rank,
                                                   device)
        return self._aug_gen

    def restore_augmentation(self, state: torch.Tensor) -> None:
        """A resumed run's augmentation generator. The checkpoint holds rank 0's (rank 0
        writes it): rank 0 goes on exactly where it stopped; any other rank starts a stream of
        its own for the epoch it resumes at, instead of repeating rank 0's draws."""
        rank = self.trainer.global_rank
        gen = torch.Generator(device=self.device)
        if rank == 0:
            gen.set_state(state)
        else:
            key = np.random.SeedSequence([self.cfg.seed, rank, self.trainer.current_epoch])
            gen.manual_seed(int(key.generate_state(1, np.uint64)[0]))
        self._aug_gen = gen

    # -- loss ---------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, y: torch.Tensor,
             soft: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        w = self.class_w if self.use_weights else None
        if soft is not None:
            return soft_target_loss(logits, soft, w, self.cfg.label_smoothing)
        if logits.shape[1] == 1:
            # The logit is evidence for class 1 whatever `positive` is: `probabilities` puts its
            # sigmoid in column 1; `positive` only picks the column thresholds and metrics read.
            target = (y == 1).float()
            if self.cfg.label_smoothing:
                target = target * (1 - self.cfg.label_smoothing) + 0.5 * self.cfg.label_smoothing
            per = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
            if w is not None:
                per = per * w[y]
                return per.sum() / w[y].sum()
            return per.mean()
        return F.cross_entropy(logits, y, weight=w, label_smoothing=self.cfg.label_smoothing)

    def _step(self, batch, stage: str, forward=None) -> torch.Tensor:
        x, y = batch
        logits = (self if forward is None else forward)(x)
        loss = self.loss(logits, y)
        self._outputs[stage].append((logits.detach().float().cpu(), y.cpu()))
        return loss

    def training_step(self, batch, batch_idx):
        if self.features_cached or not (self.cfg.mixup or self.cfg.cutmix):
            return self._step(batch, "train")
        x, y = batch  # Mixup / CutMix (data/mixing.py); the train columns score y, the first
        m = mix_batch(x, y, self.n_classes, self.cfg.mixup, self.cfg.cutmix,
                      self.augmentation_gen(x.device))
        x = m.x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else m.x
        logits = self(x)
        self._outputs["train"].append((logits.detach().float().cpu(), y.cpu()))
        return self.loss(logits, y, soft=m.target)

    def validation_step(self, batch, batch_idx):
        # BatchNorm folded into the convolutions, as every later score (predict_probs): the
        # same logits, 1.2-1.5x faster on a CPU; refolded once an epoch (the weights changed).
        forward = self if self.features_cached else folded(self.model, batch[0])
        self._step(batch, "val", forward)

    def _epoch_metrics(self, stage: str) -> dict[str, float]:
        """The epoch's curve values over all its samples (gathered from every process)."""
        outs = self._outputs[stage]
        self._outputs[stage] = []
        if not outs:
            return {}
        logits = torch.cat([o[0] for o in outs])
        y = torch.cat([o[1] for o in outs])
        if self.trainer.world_size > 1:
            n_val = len(self.trainer.val_dataloaders.dataset) if stage == "val" else None
            logits, y = gather_in_order(self, [logits, y], n_val)
        with torch.no_grad():
            loss = float(self.loss(logits.to(self.device), y.to(self.device)))
        probs = probabilities(logits).numpy()
        summary = epoch_summary(y.numpy(), probs, self.positive, loss)
        return {f"{stage}_{k}": v for k, v in summary.items()}

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        m = self._epoch_metrics("train")
        self.log_dict({k: v for k, v in m.items() if v is not None and k != "train_loss"},
                      sync_dist=True)
        self.log("train_loss", m["train_loss"], prog_bar=True, sync_dist=True)
        if self.history is not None:
            self.history.add(self.trainer, time.perf_counter() - self._epoch_t0)

    def on_validation_epoch_end(self) -> None:
        m = self._epoch_metrics("val")
        if self.trainer.sanity_checking or not m:
            return
        self.log("val_loss", m.pop("val_loss"), prog_bar=True, sync_dist=True)
        auc = m.pop("val_auc", None)
        self.log_dict({k: v for k, v in m.items() if v is not None},
                      prog_bar=False, sync_dist=True)
        if auc is not None:
            self.log("val_auc", auc, prog_bar=True, sync_dist=True)

    # -- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        c = self.cfg
        params = trainable_parameters(self.model)
        if c.freeze_backbone and c.unfreeze_after is None:
            params = head_parameters(self.model)
        elif c.unfreeze_after is not None or c.backbone_lr_mult != 1.0:
            # Head first (history's lr column); the backbone group is skipped by the
            # optimizer while its parameters have no gradient (frozen epochs).
            params = [{"params": head_parameters(self.model)},
                      {"params": backbone_parameters(self.model),
                       "lr": c.lr * c.backbone_lr_mult}]
        opt = make_optimizer(params, c, self.device)
        if c.schedule == "cosine":
            steps = self.trainer.estimated_stepping_batches
            sched = torch.optim.lr_scheduler.LambdaLR(opt, restarted_cosine(steps, c))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if c.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=1)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
        return opt


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None,
                     smoothing: float) -> torch.Tensor:
    """The run's loss on (B, K) soft targets (Mixup / CutMix): BCE on the single logit
    (target = the share of class 1) or cross-entropy -sum_c t_c log p_c, label smoothing as
    for hard labels, each image weighted by its target's mix of class weights. On one-hot
    targets it equals `ClassifierModule.loss` on the labels (with class weights and label
    smoothing together, more than two classes: PyTorch weighs the smoothed share by class,
    this by the image's weight)."""
    if logits.shape[1] == 1:
        t = target[:, 1]
        if smoothing:
            t = t * (1 - smoothing) + 0.5 * smoothing
        per = F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
    else:
        t = target * (1 - smoothing) + smoothing / logits.shape[1] if smoothing else target
        per = -(t * F.log_softmax(logits, dim=1)).sum(1)
    if w is None:
        return per.mean()
    sample_w = target @ w
    return (per * sample_w).sum() / sample_w.sum()


def epoch_summary(y: np.ndarray, probs: np.ndarray, positive: int | None,
                  loss: float) -> dict[str, float | None]:
    """The per-epoch curve values: cheap, at 0.5 (2 classes) or argmax (more)."""
    out: dict[str, float | None] = {"loss": loss}
    if positive is not None:
        pred = (probs[:, positive] >= 0.5).astype(int)
        truth = (y == positive).astype(int)
        out["acc"] = float((pred == truth).mean())
        out["precision"] = float(precision_score(truth, pred, zero_division=0))
        out["recall"] = float(recall_score(truth, pred, zero_division=0))
        out["auc"] = (float(roc_auc_score(truth, probs[:, positive]))
                      if 0 < truth.sum() < len(truth) else None)
    else:
        pred = probs.argmax(1)
        out["acc"] = float((pred == y).mean())
        out["precision"] = float(precision_score(y, pred, average="macro", zero_division=0))
        out["recall"] = float(recall_score(y, pred, average="macro", zero_division=0))
        try:
            out["auc"] = float(roc_auc_score(y, probs, multi_class="ovr",
                                             labels=list(range(probs.shape[1]))))
        except ValueError:
            out["auc"] = None
    return out


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO on import; its banner is noise in our output."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


class HistoryCSV:
    """Collects one row per epoch, train and val side by side, into RUN_DIR/history.csv
    (its format: cxrlab.run.write_history).

    Written by the module after it logs the epoch's train metrics: a Callback's
    on_train_epoch_end runs before the module's and would see the previous epoch's values.
    """

    COLUMNS = HISTORY_COLUMNS

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def replace(self, rows: list[dict]) -> None:
        """A resumed run's rows, as its checkpoint recorded them."""
        self.rows = [dict(r) for r in rows]
        write_history(self.path, self.rows)

    def add(self, trainer, seconds: float) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {c: m.get(c) for c in self.COLUMNS}
        row["epoch"] = trainer.current_epoch + 1
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        row["seconds"] = round(seconds, 2)
        self.rows.append(row)
        write_history(self.path, self.rows)


def progress_bar(budgeted=None, head_epochs: int = 0):
    """Rich's bar in a terminal, with the whole run's ETA (training/budget.py); in a Jupyter kernel
    Lightning's tqdm bar, which updates in place there with its ETA (tqdm.auto widgets when
    ipywidgets is installed, else carriage returns on stderr), where Rich's live display needs
    ipywidgets and otherwise shows nothing until the end."""

    if in_jupyter():
        return TQDMProgressBar()
    if budgeted is None:
        return RunProgressBar(leave=True, head_epochs=head_epochs)
    return RunProgressBar(leave=True, planned_end=budgeted.started + budgeted.plan.predicted_s,
                          planned_epoch=budgeted.plan.full_epoch_s, head_epochs=head_epochs)


def in_jupyter() -> bool:
    """Running inside an IPython kernel (Jupyter, VS Code notebooks), not a terminal."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


@dataclass
class FitResult:
    module: ClassifierModule
    best_path: str
    epochs_run: int
    seconds: float
    precision: str  # what training ran in: "bf16" or "fp32" (`precision: auto` resolved)


@contextmanager
def deterministic_without_nan_fill():
    """While training: no NaN fill of new tensors; after it, the process's flags as they were.

    Lightning's `deterministic=True` turns on `torch.use_deterministic_algorithms` for the
    whole process, and with it PyTorch fills every new tensor with NaN
    (`torch.utils.deterministic.fill_uninitialized_memory`: a debugging aid that makes reads
    of memory no kernel wrote visible). No kernel a run uses reads such memory: the default
    recipe's predictions are byte for byte the same without the fill, and a seeded run still
    repeats itself (tests/training/test_determinism.py). The fill cost a sixth of the default
    recipe's full epoch (median 63 s against 52 s on a Zen 4 CPU, README), and the time
    budget's warm-up, timed before Lightning turns deterministic mode on, never saw it. The
    flags are restored so that scoring after training, and a notebook's own code, run as
    before."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), tud.fill_uninitialized_memory)
    tud.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        tud.fill_uninitialized_memory = saved[2]


def fit(model: torch.nn.Module, config: RunConfig, train_x, train_y, val_x, val_y,
        n_classes: int, positive: int | None, run_dir: Path,
        progress: bool = True, ckpt_path: Path | None = None,
        cache_features: bool = True, loggers: list | None = None,
        budgeted=None) -> FitResult:
    """Train with Lightning; returns the module holding the best (lowest val loss) weights,
    interpolated towards those at the unfreeze when `config.wise_ft` < 1 (WiSE-FT).

    A checkpoint (checkpoints/last.ckpt) is written atomically at the end of every epoch;
    `ckpt_path` continues a run from one (see training/checkpoints.py). A frozen backbone without
    augmentation trains on cached pooled features (`cache_features=False` recomputes them
    every batch: the benchmark's baseline). `loggers`: Lightning loggers (reporting/tracking.py);
    `budgeted` (cxrlab.training.budget) watches the time plan.
    """
    quiet_lightning()
    L.seed_everything(config.seed, workers=True, verbose=False)
    weights = class_weights(np.asarray(train_y), n_classes) if config.class_weights else None
    module = ClassifierModule(model, config, n_classes, weights, positive)
    precision = "bf16" if use_bf16(config.precision, model) else "fp32"
    if config.channels_last:
        module.model.to(memory_format=torch.channels_last)
    mixing = config.mixup > 0 or config.cutmix > 0  # mixes images, not pooled features
    if cache_features and not mixing and finetune.can_cache_features(model, config):
        train_x, val_x = finetune.cache_features(model, [train_x, val_x],
                                                 precision == "bf16",
                                                 config.channels_last)
        module.features_cached = True
    train_dl = make_loader(ArrayDataset(train_x, train_y), config.batch_size, train=True,
                           seed=config.seed, balanced=config.sampler == "balanced")
    val_dl = make_loader(ArrayDataset(val_x, val_y), max(config.batch_size, 64), train=False,
                         seed=config.seed)
    # Saved and checked at the very end of the epoch (after the module's history row), so a
    # checkpoint holds everything the epoch did. last.ckpt has its own callback: Lightning's
    # save_last writes only in epochs that also save a new best, and resuming must not lose
    # the epochs since. It comes after `ckpt`, so it records this epoch's best tracking.
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_loss",
                           mode="min", save_top_k=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None,
                           save_top_k=1, every_n_epochs=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    module.history = HistoryCSV(run_dir / "history.csv")
    state = TrainingState(train_dl.generator or getattr(train_dl.sampler, "generator", None))
    callbacks: list[Callback] = [
        RestartingEarlyStopping(restart_epochs(config), monitor="val_loss",
                                patience=config.patience, mode="min",
                                check_on_train_epoch_end=True),
        ckpt,
        last,
        state,
    ]
    if config.unfreeze_after is not None:
        callbacks.append(finetune.UnfreezeBackbone(
            config.unfreeze_after, run_dir / "checkpoints" / finetune.HEAD_TRAINED
            if config.wise_ft < 1 else None))

    if budgeted is not None:
        callbacks.append(BudgetWatch(budgeted, run_dir))
    if progress:
        callbacks.append(progress_bar(budgeted, head_epochs(config)))
    with deterministic_without_nan_fill():
        trainer = L.Trainer(
            max_epochs=config.epochs,
            accelerator=config.accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy=config.strategy,
            plugins=[AtomicCheckpointIO()],
            precision="bf16-mixed" if precision == "bf16" else "32-true",
            deterministic=config.deterministic,
            callbacks=callbacks,
            logger=loggers or False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(run_dir),
        )
        trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt_path)
    seconds = state.seconds
    if not trainer.is_global_zero:  # rank 0 alone writes and evaluates the run
        return FitResult(module, ckpt.best_model_path, trainer.current_epoch, seconds,
                         precision)
    if not ckpt.best_model_path:
        raise CxrlabError("training produced no checkpoint (no validation epoch completed)")
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    module.load_state_dict(best["state_dict"])
    if config.wise_ft < 1:  # config validation: only with a head-only phase
        if finetune.wise_ft(module.model, run_dir / "checkpoints" / finetune.HEAD_TRAINED,
                            config.wise_ft):
            # The mixed statistics are not the mixed network's: estimated again from the
            # training batches (epoch 1's order and sampler, not augmented), before any
            # threshold is chosen. WiSE-FT never caches features (it needs the unfreeze).
            loader = make_loader(ArrayDataset(train_x, train_y), config.batch_size, train=True,
                                 seed=config.seed, balanced=config.sampler == "balanced")
            device = next(module.model.parameters()).device
            t0 = time.perf_counter()
            n = finetune.reestimate_bn(
                module.model, (module.model_input(x.to(device), augment=False)
                               for x, _ in loader))
            log.info("WiSE-FT: final weights = %g x fine-tuned + %g x those at the unfreeze; "
                     "batch-norm statistics estimated again on %d training batches (%.1f s)",
                     config.wise_ft, 1 - config.wise_ft, n, time.perf_counter() - t0)
        else:
            log.info("WiSE-FT: the best epoch came before the unfreeze; its weights are kept")
    finetune.thaw(module.model)
    module.model.to(memory_format=torch.contiguous_format)
    return FitResult(module, ckpt.best_model_path, trainer.current_epoch, seconds, precision)
