"""The notebooks' Keras pipeline, timed on this machine: what cxrlab's speed is compared with.

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu pillow scipy
    /tmp/tfenv/bin/python benchmarks/keras_baseline.py --out keras.json     # ~10 min, 2 cores
    python benchmarks/throughput.py --keras keras.json                      # the b / keras row

TensorFlow is not a cxrlab dependency (nor installable beside its pinned torch without
care), so this script imports nothing from cxrlab and runs under a Python that has
TensorFlow; throughput.py reads its JSON. What it runs is what the notebooks ran:
`ImageDataGenerator(rescale=1/255, rotation_range=30, width/height_shift_range=0.2,
shear_range=0.2, zoom_range=0.2, horizontal_flip=True).flow_from_directory(...)` decoding and
augmenting every JPEG on every epoch, `model.fit` with class weights, Adam, fp32 -- for the
notebook's small CNN (180 px, batch 16) and a hand-built ResNet-18 (224 px, batch 32), both on
one grey channel like cxrlab's. Images/s are timed over --steps steps after --warmup steps
(the graph build and first batches), from batch end to batch end, like throughput.py's (b).

Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from throughput import cpu_has_bf16, cpu_name  # stdlib + NumPy only at import

# name -> (image size, batch size): throughput.py's MODELS for the same two models
MODELS = {"cnn": (180, 16), "resnet18": (224, 32)}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "train"


def notebook_cnn(keras, size: int):
    """The Kaggle notebook's CNN (cxrlab/models/cnn.py is its PyTorch rebuild)."""
    L = keras.layers
    x = inp = keras.Input((size, size, 1))
    x = L.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = L.MaxPooling2D()(x)
    for width, drop in ((32, 0.0), (64, 0.0), (128, 0.2), (256, 0.2)):
        x = L.SeparableConv2D(width, 3, padding="same", activation="relu")(x)
        x = L.SeparableConv2D(width, 3, padding="same", activation="relu")(x)
        x = L.BatchNormalization()(x)
        x = L.MaxPooling2D()(x)
        if drop:
            x = L.Dropout(drop)(x)
    x = L.Flatten()(x)
    for units, drop in ((512, 0.7), (128, 0.5), (64, 0.3)):
        x = L.Dense(units, activation="relu")(x)
        x = L.BatchNormalization()(x)
        x = L.Dropout(drop)(x)
    return keras.Model(inp, L.Dense(1, activation="sigmoid")(x))


def resnet18(keras, size: int):
    """ResNet-18 as the notebooks built it by hand (BasicBlock, [2, 2, 2, 2])."""
    L = keras.layers

    def block(x, width: int, stride: int):
        skip = x
        y = L.Conv2D(width, 3, strides=stride, padding="same", use_bias=False)(x)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.BatchNormalization()(L.Conv2D(width, 3, padding="same", use_bias=False)(y))
        if stride != 1 or x.shape[-1] != width:
            skip = L.BatchNormalization()(L.Conv2D(width, 1, strides=stride, use_bias=False)(x))
        return L.ReLU()(L.Add()([y, skip]))

    x = inp = keras.Input((size, size, 1))
    x = L.Conv2D(64, 7, strides=2, padding="same", use_bias=False)(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(L.ReLU()(L.BatchNormalization()(x)))
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = block(block(x, width, stride), width, 1)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(1, activation="sigmoid")(x))


def measure(name: str, data: Path, steps: int, warmup: int) -> dict:
    import numpy as np
    import tensorflow as tf
    from tensorflow import keras
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    size, bs = MODELS[name]
    tf.keras.utils.set_random_seed(0)
    gen = ImageDataGenerator(rescale=1 / 255, rotation_range=30, width_shift_range=0.2,
                             height_shift_range=0.2, shear_range=0.2, zoom_range=0.2,
                             horizontal_flip=True)
    flow = gen.flow_from_directory(str(data), target_size=(size, size), color_mode="grayscale",
                                   batch_size=bs, class_mode="binary", shuffle=True, seed=0)
    counts = np.bincount(flow.classes)
    weights = {i: len(flow.classes) / (len(counts) * c) for i, c in enumerate(counts)}
    model = (notebook_cnn if name == "cnn" else resnet18)(keras, size)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])

    stamps: list[float] = []

    class Stamps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    model.fit(flow, steps_per_epoch=warmup + steps, epochs=1, class_weight=weights,
              callbacks=[Stamps()], verbose=0)
    timed = stamps[warmup - 1:]  # from the end of the last warm-up step
    return {"model": name, "image_size": size, "batch_size": bs, "steps": steps,
            "warmup_steps": warmup, "img_s": steps * bs / (timed[-1] - timed[0]),
            "first_steps_s": stamps[warmup - 1] - t0, "n_images": int(flow.samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=40, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True, help="JSON for throughput.py --keras")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup: at least 1 (the first step builds the graph)")
    if not args.data.is_dir():
        ap.error(f"--data {args.data}: not a folder")

    import tensorflow as tf

    started = datetime.now(UTC)
    results = []
    for name in args.models:
        r = measure(name, args.data, args.steps, args.warmup)
        print(f"{name}: {r['img_s']:.1f} img/s (Keras fit, {args.steps} steps)", flush=True)
        results.append(r)
    out = {"cpu": cpu_name(), "bf16_cpu": cpu_has_bf16(), "cores": os.cpu_count(),
           "tensorflow": tf.__version__, "started": started.isoformat(timespec="seconds"),
           "data": str(args.data), "results": {r["model"]: r for r in results}}
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
