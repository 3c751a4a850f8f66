"""Look before training: counts, patients, sizes, exact duplicates, leakage, unreadable files."""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cxrlab.data.images import read_image
from cxrlab.data.sources import Source
from cxrlab.data.split import assign_splits
from cxrlab.errors import CxrlabError


@dataclass
class Summary:
    root: str
    kind: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    patients: dict[str, dict[str, int]]  # split -> class -> patients
    grouped: bool
    split_message: str
    sizes: dict[str, object]  # width/height min/median/max, modes
    duplicate_sets: list[list[str]]  # paths with identical pixels
    cross_split_duplicates: list[list[str]]  # duplicate sets spanning splits (leakage)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _pixel_hash(path: Path) -> tuple[str | None, tuple | None, str | None]:
    """Hash of the decoded pixels (not the file bytes): re-encoded copies still match."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
        a = read_image(path, 3 if mode not in ("L", "I;16", "I", "1") else 1)
    except CxrlabError as e:
        return None, None, str(e).split(": ", 1)[-1]
    except Exception as e:  # an audit lists problems; it never stops on one
        return None, None, f"{type(e).__name__}: {e}"
    h = hashlib.blake2b(a.tobytes(), digest_size=16)
    h.update(str(a.shape).encode())
    return h.hexdigest(), (size[0], size[1], mode), None


def summarize(source: Source, group_regex: str | None = None, val_fraction: float = 0.2,
              seed: int = 0) -> Summary:
    records = source.records
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(_pixel_hash, [r.path for r in records], chunksize=16))
    unreadable = [(str(r.path), why) for r, (_, _, why) in zip(records, results, strict=True)
                  if why]
    ok = [i for i, (h, _, _) in enumerate(results) if h is not None]
    good = Source(source.root, source.kind, [records[i] for i in ok], source.classes)
    if len({r.label for r in good.records}) >= 1 and good.records:
        split = assign_splits(good, val_fraction, seed, group_regex)
        splits, groups, grouped, msg = split.splits, split.groups, split.grouped, split.message
    else:
        splits, groups, grouped, msg = [], [], False, "no readable images"
    counts: dict[str, Counter] = defaultdict(Counter)
    patients: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r, s, g in zip(good.records, splits, groups, strict=True):
        counts[s][r.label] += 1
        patients[s][r.label].add(g or str(r.path))
    by_hash: dict[str, list[int]] = defaultdict(list)
    for j, i in enumerate(ok):
        by_hash[results[i][0]].append(j)
    dup_sets, cross = [], []
    for members in by_hash.values():
        if len(members) > 1:
            dup_sets.append([str(good.records[j].path) for j in members])
            if len({splits[j] for j in members}) > 1:
                cross.append([f"{splits[j]}:{good.records[j].path}" for j in members])
    dims = np.array([results[i][1][:2] for i in ok]) if ok else np.zeros((0, 2))
    sizes: dict[str, object] = {}
    if len(dims):
        for name, col in (("width", 0), ("height", 1)):
            sizes[name] = {"min": int(dims[:, col].min()), "median": int(np.median(dims[:, col])),
                           "max": int(dims[:, col].max())}
        sizes["modes"] = dict(Counter(results[i][1][2] for i in ok))
    order = [s for s in ("train", "val", "test") if s in counts]
    return Summary(
        root=str(source.root), kind=source.kind, classes=source.classes,
        counts={s: {c: counts[s][c] for c in source.classes} for s in order},
        patients={s: {c: len(patients[s][c]) for c in source.classes} for s in order},
        grouped=grouped, split_message=msg, sizes=sizes,
        duplicate_sets=sorted(dup_sets), cross_split_duplicates=sorted(cross),
        unreadable=unreadable,
    )


def render_summary(s: Summary, console) -> None:
    from rich.table import Table

    t = Table(title=f"{s.root} ({s.kind})")
    t.add_column("class")
    for split in s.counts:
        t.add_column(f"{split} images", justify="right")
        t.add_column(f"{split} patients" if s.grouped else f"{split} groups", justify="right")
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
        console.print(f"Image sizes: width {w['min']}-{w['max']} (median {w['median']}), "
                      f"height {h['min']}-{h['max']} (median {h['median']}); "
                      f"modes {s.sizes['modes']}")
    n_dup = sum(len(d) - 1 for d in s.duplicate_sets)
    console.print(f"Exact duplicates (same pixels): {len(s.duplicate_sets)} set(s), "
                  f"{n_dup} redundant image(s)")
    for d in s.duplicate_sets[:5]:
        console.print("  " + "  =  ".join(Path(p).name for p in d))
    if len(s.duplicate_sets) > 5:
        console.print(f"  ... and {len(s.duplicate_sets) - 5} more (--json lists all)")
    style = "bold red" if s.cross_split_duplicates else "green"
    console.print(f"[{style}]Duplicates across splits (leakage): "
                  f"{len(s.cross_split_duplicates)}[/]")
    for d in s.cross_split_duplicates[:5]:
        console.print("  " + "  =  ".join(d))
    console.print(f"Unreadable files: {len(s.unreadable)}")
    for p, why in s.unreadable[:10]:
        console.print(f"  {p}: {why}")


def write_grid(source: Source, path: Path, policy: str, size: int = 128, per_class: int = 4,
               seed: int = 0) -> Path:
    """Per class, a row of samples and below it the same images as training will see them."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cxrlab.data.augment import augment_batch
    from cxrlab.data.images import guess_channels

    rng = np.random.default_rng(seed)
    channels = guess_channels([r.path for r in source.records])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c in source.classes:
        paths = [r.path for r in source.records if r.label == c]
        pick = rng.choice(len(paths), size=min(per_class, len(paths)), replace=False)
        imgs = []
        for i in sorted(pick):
            try:
                imgs.append(read_image(paths[i], channels, size))
            except CxrlabError:
                continue
        if not imgs:
            continue
        x = torch.from_numpy(np.stack(imgs)).float() / 255
        aug = augment_batch(x, policy, gen)
        rows.append((c, "original", x))
        rows.append((c, f"augment={policy}", aug))
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
