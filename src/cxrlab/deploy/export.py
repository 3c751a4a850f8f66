"""Export a run to ONNX, and run it with ONNX Runtime.

The exported graph takes what the cache stores and returns what `predict` reports:

    input  "image": uint8 (N, in_chans, S, S), pixel values 0..255, the image resized to S x S
           (aspect not kept, bilinear with antialiasing, as `cxrlab.data.images.read_image`
           does), grey X-rays as 1 channel (ITU-R 601 luminance), colour as RGB;
    output "probabilities": float32 (N, K), one column per class in `classes` order.

Scaling to [0, 1], the run's normalisation and the sigmoid/softmax are inside the graph, so a
caller only decodes and resizes. The model's metadata_props say the rest (JSON where a value
is a list): classes, positive_class, threshold, image_size, in_chans, input_spec,
preprocessing, model, cxrlab_version, run, weights_sha256 (which weights the graph holds: a run
refuses a file whose weights or threshold are not its own), tta (the test-time augmentation
whose views the graph averages, cxrlab.models.tta). The legacy TorchScript exporter is
used (`dynamo=False`): the dynamo one needs onnxscript, a large extra dependency, and gives
the same graph for these plain CNNs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrlab._version import __version__
from cxrlab.cpu import cpu_has_vnni
from cxrlab.deploy.inference import predict_probs
from cxrlab.errors import CxrlabError
from cxrlab.models.tta import without_tta
from cxrlab.run import LoadedRun, load_run

# Imported inside the functions that need them: onnx, onnxruntime (heavy or
# optional; importing them here would slow every command that imports this module).

log = logging.getLogger("cxrlab")

OPSET = 17
INPUT_SPEC = ("uint8 (N, in_chans, S, S), values 0..255; S = image_size; "
              "the graph scales to [0, 1] and normalises itself")
PREPROCESSING = ("decode (JPEG/PNG/DICOM) -> 1 channel luminance (in_chans 1) or RGB (3) -> "
                 "resize to image_size x image_size, aspect not kept, bilinear, antialiased "
                 "-> uint8 CHW")


class ProbabilityModel(nn.Module):
    """uint8 images in, class probabilities out: everything between is part of the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model(image.float() / 255.0).float()
        if logits.shape[1] == 1:  # same columns as cxrlab.deploy.inference.probabilities
            p = torch.sigmoid(logits)
            return torch.cat([1 - p, p], dim=1)
        return torch.softmax(logits, dim=1)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict, keys sorted (name, dtype, shape, bytes; floating tensors as
    float32, as the graph holds them): the weights themselves, however model.pt was saved, and
    whatever test-time augmentation wraps them (metadata `tta` says that)."""
    h = hashlib.sha256()
    for name, t in sorted(without_tta(model).state_dict().items()):
        t = t.detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def run_metadata(run: LoadedRun) -> dict[str, str]:
    pos = run.info.positive
    return {
        "classes": json.dumps(run.classes),
        "positive_class": "" if pos is None else run.classes[pos],
        "threshold": "" if run.threshold is None else repr(float(run.threshold)),
        "image_size": str(run.config.image_size),
        "in_chans": str(run.info.in_chans),
        "input_spec": INPUT_SPEC,
        "preprocessing": PREPROCESSING,
        "model": run.config.model,
        "cxrlab_version": __version__,
        "run": str(Path(run.run_dir).resolve().name),
        "weights_sha256": weights_sha256(run.model),
        "tta": run.tta,
    }


def check_out(out: Path, overwrite: bool = False) -> Path:
    """Refuse an ONNX destination that is a folder, exists, or has no folder to go in."""
    out = Path(out)
    if out.is_dir():
        raise CxrlabError(f"--onnx {out}: is a folder; give a file name (model.onnx)")
    if out.exists() and not overwrite:
        raise CxrlabError(f"--onnx {out}: file exists (choose a new name)")
    if not out.parent.is_dir():
        raise CxrlabError(f"--onnx {out}: folder {out.parent} does not exist")
    return out


def fp32_graph(run: LoadedRun):
    """The run's fp32 ONNX graph (an onnx.ModelProto), its metadata set."""
    import onnx

    wrapped = ProbabilityModel(run.model.float()).eval()
    wrapped = wrapped.to(memory_format=torch.contiguous_format)
    s, c = run.config.image_size, run.info.in_chans
    example = torch.zeros(1, c, s, s, dtype=torch.uint8)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about shape checks
            torch.onnx.export(wrapped, (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["probabilities"],
                              dynamic_axes={"image": {0: "batch"},
                                            "probabilities": {0: "batch"}})
    finally:
        run.model.eval()
    proto = onnx.load_from_string(buf.getvalue())
    set_metadata(proto, run_metadata(run) | {"precision": "fp32"})
    return proto


def set_metadata(proto, meta: dict[str, str]) -> None:
    import onnx

    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"cxrlab {meta['model']}: {', '.join(json.loads(meta['classes']))}"


def save_onnx(proto, out: Path) -> Path:
    """Check the graph and write it in one rename: no half-written file at `out`, ever."""
    import onnx

    onnx.checker.check_model(proto)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def export_onnx(run: LoadedRun | Path, out: Path, overwrite: bool = False) -> Path:
    """Write the run as one fp32 ONNX file (weights inside), checked with onnx.checker."""
    out = check_out(out, overwrite)
    if not isinstance(run, LoadedRun):
        run = load_run(run)
    return save_onnx(fp32_graph(run), out)


class OnnxPredictor:
    """An ONNX Runtime session for an exported run: uint8 images -> probabilities."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CxrlabError(f"--onnx {path}: no such file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CxrlabError(f"--onnx {path}: not a loadable ONNX model ({reason})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in meta:
            raise CxrlabError(f"--onnx {path}: not exported by cxrlab (no classes metadata)")
        self.path = path
        self.metadata = dict(meta)
        self.classes: list[str] = json.loads(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.in_chans = int(meta["in_chans"])
        self.threshold = float(meta["threshold"]) if meta.get("threshold") else None
        pos = meta.get("positive_class") or None
        self.positive = None if pos is None else self.classes.index(pos)
        self.precision = meta.get("precision", "fp32")
        self.weights_sha256: str | None = meta.get("weights_sha256") or None
        self.tta = meta.get("tta", "none")  # files from before TTA: none
        self.int8_check = json.loads(meta["int8_check"]) if "int8_check" in meta else None
        if self.int8_check and self.int8_check.get("vnni") and not cpu_has_vnni():
            # Refused, not warned: on ONNX Runtime's AVX2 kernels such a file changed 8 of 128
            # validation decisions of the default recipe (benchmarks/int8_without_vnni.py)
            raise CxrlabError(f"--onnx {path}: int8 with 8-bit weights, for CPUs with VNNI; "
                              "this one has none, and here its products saturate and "
                              "decisions change: export it with --int8 --portable (7-bit, "
                              "the same scores on any CPU) or on this kind of machine")

    def check_matches(self, run: LoadedRun) -> None:
        """Refuse a file exported from another run: other classes or input, other weights
        (a calibrated copy of a run has the same shape), or another threshold. A file with no
        recorded hash cannot be told apart from another run's, so it is refused too."""
        ours = (self.classes, self.image_size, self.in_chans)
        theirs = (run.classes, run.config.image_size, run.info.in_chans)
        if ours != theirs:
            raise CxrlabError(f"--onnx {self.path}: exported for classes {self.classes} at "
                              f"{self.image_size} px x {self.in_chans} ch, the run has "
                              f"{run.classes} at {theirs[1]} px x {theirs[2]} ch")
        run_dir = Path(run.run_dir)
        again = f"export it again: cxrlab export {run_dir} --onnx NEW.onnx"
        if self.weights_sha256 is None:
            raise CxrlabError(f"--onnx {self.path}: records no hash of its weights (exported "
                              f"before cxrlab recorded one), so it cannot be checked against "
                              f"{run_dir / 'model.pt'}; {again}")
        digest = weights_sha256(run.model)
        if self.weights_sha256 != digest:
            raise CxrlabError(f"--onnx {self.path}: exported from other weights (run "
                              f"{self.metadata.get('run', '?')!r}, sha256 "
                              f"{self.weights_sha256[:12]}) than {run_dir / 'model.pt'} "
                              f"(sha256 {digest[:12]}); {again}")
        if self.threshold != run.threshold:
            raise CxrlabError(f"--onnx {self.path}: records threshold {self.threshold}, "
                              f"{run_dir / 'threshold'} says {run.threshold}; {again}")
        if self.tta != run.tta:
            raise CxrlabError(f"--onnx {self.path}: averages test-time augmentation "
                              f"{self.tta!r} in its graph, asked for {run.tta!r}; pass --tta "
                              f"{self.tta} or {again} --tta {run.tta}")

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return self.scores(self.session, images, batch_size)

    @staticmethod
    def scores(session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities (N, K) from a session of a cxrlab graph, `batch_size` images a run."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if len(images) == 0:
            k = session.get_outputs()[0].shape[1]
            return np.zeros((0, k), dtype=np.float32)
        out = [session.run(None, {"image": images[i : i + batch_size]})[0]
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32)


def make_predictor(run: LoadedRun, backend: str = "torch", onnx_file: Path | None = None):
    """A callable uint8 (N, C, S, S) -> probabilities (N, K) for the chosen backend.
    'onnx' exports the run to a temporary file unless one is given (checked against the run)."""
    if backend == "torch":
        return lambda images: predict_probs(run.model, images)
    if backend != "onnx":
        raise CxrlabError(f"--backend {backend}: choose torch or onnx")
    if onnx_file is None:
        with tempfile.TemporaryDirectory(prefix="cxrlab-onnx-") as d:
            predictor = OnnxPredictor(export_onnx(run, Path(d) / "model.onnx"))
    else:
        predictor = OnnxPredictor(onnx_file)
    predictor.check_matches(run)
    if predictor.int8_check:
        c = predictor.int8_check
        log.info("%s is int8: on the run's validation images it changed %d of %d decisions",
                 predictor.path.name, c["changed_decisions"], c["images"])
    return predictor
