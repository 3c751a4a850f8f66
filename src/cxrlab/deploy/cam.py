"""Grad-CAM: where in the X-ray the model looked for its answer.

MONAI's `GradCAM` does the work (hooks on the layer, gradient-weighted activations, ReLU,
upsampling). Three things about it shape this module:
- it registers its hooks for good (no handle to remove them) and turns off `inplace` on the
  hooked module, so it runs on a private copy of the model, never on the caller's;
- with a batch and no class index it sums the scores of every image's own class, mixing the
  classes of a mixed batch, so images are explained in groups of one target class;
- its default normaliser maps (min, max) to (1, 0) (reversed), so we pass our own: each map
  divided by its maximum (0 stays "no evidence", the peak is 1).
An ensemble (models/ensemble.py) is explained by the mean of its members' maps, each for the
class the ensemble decides (a layer named explicitly is explained through the ensemble).
A model with one logit (2 classes) is shown to MONAI as two scores [-logit, +logit]: index 1
is the evidence for class 1 (the logit always means class 1) and index 0 the evidence for
class 0. A binary model is explained for the run's positive class by default, whichever index
`--positive` gave it.
"""

from __future__ import annotations

import base64
import copy
import io
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cxrlab.data.images import read_image
from cxrlab.errors import CxrlabError
from cxrlab.models.tta import without_tta

# Imported inside the functions that need them: matplotlib, monai (heavy or
# optional; importing them here would slow every command that imports this module).

CHUNK = 16  # images per forward/backward pass: bounds the memory of the kept activations


class _Scores(nn.Module):
    """The model with one logit per class (two for a one-logit binary model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return torch.cat([-logits, logits], dim=1) if logits.shape[1] == 1 else logits


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    peak = maps.amax(dim=tuple(range(1, maps.ndim)), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


class GradCam:
    """Grad-CAM for one model and layer; build once, call many times (thread-safe: a lock)."""

    def __init__(self, model: nn.Module, layer: str | None = None, positive: int | None = None):
        with warnings.catch_warnings():
            # monai's first import pulls in tqdm.auto (through mlflow); in a notebook without
            # ipywidgets that advises installing them, noise beside a heatmap
            warnings.filterwarnings("ignore", message="IProgress not found")
            from monai.visualize import GradCAM

        model = without_tta(model)  # the model itself explains, on the image as given
        self._members = None
        if layer is None and hasattr(model, "members"):  # an ensemble: its members' mean map
            self._members = [GradCam(m, None, positive) for m in model.members]
            self.layer, self.binary = self._members[0].layer, model.num_classes == 1
            self.positive = 1 if positive is None else positive
            self._net = _Scores(copy.deepcopy(model).float().eval().requires_grad_(False))
            self._lock = threading.Lock()
            return
        layer = layer or getattr(model, "feature_layer", "") or ""
        if not layer:
            raise CxrlabError(f"--layer: {type(model).__name__} names no feature layer; "
                              f"give one (e.g. {layer_names(model)[-2]})")
        names = layer_names(model)
        if layer not in names:
            near = [n for n in names if "." not in n] or names
            raise CxrlabError(f"--layer {layer}: not a layer of this model (top-level layers: "
                              f"{', '.join(near)}; default {getattr(model, 'feature_layer', '')})")
        self.layer = layer
        self.binary = getattr(model, "num_classes", None) == 1
        self.positive = 1 if positive is None else positive
        net = copy.deepcopy(model).float().eval()
        net = net.to(memory_format=torch.contiguous_format)
        # Gradients flow to the input instead of the weights: no weight gradients to compute,
        # and the full backward hook sees a graph with inputs (no warning from torch).
        net.requires_grad_(False)
        self._net = _Scores(net)
        self._cam = GradCAM(self._net, target_layers=f"model.{layer}", postprocessing=_normalize)
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray | torch.Tensor,
                 target: int | None = None) -> np.ndarray:
        """uint8 (N, C, H, W) -> float32 (N, H, W) in [0, 1]; see `gradcam`."""
        x_all = torch.as_tensor(np.asarray(images))
        if x_all.ndim != 4:
            raise CxrlabError(f"gradcam: expected images (N, C, H, W), got shape "
                              f"{tuple(x_all.shape)}")
        n, _, h, w = x_all.shape
        out = np.zeros((n, h, w), dtype=np.float32)
        device = next(self._net.parameters()).device
        with self._lock, torch.enable_grad():
            for i in range(0, n, CHUNK):
                x = x_all[i : i + CHUNK].to(device).float().div(255.0).requires_grad_(True)
                targets = self._targets(x, target)
                for t in np.unique(targets):
                    idx = np.flatnonzero(targets == t)
                    maps = self._maps(x[idx], int(t))
                    out[i + idx] = maps[:, 0].detach().cpu().numpy()
        return out

    def _maps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Grad-CAM of class t; for an ensemble the mean of its members' maps (each peak 1),
        where each member looked for the class the ensemble decides."""
        if self._members is None:
            return self._cam(x, class_idx=t)
        maps = [m._cam(x.detach().requires_grad_(True), class_idx=t) for m in self._members]
        return _normalize(torch.stack(maps).mean(0))  # each member's own graph, freed after

    def _targets(self, x: torch.Tensor, target: int | None) -> np.ndarray:
        if target is not None:
            k = 2 if self.binary else self._net.model.num_classes
            if not 0 <= target < k:
                raise CxrlabError(f"gradcam: target {target} is not a class index (0..{k - 1})")
            return np.full(len(x), target)
        if self.binary:  # the evidence for the positive class, whatever the decision
            return np.full(len(x), self.positive)
        with torch.no_grad():
            return self._net(x).argmax(1).cpu().numpy()


