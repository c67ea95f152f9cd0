"""One study through t1stir-quadrants at the published sizes, CPU: time per step and peak RSS (reported, not asserted).

Usage (from the repository root; under nice on a shared machine)::

    PYTHONPATH=$PWD nice -n 19 python3 bench/t1stir_quadrants/study_inference.py --threads 2 --out /tmp/quadrants-bench.json

The networks are built at the paper's sizes (contouring BasicUNet 64..1024 on the 224 grid,
31.1 M parameters; ResNet-34 shared encoder with 14 heads on 112 x 112 joint crops, 21.3 M)
with random weights: no published weights exist, and the cost of a forward pass does not depend
on the values. Random weights trace no contours, so the walk is timed on the phantom's true
fields and the regions are cut from the phantom's true joint lines; every other step runs as the
chain runs it (:mod:`pipeline.chains.t1stir_quadrants.inference`). Grad-CAM: one map per joint
(the paper's 14 heads would each need a backward pass; the chain draws at most ``gradcam_limit``).
Aim (issue 13): under 10 s and 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.chains.t1stir_quadrants.data import SEQUENCES, contour_samples, phantom_contours, series_of, series_regions, series_volume, sorted_slices
from pipeline.chains.t1stir_quadrants.inference import QuadrantGradCAM, build_networks, consensus_probabilities, joint_inputs, unet_outputs, walk_reasons
from pipeline.chains.t1stir_quadrants.model import Hyperparameters
from pipeline.phantom import SIDES, generate_study


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1003)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    study = generate_study(args.seed, kinds=("mri",), lesions={"lesions": [{"type": "edema", "side": "left", "quadrant": "upper_ilium"}]})
    datasets = {e.info.role: sorted_slices(e.datasets) for e in study.series if e.info.role in SEQUENCES}
    timings: dict[str, float] = {}
    before = peak_rss_mb()

    def timed(step: str, function, *a):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        value = function(*a)
        timings[step] = round(timings.get(step, 0.0) + time.perf_counter() - started, 3)
        return value

    networks = timed("build networks", build_networks, Hyperparameters())
    for module in networks.modules().values():
        module.eval()
    series = {s: timed("read and resample to 224", series_of, s, datasets[s]) for s in SEQUENCES}
    outputs = {s: timed("contouring U-Net", unet_outputs, networks.unet, series[s].images) for s in SEQUENCES}
    truths = {s: phantom_contours(series[s], study.masks[f"{s}_joint_line"]) for s in SEQUENCES}
    fields = {s: contour_samples(series[s], truths[s])[1] for s in SEQUENCES}  # the true maps, to walk
    walked = {s: timed("contour walk (true fields)", walk_reasons, fields[s])[0] for s in SEQUENCES}
    regions = {s: timed("regions", series_regions, walked[s]) for s in SEQUENCES}
    volumes = {s: series_volume(series[s].images) for s in SEQUENCES}
    roi = networks.hyperparameters.roi_size
    inputs = {side: timed("joint crops", joint_inputs, volumes, regions, side, roi) for side in SIDES}
    probabilities = {side: timed("classifier (consensus output)", consensus_probabilities, networks, inputs[side]) for side in SIDES}
    explainer = QuadrantGradCAM(networks.classifier)
    for side in SIDES:
        timed("Grad-CAM (one map per joint)", explainer.maps, inputs[side], "edema_upper_ilium", "STIR")
    report = {
        "study_seed": args.seed,
        "slices": {s: len(datasets[s]) for s in SEQUENCES},
        "source_matrix": {s: [int(datasets[s][0].Rows), int(datasets[s][0].Columns)] for s in SEQUENCES},
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in networks.modules().items()},
        "threads": args.threads,
        "seconds_per_step": timings,
        "seconds_total_without_build": round(sum(v for k, v in timings.items() if k != "build networks"), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_mb_before_networks": round(before, 1),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "probabilities_are_random_weights": {side: [round(float(v), 3) for v in probabilities[side][:2]] for side in SIDES},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
