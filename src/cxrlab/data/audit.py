"""Look before training: counts, patients, sizes, exact duplicates, leakage, unreadable files.

Duplicates are found on decoded pixels (full resolution, 8-bit, grey when all channels are
equal), not on file bytes, so a re-encoded or renamed copy still matches. Bad images are
listed, never raised: an audit exists to find them.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxrlab.data.cache import n_workers
from cxrlab.data.images import GREY_MODES, guess_channels, image_header, read_image
from cxrlab.data.sources import Source
from cxrlab.data.split import assign_splits
from cxrlab.errors import CxrlabError

# Imported inside the functions that need them: matplotlib, rich, torch and
# cxrlab.data.augment (torch): `cxrlab data summary` reads no tensors and must not load torch.


@dataclass
class Summary:
    root: str
    kind: str
    classes: list[str]
    n_images: int  # readable ones
    counts: dict[str, dict[str, int]]  # split -> class -> images
    patients: dict[str, dict[str, int]]  # split -> class -> patients (files, when ungrouped)
    grouped: bool
    split_message: str
    sizes: dict[str, object]  # width/height {min, median, max}, modes and formats {name: n}
    duplicate_sets: list[list[str]]  # paths with identical pixels, each set sorted
    cross_split_duplicates: list[list[str]]  # "split:path" for sets spanning splits (leakage)
    cross_class_duplicates: list[list[str]]  # "label:path" for sets with differing labels
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict:
        """JSON-able (tuples become lists when dumped)."""
        return asdict(self)


@dataclass
class _Inspected:
    digest: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    reason: str | None = None


def _inspect(path: Path) -> _Inspected:
    """Header facts and a hash of the decoded pixels; a bad file gives its reason instead."""
    info = _Inspected()
    try:
        w, h, mode, fmt = image_header(path)
        info = _Inspected(width=w, height=h, mode=mode, format=fmt)
    except Exception:  # read_image below says what is wrong, in its words
        pass
    try:
        a = read_image(path, 1 if info.mode in GREY_MODES else 3, None)
        if not info.mode:
            raise CxrlabError(f"{path}: unreadable image header")
    except CxrlabError as e:
        msg, prefix = str(e), f"{path}: "
        return _Inspected(reason=msg[len(prefix):] if msg.startswith(prefix) else msg)
    except Exception as e:  # an audit lists problems; it never stops on one
        return _Inspected(reason=f"unreadable image ({type(e).__name__}: {e})")
    info.digest = pixel_digest(a)
    return info


def pixel_digest(a: np.ndarray) -> str:
    """What "the same image" means here: a hash of uint8 (C, H, W) pixels and their shape,
    grey stored as RGB equal to the same grey stored as L. Also `cxrlab.evaluation.overlap`'s."""
    if a.shape[0] == 3 and (a[0] == a[1]).all() and (a[0] == a[2]).all():
        a = a[:1]  # grey stored as RGB equals the same grey stored as L
    h = hashlib.blake2b(a.tobytes(), digest_size=16)
    h.update(repr(a.shape).encode())
    return h.hexdigest()


def summarize(source: Source, group_regex: str | None = None, val_fraction: float = 0.2,
              seed: int = 0) -> Summary:
    """Everything worth knowing before training, with the splits a training run would use.

    Splits come from `assign_splits` on the readable images (what `--skip-bad` training
    sees), with the same val_fraction, seed and group_regex.
    """
    records = source.records
    with ThreadPoolExecutor(max_workers=n_workers()) as pool:
        info = list(pool.map(_inspect, [r.path for r in records]))
    unreadable = [(str(r.path), i.reason) for r, i in zip(records, info, strict=True)
                  if i.reason is not None]
    ok = [j for j, i in enumerate(info) if i.reason is None]
    good = Source(source.root, source.kind, [records[j] for j in ok], source.classes)
    splits: list[str] = [r.split or "train" for r in good.records]
    groups: list[str] = [""] * len(good.records)
    grouped, msg = False, "no readable images"
    if good.records:
        try:
            res = assign_splits(good, val_fraction, seed, group_regex)
            splits, groups, grouped, msg = res.splits, res.groups, res.grouped, res.message
        except CxrlabError as e:  # e.g. too few images to hold out validation
            msg = f"no validation split: {e}"

    counts: dict[str, Counter] = defaultdict(Counter)
    patients: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r, s, g in zip(good.records, splits, groups, strict=True):
        counts[s][r.label] += 1
        patients[s][r.label].add(g or str(r.path))

    by_digest: dict[str, list[int]] = defaultdict(list)
    for k, j in enumerate(ok):
        by_digest[info[j].digest].append(k)
    dup_sets, cross_split, cross_class = [], [], []
    for members in by_digest.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda k: str(good.records[k].path))
        dup_sets.append([str(good.records[k].path) for k in members])
        if len({splits[k] for k in members}) > 1:
            cross_split.append([f"{splits[k]}:{good.records[k].path}" for k in members])
        if len({good.records[k].label for k in members}) > 1:
            cross_class.append([f"{good.records[k].label}:{good.records[k].path}"
                                for k in members])

    sizes: dict[str, object] = {}
    if ok:
        dims = np.array([(info[j].width, info[j].height) for j in ok])
        for name, col in (("width", 0), ("height", 1)):
            sizes[name] = {"min": int(dims[:, col].min()),
                           "median": float(np.median(dims[:, col])),
                           "max": int(dims[:, col].max())}
        sizes["modes"] = dict(sorted(Counter(info[j].mode for j in ok).items()))
        sizes["formats"] = dict(sorted(Counter(info[j].format for j in ok).items()))
    order = [s for s in ("train", "val", "test") if s in counts]
    return Summary(
        root=str(source.root), kind=source.kind, classes=list(source.classes), n_images=len(ok),
        counts={s: {c: counts[s][c] for c in source.classes} for s in order},
        patients={s: {c: len(patients[s][c]) for c in source.classes} for s in order},
        grouped=grouped, split_message=msg, sizes=sizes,
        duplicate_sets=sorted(dup_sets), cross_split_duplicates=sorted(cross_split),
        cross_class_duplicates=sorted(cross_class), unreadable=unreadable,
    )


