"""The `cxrlab` command: parses, calls the library, prints. No logic of its own."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from cxrlab.errors import CxrlabError


def _flags_without_type_tag() -> None:
    """Typer 0.29's help gives every option a type column, and a flag (`--json`, `--skip-bad`,
    `--help` itself) reads `<bool>` there as if it took a value. A flag takes none: show no
    type for it, as Click's own help does. Options with a value keep theirs; older Typers,
    without `display_type_rich`, never printed the tag."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "_cxrlab", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich._cxrlab = True
    option.display_type_rich = display_type_rich


_flags_without_type_tag()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and use chest X-ray (or any image-folder) classifiers.")
data_app = typer.Typer(no_args_is_help=True, help="Look at a dataset before training on it.")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_time=False,
                                              show_path=False)])
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


DataArg = Annotated[
    Path | None, typer.Argument(help="class folders, train/val/test folders, or CSV")
]
ImageCol = Annotated[str | None, typer.Option(help="CSV column with image paths")]
TtaOption = Annotated[str | None, typer.Option(
    metavar="none|flip", help="test-time augmentation: flip = the mean probability of the "
    "image and its mirror (2 passes) \\[default: the run's own, with which its threshold was "
    "chosen]")]
LabelCol = Annotated[str | None, typer.Option(help="CSV column with labels")]


# ---------------------------------------------------------------------------------------
# train


_CONFIG_DEFAULTS: dict[str, object] = {}  # filled once


def _config_defaults() -> dict[str, object]:
    """RunConfig's literal field defaults, read from config.py's source (the one place they
    live). Every command builds `train`'s help text at start-up, and importing config.py
    (pydantic, yaml) would cost that start ~75 ms of CPU; parsing it costs ~2 ms. Tests check
    these equal RunConfig.model_fields' defaults."""
    import ast
    import importlib.util

    if _CONFIG_DEFAULTS:
        return _CONFIG_DEFAULTS
    source = Path(importlib.util.find_spec("cxrlab.config").origin).read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunConfig")
    out = _CONFIG_DEFAULTS
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and stmt.value is not None):
            continue
        value = stmt.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
            if not value.args:
                continue  # default_factory
            value = value.args[0]
        try:
            out[stmt.target.id] = ast.literal_eval(value)
        except ValueError:
            continue
    return out


def _default(field: str) -> str:
    """"[default: X]" for a train option, RunConfig's (`_config_defaults`): the options
    themselves default to None, so that given can be told from left out."""
    value = _config_defaults()[field]
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f"\\[default: {value}]"  # escaped: help text is Rich markup


_DATA, _MODEL, _TRAIN = "Data", "Model", "Training"
_TUNE = "Fine-tuning (pretrained weights; defaults follow the recipe)"
_AUG, _THRESHOLD = "Augmentation and class balance", "Decision threshold (2 classes)"
_HARDWARE, _TRACKING = "Time and hardware", "Tracking"
_FLAG = ""  # metavar of on/off flags: no <bool> tag


