"""Video probing, routing and decoding: one clip contract, ``[T, S, S, 3]`` uint8 RGB.

In data-flow order:
- ``route.py``:  devices (``dali_device``, ``cuda_index``), the codec -> decoder rule
  (``route_for``) and the file check every decoder makes first.
- ``probe.py``:  ``probe_video`` / ``probe_videos`` / ``probe_index`` (PyAV): codec, size, exact
  frame count and route of each file.
- ``clips.py``:  ``ClipLoader`` (background-thread batches, failures recorded) and ``decode_clip``.
- ``pyav.py``:   PyAV decoding of the sampled frames only (videos routed to PyAV).
- ``dali.py``:   the DALI pipeline (``cpu`` or ``mixed``), resize + centre crop for every clip.
- ``resize.py``: the torch resize + centre crop, DALI's rounding (``backend="pyav"``, backbones).
- ``health.py``: the signs of a damaged file that still decodes (libav messages, a frame count
  short of the header's, repeated frames), in ``VideoInfo.warnings`` and ``ClipBatch.warnings``.
See DECODERS.md for the routing table and the measured DALI-vs-PyAV differences.
"""
from bombkd_io.video.clips import BACKENDS, ClipBatch, ClipLoader, decode_clip
from bombkd_io.video.probe import VideoInfo, probe_index, probe_video, probe_videos
from bombkd_io.video.route import cuda_index, dali_device, route_for

__all__ = ["BACKENDS", "ClipBatch", "ClipLoader", "VideoInfo", "cuda_index", "dali_device",
           "decode_clip", "probe_index", "probe_video", "probe_videos", "route_for"]
