"""`cxrlab report`: one self-contained HTML page for a run or an ablation.

Everything is inlined (figures as PNG data URLs, one small stylesheet, no script, no font), so
the file can be mailed, archived or opened offline. Sections carry stable ids (SECTIONS_RUN,
SECTIONS_ABLATION) that tests and links rely on. The page is built with plain string
templates and `html.escape`: a dozen sections do not need a template engine.

Figures come from the run's own files (history.csv, metrics.json, split.csv and
val_predictions.csv); a run trained before val_predictions.csv existed gets its validation
probabilities recomputed from model.pt and split.csv.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cxrlab.errors import CxrlabError
from cxrlab.run import atomic_write_text

# The rest of cxrlab (scores, plots, Grad-CAM) is imported inside the functions that use it:
# esc/fmt/table here also render the API's notebook views (Run._repr_html_), which must not
# load torch and matplotlib to show a table.

log = logging.getLogger("cxrlab")

SECTIONS_RUN = ("summary", "data", "configuration", "learning-curves", "convergence",
                "confusion-matrix", "roc-pr", "calibration", "metrics", "gallery")
SECTIONS_ABLATION = ("summary", "ablation-table", "effects", "seed-curves", "convergence",
                     "runs", "data", "configuration")
LAST_EPOCHS = 3  # convergence: spread over this many final epochs
GALLERY_SIZE = 24

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1em 2em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%}.muted{color:#777}.better{color:#1a7f37}.worse{color:#c62828}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.tile{border:2px solid #ddd;padding:4px;font-size:.8em;text-align:center}
.tile.wrong{border-color:#c62828}.tile img{width:100%;image-rendering:pixelated}
pre{background:#f6f6f6;padding:.8em;overflow:auto}.figs{display:flex;flex-wrap:wrap;gap:1em}
.figs img{max-width:520px}
"""


# ---------------------------------------------------------------------------------------
# entry point


def write_report(path: Path, out: Path | None = None) -> Path:
    """Write PATH's report (default PATH/report.html) and return where it went."""
    path = Path(path)
    if not path.is_dir():
        raise CxrlabError(f"{path}: not a directory (give a run or an ablation directory)")
    if (path / "ablation.yaml").is_file():
        page = ablation_page(path)
    elif (path / "run.json").is_file():
        page = run_page(path)
    else:
        raise CxrlabError(f"{path}: neither a run directory (run.json) nor an ablation "
                          "directory (ablation.yaml)")
    out = Path(out) if out is not None else path / "report.html"
    if out.is_dir():
        raise CxrlabError(f"--out {out}: is a directory; give a file name")
    if not out.parent.is_dir():
        raise CxrlabError(f"--out {out}: folder {out.parent} does not exist")
    try:
        atomic_write_text(out, page)
    except OSError as e:  # a read-only run: say where else it can go, not a traceback
        raise CxrlabError(f"{out}: cannot write the report there ({e.strerror}); give --out "
                          "a file elsewhere") from None
    return out


# ---------------------------------------------------------------------------------------
# html helpers


def esc(x) -> str:
    return html.escape(str(x))


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str) -> str:
    return f'<img src="{data_url(png)}" alt="{esc(alt)}">'