@app.command()
def train(
    data: DataArg = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="the new run directory \\[required unless --resume]")] = None,
    config: Annotated[Path | None, typer.Option(
        help="start from an earlier run's config.yaml; options given here override it")
    ] = None,
    resume: Annotated[Path | None, typer.Option(
        help="continue a killed or failed run from its last checkpoint; with --epochs N, "
        "train a complete run on to N epochs")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", metavar=_FLAG, help="no progress bar")] = False,
    image_col: Annotated[str | None, typer.Option(
        rich_help_panel=_DATA, help="CSV column with image paths")] = None,
    label_col: Annotated[str | None, typer.Option(
        rich_help_panel=_DATA, help="CSV column with labels")] = None,
    group_regex: Annotated[str | None, typer.Option(
        rich_help_panel=_DATA, help="regex for the patient key in file names: one patient's "
        "images stay on one side of the split")] = None,
    val_fraction: Annotated[float | None, typer.Option(
        rich_help_panel=_DATA, help=f"share of the images held out for validation (by patient) "
        f"{_default('val_fraction')}")] = None,
    folds: Annotated[int | None, typer.Option(
        rich_help_panel=_DATA, help="cross-validate instead: K runs OUT/fold-1..K, pooled in "
        "OUT/crossval.json; OUT is their averaging ensemble, used as one run")] = None,
    seeds: Annotated[int | None, typer.Option(
        rich_help_panel=_DATA, help="an ensemble: N runs OUT/seed-1..N on one split (seeds "
        "seed..seed+N-1); OUT averages them and is used as one run")] = None,
    channels: Annotated[int | None, typer.Option(
        rich_help_panel=_DATA, help="1 (grey) or 3 (colour) \\[default: from the images]")] = None,
    bit_depth: Annotated[int | None, typer.Option(
        rich_help_panel=_DATA, help="16-bit images hold N-bit data (8..16) \\[default: PNG sBIT "
        "or DICOM BitsStored, else the training images' maximum]")] = None,
    skip_bad: Annotated[bool | None, typer.Option(
        "--skip-bad", metavar=_FLAG, rich_help_panel=_DATA,
        help="list unreadable images and train without them \\[default: stop at the first]")
    ] = None,
    model: Annotated[str | None, typer.Option(
        rich_help_panel=_MODEL, help=f"architecture; `cxrlab models` lists them "
        f"{_default('model')}")] = None,
    image_size: Annotated[int | None, typer.Option(
        rich_help_panel=_MODEL, help=f"images are resized to this many pixels square "
        f"{_default('image_size')}")] = None,
    pretrained: Annotated[str | None, typer.Option(
        rich_help_panel=_MODEL, help="start from these weights: a state dict file or URL "
        "(torchvision layout) \\[default: the model's packaged ImageNet weights if it has "
        "them, else random]")] = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", metavar=_FLAG, rich_help_panel=_MODEL,
        help="start from random weights, even where the model has packaged ones")] = False,
    head: Annotated[str | None, typer.Option(
        metavar="linear|mlp-bn|vgg", rich_help_panel=_MODEL,
        help=f"the classifier on top: one linear layer, or the Keras notebooks' small MLPs "
        f"(mlp-bn: ResNet50V2's, vgg: VGG19's) {_default('head')}")] = None,
    dropout: Annotated[float | None, typer.Option(
        rich_help_panel=_MODEL, help="dropout rate before the head \\[default: the "
        "model's own]")] = None,
    batchnorm: Annotated[bool | None, typer.Option(
        "--batchnorm/--no-batchnorm", metavar=_FLAG, rich_help_panel=_MODEL,
        help=f"batch normalisation in the small `cnn` model {_default('batchnorm')}")] = None,
    intensity: Annotated[str | None, typer.Option(
        metavar="fixed|image", rich_help_panel=_MODEL,
        help=f"fixed: one brightness scale for all images; image: each image standardised by "
        f"its own mean and spread {_default('intensity')}")] = None,
    epochs: Annotated[int | None, typer.Option(
        rich_help_panel=_TRAIN, help="passes over the training images \\[default: 9 with "
        "pretrained weights, 14 from scratch]")] = None,
    batch_size: Annotated[int | None, typer.Option(
        rich_help_panel=_TRAIN, help=f"images per step {_default('batch_size')}")] = None,
    optimizer: Annotated[str | None, typer.Option(
        metavar="adam|adamw|sgd", rich_help_panel=_TRAIN,
        help=f"optimiser {_default('optimizer')}")] = None,
    lr: Annotated[float | None, typer.Option(
        rich_help_panel=_TRAIN, help=f"learning rate {_default('lr')}")] = None,
    momentum: Annotated[float | None, typer.Option(
        rich_help_panel=_TRAIN, help=f"SGD momentum {_default('momentum')}")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        rich_help_panel=_TRAIN, help=f"weight decay {_default('weight_decay')}")] = None,
    schedule: Annotated[str | None, typer.Option(
        metavar="none|cosine|plateau", rich_help_panel=_TRAIN,
        help=f"learning-rate schedule {_default('schedule')}")] = None,
    patience: Annotated[int | None, typer.Option(
        rich_help_panel=_TRAIN, help=f"stop after this many epochs without a better "
        f"validation loss {_default('patience')}")] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        rich_help_panel=_TRAIN, help=f"pull targets towards uniform by this much "
        f"{_default('label_smoothing')}")] = None,
    seed: Annotated[int | None, typer.Option(
        rich_help_panel=_TRAIN, help=f"seed of the split, weights and augmentation "
        f"{_default('seed')}")] = None,
    deterministic: Annotated[bool | None, typer.Option(
        "--deterministic/--no-deterministic", metavar=_FLAG, rich_help_panel=_TRAIN,
        help=f"deterministic algorithms: same machine, same result "
        f"{_default('deterministic')}")] = None,
    freeze_backbone: Annotated[bool | None, typer.Option(
        "--freeze-backbone/--no-freeze-backbone", metavar=_FLAG, rich_help_panel=_TUNE,
        help="train the head only \\[default: pretrained weights: epoch 1 only]")] = None,
    unfreeze_after: Annotated[int | None, typer.Option(
        rich_help_panel=_TUNE, help="train the head only for N epochs, then everything "
        "\\[default: 1 pretrained, none from scratch]")] = None,
    backbone_lr_mult: Annotated[float | None, typer.Option(
        rich_help_panel=_TUNE, help="backbone learning rate = lr x this \\[default: 0.1 "
        "pretrained, 1 from scratch]")] = None,
    frozen_stages: Annotated[int | None, typer.Option(
        rich_help_panel=_TUNE, help="keep the first N stages (the stem first) as pretrained "
        "\\[default: pretrained: those at 1/8 of the image or finer, from scratch: 0]")] = None,
    wise_ft: Annotated[float | None, typer.Option(
        rich_help_panel=_TUNE, help=f"WiSE-FT: final weights = this x fine-tuned + the rest x "
        f"those at the unfreeze; needs --unfreeze-after {_default('wise_ft')}")] = None,
    augment: Annotated[str | None, typer.Option(
        metavar="POLICY", rich_help_panel=_AUG,
        help=f"random changes to training images: none, flip, light (small rotation, shift, "
        f"zoom, flip), intensity (light + contrast, blur, noise, JPEG), framing (intensity + "
        f"random crops), scale (intensity + zoom in and out, black border), intake (scale "
        f"on half the images, intensity on the rest, wider blur and noise), notebook (the "
        f"Keras notebooks' large ones) {_default('augment')}")
    ] = None,
    mixup: Annotated[float | None, typer.Option(
        metavar="ALPHA", rich_help_panel=_AUG, help="Mixup: blend image pairs and their "
        f"labels, weight ~ Beta(ALPHA, ALPHA), e.g. 0.2; 0 = off {_default('mixup')}")] = None,
    cutmix: Annotated[float | None, typer.Option(
        metavar="ALPHA", rich_help_panel=_AUG, help="CutMix: paste a box of another image, "
        f"labels mixed by its area, e.g. 1.0; 0 = off {_default('cutmix')}")] = None,
    class_weights: Annotated[bool | None, typer.Option(
        "--class-weights/--no-class-weights", metavar=_FLAG, rich_help_panel=_AUG,
        help=f"weigh each class's loss by n_total / (n_classes x n_class) "
        f"{_default('class_weights')}")] = None,
    sampler: Annotated[str | None, typer.Option(
        metavar="none|balanced", rich_help_panel=_AUG,
        help=f"balanced: draw every class equally often, instead of class weights "
        f"{_default('sampler')}")] = None,
    positive: Annotated[str | None, typer.Option(
        rich_help_panel=_THRESHOLD, help="the positive class \\[default: the second in "
        "sorted order]")] = None,
    threshold_rule: Annotated[str | None, typer.Option(
        metavar="youden|sensitivity", rich_help_panel=_THRESHOLD,
        help=f"how the threshold on p(positive) is chosen on validation images: sensitivity "
        f"= the highest that reaches --target-sensitivity, youden = best sensitivity + "
        f"specificity {_default('threshold_rule')}")] = None,
    target_sensitivity: Annotated[float | None, typer.Option(
        rich_help_panel=_THRESHOLD, help=f"the sensitivity rule's target (implies it) "
        f"{_default('target_sensitivity')}")] = None,
    tta: Annotated[str | None, typer.Option(
        metavar="none|flip", rich_help_panel=_THRESHOLD,
        help=f"test-time augmentation of the validation scores the threshold is chosen on, "
        f"and then of every prediction (flip: image + mirror, 2 passes) {_default('tta')}")
    ] = None,
    time_budget: Annotated[str | None, typer.Option(
        rich_help_panel=_HARDWARE, help="plan the run to end within this: 90s, 30m, 1.5h, 45 "
        "(min), none \\[default: auto = 30m on a CPU unless --epochs is given]")] = None,
    precision: Annotated[str | None, typer.Option(
        metavar="auto|bf16|fp32", rich_help_panel=_HARDWARE,
        help=f"number format; auto = bf16 where the CPU or GPU has it and the model gains "
        f"{_default('precision')}")] = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", metavar=_FLAG, rich_help_panel=_HARDWARE,
        help=f"channels-last memory layout (faster convolutions) "
        f"{_default('channels_last')}")] = None,
    accelerator: Annotated[str | None, typer.Option(
        metavar="auto|cpu|gpu", rich_help_panel=_HARDWARE,
        help=f"where to train {_default('accelerator')}")] = None,
    devices: Annotated[int | None, typer.Option(
        rich_help_panel=_HARDWARE, help=f"processes per machine (DDP) "
        f"{_default('devices')}")] = None,
    num_nodes: Annotated[int | None, typer.Option(
        rich_help_panel=_HARDWARE, help=f"machines (DDP) {_default('num_nodes')}")] = None,
    strategy: Annotated[str | None, typer.Option(
        metavar="auto|ddp|ddp_spawn", rich_help_panel=_HARDWARE,
        help=f"multi-process strategy {_default('strategy')}")] = None,
    logger: Annotated[list[str] | None, typer.Option(
        metavar="tensorboard|csv|mlflow", rich_help_panel=_TRACKING,
        help="also log to these (repeat or comma-separate); logs go in OUT \\[default: "
        "none]")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(
        rich_help_panel=_TRACKING, help="MLflow tracking URI \\[default: "
        "MLFLOW_TRACKING_URI, else OUT/mlruns]")] = None,
) -> None:
    """Train a classifier; everything that defines the run goes to OUT/config.yaml.

    Left out, an option takes the default recipe's value; docs/recipes.md explains each one."""
    options = {k: v for k, v in locals().items()
               if k not in ("data", "out", "quiet", "resume") and v is not None}
    from cxrlab.api import run_training

    result = run_training(data, out, progress=not quiet, resume=resume, options=options,
                          cli=True)
    if isinstance(result, dict):
        _print_crossval(result, result.pop("_out"))
    else:
        _print_result(result)


