"""Build the demo set shipped in the package from ../shared/data/chest_xray/train.

Patient-disjoint train/ and test/ folders, downsized to 128 px JPEGs, so `cxrlab demo` runs
offline in a couple of minutes. Run once by a maintainer; the output is committed.

    python scripts/make_demo_data.py ../shared/data/chest_xray/train src/cxrlab/demo_data
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128
COUNTS = {"train": {"NORMAL": 120, "PNEUMONIA": 240}, "test": {"NORMAL": 60, "PNEUMONIA": 60}}
ATTRIBUTION = """\
Demo data for cxrlab: {n} pediatric chest X-rays, downsized to {size}x{size} JPEG.

Source: the training split of Kermany, Daniel; Zhang, Kang; Goldbaum, Michael (2018),
"Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for Classification",
Mendeley Data, v2, doi:10.17632/rscbjbr9sj.2. Licence: CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/). Changes: a patient-disjoint subset was
selected and resized; train/ and test/ here are both drawn from the original training split.
"""


def patient(name: str) -> str:
    m = re.match(r"(person\d+)_|(.+?-IM-\d+|IM-\d+)-\d+", name)
    return next(g for g in m.groups() if g) if m else name


def main(src: Path, dst: Path) -> None:
    rng = np.random.default_rng(2018)
    if dst.exists():
        shutil.rmtree(dst)
    used: set[str] = set()
    total = 0
    for split, per_class in COUNTS.items():
        for cls, n in per_class.items():
            by_patient = defaultdict(list)
            for f in sorted((src / cls).iterdir()):
                by_patient[patient(f.name)].append(f)
            patients = [p for p in sorted(by_patient) if p not in used]
            rng.shuffle(patients)
            chosen: list[Path] = []
            for p in patients:
                if len(chosen) >= n:
                    break
                used.add(p)
                chosen.extend(by_patient[p][: n - len(chosen)])
            out = dst / split / cls
            out.mkdir(parents=True)
            for f in chosen:
                im = Image.open(f).convert("L").resize((SIZE, SIZE), Image.LANCZOS)
                im.save(out / f.name, quality=88, optimize=True)
            total += len(chosen)
    (dst / "ATTRIBUTION.txt").write_text(ATTRIBUTION.format(n=total, size=SIZE))
    print(f"{total} images written to {dst}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