def gradcam(model: nn.Module, images: np.ndarray, target: int | None = None,
            layer: str | None = None, positive: int | None = None) -> np.ndarray:
    """Grad-CAM heatmaps: uint8 images (N, C, H, W) as the cache stores them -> float32
    (N, H, W) in [0, 1] at the image size. `target` None = the predicted class (argmax; for a
    one-logit binary model the `positive` class, default 1); `layer` None = the model's last
    conv block (`feature_layer`, the module whose output `forward_features` returns)."""
    return GradCam(model, layer, positive)(images, target)


# ---------------------------------------------------------------------------------------
# pictures


def _display_rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise CxrlabError(f"overlay: expected a grey or RGB image, got shape {np.shape(image)}")
    return a.astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 (H, W, 3): the image (2-D, CHW or HWC) under the heatmap in the jet colours,
    the heatmap resized to the image. Where the map is near 0 the X-ray shows through."""
    from matplotlib import colormaps

    rgb = _display_rgb(image).astype(np.float32)
    h, w = rgb.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h),
                                                                 Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0, 1)
    colour = colormaps["jet"](heat)[..., :3].astype(np.float32) * 255
    a = alpha * np.sqrt(heat)[..., None]  # faint where there is little evidence
    return (rgb * (1 - a) + colour * a).round().clip(0, 255).astype(np.uint8)


def overlay_png_bytes(image: np.ndarray, heat: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(overlay(image, heat)).save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def save_cam_figure(path: Path, image: np.ndarray, heat: np.ndarray, title: str) -> Path:
    """A PNG of the overlay with the prediction as its title, beside a colour bar."""
    fig = cam_figure(image, heat, title)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    tmp.replace(path)
    return path


def cam_figure(image: np.ndarray, heat: np.ndarray, title: str):
    """The overlay with `title` beside a colour bar, as a matplotlib Figure (no pyplot)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    pic = overlay(image, heat)
    h, w = pic.shape[:2]
    fig = Figure(figsize=(5.2, 5.2 * h / w + 0.5), dpi=100)  # no pyplot: thread-safe
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(pic)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.colorbar(ScalarMappable(cmap=colormaps["jet"]), ax=ax, fraction=0.046, pad=0.02,
                 label="Grad-CAM (relative)")
    return fig


def cam_title(name: str, row: dict) -> str:
    """'IM-0001.jpeg: PNEUMONIA (p=0.93, threshold 0.41)' from a predict row."""
    cls = row["class"]
    p = row["probabilities"][cls]
    t = row.get("threshold")
    extra = f", threshold {t:.2f}" if t is not None else ""
    return f"{name}: {cls} (p={p:.2f}{extra})"


def write_cam_pngs(run, files: list[Path], images: np.ndarray, rows: list[dict],
                   out_dir: Path, layer: str | None = None,
                   cam: GradCam | None = None) -> list[Path]:
    """One `<name>.cam.png` per image in out_dir: the image at its own resolution (up to
    768 px) with the heatmap and the prediction. Only files named *.cam.png are replaced."""
    cam = cam or GradCam(run.model, layer, run.info.positive)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CxrlabError(f"--cam {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CxrlabError(f"--cam {out_dir}: cannot create the folder ({e.strerror})") from None
    heats = cam(images)
    written: list[Path] = []
    used: set[str] = set()
    for f, heat, row in zip(files, heats, rows, strict=True):
        name = f"{Path(f).name}.cam.png"
        k = 2
        while name in used:  # same file name from two folders
            name = f"{Path(f).name}-{k}.cam.png"
            k += 1
        used.add(name)
        shown = read_image(f, run.info.in_chans, None, run.bit_depth)
        side = max(shown.shape[1:])
        if side > 768:
            hw = tuple(max(1, round(s * 768 / side)) for s in shown.shape[1:])
            shown = np.stack([np.asarray(Image.fromarray(c).resize(hw[::-1],
                                                                   Image.Resampling.BILINEAR))
                              for c in shown])
        written.append(save_cam_figure(out_dir / name, shown, heat,
                                       cam_title(Path(f).name, row)))
    return written