def _print_crossval(result: dict, out: Path) -> None:
    from cxrlab.training.crossval import render

    render(result, console)
    console.print(f"Folds and crossval.json written to [bold]{out}[/]; the folds' ensemble "
                  "is the run there (evaluate, predict, export it as any run)")


def _print_result(result) -> None:
    if result.rank != 0:
        return  # data-parallel: rank 0 reports
    _print_metrics(result.metrics, f"Validation, selection-biased ({result.n_val} images, "
                   f"{result.epochs} epochs, {result.seconds:.0f} s)")
    if result.test_metrics:
        _print_metrics(result.test_metrics, f"Test ({result.test_metrics['n']} images)")
    console.print(f"Run written to [bold]{result.run_dir}[/]")


def _print_metrics(metrics: dict, title: str, at_half: bool = False) -> None:
    from cxrlab.evaluation.metrics import format_metrics_table

    table = format_metrics_table(metrics, at_half=at_half)
    table.title = title
    console.print(table)


# ---------------------------------------------------------------------------------------
# evaluate / predict


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="the reference run (A)")],
    run_b: Annotated[Path, typer.Argument(help="the run compared with it (B)")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the result here")] = None,
    boot: Annotated[int, typer.Option(min=100, help="paired bootstrap resamples")] = 2000,
) -> None:
    """B − A on the validation images both runs share, with paired bootstrap intervals."""
    from cxrlab.api import compare as compare_runs
    from cxrlab.evaluation.comparison import render
    from cxrlab.run import write_json

    result = compare_runs(run_a, run_b, n_boot=boot)
    render(result, console)
    if json_out is not None:
        write_json(json_out, result)
        console.print(f"Comparison written to [bold]{json_out}[/]")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    data: Annotated[Path, typer.Argument(help="labelled images: any source train accepts")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write metrics here")] = None,
    split: Annotated[str | None, typer.Option(help="only this split of DATA")] = None,
    positive: Annotated[str | None, typer.Option(help="positive class (2 classes)")] = None,
    image_col: ImageCol = None,
    label_col: LabelCol = None,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="list unreadable images and go on without them")] = False,
    shift: Annotated[bool, typer.Option(
        "--shift", help="stress test under synthetic intake shifts; writes RUN/shift.json "
        "and RUN/shift.png (the report shows them)")] = False,
    onnx: Annotated[Path | None, typer.Option(
        help="score with this file from `cxrlab export` (e.g. --int8) instead of the run's "
        "fp32 model")] = None,
    allow_overlap: Annotated[bool, typer.Option(
        "--allow-overlap", help="DATA holds images the run trained on: leave them out and "
        "score the rest (default: refuse)")] = False,
    tta: TtaOption = None,
) -> None:
    """Metrics of a run on labelled images, at the run's threshold and at 0.5.

    Refuses images the run trained on, labels its validation images selection-biased, and
    warns when the images differ from the run's training images."""
    from cxrlab.api import Run
    from cxrlab.run import write_json

    if json_out is not None and not json_out.absolute().parent.is_dir():
        raise CxrlabError(f"--json {json_out}: no folder {json_out.absolute().parent}")
    metrics = Run(run_dir, tta=tta).evaluate(
        data, split=split, positive=positive, image_col=image_col, label_col=label_col,
        skip_bad=skip_bad, shift=shift, onnx=onnx, allow_overlap=allow_overlap, save=False)
    scored_by = "" if onnx is None else f", {metrics['onnx']['precision']} file {onnx.name}"
    _print_metrics(metrics, f"{data} ({metrics['n']} images{scored_by})", at_half=True)
    if json_out is not None:  # the user's file first: a read-only run loses nothing
        try:
            write_json(json_out, metrics)
        except OSError as e:
            raise CxrlabError(f"--json {json_out}: cannot write it ({e.strerror})") from None
        console.print(f"Metrics written to [bold]{json_out}[/]")
    if shift:
        from cxrlab.site import shift as stress

        stress.render(metrics["shift"], console)
        saved = stress.save(run_dir, metrics["shift"])
        if saved is not None:
            console.print(f"Stress test written to [bold]{saved[0]}[/] and [bold]{saved[1]}[/]")


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory (left untouched)")],
    data: Annotated[Path, typer.Argument(
        help="a labelled sample of the new intake (at least 10 images per class)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the new run directory")] = ...,
    split: Annotated[str | None, typer.Option(help="only this split of DATA")] = None,
    image_col: ImageCol = None,
    label_col: LabelCol = None,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="list unreadable images and go on without them")] = False,
    boot: Annotated[int, typer.Option(min=100, help="bootstrap resamples")] = 1000,
    tta: TtaOption = None,
    refit: Annotated[str, typer.Option(
        help="the probability map: intercept (a shift of the logit), shrink (Platt pulled "
             "towards the run's own scale) or platt (slope and intercept)")] = "intercept",
    rule: Annotated[str, typer.Option(
        help="the threshold: keep-sensitivity (keeps the target with --confidence), youden "
             "(Youden's J on the sample: can cost sensitivity) or sensitivity (the sample "
             "reaches the target, no margin)")] = "keep-sensitivity",
    target_sensitivity: Annotated[float | None, typer.Option(
        help="sensitivity to keep [default: the run's own on its validation images]")] = None,
    confidence: Annotated[float, typer.Option(
        help="keep-sensitivity's one-sided confidence")] = 0.9,
) -> None:
    """Refit the threshold and probabilities on a new site's sample; writes a new run."""
    from cxrlab.site.calibration import calibrate_run, describe

    r = calibrate_run(run_dir, data, out, image_col, label_col, split, skip_bad, n_boot=boot,
                      tta=tta, refit=refit, rule=rule, target_sensitivity=target_sensitivity,
                      confidence=confidence)
    console.print(describe(r), highlight=False)
    console.print(f"Calibrated run written to [bold]{r['out']}[/]")


