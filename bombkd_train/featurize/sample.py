"""What featurize writes beside each sample's features, in the student's shard set (FORMAT.md):
``KEY.cls`` and ``KEY.json``. ``run.py`` writes them; ``estimate.py`` bounds their size with the
same function.
"""
from __future__ import annotations

import numpy as np

from bombkd_io.datasets import VideoItem


def student_members(item: VideoItem, fps: float, frame_indices, decoded_by: str, *,
                    labelled: bool) -> dict:
    """The ``cls`` member (none in a split without labels) and the ``json`` member: the video,
    its class name and fps, the clip's frame indices and who decoded it (``decoded_by``)."""
    doc = {"path": item.path, "class_name": item.class_name, "fps": fps,
           "frame_indices": [int(f) for f in np.asarray(frame_indices)], "decoded_by": decoded_by}
    return {"cls": item.label, "json": doc} if labelled else {"json": doc}