def _short(p: str, root: str) -> str:
    return str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p


def render_summary(s: Summary, console, show: int = 5) -> None:
    """Rich tables for the terminal; `show` caps the listed examples (the JSON has all)."""
    from rich.table import Table

    t = Table(title=f"{s.root} ({s.kind}, {s.n_images} readable images)")
    t.add_column("class")
    who = "patients" if s.grouped else "files"
    for split in s.counts:
        t.add_column(f"{split} images", justify="right")
        t.add_column(f"{split} {who}", justify="right")
    t.add_column("total", justify="right")
    for c in s.classes:
        row = [c]
        for split in s.counts:
            row += [str(s.counts[split][c]), str(s.patients[split][c])]
        row.append(str(sum(s.counts[sp][c] for sp in s.counts)))
        t.add_row(*row)
    console.print(t)
    if s.split_message:
        console.print(f"Split: {s.split_message}")
    if s.sizes:
        w, h = s.sizes["width"], s.sizes["height"]
        console.print(f"Image sizes: width {w['min']}-{w['max']} (median {w['median']:g}), "
                      f"height {h['min']}-{h['max']} (median {h['median']:g}); "
                      f"modes {s.sizes['modes']}; formats {s.sizes['formats']}")

    n_dup = sum(len(d) - 1 for d in s.duplicate_sets)
    console.print(f"Exact duplicates (same pixels): {len(s.duplicate_sets)} set(s), "
                  f"{n_dup} redundant image(s)")
    if s.duplicate_sets:
        d = Table("set", "files", show_lines=True)
        for n, dup in enumerate(s.duplicate_sets[:show], start=1):
            d.add_row(str(n), "\n".join(_short(p, s.root) for p in dup))
        console.print(d)
        if len(s.duplicate_sets) > show:
            console.print(f"  ... and {len(s.duplicate_sets) - show} more (--json lists all)")
    for title, sets in (("Duplicates across splits (leakage)", s.cross_split_duplicates),
                        ("Duplicates with different labels", s.cross_class_duplicates)):
        style = "bold red" if sets else "green"
        console.print(f"[{style}]{title}: {len(sets)}[/]")
        for dup in sets[:show]:
            console.print("  " + "  =  ".join(dup), markup=False)
    style = "bold red" if s.unreadable else "green"
    console.print(f"[{style}]Unreadable files: {len(s.unreadable)}[/]")
    if s.unreadable:
        u = Table("file", "reason")
        for p, why in s.unreadable[:10 * show]:
            u.add_row(p, why)
        console.print(u)


def write_grid(source: Source, path: Path | str, policy: str, size: int = 128,
               per_class: int = 4, seed: int = 0) -> Path:
    """PNG: per class a row of samples, below it the same images as training will see them."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cxrlab.data.augment import augment_batch

    rng = np.random.default_rng(seed)
    channels = guess_channels([r.path for r in source.records])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c in source.classes:
        paths = [r.path for r in source.records if r.label == c]
        imgs = []
        for i in rng.permutation(len(paths)):  # skip unreadable files, keep per_class samples
            try:
                imgs.append(read_image(paths[i], channels, size))
            except CxrlabError:
                continue
            if len(imgs) == per_class:
                break
        if not imgs:
            continue
        x = torch.from_numpy(np.stack(imgs)).float() / 255
        rows.append((c, "original", x))
        rows.append((c, f"augment={policy}", augment_batch(x, policy, gen)))
    if not rows:
        raise CxrlabError(f"{source.root}: no readable images for the grid")
    fig = Figure(figsize=(2 * per_class, 2.1 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    for r, (c, what, x) in enumerate(rows):
        for k in range(per_class):
            ax = fig.add_subplot(len(rows), per_class, r * per_class + k + 1)
            ax.set_axis_off()
            if k < len(x):
                img = x[k].clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if k == 0:
                ax.set_title(f"{c} - {what}", fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