@app.command()
def adapt(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory (left untouched)")],
    images: Annotated[Path, typer.Argument(
        help="a folder of the new intake's unlabelled images (at least 100)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the new run directory")] = ...,
    bn: Annotated[bool | None, typer.Option(
        "--bn/--no-bn", help="re-estimate BatchNorm statistics on the images (AdaBN); "
        "off by default: measured to cost accuracy unless the intake is shifted")] = None,
    bn_prior: Annotated[float, typer.Option(
        min=0, help="--bn: weight of the run's own statistics, in images (0: AdaBN)")] = 0.0,
    prevalence: Annotated[bool | None, typer.Option(
        "--prevalence/--no-prevalence", help="estimate the intake's prevalence (EM) and move "
        "the threshold for it (two classes); off by default: misled by shifted films")] = None,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="list unreadable images and go on without them")] = False,
    seed: Annotated[int, typer.Option(help="seed of the shuffle before batching")] = 0,
) -> None:
    """Adapt a run to a new intake without labels; writes a new run and says what changed."""
    from cxrlab.site.adapt import adapt_run, describe

    r = adapt_run(run_dir, images, out, bn=bn, bn_prior=bn_prior, prevalence=prevalence,
                  skip_bad=skip_bad, seed=seed)
    console.print(describe(r), highlight=False)
    console.print(f"Adapted run written to [bold]{r['out']}[/]")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    paths: Annotated[list[Path], typer.Argument(help="images or folders")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="list unreadable images and go on without them")] = False,
    cam: Annotated[Path | None, typer.Option(
        "--cam", help="write a Grad-CAM PNG per image into this folder")] = None,
    layer: Annotated[str | None, typer.Option(
        help="Grad-CAM layer (default: the last conv block)")] = None,
    backend: Annotated[str, typer.Option(help="torch | onnx (ONNX Runtime)")] = "torch",
    onnx: Annotated[Path | None, typer.Option(
        help="with --backend onnx: a file from `cxrlab export` (default: export now)")] = None,
    tta: TtaOption = None,
) -> None:
    """Predicted class and per-class probability for each image, at the run's threshold."""
    from cxrlab.api import Run

    rows = Run(run_dir, tta=tta).predict(paths, skip_bad=skip_bad, backend=backend,
                                         onnx=onnx, cam_dir=cam, layer=layer)
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    classes = next((list(r["probabilities"]) for r in rows if "probabilities" in r), [])
    table = Table("image", "prediction", "because", *[f"p({c})" for c in classes])
    for r in rows:
        if "error" in r:
            table.add_row(r["path"], f"[red]{r['error']}[/]")
        else:
            table.add_row(r["path"], r["class"], r["rule"],
                          *[f"{v:.3f}" for v in r["probabilities"].values()])
    first = next((r for r in rows if "positive_class" in r), None)
    if first is not None:
        table.caption = (f"{first['positive_class']} when p({first['positive_class']}) ≥ "
                         f"{first['threshold']:.3f}, the run's threshold (chosen on validation "
                         "images), else the other class")
    console.print(table)
    if cam is not None:
        console.print(f"Grad-CAM images written to [bold]{cam}[/]")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    onnx: Annotated[Path, typer.Option(help="ONNX file to write")] = ...,
    int8: Annotated[bool, typer.Option(
        "--int8", help="8-bit integer weights and activations: faster on a CPU, checked "
        "against the run on its validation images")] = False,
    calibration_images: Annotated[int, typer.Option(
        help="with --int8: training images that set the 8-bit ranges")] = 256,
    portable: Annotated[bool, typer.Option(
        "--portable", help="with --int8: 7-bit weights, the same scores on every x86 CPU "
        "(without --portable the file is made for this CPU's kind: with or without VNNI)")]
    = False,
    tta: TtaOption = None,
) -> None:
    """The run as one ONNX file: uint8 images in, probabilities out.

    The classes and the threshold travel in the file's metadata."""
    from cxrlab.api import Run

    out = Run(run_dir, tta=tta).export_onnx(onnx, int8=int8, portable=portable,
                                            calibration_images=calibration_images)
    kind = "int8 ONNX" if int8 else "ONNX"
    console.print(f"{kind} model written to [bold]{out}[/] ({out.stat().st_size / 1e6:.1f} MB)")
    if int8:
        from cxrlab.deploy.export import OnnxPredictor

        console.print(int8_summary(OnnxPredictor(out).int8_check))