def figure_png(draw, *args, **kwargs) -> bytes:
    """Run a `cxrlab.reporting.plots` function into a temporary file and return the PNG bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "fig.png"
        draw(*args, p, **kwargs) if args else draw(p, **kwargs)
        return p.read_bytes()


def fig_to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    fig.clear()
    return buf.getvalue()


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t, _ in sections)
    body = "".join(section(*s) for s in sections)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(subtitle)} · generated {stamp} by "
            f"cxrlab</p><p><strong>Research use only — not for clinical use.</strong></p>"
            f"<nav>{nav}</nav>\n{body}</body></html>\n")


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def fmt_ci(ci) -> str:
    return "—" if not ci else f"{ci[0]:.3f} – {ci[1]:.3f}"


# ---------------------------------------------------------------------------------------
# what a run holds


@dataclass
class RunData:
    run_dir: Path
    config: dict
    info: dict
    metrics: dict
    history: list[dict]
    split_rows: list[dict]
    classes: list[str]
    positive: int | None
    threshold: float | None
    val_paths: list[str]
    val_y: np.ndarray
    val_probs: np.ndarray


def recompute_val_predictions(run_dir: Path, split_rows: list[dict]):
    """Older runs: predict the validation images of split.csv again with model.pt."""
    from cxrlab.data.cache import load_images
    from cxrlab.deploy.inference import predict_probs
    from cxrlab.run import load_run

    run = load_run(run_dir)
    val = [r for r in split_rows if r["split"] == "val"]
    images, bad = load_images([Path(r["path"]) for r in val], run.config.image_size,
                              run.info.in_chans, skip_bad=True, bit_depth=run.bit_depth)
    bad_paths = {str(p) for p, _ in bad}
    val = [r for r in val if r["path"] not in bad_paths]
    probs = predict_probs(run.model, images)
    y = np.array([run.classes.index(r["label"]) for r in val], dtype=int)
    return [r["path"] for r in val], y, probs


def load_run_data(run_dir: Path) -> RunData:
    from cxrlab.run import read_history, read_split_csv, read_threshold

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    if info.get("state") != "complete":
        raise CxrlabError(f"{run_dir}: run is not complete (state: {info.get('state')})")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    classes = info["classes"]
    pos = info.get("positive_class")
    positive = None if pos is None else classes.index(pos)
    split_rows = read_split_csv(run_dir / "split.csv")
    if (run_dir / "val_predictions.csv").is_file():
        from cxrlab.run import read_predictions

        paths, y, P = read_predictions(run_dir / "val_predictions.csv", classes)
    else:
        paths, y, P = recompute_val_predictions(run_dir, split_rows)
    threshold = read_threshold(run_dir)
    return RunData(run_dir, config, info, metrics, read_history(run_dir / "history.csv"),
                   split_rows, classes, positive, threshold, paths, y, P)


# ---------------------------------------------------------------------------------------
# sections shared by both pages


def data_section(split_rows: list[dict], config: dict) -> str:
    """Counts per split and class, patients, and the audit's duplicates."""
    from collections import Counter

    classes = sorted({r["label"] for r in split_rows})
    splits = [s for s in ("train", "val", "test") if any(r["split"] == s for r in split_rows)]
    counts = Counter((r["split"], r["label"]) for r in split_rows)
    rows = []
    for s in splits:
        n = sum(counts[(s, c)] for c in classes)
        pats = {r["patient"] or r["path"] for r in split_rows if r["split"] == s}
        rows.append([esc(s), *[f"{counts[(s, c)]} ({counts[(s, c)] / n:.0%})" for c in classes],
                     str(n), str(len(pats))])
    total = len(split_rows)
    rows.append(["<b>all</b>", *[str(sum(counts[(s, c)] for s in splits)) for c in classes],
                 str(total), str(len({r["patient"] or r["path"] for r in split_rows}))])
    grouped = any(r["patient"] for r in split_rows)
    out = table(["split", *classes, "images", "patients" if grouped else "files"], rows)
    if not grouped:
        out += ("<p>No patient key was found in the file names, so each file counts as its own "
                "patient: images of one patient may sit in both train and val.</p>")
    out += audit_html(config)
    return out


def audit_html(config: dict) -> str:
    from cxrlab.data.audit import summarize
    from cxrlab.data.sources import load_source

    try:
        source = load_source(Path(config["data"]), config.get("image_col"),
                             config.get("label_col"))
        s = summarize(source, group_regex=config.get("group_regex"),
                      val_fraction=config.get("val_fraction", 0.2), seed=config.get("seed", 0))
    except Exception as e:  # the report still stands without the audit
        return f'<p class="muted">Data audit unavailable: {esc(e)}</p>'
    extra = sum(len(d) - 1 for d in s.duplicate_sets)
    parts = [f"<p>Audit of <code>{esc(s.root)}</code> ({s.n_images} readable images): "
             f"<b>{len(s.duplicate_sets)}</b> set(s) of pixel-identical images "
             f"({extra} redundant copies), <b>{len(s.cross_split_duplicates)}</b> spanning "
             f"splits (leakage), <b>{len(s.cross_class_duplicates)}</b> with conflicting labels, "
             f"<b>{len(s.unreadable)}</b> unreadable file(s).</p>"]
    if s.sizes:
        w, h = s.sizes["width"], s.sizes["height"]
        parts.append(f"<p>Image sizes: width {w['min']}–{w['max']} (median {w['median']:g}), "
                     f"height {h['min']}–{h['max']} (median {h['median']:g}); modes "
                     f"{esc(s.sizes['modes'])}.</p>")
    shown = (s.cross_split_duplicates + s.cross_class_duplicates)[:5] or s.duplicate_sets[:5]
    if shown:
        parts.append("<p>Examples:</p><ul>" + "".join(
            f"<li>{esc(' = '.join(d))}</li>" for d in shown) + "</ul>")
    return "".join(parts)


def config_section(config: dict, extra: str = "") -> str:
    return extra + f"<pre>{esc(yaml.safe_dump(config, sort_keys=False))}</pre>"


def last_epochs_spread(history: list[dict], key: str, k: int = LAST_EPOCHS):
    vals = [r.get(key) for r in history[-k:] if r.get(key) is not None]
    if not vals:
        return None, None, 0
    a = np.array(vals, dtype=float)
    return (float(a.std(ddof=1)) if len(a) > 1 else None), float(a.max() - a.min()), len(a)


