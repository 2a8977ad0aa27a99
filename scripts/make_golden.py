"""How tests/assets/golden/ was made: a tiny format-1 cache that must stay readable forever.

    .venv/bin/python scripts/make_golden.py [OUT]     # default tests/assets/golden

3 samples in shards of 2, student [2, 4] fp16 and teacher "videomae" [1, 6] fp16, values from
``golden_features`` (tests/bombkd_io/test_shards_rw.py recomputes them to check the committed bytes). Run
it only for a new format version; the tests read the committed files, never regenerate them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bombkd_io.shards.manifest import Manifest, ModelEntry, save_manifest
from bombkd_io.shards.writer import ShardSetWriter

CLASSES = ["jump", "run"]
KEYS = ["000000_v_jump_g01_c01", "000001_v_run_g01_c01", "000002_v_jump_g02_c01"]
LABELS = [0, 1, 0]


def golden_features(i: int) -> dict[str, np.ndarray]:
    """Sample i's features: exact in fp16, different per sample and per position."""
    student = (np.arange(8, dtype=np.float32).reshape(2, 4) - 3) * 0.5 + i        # [T'=2, D=4]
    teacher = np.array([[-1, -0.5, 0, 0.25, 1, 2]], dtype=np.float32) * (i + 1)  # [T'=1, D=6]
    return {"student": student.astype(np.float16), "videomae": teacher.astype(np.float16)}


def golden_json(i: int) -> dict:
    return {"path": f"videos/{KEYS[i][7:]}.avi", "class_name": CLASSES[LABELS[i]],
            "frame_indices": [0, 2, 4, 6], "fps": 25.0}


def make_golden(out: Path) -> Manifest:
    shapes = {"student": ("tiny-vjepa2", 4, 2), "videomae": ("tiny-videomae", 6, 1)}
    writers = {m: ShardSetWriter(out, "golden", "train", m, 2, "float16") for m in shapes}
    for i, key in enumerate(KEYS):
        feats = golden_features(i)
        writers["student"].write(key, feats["student"], {"cls": LABELS[i], "json": golden_json(i)})
        writers["videomae"].write(key, feats["videomae"])
    models = {m: ModelEntry(m, backbone, dim, tokens, 4, 32, "time", "float16", writers[m].close())
              for m, (backbone, dim, tokens) in shapes.items()}
    manifest = Manifest("golden", "train", CLASSES, 2, models, len(KEYS),
                        [{"path": "videos/v_run_g02_c01.avi", "reason": "no decodable frame"}])
    save_manifest(manifest, out)
    return manifest


if __name__ == "__main__":
    default = Path(__file__).parents[1] / "tests" / "assets" / "golden"
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    target.mkdir(parents=True, exist_ok=True)
    print(make_golden(target))