def int8_summary(check: dict) -> str:
    n, changed = check["images"], check["changed_decisions"]
    auc = check["auc"]
    line = (f"On the run's {n} validation images: {changed} of {n} decisions changed, "
            f"probabilities moved by at most {check['max_probability_change']:.3f}; accuracy "
            f"{check['accuracy']['int8']:.3f} (fp32 {check['accuracy']['fp32']:.3f})")
    if auc["int8"] is not None:
        line += f", AUC {auc['int8']:.4f} (fp32 {auc['fp32']:.4f})"
    speed = check["images_per_second"]
    made_for = ("8-bit weights for CPUs with VNNI (without it scores move: --portable for "
                "those)" if check["vnni"] else "7-bit weights: the same scores on any x86 CPU")
    line += (f". {made_for}. Here ({check['cpu']}) ONNX Runtime runs it at "
             f"{speed['int8']:.0f} images/s, the fp32 file at {speed['fp32']:.0f}.")
    if speed["int8"] < speed["fp32"]:
        line += "\n[yellow]int8 is slower than fp32 on this CPU: use the fp32 file.[/]"
    if changed > 0.01 * n:
        line += ("\n[yellow]More than 1% of decisions changed: prefer the fp32 file unless "
                 "speed matters more.[/]")
    return line


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 = every network)")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="larger uploads get 413")] = 20.0,
    batch_wait_ms: Annotated[float, typer.Option(
        help="batch concurrent requests waiting up to this long (0 = off)")] = 0.0,
    onnx: Annotated[Path | None, typer.Option(
        help="answer with this file from `cxrlab export` (e.g. --int8) in ONNX Runtime")]
    = None,
    tta: TtaOption = None,
) -> None:
    """A web service and page for the run: POST /predict, GET / , /health, /docs."""
    from cxrlab.deploy.serve import serve_run

    serve_run(run_dir, host=host, port=port, max_upload_mb=max_upload_mb,
              batch_wait_ms=batch_wait_ms, onnx=onnx, tta=tta)


