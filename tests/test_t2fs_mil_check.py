"""`sijnode evaluate packs/t2fs-mil-demo --data DIR --check` regenerates the committed held-out
numbers on a subset: here one held-out study, regenerated from its seed as the pack's README says."""

from __future__ import annotations

from pathlib import Path

from pipeline.phantom import write_studies
from pipeline.training import check_evaluation

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "packs" / "t2fs-mil-demo"


def test_the_committed_evaluation_is_regenerated_on_a_held_out_study(tmp_path: Path) -> None:
    # sijnode phantom --out data/test --seed 6000 --count 15 --kinds mri --lesions none: its first study
    write_studies(tmp_path / "held-out", seed=6000, count=1, kinds=["mri"], lesions="none")
    assert check_evaluation(PACK, tmp_path / "held-out") == []