# ---------------------------------------------------------------------------------------
# the run page


def run_page(run_dir: Path) -> str:
    from cxrlab.reporting import plots

    r = load_run_data(run_dir)
    m = r.metrics
    title = f"Run report: {run_dir.resolve().name}"
    sub = (f"{r.config.get('model')} at {r.config.get('image_size')} px on "
           f"{r.config.get('data')}; {len(r.classes)} classes: {', '.join(r.classes)}")
    ci, method = val_intervals(r)
    headline = (f"<p>Validation ({m.get('n')} images): ROC AUC <b>{fmt(m.get('roc_auc'))}</b> "
                f"[{fmt_ci(ci.get('roc_auc'))}], accuracy "
                f"<b>{fmt(m.get('accuracy'))}</b>, recall {fmt(m.get('recall'))}, specificity "
                f"{fmt(m.get('specificity'))}; {m.get('epochs')} epochs in "
                f"{fmt(m.get('train_seconds'), 0)} s. 95% interval: {esc(method)}. "
                f"Optimistic: {esc(selection_note(r))}.</p>")
    ens = r.info.get("ensemble")
    if ens:  # training/ensemble.py: the run averages these runs' probabilities
        headline += (f"<p>An ensemble ({esc(ens['kind'])}): the mean probability of "
                     f"{len(ens['members'])} runs, {esc(', '.join(ens['members']))}; epochs "
                     "and seconds above: its longest member's epochs, all members' time.</p>")
    test_file = run_dir / "metrics_test.json"
    if test_file.is_file():
        t = json.loads(test_file.read_text())
        headline += (f"<p>Test ({t.get('n')} images): ROC AUC <b>{fmt(t.get('roc_auc'))}</b>, "
                     f"accuracy <b>{fmt(t.get('accuracy'))}</b>.</p>")
    sections = [
        ("summary", "Summary", headline),
        ("data", "Data", data_section(r.split_rows, r.config)),
        ("configuration", "Configuration", config_section(r.config)),
        ("learning-curves", "Learning curves",
         img(figure_png(plots.plot_history, r.history), "learning curves")
         if r.history else '<p class="muted">No history.csv.</p>'),
        ("convergence", "Convergence", convergence_run(r.history)),
        ("confusion-matrix", "Confusion matrix",
         img(figure_png(plots.plot_confusion, np.array(m["confusion_matrix"]), r.classes,
                        title="Validation confusion matrix"), "confusion matrix")
         + (f"<p>At threshold {r.threshold:.4g} on the {r.classes[r.positive]} probability."
            "</p>" if r.threshold is not None and r.positive is not None else "")),
        ("roc-pr", "ROC and precision-recall curves",
         '<div class="figs">'
         + img(figure_png(plots.plot_roc, r.val_y, r.val_probs, r.classes,
                          positive=r.positive, threshold=r.threshold), "ROC curve")
         + img(figure_png(plots.plot_pr, r.val_y, r.val_probs, r.classes,
                          positive=r.positive), "precision-recall curve") + "</div>"),
        ("calibration", "Calibration", calibration_html(r)),
        ("metrics", "Metrics", metrics_html(r)),
        ("gallery", "Validation predictions", gallery_html(r)),
    ]
    sections += shift_sections(r)
    return page(title, sub, sections)


def _site_map_html(cal: dict) -> str:
    """The refit of a site calibration with its patient-bootstrap intervals (runs calibrated
    before they were recorded: nothing)."""
    if "a_ci" not in cal:
        return ""
    target = cal.get("target_sensitivity")
    return (f"<p>Map ({esc(cal.get('method'))}): p = sigmoid(a z + b), a = {fmt(cal['a'])} "
            f"[{fmt_ci(cal['a_ci'])}], b = {fmt(cal['b'])} [{fmt_ci(cal.get('b_ci'))}]; "
            f"threshold rule {esc(cal.get('threshold_rule'))}"
            + (f", sensitivity {fmt(target)} ({esc(cal.get('target_sensitivity_from'))})"
               if target is not None else "") + ".</p>")


