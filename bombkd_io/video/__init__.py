"""Video probing, routing and decoding: one clip contract, ``[T, S, S, 3]`` uint8 RGB.

- ``probe.py``:  ``probe_video`` / ``probe_videos`` / ``probe_index`` (PyAV) and the route rule.
- ``dali.py``:   the DALI pipeline (``cpu`` or ``mixed``), resize + centre crop for every clip.
- ``pyav.py``:   PyAV decoding of the sampled frames only.
- ``resize.py``: the torch resize + centre crop, DALI's rounding (``backend="pyav"``, backbones).
- ``clips.py``:  ``ClipLoader`` (background-thread batches, failures recorded) and ``decode_clip``.
- ``health.py``: the signs of a damaged file that still decodes (libav messages, a frame count
  short of the header's, repeated frames), in ``VideoInfo.warnings`` and ``ClipBatch.warnings``.
See DECODERS.md for the routing table and the measured DALI-vs-PyAV differences.
"""
from bombkd_io.video.clips import BACKENDS, ClipBatch, ClipLoader, decode_clip
from bombkd_io.video.probe import (VideoInfo, cuda_index, dali_device, probe_index, probe_video,
                                   probe_videos, route_for)

__all__ = ["BACKENDS", "ClipBatch", "ClipLoader", "VideoInfo", "cuda_index", "dali_device",
           "decode_clip", "probe_index", "probe_video", "probe_videos", "route_for"]