# ---------------------------------------------------------------------------------------
# ablate / report


@app.command()
def ablate(
    spec: Annotated[Path, typer.Argument(help="ablation spec (YAML): base, factors, seeds")],
    out: Annotated[Path, typer.Option("--out", "-o", help="sweep directory")] = ...,
    shard: Annotated[str | None, typer.Option(help="i/n: train runs i, i+n, ... only")] = None,
    collect: Annotated[bool, typer.Option(
        "--collect", help="train nothing: merge the runs under OUT into the answer")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Train every variant x seed (complete runs are skipped), then compare them, paired."""
    from cxrlab.evaluation import ablation as ab

    study = ab.load_spec(spec)
    parsed = ab.parse_shard(shard)
    if not collect:
        from cxrlab.training import sweep

        def show(e: sweep.SweepEvent) -> None:
            where = f"[{e.index}/{e.total}] {e.run.name}"
            if e.kind == "training":
                err_console.print(f"{where}: training", highlight=False)
            else:
                err_console.print(f"{where}: {e.kind} {e.detail}".rstrip(), highlight=False)

        res = sweep.run_sweep(study, out, parsed, progress=not quiet, on_event=show)
        err_console.print(f"trained {len(res.trained)}, skipped {len(res.skipped)} complete, "
                          f"set aside {len(res.moved)} half-written in {res.seconds:.0f} s")
        if parsed is not None:
            console.print(f"Shard {shard} done. When every shard is done: "
                          f"cxrlab ablate {spec} --out {out} --collect")
            return
    result = ab.collect(study, out)
    ab.render(result, console)
    console.print(f"Written: {out / 'ablation.csv'}, {out / 'effects.csv'}, "
                  f"{out / 'ablation.json'}")


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="a run directory or an ablation directory")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="HTML file (default: PATH/report.html)")] = None,
) -> None:
    """One self-contained HTML page: data, configuration, curves, calibration, gallery."""
    from cxrlab.reporting.report import write_report

    written = write_report(path, out)
    console.print(f"Report written to [bold]{written}[/]")


@app.command("runs")
def runs_cmd(
    root: Annotated[Path, typer.Argument(help="folder searched for runs (recursive)")]
    = Path("runs"),
    sort: Annotated[str, typer.Option(help="auc | date | name | time")] = "date",
    reverse: Annotated[bool, typer.Option("--reverse", help="reverse the order")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every run under ROOT in one table: model, epochs, val AUC [95% CI], state, date."""
    from cxrlab.api import runs
    from cxrlab.reporting.run_table import render

    rows = runs(root, sort=sort, reverse=reverse)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    render(rows, console, title=f"Runs under {root}")


# ---------------------------------------------------------------------------------------
# data / models / demo


@data_app.command("summary")
def data_summary(
    data: Annotated[Path, typer.Argument(help="class folders, train/val/test folders, or CSV")],
    grid: Annotated[Path | None, typer.Option(help="write a PNG of samples per class")] = None,
    augment: Annotated[str | None, typer.Option(
        help=f"augmentation shown in the grid {_default('augment')}, the recipe's")] = None,
    image_col: ImageCol = None,
    label_col: LabelCol = None,
    group_regex: Annotated[str | None, typer.Option(help="patient key regex")] = None,
    val_fraction: Annotated[float, typer.Option()] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the summary")] = None,
) -> None:
    """Counts per class and split, patients, sizes, duplicates, leakage, unreadable files."""
    from cxrlab.api import data_summary as summarize
    from cxrlab.data.audit import render_summary, write_grid
    from cxrlab.data.augment import POLICIES
    from cxrlab.data.sources import load_source

    augment = augment or str(_config_defaults()["augment"])
    if augment not in POLICIES:
        raise CxrlabError(f"--augment {augment}: choose from {', '.join(POLICIES)}")
    summary = summarize(data, image_col=image_col, label_col=label_col,
                        group_regex=group_regex, val_fraction=val_fraction, seed=seed)
    render_summary(summary.audit, console)
    if json_out is not None:
        from cxrlab.run import write_json

        write_json(json_out, summary.to_dict())
    if grid is not None:
        write_grid(load_source(data, image_col, label_col), grid, augment, seed=seed)
        console.print(f"Sample grid written to [bold]{grid}[/]")


@app.command("models")
def models_cmd(
    name: Annotated[str | None, typer.Argument(help="one model")] = None,
    summary: Annotated[bool, typer.Option("--summary", help="layer table")] = False,
    image_size: Annotated[int, typer.Option(help="for multiply-adds and shapes")] = 224,
    in_chans: Annotated[int, typer.Option(help="input channels")] = 1,
    num_classes: Annotated[int, typer.Option(help="outputs (1 = binary)")] = 1,
) -> None:
    """The registered models with parameters and multiply-adds; --summary for the layers."""
    from cxrlab.models import list_models
    from cxrlab.models.summary import (
        build_on_meta,
        count_macs,
        count_parameters,
        model_summary,
        render_summary,
    )

    names = [name] if name else list_models()
    table = Table("model", "parameters", f"GMACs @ {image_size}px", title="Models")
    built = {}
    for n in names:
        m = build_on_meta(n, num_classes=num_classes, in_chans=in_chans, image_size=image_size)
        built[n] = m
        table.add_row(n, f"{count_parameters(m):,}", f"{count_macs(m, image_size) / 1e9:.2f}")
    console.print(table)
    if summary:
        for n, m in built.items():
            render_summary(model_summary(m, image_size), console, title=n)


@app.command("lr-find")
def lr_find_cmd(
    data: DataArg = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="a new folder for lr_find.png, lr_find.csv, lr_find.json and the "
        "config.yaml swept")] = None,
    plot: Annotated[Path | None, typer.Option(help="just the plot, as this PNG")] = None,
    config: Annotated[Path | None, typer.Option(
        help="the recipe of an earlier run's config.yaml (any train option lives there); "
        "options given here override it")] = None,
    model: Annotated[str | None, typer.Option(
        help=f"architecture; `cxrlab models` lists them {_default('model')}")] = None,
    image_size: Annotated[int | None, typer.Option(
        help=f"images resized to this many pixels square {_default('image_size')}")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"images per step {_default('batch_size')}")] = None,
    optimizer: Annotated[str | None, typer.Option(
        metavar="adamw|adam|sgd", help=f"optimiser {_default('optimizer')}")] = None,
    lr: Annotated[float | None, typer.Option(
        help=f"the recipe's learning rate, shown beside the suggestion "
        f"{_default('lr')}")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        help=f"{_default('weight_decay')}")] = None,
    augment: Annotated[str | None, typer.Option(
        help=f"training augmentation, as train's {_default('augment')}")] = None,
    pretrained: Annotated[str | None, typer.Option(
        help="start from these weights \\[default: the model's packaged ImageNet weights if "
        "it has them]")] = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", help="start from random weights")] = False,
    head: Annotated[str | None, typer.Option(
        metavar="linear|mlp-bn|vgg", help=f"classification head {_default('head')}")] = None,
    seed: Annotated[int | None, typer.Option(
        help=f"split, initial weights and batch order {_default('seed')}")] = None,
    image_col: ImageCol = None,
    label_col: LabelCol = None,
    min_lr: Annotated[float, typer.Option(help="the sweep's first rate")] = 1e-6,
    max_lr: Annotated[float, typer.Option(help="the sweep's last rate")] = 1.0,
    steps: Annotated[int, typer.Option(
        help="batches (one rate each); the sweep stops early once the loss passes 4x its "
        "best")] = 100,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Learning-rate range test: the suggested rate beside the recipe's own.

    The recipe's model trains a few batches at growing rates; the suggestion is where the
    loss fell fastest.

    Any other option of train goes in a config.yaml (--config); with pretrained weights the
    sweep is the recipe's first phase, the head on a frozen backbone (docs/recipes.md)."""
    from cxrlab.api import lr_find

    options = {k: v for k, v in locals().items() if v is not None and v is not False
               and k not in ("data", "out", "plot", "min_lr", "max_lr", "steps", "quiet",
                             "lr_find")}
    result = lr_find(data, out=out, plot=plot, min_lr=min_lr, max_lr=max_lr, steps=steps,
                     progress=not quiet, **options)
    console.print(result.summary(), highlight=False)
    for path in result.files:
        if path.suffix == ".png":
            console.print(f"Plot written to [bold]{path}[/]")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("cxrlab-demo"),
    epochs: Annotated[int | None, typer.Option(help="override the demo's epochs")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Train and evaluate a small model on the chest X-rays shipped with cxrlab."""
    from cxrlab.demo import run_demo

    result = run_demo(out, epochs=epochs, progress=not quiet)
    _print_metrics(result.metrics, f"Validation ({result.n_val} images)")
    if result.test_metrics:
        _print_metrics(result.test_metrics,
                       f"Held-out test ({result.test_metrics['n']} images, never seen)")
    files = ", ".join(p.name for p in sorted(result.run_dir.glob("*.png")))
    console.print(f"Trained in {result.seconds:.0f} s. Run directory: [bold]{result.run_dir}[/]")
    console.print(f"Plots: {files}")
    console.print(f"Next: cxrlab predict {result.run_dir} IMAGE.jpeg")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"cxrlab {version('cxrlab')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
) -> None:
    """Train, evaluate and use chest X-ray (or any image-folder) classifiers."""


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2.

    Click itself reports usage errors (its short usage line, exit 2) in standalone mode; we never
    catch Click's exception classes by name, because Typer now vendors its own copy of Click and
    `click.exceptions.*` no longer matches what it raises.
    """
    _setup_logging()
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
        return  # success: in-process callers (tests, notebooks) get a plain return
    except CxrlabError as e:
        err_console.print(f"cxrlab: error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