def shift_sections(r: RunData) -> list[tuple[str, str, str]]:
    """Present only for runs that have them: where a site calibration came from (run.json)
    and the stress test (RUN/shift.json, from `evaluate --shift`)."""
    from cxrlab.reporting import plots
    from cxrlab.run import read_shift

    out = []
    cal = r.info.get("site_calibration")
    if cal:
        counts = ", ".join(f"{k}: {v}" for k, v in (cal.get("n_per_class") or {}).items())
        out.append(("site-calibration", "Site calibration", (
            f"<p>Threshold and probabilities refitted on <code>{esc(cal.get('data'))}</code> "
            f"({esc(counts)}) on {esc(cal.get('date'))}, from run "
            f"<code>{esc(cal.get('calibrated_from'))}</code>: threshold "
            f"{fmt(cal.get('threshold'), 4)} [{fmt_ci(cal.get('threshold_ci'))}] (the "
            f"original threshold on the new scale: {fmt(cal.get('original_threshold_rescaled'), 4)}"
            "). The validation figures above are the original validation images scored by the "
            "calibrated model.</p>" + _site_map_html(cal))))
    ada = r.info.get("site_adaptation")
    if ada:
        out.append(("site-adaptation", "Adapted to an intake without labels",
                    _adaptation_html(ada)))
    stress = read_shift(r.run_dir)
    if stress:
        b = stress["baseline"]
        rows = [["none", "0", "", fmt(b.get("roc_auc")), fmt(b.get("sensitivity")),
                 fmt(b.get("specificity"))]]
        rows += [[esc(x["shift"]), str(x["severity"]), esc(f"{x['level']:g} {x['unit']}"),
                  fmt(x.get("roc_auc")), fmt(x.get("sensitivity")), fmt(x.get("specificity"))]
                 for x in stress["rows"]]
        out.append(("shift", "Stress test: synthetic intake shifts", (
            f"<p>{stress['n']} images of <code>{esc(stress.get('data', ''))}</code> under "
            "graded synthetic shifts, at the run's threshold (<code>cxrlab evaluate "
            "--shift</code>)."
            + (f" {stress['training_left_out']} images the run trained on were left out."
               if stress.get("training_left_out") else "")
            + (f" Optimistic: {esc(stress['selection_biased'])}."
               if stress.get("selection_biased") else "") + "</p>"
            + img(figure_png(plots.plot_shift, stress), "stress test")
            + table(["shift", "severity", "level", "ROC AUC", "sensitivity", "specificity"],
                    rows))))
    return out


def convergence_run(history: list[dict]) -> str:
    if not history:
        return '<p class="muted">No history.csv.</p>'
    rows = []
    for key, label in (("val_loss", "validation loss"), ("val_auc", "validation ROC AUC"),
                       ("val_acc", "validation accuracy")):
        std, rng, k = last_epochs_spread(history, key)
        if k:
            rows.append([label, str(k), fmt(std, 4), fmt(rng, 4),
                         fmt(history[-1].get(key), 4)])
    best = min((h for h in history if h.get("val_loss") is not None),
               key=lambda h: h["val_loss"], default=None)
    note = ""
    if best is not None:
        ep, n = int(best["epoch"]), int(history[-1]["epoch"])
        note = (f"<p>Best validation loss at epoch {ep} of {n}"
                + (" (the last epoch: training may not have finished improving)." if ep == n
                   else ".") + "</p>")
    return (f"<p>Spread over the last {LAST_EPOCHS} epochs: a run that settled moves little; "
            "a large range means the chosen epoch is partly luck.</p>"
            + table(["metric", "epochs", "std", "range (max − min)", "last"], rows) + note)


def _adaptation_html(a: dict) -> str:
    """What `cxrlab adapt` changed (run.json site_adaptation), as it said on the console."""
    done = []
    if a.get("batchnorm"):
        b = a["batchnorm"]
        done.append(f"BatchNorm statistics of {b.get('layers')} layers re-estimated on them "
                    f"(intake weight {fmt(b.get('intake_weight'), 2)}, a prior of "
                    f"{esc(b.get('prior_images'))} source images)")
    if a.get("prevalence"):
        p = a["prevalence"]
        done.append(f"prevalence of {esc(p.get('positive_class'))} estimated at "
                    f"{fmt(p.get('estimated'), 3)} (validation {fmt(p.get('validation'), 3)}), "
                    f"threshold {fmt(p.get('threshold_before'), 4)} &rarr; "
                    f"{fmt(p.get('threshold_after'), 4)}")
    moved = "; ".join(f"{esc(k)}: {v}" for k, v in (a.get("decisions_moved") or {}).items())
    return (f"<p>Adapted on {a.get('n_images')} unlabelled images of "
            f"<code>{esc(a.get('data'))}</code> on {esc(a.get('date'))}, from run "
            f"<code>{esc(a.get('adapted_from'))}</code>: {'; '.join(done) or 'nothing'}. "
            f"Decisions on those images that moved: {a.get('n_moved')} ({moved or 'none'}). "
            "Figures on the images it adapted to are not held-out evidence: score it on "
            "labelled films of the intake it was not adapted on.</p>")


def calibration_html(r: RunData) -> str:
    from cxrlab.evaluation.calibration import reliability

    cal = reliability(r.val_y, r.val_probs, r.positive)
    return (img(reliability_png(cal), "reliability diagram")
            + f"<p>Expected calibration error (ECE, 10 equal-width bins of the {cal['kind']}): "
              f"<b>{fmt(cal['ece'])}</b>; largest bin gap (MCE) {fmt(cal['mce'])}. "
              "0 means predicted probabilities match observed frequencies; class weights and "
              "augmentation usually make a model over- or under-confident.</p>")


