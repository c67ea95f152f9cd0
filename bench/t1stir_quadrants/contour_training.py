"""Learned contouring on phantoms: train a (narrow) contouring U-Net, walk its fields on held-out studies, report the contour error.

Reported, not asserted.  Usage (from the repository root, under nice on shared machines)::

    PYTHONPATH=$PWD nice -n 10 python3 bench/t1stir_quadrants/contour_training.py --train 12 --test 3 --epochs 6 --out /tmp/contour.json

Each study gives its coronal T1 and STIR slices (canonical orientation, 224 grid); targets come
from the phantom's joint-line masks; the error is the paper's (RMS over the walked contour's
vertices of the distance to the true joint line, mm), with walk failures counted per reason.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.chains.t1stir_quadrants.data import contour_samples, coronal_series, phantom_contours
from pipeline.chains.t1stir_quadrants.model import Hyperparameters, build_contour_unet
from pipeline.chains.t1stir_quadrants.train import augment, contour_errors, contour_loss, normalise_slices
from pipeline.phantom import generate_study
from pipeline.training import count_parameters, fit, optimizer_step, progress_display, seed_everything


def study_samples(seed: int, size: int) -> list[tuple[np.ndarray, np.ndarray, list, tuple[float, float]]]:
    study = generate_study(seed, kinds=("mri",), lesions="random")
    out = []
    for entry in study.series:
        if entry.info.role not in ("T1", "STIR"):
            continue
        first = entry.datasets[0]
        series = coronal_series(entry.info.role, [d.pixel_array for d in entry.datasets], first.ImageOrientationPatient, first.PixelSpacing, size)
        contours = phantom_contours(series, study.masks[f"{entry.info.role}_joint_line"])
        inputs, targets = contour_samples(series, contours)
        out.append((normalise_slices(inputs), targets, contours, series.frame.grid_spacing_mm(series.pixel_spacing)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=12)
    parser.add_argument("--test", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--features", default="16,16,32,64,128,16")
    parser.add_argument("--size", type=int, default=224, help="contouring grid (the paper's: 224)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(0)
    started = time.time()
    train = [s for seed in range(1000, 1000 + args.train) for s in study_samples(seed, args.size)]
    test = [s for seed in range(2000, 2000 + args.test) for s in study_samples(seed, args.size)]
    images = np.concatenate([s[0] for s in train])
    targets = np.concatenate([s[1] for s in train])
    generated = time.time() - started
    features = tuple(int(v) for v in args.features.split(","))
    unet = build_contour_unet(Hyperparameters(unet_features=features, contour_size=args.size))
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3, betas=(0.9, 0.999))
    rng = np.random.default_rng(0)

    def train_epoch(epoch: int) -> dict[str, float]:
        order = rng.permutation(len(images))
        losses = []
        for start in range(0, len(order), args.batch):
            pairs = [augment(images[i, 0], targets[i], rng) for i in order[start : start + args.batch]]
            x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
            y = torch.from_numpy(np.stack([p[1] for p in pairs]))
            losses.append(optimizer_step(optimizer, contour_loss(unet(x), y)))
        return {"loss": float(np.mean(losses))}

    def outputs_of(samples: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([unet(torch.from_numpy(samples[i : i + 8])).numpy() for i in range(0, len(samples), 8)])

    def validate() -> dict[str, float]:
        losses = [float(contour_loss(torch.from_numpy(outputs_of(s[0])), torch.from_numpy(s[1]))) for s in test]
        return {"validation_loss": float(np.mean(losses))}

    with progress_display() as progress:
        result = fit(unet, args.epochs, train_epoch, validate, phase="contouring", progress=progress)
    errors, failures = [], {}
    for inputs, _, contours, spacing in test:
        e, f = contour_errors(outputs_of(inputs), contours, spacing)
        errors += e
        for k, v in f.items():
            failures[k] = failures.get(k, 0) + v
    attempted = len(errors) + sum(failures.values())
    report = {
        "train_studies": args.train,
        "test_studies": args.test,
        "train_slices": int(len(images)),
        "unet_features": list(features),
        "grid": args.size,
        "parameters": count_parameters(unet),
        "epochs": args.epochs,
        "history": result.history,
        "joints_on_test_slices": attempted,
        "walked": len(errors),
        "failures": failures,
        "rms_mm_percentiles": {str(p): round(float(np.percentile(errors, p)), 3) for p in (50, 75, 90, 95)} if errors else None,
        "cumulative_fraction_below_mm": {str(t): round(float(np.mean(np.array(errors) < t)), 3) for t in (1, 2, 2.76, 4, 8)} if errors else None,
        "seconds": {"generation": round(generated, 1), "total": round(time.time() - started, 1)},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
