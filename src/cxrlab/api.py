"""cxrlab from Python and notebooks: the CLI's commands as functions returning objects.

`train`, `load`, `compare`, `ablate` and `data_summary` call the same library functions as the
`cxrlab` command, with its option names and defaults (validated by `RunConfig.build`). Results
show as compact HTML tables in Jupyter (`_repr_html_`, with 95% intervals) and as plain text
elsewhere; plots come back as matplotlib Figures. Nothing prints unless asked: errors raise
`CxrlabError`, messages go to logging, and a progress bar appears only with `progress=True`.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cxrlab.run import LoadedRun
    from cxrlab.training.lr_find import LrFindResult

__all__ = ["CrossVal", "Comparison", "DataSummary", "History", "Metrics", "Run", "Sweep",
           "ablate", "adapt", "compare", "data_summary", "load", "lr_find", "register_model",
           "runs", "train"]

PathLike = str | Path

# `cxrlab train`'s options (python_style): RunConfig's fields, bar those set otherwise, and the
# few that map onto fields (no_pretrained, logger) or steer the run (config, mlflow_uri).
_HARDWARE = ("accelerator", "devices", "num_nodes", "strategy")
_TRAIN_OPTIONS = (
    "config", *(f for f in RunConfig.model_fields if f not in ("data", "fold", "loggers")),
    "no_pretrained", "logger", "mlflow_uri",
)


# ---------------------------------------------------------------------------------------
# functions


def train(data: PathLike | None = None, out: PathLike | None = None, *, progress: bool = False,
          resume: PathLike | None = None, **options: Any) -> Run | CrossVal:
    """Train a classifier like `cxrlab train DATA --out OUT` and return the finished Run.

    `options` are the CLI's (`image_size=64`, `model="cnn"`, `no_pretrained=True`,
    `time_budget="30m"`, `logger=["tensorboard"]`, ...), with its defaults and checks. `out`
    None makes a new folder runs/<data name>-<UTC time>. `resume=RUN_DIR` continues a killed
    or failed run (hardware options may change; any other must be the run's own value).
    With `folds=K` the result is a CrossVal of the K fold runs (`.ensemble`: their average as
    a Run); with `seeds=N` the Run of N members' average (OUT/seed-1..N are the members).
    """
    with _quiet():  # from the first import of the models on (monai pulls in tqdm.auto)
        result = run_training(data, out, progress=progress, resume=resume, options=options)
    if isinstance(result, dict):
        return CrossVal(result, result.pop("_out"))
    return Run(result.run_dir)


def run_training(data: PathLike | None, out: PathLike | None, *, progress: bool,
                 resume: PathLike | None, options: dict[str, Any], cli: bool = False):
    """The one code path behind `cxrlab train` and `cxrlab.train`: options -> RunConfig ->
    a run, a resumed run or a cross-validation. Returns the TrainResult, or the pooled
    cross-validation dict (with its folder under "_out"). `cli` names options as flags
    (--image-size) in errors, else as keyword arguments (image_size); the CLI also requires
    `out`, where Python makes a new folder."""
    from cxrlab.training.continuation import continue_run, wants_continuation
    from cxrlab.training.crossval import run_crossval
    from cxrlab.training.ensemble import run_seeds, study_file
    from cxrlab.training.lifecycle import resume_run, train_run

    def name(key: str) -> str:
        if not cli:
            return key
        return "DATA" if key == "data" else "--" + key.replace("_", "-")

    options = dict(options)
    unknown = [k for k in options if k not in _TRAIN_OPTIONS]
    if unknown:
        near = difflib.get_close_matches(unknown[0], _TRAIN_OPTIONS, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise CxrlabError(f"{unknown[0]}: not an option of cxrlab.train{hint}")
    hardware = {k: options.pop(k) for k in _HARDWARE if options.get(k) is not None}
    mlflow_uri = options.pop("mlflow_uri", None)
    if resume is not None:
        resume = Path(resume)
        more = options.get("epochs")  # more than the run has: continue it (continuation.py)
        if more is not None and wants_continuation(resume, more):
            del options["epochs"]
        else:
            more = None
        _check_resume_options(resume, {"data": data, "out": out, "mlflow_uri": mlflow_uri,
                                       **options}, name, cli)
        if more is not None:
            return continue_run(resume, more, progress=progress, hardware=hardware,
                                option=name("epochs"))
        study = study_file(resume)  # a cross-validation or --seeds ensemble
        if study is not None:
            if hardware:
                raise CxrlabError(f"{name('resume')} of an ensemble: its members keep the "
                                  "hardware options they were started with")
            cfg = RunConfig.load(study)
            if cfg.seeds is not None:
                return run_seeds(cfg, resume, progress=progress)
            return {**run_crossval(cfg, resume, progress=progress), "_out": resume}
        return resume_run(resume, progress=progress, hardware=hardware)
    values = _config_values(data, options, name)
    if "data" not in values:
        raise CxrlabError(f"{name('data')}: give a dataset (or {name('config')} with a data "
                          "entry)")
    if out is None and cli:
        raise CxrlabError("--out: give a new run directory (or --resume RUN_DIR)")
    values.update(hardware)
    cfg = RunConfig.build(values, source="option", name=name)
    out = Path(out) if out is not None else _new_run_dir(Path(cfg.data))
    if cfg.folds is not None or cfg.seeds is not None:
        if mlflow_uri is not None:
            which = name("folds" if cfg.folds is not None else "seeds")
            raise CxrlabError(f"{name('mlflow_uri')}: not with {which} yet; set "
                              "MLFLOW_TRACKING_URI")
        if cfg.seeds is not None:
            return run_seeds(cfg, out, progress=progress)
        return {**run_crossval(cfg, out, progress=progress), "_out": out}
    return train_run(cfg, out, progress=progress, mlflow_uri=mlflow_uri)


def load(run_dir: PathLike, *, tta: str | None = None) -> Run:
    """A finished run directory (what `cxrlab train` wrote) as a Run; `tta` as Run's."""
    return Run(run_dir, tta=tta)


def compare(run_a: Run | PathLike, run_b: Run | PathLike, n_boot: int = 2000) -> Comparison:
    """B − A on the validation images both runs share, with paired bootstrap 95% intervals
    (`cxrlab compare A B`)."""
    from cxrlab.evaluation.comparison import compare_runs

    return Comparison(compare_runs(_path(run_a), _path(run_b), n_boot=n_boot))


def calibrate(run: Run | PathLike, data: PathLike, out: PathLike, *,
              image_col: str | None = None, label_col: str | None = None,
              split: str | None = None, skip_bad: bool = False, tta: str | None = None,
              refit: str | None = None, rule: str = "keep-sensitivity",
              target_sensitivity: float | None = None, confidence: float | None = None,
              n_boot: int = 1000) -> Run:
    """The run refitted on a new site's labelled sample DATA, written as the new run OUT
    (`cxrlab calibrate`); None takes the measured defaults (a logit shift, and the threshold
    that keeps the run's own sensitivity). What it fitted, with intervals, is logged and kept
    in OUT's run.json "site_calibration"."""
    from cxrlab.site.calibration import CONFIDENCE, REFIT, calibrate_run, describe

    r = calibrate_run(_path(run), Path(data), Path(out), image_col=image_col,
                      label_col=label_col, split=split, skip_bad=skip_bad, n_boot=n_boot,
                      tta=tta, refit=REFIT if refit is None else refit, rule=rule,
                      target_sensitivity=target_sensitivity,
                      confidence=CONFIDENCE if confidence is None else confidence)
    logging.getLogger("cxrlab").info("%s", describe(r))
    return Run(out)


def adapt(run: Run | PathLike, images: PathLike, out: PathLike, *, bn: bool | None = None,
          bn_prior: float | None = None, prevalence: bool | None = None,
          skip_bad: bool = False, seed: int = 0) -> Run:
    """The run adapted to a new intake's unlabelled images, written as the new run OUT
    (`cxrlab adapt`); None takes the measured defaults. What it changed (estimated
    prevalence, decisions moved) is logged and kept in OUT's run.json "site_adaptation"."""
    from cxrlab.site.adapt import DEFAULT_BN_PRIOR, adapt_run, describe

    r = adapt_run(_path(run), Path(images), Path(out), bn=bn, prevalence=prevalence,
                  bn_prior=DEFAULT_BN_PRIOR if bn_prior is None else bn_prior,
                  skip_bad=skip_bad, seed=seed)
    logging.getLogger("cxrlab").info("%s", describe(r))
    return Run(out)


def ablate(spec: PathLike | dict, out: PathLike, *, progress: bool = False,
           shard: str | None = None) -> Sweep:
    """Train every variant x seed of an ablation spec (a YAML file or the same mapping as a
    dict; complete runs are skipped), then compare them paired by seed (`cxrlab ablate`)."""
    from cxrlab.evaluation import ablation as ab
    from cxrlab.training.sweep import run_sweep

    out = Path(out)
    with _quiet():
        study = ab.parse_spec(spec) if isinstance(spec, dict) else ab.load_spec(Path(spec))
        run_sweep(study, out, ab.parse_shard(shard), progress=progress,
                  on_event=lambda e: logging.getLogger("cxrlab").info(
                      "[%d/%d] %s: %s %s", e.index, e.total, e.run.name, e.kind, e.detail))
    return Sweep(ab.collect(study, out), out)


def runs(root: PathLike = "runs", *, sort: str = "date", reverse: bool = False) -> list[dict]:
    """Every run under `root` (recursive), one dict each: model, image size, epochs, val AUC
    with its interval, accuracy, threshold, wall time, state, date (`cxrlab runs`)."""
    from cxrlab.reporting.run_table import runs as table

    return table(root, sort=sort, reverse=reverse)


def data_summary(data: PathLike, *, image_col: str | None = None,
                 label_col: str | None = None, group_regex: str | None = None,
                 val_fraction: float = 0.2, seed: int = 0) -> DataSummary:
    """Counts per class and split, patients, sizes, duplicates, leakage and unreadable files,
    with the split a training run would use (`cxrlab data summary`)."""
    from cxrlab.data.audit import summarize
    from cxrlab.data.sources import load_source

    source = load_source(Path(data), image_col, label_col)
    return DataSummary(summarize(source, group_regex=group_regex, val_fraction=val_fraction,
                                 seed=seed))


def register_model(name: str, factory: Callable[..., Any] | None = None, *,
                   replace: bool = False):
    """Make your own network a cxrlab model: `train(..., model=name)` then gives it the splits,
    metrics, reports, ablations, Grad-CAM, export and serving of the built-in ones.

    `factory` receives those of num_classes, in_chans, dropout, batchnorm, head, image_size
    it names and returns a backbone (an nn.Module: images -> a (B, C, h, w) feature map;
    cxrlab adds the normalisation and the head) or a cxrlab.models.ImageClassifier; it is
    checked once per build (docs/own-model.md). Without `factory`, a decorator. A built-in
    name is refused; your own name again needs `replace=True`. Runs of the model load in a
    process that registered it; the ONNX file `Run.export_onnx` writes needs neither it nor
    cxrlab."""
    from cxrlab.models import register_custom_model

    return register_custom_model(name, factory, replace=replace)


# train's options that mean nothing for a learning-rate sweep (one process, one split)
_NOT_LR_FIND = ("folds", "time_budget", "logger", "mlflow_uri", "devices", "num_nodes",
                "strategy", "loggers")


def lr_find(data: PathLike | None = None, *, out: PathLike | None = None,
            plot: PathLike | None = None, min_lr: float = 1e-6, max_lr: float = 1.0,
            steps: int = 100, progress: bool = False, **options: Any) -> LrFindResult:
    """The learning-rate range test (fastai's lr_find, Lightning's Tuner.lr_find) for the
    recipe `options` describe, as `cxrlab train` would build it (`cxrlab lr-find DATA`).

    The recipe's model trains for `steps` batches while the rate grows from `min_lr` to
    `max_lr`; the result has `.suggestion` (steepest fall of the loss, or None),
    `.recipe_lr`, `.lrs`, `.losses` and `.figure()`. `out`: a new folder for lr_find.png,
    .csv, .json and the config.yaml swept; `plot`: just the PNG. With pretrained weights the
    sweep is the recipe's first phase, the head on a frozen backbone."""
    from cxrlab.training.lr_find import lr_find as sweep

    options = dict(options)
    bad = [k for k in options if k in _NOT_LR_FIND or k not in _TRAIN_OPTIONS]
    if bad:
        near = difflib.get_close_matches(bad[0], _TRAIN_OPTIONS, n=1)
        hint = f" (did you mean {near[0]}?)" if near and near[0] != bad[0] else ""
        raise CxrlabError(f"{bad[0]}: not an option of cxrlab.lr_find{hint}")
    values = _config_values(data, options)
    if "data" not in values:
        raise CxrlabError("data: give a dataset (or config with a data entry)")
    cfg = RunConfig.build(values, source="option")
    with _quiet():
        return sweep(cfg, min_lr=min_lr, max_lr=max_lr, steps=steps,
                     out=None if out is None else Path(out),
                     plot=None if plot is None else Path(plot), progress=progress)


# ---------------------------------------------------------------------------------------
# a run


class Run:
    """A finished run directory: its metrics, configuration and history, and the model to
    evaluate, predict, explain, export and plot with (loaded on first use).

    `tta`: the test-time augmentation every score of this Run object uses ("none", "flip",
    ...; cxrlab.models.tta); None = the run's own (config `tta`), with which its threshold was
    chosen. Another one is allowed, with a one-line warning."""

    def __init__(self, path: PathLike, *, tta: str | None = None):
        from cxrlab.run import load_info

        self.path = Path(path)
        if not self.path.is_dir():
            raise CxrlabError(f"{self.path}: run directory not found")
        info = load_info(self.path)
        if info.state != "complete":
            raise CxrlabError(f"{self.path}: run is not complete (state: {info.state})")
        self._info = info
        self._loaded: LoadedRun | None = None
        if tta is not None:
            from cxrlab.models.tta import check_tta

            check_tta(tta)
        self._tta = tta

    # -- what the run wrote -----------------------------------------------------------------
    @property
    def metrics(self) -> Metrics:
        """Validation metrics (metrics.json) with their 95% bootstrap intervals under "ci"."""
        return Metrics(_read_json(self.path / "metrics.json"))

    @property
    def test_metrics(self) -> Metrics | None:
        """Metrics on the data's own test split (metrics_test.json), if it had one."""
        p = self.path / "metrics_test.json"
        return Metrics(_read_json(p)) if p.is_file() else None

    @property
    def config(self) -> RunConfig:
        """Everything that defines the run (config.yaml)."""
        return RunConfig.load(self.path / "config.yaml")

    @property
    def history(self) -> History:
        """One dict per epoch (history.csv); `.to_pandas()` for a DataFrame."""
        from cxrlab.run import read_history

        return History(read_history(self.path / "history.csv"))

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the probabilities."""
        return list(self._info.classes)

    @property
    def positive_class(self) -> str | None:
        """The class the threshold is for (two classes), else None."""
        pos = self._info.positive
        return None if pos is None else self._info.classes[pos]

    @property
    def threshold(self) -> float | None:
        """The decision threshold chosen on validation (two classes), else None."""
        from cxrlab.run import read_threshold

        return read_threshold(self.path)

    @property
    def val_predictions(self) -> list[dict]:
        """The validation images as the run decided them (val_predictions.csv): path, label,
        class, probabilities and correct, per image."""
        from cxrlab.deploy.inference import decide

        paths, y, probs = self._val_predictions()
        pred = decide(probs, self._info.positive, self.threshold)
        names = self.classes
        return [{"path": p, "label": names[t], "class": names[k],
                 "probabilities": {c: float(v) for c, v in zip(names, row, strict=True)},
                 "correct": bool(t == k)} for p, t, k, row in zip(paths, y, pred, probs,
                                                                   strict=True)]

    @property
    def loaded(self) -> LoadedRun:
        """The model and what inference needs, loaded once."""
        if self._loaded is None:
            from cxrlab.run import load_run

            self._loaded = load_run(self.path, self._tta)
        return self._loaded

    @property
    def tta(self) -> str:
        """The test-time augmentation this Run scores with (see the class docstring)."""
        return self.config.tta if self._tta is None else self._tta

    # -- training it on ------------------------------------------------------------------
    def fit(self, epochs: int, *, progress: bool = False) -> Run:
        """Train `epochs` more epochs, in place (`cxrlab train --resume RUN --epochs N` with
        N = the epochs done + `epochs`); returns this Run, now the longer one. The result before
        is kept as a run of its own in RUN/previous/epochs-D (docs/runs.md, "Continue
        training")."""
        from cxrlab.training.continuation import continue_run, epochs_done

        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise CxrlabError(f"epochs {epochs!r}: how many more epochs, a whole number >= 1")
        with _quiet():
            continue_run(self.path, epochs_done(self.path) + epochs, progress=progress,
                         option="epochs")
        from cxrlab.run import load_info

        self._info, self._loaded = load_info(self.path), None  # the longer run from now on
        return self

    # -- using the model ----------------------------------------------------------------
    def evaluate(self, data: PathLike, *, split: str | None = None, positive: str | None = None,
                 image_col: str | None = None, label_col: str | None = None,
                 skip_bad: bool = False, shift: bool = False,
                 onnx: PathLike | None = None, allow_overlap: bool = False,
                 save: bool = True) -> Metrics:
        """Metrics on labelled images at the run's threshold (`cxrlab evaluate RUN DATA`).

        DATA holding images the run trained on is refused; `allow_overlap=True` scores the
        others (metrics["overlap"] lists both). `shift=True` also scores the run under graded
        synthetic intake shifts (under "shift"), and writes RUN/shift.json and RUN/shift.png,
        which the report shows (a warning where the run folder is read-only; `save=False`
        leaves it untouched). `onnx`: score with that exported file (e.g.
        `export_onnx(..., int8=True)`) instead."""
        from cxrlab.site.assess import evaluate_run

        metrics = evaluate_run(self.path, Path(data), image_col, label_col, split, positive,
                               skip_bad, shift=shift, onnx=None if onnx is None else Path(onnx),
                               allow_overlap=allow_overlap, tta=self._tta)
        if shift and save:
            from cxrlab.site import shift as stress

            stress.save(self.path, metrics["shift"])
        return Metrics(metrics)

    def predict(self, images: Any, *, skip_bad: bool = False, backend: str = "torch",
                onnx: PathLike | None = None, cam_dir: PathLike | None = None,
                layer: str | None = None) -> list[dict]:
        """One dict (path, class, probabilities, threshold) per image, in the order given.

        `images`: a file or folder path, a PIL image, a NumPy array (H x W or H x W x C, uint8
        or uint16), or a list of these. Folders are expanded in place. In-memory images get
        "path" "<array N>" / "<PIL N>" (N their position in the list). Arrays go through the
        same mode conversion and resize as files, so they predict exactly like their PNGs.
        `cam_dir`: write a Grad-CAM PNG per image file there (`cxrlab predict --cam`).
        """
        from cxrlab.deploy.export import make_predictor
        from cxrlab.deploy.predict import predict_paths, prediction_rows

        items = _as_list(images)
        run = self.loaded
        predictor = None
        out: list[dict] = []
        paths: list[Path] = []  # consecutive paths go through predict_paths in one call

        def flush() -> None:
            if paths:
                out.extend(predict_paths(run, list(paths), skip_bad=skip_bad, backend=backend,
                                         onnx_file=None if onnx is None else Path(onnx),
                                         cam_dir=None if cam_dir is None else Path(cam_dir),
                                         layer=layer))
                paths.clear()

        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                paths.append(Path(item))
                continue
            flush()
            name = f"<{'array' if isinstance(item, np.ndarray) else 'PIL'} {i}>"
            x = self._pixels(item, name)
            predictor = predictor or make_predictor(run, backend,
                                                    None if onnx is None else Path(onnx))
            out += prediction_rows(run, [name], predictor(x[None]))
        flush()
        return out

    def gradcam(self, image: Any, *, target: int | None = None,
                layer: str | None = None) -> np.ndarray:
        """Grad-CAM heatmap of one image (path, PIL or array): float32 (S, S) in [0, 1] at the
        run's image size; for two classes the evidence for the positive class."""
        from cxrlab.deploy.cam import gradcam

        run = self.loaded
        return gradcam(run.model, self._pixels(image)[None], target, layer,
                       run.info.positive)[0]

    def show_gradcam(self, image: Any, *, target: int | None = None,
                     layer: str | None = None) -> Figure:
        """The image under its Grad-CAM heatmap, titled with the prediction (a Figure)."""
        from cxrlab.deploy.cam import cam_figure, cam_title

        pixels = self._pixels(image)
        row = self.predict([image])[0]
        name = Path(image).name if isinstance(image, (str, Path)) else "image"
        return _shown(cam_figure(pixels, self.gradcam(image, target=target, layer=layer),
                                 cam_title(name, row)))

    def export_onnx(self, path: PathLike, *, overwrite: bool = False, int8: bool = False,
                    calibration_images: int = 256, portable: bool = False) -> Path:
        """The run as one ONNX file (uint8 images in, probabilities out; `cxrlab export`).

        `int8`: 8-bit weights and activations, ranges from `calibration_images` training
        images; what that changes on the validation images is in the file's `int8_check`
        metadata (`cxrlab.deploy.export.OnnxPredictor(path).int8_check`). `portable`: 7-bit weights,
        the same scores on any x86 CPU (otherwise made for this CPU's kind: VNNI or not)."""
        if portable and not int8:
            raise CxrlabError("--portable (portable=True): only with --int8 (int8=True); an "
                              "fp32 file is portable already")
        if int8:
            from cxrlab.deploy.quantize import export_int8

            if self.tta != self.config.tta:
                raise CxrlabError(f"--int8 with --tta {self.tta}: the int8 file is checked "
                                  "against the run's validation scores, made with tta "
                                  f"{self.config.tta}; export --int8 with the run's own")

            return export_int8(self.loaded, Path(path), overwrite=overwrite,
                               calibration_images=calibration_images, portable=portable)[0]
        from cxrlab.deploy.export import export_onnx

        return export_onnx(self.loaded, Path(path), overwrite=overwrite)

    def report(self, out: PathLike | None = None) -> Path:
        """Write the self-contained HTML report (default RUN/report.html); its path."""
        from cxrlab.reporting.report import write_report

        return write_report(self.path, None if out is None else Path(out))

    # -- figures ------------------------------------------------------------------------
    def plot_history(self) -> Figure:
        """Loss, accuracy, precision and recall per epoch, train beside validation."""
        from cxrlab.reporting.plots import plot_history

        return _shown(plot_history(self.history))

    def plot_roc(self) -> Figure:
        """Validation ROC curve(s) with AUC, the run's operating point marked."""
        from cxrlab.reporting.plots import plot_roc

        _, y, probs = self._val_predictions()
        return _shown(plot_roc(y, probs, self.classes, positive=self._info.positive,
                               threshold=self.threshold))

    def plot_confusion(self) -> Figure:
        """Validation confusion matrix at the run's threshold."""
        from cxrlab.reporting.plots import plot_confusion

        return _shown(plot_confusion(np.array(self.metrics["confusion_matrix"]), self.classes,
                                     title="Validation confusion matrix"))

    def show_predictions(self, *, wrong_first: bool = True, max_images: int = 32) -> Figure:
        """Validation images titled "pred: X (p) | true: Y"; mistakes first (most confident
        first, framed in red) unless wrong_first=False."""
        from cxrlab.data.cache import load_images
        from cxrlab.deploy.inference import decide
        from cxrlab.reporting.plots import plot_prediction_grid

        paths, y, probs = self._val_predictions()
        pred = decide(probs, self._info.positive, self.threshold)
        keep = np.arange(len(paths))
        if not wrong_first:
            keep = keep[: max_images]
        else:
            wrong = np.flatnonzero(pred != y)
            keep = np.concatenate([wrong, np.flatnonzero(pred == y)])[: max_images]
        cfg = self.config
        images, _ = load_images([Path(paths[i]) for i in keep], cfg.image_size,
                                self._info.in_chans, cache_dir=None, bit_depth=self._bit_depth)
        return _shown(plot_prediction_grid(images, y[keep], pred[keep], probs[keep],
                                           self.classes, max_images=max_images,
                                           wrong_first=wrong_first))

    # -- helpers ------------------------------------------------------------------------
    def _pixels(self, image: Any, name: str = "image") -> np.ndarray:
        """uint8 (C, S, S) exactly as training saw the image's file."""
        from cxrlab.data.images import convert_image, read_image

        size, chans = self.config.image_size, self._info.in_chans
        if isinstance(image, (str, Path)):
            return read_image(image, chans, size, self._bit_depth)
        return convert_image(image, chans, size, name=name, bit_depth=self._bit_depth)

    @property
    def _bit_depth(self):
        """16-bit images (files, uint16 arrays) scaled as the run's training images were."""
        from cxrlab.run import run_bit_depth

        return run_bit_depth(self.config, self._info)

    def _val_predictions(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        from cxrlab.run import read_predictions

        return read_predictions(self.path / "val_predictions.csv", self.classes)

    def __repr__(self) -> str:
        m = self.metrics
        cfg = self.config
        key = "roc_auc" if m.get("roc_auc") is not None else "accuracy"
        ci = (m.get("ci") or {}).get(key)
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        value = m.get(key)
        shown = "—" if value is None else f"{value:.3f}"
        return (f"Run('{self.path}': {cfg.model}, {cfg.image_size} px, {m.get('epochs')} "
                f"epochs, {len(self.classes)} classes; validation {key} {shown}{interval}, "
                f"n={m.get('n')})")

    def _repr_html_(self) -> str:
        from cxrlab.reporting.report import esc

        cfg = self.config
        head = (f"<b>Run</b> <code>{esc(self.path)}</code>: {esc(cfg.model)}, "
                f"{cfg.image_size} px, {esc(self.metrics.get('epochs'))} epochs, "
                f"classes {esc(', '.join(self.classes))}")
        body = self.metrics._table_html("validation")
        if self.test_metrics is not None:
            body += self.test_metrics._table_html("test")
        return f"<div>{head}{body}</div>"


# ---------------------------------------------------------------------------------------
# results that show themselves


class Metrics(dict):
    """A metrics.json mapping (accuracy, roc_auc, ..., "ci": 95% intervals, confusion_matrix)
    that shows as a table: HTML in Jupyter, the CLI's table as text elsewhere."""

    def __repr__(self) -> str:
        from cxrlab.evaluation.metrics import format_metrics_table

        return _rich_text(lambda c: c.print(format_metrics_table(self))).rstrip()

    def _table_html(self, what: str = "") -> str:
        from cxrlab.evaluation.metrics import _LABELS, METRIC_KEYS
        from cxrlab.reporting.report import esc, fmt, fmt_ci, table

        binary = self.get("positive_class") is not None
        ci = self.get("ci") or {}
        rows = [[esc(_LABELS[k] if binary or k == "accuracy" else f"{_LABELS[k]}, macro"),
                 fmt(self.get(k)), fmt_ci(ci.get(k))] for k in METRIC_KEYS]
        if self.get("threshold") is not None:
            rows.append(["threshold", f"{self['threshold']:.4g}", ""])
        cap = f"{what} " if what else ""
        cap += f"{self.get('n', '?')} cases"
        cap += (f", positive class {self['positive_class']}" if binary else ", macro averages")
        return (f"<p style='margin:.4em 0 .1em'>{esc(cap)}</p>"
                + table(["metric", "value", "95% CI"], rows))

    def _repr_html_(self) -> str:
        return self._table_html()


class History(list):
    """history.csv as a list of dicts, one per epoch (floats; None where not recorded).

    A list, so it works without pandas (not a dependency); `.to_pandas()` gives a DataFrame.
    """

    def to_pandas(self):
        """A pandas DataFrame indexed by epoch (needs pandas installed)."""
        try:
            import pandas as pd
        except ImportError:
            raise CxrlabError("to_pandas: pandas is not installed (pip install pandas)") from None
        df = pd.DataFrame(list(self))
        return df.set_index("epoch") if "epoch" in df else df

    def _repr_html_(self) -> str:
        from cxrlab.reporting.report import esc, fmt, table

        cols = list(self[0]) if self else []
        rows = [[esc(int(r[c])) if c == "epoch" and r[c] is not None
                 else fmt(r[c], 4) if isinstance(r[c], float) else esc(r[c]) for c in cols]
                for r in self]
        return table(cols, rows)


class Comparison(dict):
    """`compare`'s result: per metric A, B, B − A, its paired 95% interval and a verdict."""

    def __repr__(self) -> str:
        from cxrlab.evaluation.comparison import render

        return _rich_text(lambda c: render(self, c)).rstrip()

    def _repr_html_(self) -> str:
        from cxrlab.evaluation.comparison import LABELS
        from cxrlab.reporting.report import esc, table

        rows = [[esc(LABELS[r["metric"]]), f"{r['a']:.4f}", f"{r['b']:.4f}",
                 f"{r['difference']:+.4f}",
                 "—" if r["ci"] is None else f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]",
                 esc(r["verdict"])] for r in self["rows"]]
        cap = (f"B = <code>{esc(self['b'])}</code> vs A = <code>{esc(self['a'])}</code>: "
               f"{self['n']} validation images, {self['n_boot']} paired resamples")
        return (f"<p>{cap}</p>"
                + table(["metric", "A", "B", "B − A", "95% CI (paired)", "verdict"], rows))


class Sweep(dict):
    """`ablate`'s result (ablation.json): variants as mean ± std over seeds with 95%
    t-intervals, and the paired effects; `.path` is the sweep directory."""

    def __init__(self, result: dict, path: PathLike):
        super().__init__(result)
        self.path = Path(path)

    def __repr__(self) -> str:
        from cxrlab.evaluation.ablation import render

        return _rich_text(lambda c: render(self, c)).rstrip()

    def _repr_html_(self) -> str:
        from cxrlab.reporting.report import esc, variants_html

        main = [e for e in self["effects"] if not e["context"] and e["metric"] == "roc_auc"]
        effects = "".join(f"<li>{esc(e['sentence'])}</li>" for e in main)
        return (f"<p><b>{esc(self.get('name') or 'Ablation')}</b>: {self['complete']} of "
                f"{self['planned']} runs in <code>{esc(self.path)}</code></p>"
                + variants_html(self) + (f"<ul>{effects}</ul>" if effects else ""))


class CrossVal(dict):
    """`train(folds=K)`'s result (crossval.json): pooled metrics; `.runs` the fold Runs,
    `.ensemble` the run that averages them (the folder itself, also `cxrlab.load(path)`)."""

    def __init__(self, result: dict, path: PathLike):
        super().__init__(result)
        self.path = Path(path)

    @property
    def runs(self) -> list[Run]:
        """One Run per fold, in fold order."""
        from cxrlab.training.crossval import fold_dir

        return [Run(fold_dir(self.path, i)) for i in range(1, int(self["folds"]) + 1)]

    @property
    def ensemble(self) -> Run:
        """The folds' ensemble: predict, evaluate, export it like any Run."""
        return Run(self.path)

    def __repr__(self) -> str:
        from cxrlab.training.crossval import render

        return _rich_text(lambda c: render(self, c)).rstrip()


class DataSummary:
    """`data_summary`'s result: the audit (`cxrlab.data.audit.Summary`'s fields as
    attributes, `.to_dict()`), shown as the CLI's tables."""

    def __init__(self, summary):
        self._summary = summary

    @property
    def audit(self):
        """The `cxrlab.data.audit.Summary` itself (what the CLI renders)."""
        return self._summary

    def __getattr__(self, name: str) -> Any:
        return getattr(self._summary, name)

    def to_dict(self) -> dict:
        """JSON-able, as `cxrlab data summary --json` writes it."""
        return self._summary.to_dict()

    def __repr__(self) -> str:
        from cxrlab.data.audit import render_summary

        return _rich_text(lambda c: render_summary(self._summary, c)).rstrip()

    def _repr_html_(self) -> str:
        from cxrlab.reporting.report import esc, table

        s = self._summary
        splits = list(s.counts)
        rows = [[esc(c), *[str(s.counts[sp].get(c, 0)) for sp in splits],
                 *[str(s.patients[sp].get(c, 0)) for sp in splits]] for c in s.classes]
        head = ["class", *[f"{sp} images" for sp in splits],
                *[f"{sp} {'patients' if s.grouped else 'files'}" for sp in splits]]
        notes = [f"{s.n_images} readable images in {esc(s.root)} ({esc(s.kind)})",
                 esc(s.split_message),
                 f"{len(s.duplicate_sets)} sets of identical images, "
                 f"{len(s.cross_split_duplicates)} across splits (leakage), "
                 f"{len(s.cross_class_duplicates)} with differing labels",
                 f"{len(s.unreadable)} unreadable files"]
        return table(head, rows) + "<ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>"


# ---------------------------------------------------------------------------------------
# helpers


def _config_values(data: PathLike | None, options: dict[str, Any],
                   name=lambda key: key) -> dict[str, Any]:
    """The options' mapping onto RunConfig values (the same checks and messages for the CLI,
    whose flags `name` spells, and for Python)."""
    values: dict[str, Any] = {}
    config = options.pop("config", None)
    if config is not None:
        values = RunConfig.load(Path(config)).model_dump()
    if options.pop("no_pretrained", False):
        if options.get("pretrained") is not None:
            raise CxrlabError(f"{name('pretrained')} and {name('no_pretrained')}: give one of "
                              "them")
        options["pretrained"] = "none"
    target = options.get("target_sensitivity")
    if target is not None:
        rule = options.get("threshold_rule")
        if rule not in (None, "sensitivity"):
            raise CxrlabError(f"{name('target_sensitivity')} with {name('threshold_rule')} "
                              f"{rule}: the target is for the sensitivity rule; give one of them")
        options["threshold_rule"] = "sensitivity"
    if options.get("time_budget") is not None:
        from cxrlab.config import parse_budget

        options["time_budget"] = parse_budget(options["time_budget"], name("time_budget"))
    loggers = options.pop("logger", None)
    if isinstance(loggers, str):
        loggers = [loggers]
    if loggers is not None:  # [] is a value: no loggers (over a --config file's)
        options["loggers"] = list(loggers)
    values.update({k: v for k, v in options.items() if v is not None})
    if data is not None:
        values["data"] = str(data)
    return values


def _check_resume_options(run_dir: Path, given: dict[str, Any], name, cli: bool) -> None:
    """`--resume RUN` continues RUN with its own config.yaml: an option given with it must say
    what that file says, else it is refused, never ignored. Given means not None: --seed 0 and
    --no-class-weights are values (no_pretrained=False is the flag left out)."""
    from cxrlab.training.ensemble import study_file

    given = {k: v for k, v in given.items() if v is not None}
    if given.get("no_pretrained") is False:
        del given["no_pretrained"]
    only = (f"only {'--quiet' if cli else 'progress'}, the hardware options and the run's own "
            "values may be given")
    fixed = next((k for k in ("data", "out", "mlflow_uri", "config") if k in given), None)
    if fixed is not None:
        raise CxrlabError(f"{name(fixed)}: {name('resume')} continues a run with its own "
                          f"config.yaml; {only}")
    if not given:
        return
    file = study_file(run_dir) or run_dir / "config.yaml"
    if not file.is_file():
        return  # resuming says what is missing
    saved = RunConfig.load(file)
    fields = {"no_pretrained": ("pretrained",), "logger": ("loggers",),
              "target_sensitivity": ("target_sensitivity", "threshold_rule")}
    for key, value in given.items():
        try:
            asked = RunConfig.build({**saved.model_dump(), **_config_values(None, {key: value})})
        except CxrlabError:
            asked = None  # e.g. --lr 0: not the run's value either
        for f in fields.get(key, (key,)):
            if asked is None or getattr(asked, f) != getattr(saved, f):
                raise CxrlabError(f"{name(key)}: {name('resume')} continues a run with its own "
                                  f"config.yaml, which says {f}: {getattr(saved, f)!r} (given: "
                                  f"{value!r}); {only}")


def _new_run_dir(data: Path) -> Path:
    """runs/<data name>-<UTC time>, with -2, -3 ... if taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = (data.stem if data.is_file() else data.resolve().name) or "run"
    base = Path("runs") / f"{name}-{stamp}"
    out, k = base, 2
    while out.exists():
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out


def _path(run: Run | PathLike) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def _as_list(images: Any) -> list:
    if isinstance(images, (str, Path, np.ndarray)) or _is_pil(images):
        return [images]
    if isinstance(images, Iterable):
        return list(images)
    raise CxrlabError(f"images: expected paths, PIL images or arrays, got {type(images).__name__}")


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrlabError(f"{path}: not found (is the run complete?)") from None


def _shown(fig: Figure) -> Figure:
    """Make a notebook show the Figure as a PNG.

    Our figures are built without pyplot (thread-safe, no global state), so IPython has no
    formatter for them unless `%matplotlib inline` ran; register the one the inline backend
    uses, unless one is already set (the user's choice, e.g. retina, wins)."""
    import sys

    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    if shell is None:
        return fig
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, lambda f: print_figure(f, "png", bbox_inches="tight"))
    return fig


def _rich_text(draw) -> str:
    """What a Rich renderer prints, as plain text (no colour codes, fixed width)."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=110, color_system=None, force_terminal=False,
                      force_jupyter=False, highlight=False)
    draw(console)
    return console.file.getvalue()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's banners and warnings off while training (as the CLI sets them), restored
    after: a notebook cell shows only what it returns, and the bar when asked."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # tqdm.auto (imported by a dependency) without ipywidgets in a notebook: its bar
            # falls back to text, which works; the advice to install ipywidgets is noise.
            warnings.filterwarnings("ignore", message="IProgress not found")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