def reliability_png(cal: dict) -> bytes:
    from cxrlab.reporting.plots import _figure

    fig = _figure((9, 4.2))
    ax, hx = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    pts = [(c, o) for c, o in zip(cal["confidence"], cal["observed"], strict=True)
           if c is not None]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-", color="tab:orange", label=f"model (ECE {cal['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"mean predicted ({cal['kind']})")
    ax.set_ylabel("observed frequency" if "positive" in cal["kind"] else "observed accuracy")
    ax.set_title("Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    edges = np.array(cal["edges"])
    hx.bar(edges[:-1], cal["count"], width=np.diff(edges), align="edge", color="tab:blue",
           edgecolor="white")
    hx.set_xlabel(cal["kind"])
    hx.set_ylabel("images")
    hx.set_title("How many predictions per bin")
    return fig_to_png(fig)


def val_patients(r: RunData) -> list[str] | None:
    """Patient key per validation image from split.csv; None when the split found none."""
    from cxrlab.run import patients_of

    return patients_of(r.split_rows, r.val_paths)


def val_intervals(r: RunData) -> tuple[dict, str]:
    """metrics.json's intervals and how they were drawn; a run written before metrics.json
    said so (image bootstrap) gets them recomputed here over patients where split.csv has them."""
    m = r.metrics
    if m.get("interval_method") or not val_patients(r):
        return m.get("ci") or {}, m.get("interval_method") or "image bootstrap"
    from cxrlab.evaluation.metrics import compute_metrics

    again = compute_metrics(r.val_y, r.val_probs, r.classes, positive=r.positive,
                            threshold=r.threshold, seed=int(r.config.get("seed", 0)),
                            groups=val_patients(r))
    return again["ci"], again["interval_method"] + ", recomputed for this report"


def selection_note(r: RunData) -> str:
    return r.metrics.get("selection_biased") or (
        "the threshold and the epoch were chosen on these images" if r.positive is not None
        else "the epoch was chosen on these images")


def metrics_html(r: RunData) -> str:
    from cxrlab.evaluation.metrics import METRIC_KEYS, compute_metrics

    m = r.metrics
    seed = int(r.config.get("seed", 0))
    ci, method = val_intervals(r)
    if r.positive is not None:
        at05 = compute_metrics(r.val_y, r.val_probs, r.classes, positive=r.positive,
                               threshold=0.5, seed=seed, groups=val_patients(r))
        t = r.threshold
        header = ["metric", f"at threshold {t:.4g}" if t is not None else "at threshold",
                  "95% CI", "at 0.5", "95% CI"]
        rows = [[k, fmt(m.get(k)), fmt_ci(ci.get(k)), fmt(at05.get(k)),
                 fmt_ci((at05.get("ci") or {}).get(k))] for k in METRIC_KEYS]
        note = (f"<p>Selection-biased: {esc(selection_note(r))} (the threshold by the "
                f"{esc(r.config.get('threshold_rule'))} rule, the epoch by the lowest validation "
                "loss), so validation numbers are optimistic; 0.5 is shown for comparison. "
                f"Intervals: 95% percentile {esc(method)} over the {m.get('n')} validation "
                "images (threshold fixed).</p>")
        note += threshold_stability_html(m.get("threshold_stability"))
    else:
        header = ["metric (macro over classes)", "value", "95% CI"]
        rows = [[k, fmt(m.get(k)), fmt_ci(ci.get(k))] for k in METRIC_KEYS]
        note = (f"<p>Argmax decisions; selection-biased: {esc(selection_note(r))}. "
                f"Intervals: 95% percentile {esc(method)} over the validation images.</p>")
    tta = r.config.get("tta") or "none"
    if tta != "none":  # the scores above are the views' mean (cxrlab.models.tta)
        note += (f"<p>Scored with test-time augmentation <code>{esc(tta)}</code>: each image "
                 "and its mirror, their probabilities averaged (two passes per image); the "
                 "threshold was chosen on those scores.</p>")
    out = table(header, rows) + note
    if m.get("per_class"):
        keys = ["precision", "recall", "specificity", "f1", "roc_auc", "support"]
        out += table(["class", *keys], [[esc(c), *[fmt(v[k]) if k != "support" else str(v[k])
                                                   for k in keys]]
                                        for c, v in m["per_class"].items()])
    return out


def threshold_stability_html(st: dict | None) -> str:
    """How far a resample of the validation patients moves the threshold, and what that does
    (metrics.json's threshold_stability, cxrlab.evaluation.operating_point); "" before it."""
    from cxrlab.evaluation.operating_point import rate

    if not st:
        return ""
    (lo, hi), a, b = st["interval"], st["at_low"], st["at_high"]
    flag = ("<strong>Unstable</strong>: expect a new intake's decisions to move as much "
            "(more validation data, <code>cxrlab calibrate</code> or <code>--folds</code> "
            "pin it better). " if st.get("unstable") else "")
    return (f"<p>Threshold stability: re-chosen on resampled validation patients, the "
            f"{esc(st['rule'])} threshold falls within {lo:.3g} – {hi:.3g} (95%, "
            f"{esc(st['interval_method'])}); at those ends validation sensitivity is "
            f"{rate(a['sensitivity'])} / {rate(b['sensitivity'])} and specificity "
            f"{rate(a['specificity'])} / {rate(b['specificity'])}, "
            f"{st['change_points']:.1f} points apart. {flag}Criterion: {esc(st['criterion'])}.</p>")


def gallery_html(r: RunData) -> str:
    """Wrong predictions first (most confident first), then the least confident right ones."""
    from cxrlab.data.cache import load_images
    from cxrlab.deploy.inference import decide

    if not len(r.val_y):
        return '<p class="muted">No validation images.</p>'
    pred = decide(r.val_probs, r.positive, r.threshold)
    conf = r.val_probs[np.arange(len(pred)), pred]
    if r.positive is not None:
        t = 0.5 if r.threshold is None else r.threshold
        margin = np.abs(r.val_probs[:, r.positive] - t)
    else:
        top2 = np.sort(r.val_probs, 1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    wrong = pred != r.val_y
    order = [*sorted(np.flatnonzero(wrong), key=lambda i: -margin[i]),
             *sorted(np.flatnonzero(~wrong), key=lambda i: margin[i])][:GALLERY_SIZE]
    size = int(r.config.get("image_size", 128))
    chans = int(r.info.get("in_chans", 1))
    try:
        from cxrlab.data.images import BitDepth

        depth = BitDepth(r.config.get("bit_depth"), r.info.get("data_bit_depth"))
        images, bad = load_images([Path(r.val_paths[i]) for i in order], size, chans,
                                  skip_bad=True, bit_depth=depth)
    except Exception as e:
        return f'<p class="muted">Images unavailable: {esc(e)}</p>'
    bad_paths = {str(p) for p, _ in bad}
    order = [i for i in order if r.val_paths[i] not in bad_paths]
    heat, how = cam_heatmaps(r.run_dir, images)
    tiles = []
    for j, i in enumerate(order):
        png = tile_png(images[j], None if heat is None else heat[j])
        cls = "tile wrong" if wrong[i] else "tile"
        tiles.append(f'<div class="{cls}">{img(png, Path(r.val_paths[i]).name)}<br>'
                     f"pred <b>{esc(r.classes[pred[i]])}</b> ({conf[i]:.2f})<br>"
                     f"true {esc(r.classes[r.val_y[i]])}<br>"
                     f'<span class="muted">{esc(Path(r.val_paths[i]).name)}</span></div>')
    return (f"<p>{int(wrong.sum())} of {len(wrong)} validation images are wrong at the run's "
            f"threshold. Shown: the wrong ones (framed red, most confident first), then the "
            f"least confident right ones. {esc(how)}</p>"
            f'<div class="gallery">{"".join(tiles)}</div>')


def cam_heatmaps(run_dir: Path, images: np.ndarray):
    """Grad-CAM maps from `cxrlab.deploy.cam` when that module exists; plain images otherwise."""
    try:
        from cxrlab.deploy.cam import gradcam
    except ImportError:
        return None, "Plain images (Grad-CAM not available in this version)."
    try:
        import torch

        from cxrlab.run import load_run

        run = load_run(run_dir)
        batch = np.ascontiguousarray(images)
        try:
            maps = gradcam(run.model, batch, positive=run.info.positive)
        except (TypeError, AttributeError):  # an implementation that wants a tensor
            maps = gradcam(run.model, torch.as_tensor(batch), positive=run.info.positive)
        maps = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps,
                          dtype=np.float32)
        pos = run.info.positive
        what = "the predicted class" if pos is None else f"class {run.info.classes[pos]}"
        return maps, f"Overlay: Grad-CAM heat map of the evidence for {what} (red = most)."
    except Exception as e:
        log.warning("Grad-CAM failed: %s", e)
        return None, f"Plain images (Grad-CAM failed: {e})."


def tile_png(image: np.ndarray, heat: np.ndarray | None) -> bytes:
    from matplotlib import colormaps
    from PIL import Image

    a = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    rgb = np.stack([a] * 3, -1) if a.ndim == 2 else a
    rgb = rgb.astype(np.float32)
    if heat is not None:
        h = np.asarray(heat, dtype=np.float32)
        if h.shape != rgb.shape[:2]:
            h = np.asarray(Image.fromarray(h).resize(rgb.shape[1::-1], Image.BILINEAR))
        colour = colormaps["jet"](np.clip(h, 0, 1))[..., :3] * 255
        rgb = 0.6 * rgb + 0.4 * colour
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# the ablation page


def ablation_page(out: Path) -> str:
    from cxrlab.evaluation.ablation import load_result

    res = load_result(out)
    spec = yaml.safe_load((out / "ablation.yaml").read_text())
    title = f"Ablation report: {res.get('name') or out.resolve().name}"
    sub = (f"{res['design']} design, factors {', '.join(res['factors'])}; "
           f"{res['complete']} of {res['planned']} runs complete; seeds {res['seeds']}")
    first = next((out / "runs" / r["name"] for r in res["runs"]), None)
    if first is not None:
        from cxrlab.run import read_split_csv

        cfg = yaml.safe_load((first / "config.yaml").read_text())
        data = ("<p>The split of the first run (each seed draws its own patient-grouped "
                "validation split; variants with the same seed share it).</p>"
                + data_section(read_split_csv(first / "split.csv"), cfg))
    else:
        data = '<p class="muted">No complete run yet.</p>'
    main = [e for e in res["effects"] if not e["context"]]
    summary = ("<p>" + (res.get("description") and esc(res["description"]) + "</p><p>" or "")
               + "Effects against the reference level, paired by seed; 'better' or 'worse' "
               "only when the 95% interval excludes zero:</p><ul>"
               + "".join(f'<li class="{esc(e["verdict"])}">{esc(e["sentence"])}</li>'
                         for e in main if e["metric"] == "roc_auc")
               + "</ul>")
    if res["missing"]:
        summary += (f'<p class="worse">{len(res["missing"])} planned run(s) are not complete: '
                    f"{esc(', '.join(res['missing'][:6]))}"
                    + ("…" if len(res["missing"]) > 6 else "") + "</p>")
    sections = [
        ("summary", "Summary", summary),
        ("ablation-table", "Variants", variants_html(res)),
        ("effects", "Effects", effects_html(res)),
        ("seed-curves", "Learning curves, all seeds", seed_curves_html(out, res)),
        ("convergence", "Convergence", convergence_ablation(out, res)),
        ("runs", "Every run", runs_html(res)),
        ("data", "Data", data),
        ("configuration", "Configuration", config_section(spec)),
    ]
    return page(title, sub, sections)


def _est_cell(e: dict, scale: float = 1.0, digits: int = 3) -> str:
    from cxrlab.evaluation.ablation import _cell

    return _cell(e, scale, digits, sep="<br>", ci='<span class="muted">[{}]</span>')


def variants_html(res: dict) -> str:
    from cxrlab.evaluation.ablation import METRICS

    splits = ["val", "test"] if any(r.get("test") for r in res["runs"]) else ["val"]
    header = ["variant", "seeds", *[(lab if s == "val" else f"test {lab}")
                                    for s in splits for _, lab in METRICS],
              "best epoch", "epochs run", "train s"]
    rows = [[esc(v["variant"]), str(v["n"]),
             *[_est_cell(v[f"{s}_{k}"]) for s in splits for k, _ in METRICS],
             _est_cell(v["best_epoch"], digits=1), _est_cell(v["epochs_run"], digits=1),
             _est_cell(v["train_seconds"], digits=0)] for v in res["variants"]]
    return ("<p>Mean ± standard deviation over seeds, 95% Student-t interval below. Validation "
            "metrics at each run's own threshold.</p>" + table(header, rows))


def effects_html(res: dict) -> str:
    rows = [[esc(e["factor"]), esc(e["level"]), esc(e["reference"]), esc(e["context"] or "main"),
             esc(("test " if e["split"] == "test" else "") + e["metric"]), str(e["n"]),
             _est_cell({k: e[k] for k in ("mean", "std", "ci_low", "ci_high")}, 100, 1),
             f'<span class="{esc(e["verdict"])}">{esc(e["verdict"])}</span>']
            for e in res["effects"]]
    plot = img(effects_png(res), "effects with 95% intervals") if res["effects"] else ""
    return (plot + "<p>Paired difference (level − reference) in percentage points, mean ± std "
            "over seeds with its 95% t-interval. 'main' averages over the other factors' "
            "levels within each seed.</p>"
            + table(["factor", "level", "vs", "at", "metric", "seeds", "difference (pts)",
                     "verdict"], rows))


def effects_png(res: dict) -> bytes:
    from cxrlab.evaluation.ablation import METRICS
    from cxrlab.reporting.plots import _figure

    main = [e for e in res["effects"] if not e["context"] and e["split"] == "val"]
    labels = list(dict.fromkeys(f"{e['factor']} {e['level']} vs {e['reference']}"
                                for e in main))
    fig = _figure((3.2 * len(METRICS), 0.6 * len(labels) + 1.6))
    axes = np.atleast_1d(fig.subplots(1, len(METRICS), sharey=True))
    for ax, (key, lab) in zip(axes, METRICS, strict=True):
        for i, name in enumerate(labels):
            e = next((e for e in main if e["metric"] == key
                      and f"{e['factor']} {e['level']} vs {e['reference']}" == name), None)
            if e is None or e["mean"] is None:
                continue
            colour = {"better": "tab:green", "worse": "tab:red"}.get(e["verdict"], "tab:grey")
            if e["ci_low"] is not None:
                ax.errorbar(100 * e["mean"], i,
                            xerr=[[100 * (e["mean"] - e["ci_low"])],
                                  [100 * (e["ci_high"] - e["mean"])]],
                            fmt="o", color=colour, capsize=4)
            else:
                ax.plot(100 * e["mean"], i, "o", color=colour, mfc="none")
            for d in (e.get("per_seed") or {}).values():
                ax.plot(100 * d, i + 0.18, "x", color="black", markersize=4, alpha=0.6)
        ax.axvline(0, color="black", linewidth=1)
        ax.set_title(f"{lab} (pts)")
        ax.grid(alpha=0.3, axis="x")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        ax.invert_yaxis()
    fig.suptitle("Effect vs reference: mean, 95% interval (x = single seeds)")
    return fig_to_png(fig)


def seed_curves_html(out: Path, res: dict) -> str:
    from cxrlab.run import read_history

    curves = {}
    for r in res["runs"]:
        h = read_history(out / "runs" / r["name"] / "history.csv")
        if h:
            curves.setdefault(r["variant"], []).append((r["seed"], h))
    if not curves:
        return '<p class="muted">No learning curves yet.</p>'
    return ("<p>Each line is one seed. Seeds that agree make a trustworthy variant; seeds "
            "that fan out mean single-run comparisons are noise.</p>"
            + img(seed_curves_png(curves), "learning curves of all seeds"))


def seed_curves_png(curves: dict[str, list[tuple[int, list[dict]]]]) -> bytes:
    from cxrlab.reporting.plots import _figure

    keys = (("val_loss", "validation loss"), ("val_auc", "validation ROC AUC"),
            ("val_acc", "validation accuracy"))
    n = len(curves)
    fig = _figure((12, 2.6 * n + 0.6))
    axes = np.atleast_2d(fig.subplots(n, len(keys), squeeze=False))
    for row, (variant, runs) in zip(axes, curves.items(), strict=True):
        for ax, (key, label) in zip(row, keys, strict=True):
            for seed, h in runs:
                pts = [(r["epoch"], r.get(key)) for r in h if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", markersize=3,
                            label=f"seed {seed}")
            ax.set_title(f"{variant}: {label}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    return fig_to_png(fig)


def convergence_ablation(out: Path, res: dict) -> str:
    from cxrlab.run import read_history

    rows = []
    for v in res["variants"]:
        mine = [r for r in res["runs"] if r["variant"] == v["variant"]]
        within = []
        for r in mine:
            _, rng, k = last_epochs_spread(read_history(out / "runs" / r["name"] /
                                                        "history.csv"), "val_auc")
            if k:
                within.append(rng)
        final = [r["val"].get("roc_auc") for r in mine if r["val"].get("roc_auc") is not None]
        across_std = float(np.std(final, ddof=1)) if len(final) > 1 else None
        across_rng = float(max(final) - min(final)) if len(final) > 1 else None
        rows.append([esc(v["variant"]), str(len(mine)),
                     fmt(float(np.mean(within)) if within else None, 4),
                     fmt(float(np.max(within)) if within else None, 4),
                     fmt(across_std, 4), fmt(across_rng, 4)])
    return ("<p>Within a run: the range of validation ROC AUC over its "
            f"last {LAST_EPOCHS} epochs, mean and worst over seeds. Across seeds: the spread of "
            "the final validation ROC AUC. A factor's effect smaller than these is not "
            "distinguishable from run-to-run noise.</p>"
            + table(["variant", "seeds", "last-epochs range (mean)", "last-epochs range (max)",
                     "across seeds std", "across seeds range"], rows))


def runs_html(res: dict) -> str:
    rows = []
    for r in res["runs"]:
        v = r["val"]
        t = r.get("test") or {}
        rows.append([esc(r["name"]), str(r["seed"]), fmt(v.get("roc_auc")),
                     fmt(v.get("accuracy")), fmt(v.get("recall")), fmt(v.get("specificity")),
                     fmt(t.get("roc_auc")), str(r.get("best_epoch")), str(r.get("epochs_run")),
                     fmt(r.get("train_seconds"), 0)])
    return table(["run", "seed", "AUC", "accuracy", "recall", "specificity", "test AUC",
                  "best epoch", "epochs", "train s"], rows)
