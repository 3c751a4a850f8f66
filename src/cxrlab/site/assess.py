"""Assessing a run on a new intake's labelled data: its metrics (cxrlab.evaluation.scoring),
checked against the images it was trained on (cxrlab.site.intake), and, on request,
stress-tested under graded synthetic shifts (cxrlab.site.shift). `cxrlab evaluate` and
`Run.evaluate` are this."""

from __future__ import annotations

from pathlib import Path

from cxrlab.errors import CxrlabError
from cxrlab.evaluation.scoring import score_run
from cxrlab.site.intake import check_intake
from cxrlab.site.shift import stress_test


def evaluate_run(run_dir: Path, data: Path, image_col: str | None = None,
                 label_col: str | None = None, split: str | None = None,
                 positive: str | None = None, skip_bad: bool = False,
                 n_boot: int = 1000, shift: bool = False, onnx: Path | None = None,
                 allow_overlap: bool = False, tta: str | None = None) -> dict:
    """Metrics of a finished run on any labelled source, at the run's threshold.

    Also checks the images against the run's training intake (cxrlab.site.intake: warnings,
    and metrics["intake"]); `shift` adds the stress test (cxrlab.site.shift) as
    metrics["shift"]. `positive` may name the other class: the metrics are then about that
    class, with the same decisions (see `complement_threshold`); the stress test stays the
    run's own. `onnx`: score with that file from `cxrlab export` (an int8 one on a held-out
    set, say) instead of the run's fp32 model; metrics["onnx"] names it. DATA holding the
    run's training images is refused unless `allow_overlap` (cxrlab.evaluation.scoring).
    `tta`: test-time augmentation, None = the run's own (cxrlab.models.tta).
    """
    if onnx is not None and shift:
        raise CxrlabError("--shift with --onnx: the stress test (RUN/shift.json) is the run's "
                          "own, in fp32; run it without --onnx")
    s = score_run(run_dir, data, image_col, label_col, split, positive, skip_bad, n_boot, onnx,
                  allow_overlap, tta=tta)
    run, metrics = s.run, s.metrics
    metrics["intake"] = check_intake(run, [r.path for r in s.records], s.images, s.probs,
                                     s.positive)
    if shift:
        metrics["shift"] = stress_test(s.predict, s.images, s.y, run.info.positive,
                                       run.threshold, seed=run.config.seed)
        metrics["shift"]["data"] = str(data)
        metrics["shift"]["tta"] = run.tta
        metrics["shift"]["training_left_out"] = s.left_out
        if s.selection_biased:
            metrics["shift"]["selection_biased"] = s.selection_biased
    return metrics
