"""Video probing, routing and decoding: one clip contract, ``[T, S, S, 3]`` uint8 RGB.

In data-flow order:
- ``route.py``:  the one device parser (``parse_device``, and ``is_cuda``, ``dali_device``,
  ``cuda_index`` from it), what a device decodes (``device_caps``: DALI's CPU codecs, or the
  NVDEC row of the GPU's compute capability, ``nvdec_caps``), the stream -> decoder rule
  (``route_for``, pure: codec, container, pixel format, size, capabilities -> route and reason),
  the file check.
- ``probe.py``:  ``probe_video`` / ``probe_videos`` / ``probe_index`` (``index_probed``: its
  answer from files probed elsewhere, e.g. by several processes) (PyAV): codec, container,
  size, frame count as DALI counts it, route and its reason for each file.
- ``clips.py``:  ``ClipLoader`` (background-thread batches, failures recorded, each clip's
  decoder and device in ``ClipBatch.decoded_by``) and ``decode_clip``.
- ``pyav.py``:   PyAV decoding of the sampled frames only (videos routed to PyAV).
- ``dali.py``:   the DALI pipeline (``cpu`` or ``mixed``), resize + centre crop for every clip.
- ``resize.py``: the torch resize + centre crop, DALI's rounding (``backend="pyav"``, backbones).
- ``health.py``: the signs of a damaged file that still decodes (libav messages, a frame count
  short of the header's, repeated frames), in ``VideoInfo.warnings`` and ``ClipBatch.warnings``.
- ``compare.py``: how far two clips of one video are apart (levels, frame order), and the
  DALI-vs-PyAV tolerances on the CPU and the GPU.
See DECODERS.md for the routing table and the measured DALI-vs-PyAV differences.

Importing the package loads neither DALI nor PyAV: a name below imports its module on first use,
so ``bombkd_train`` reads devices through ``route.py`` without loading the decoders.
"""
from bombkd_io.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "route": ("DECODED_BY", "DecodeCaps", "Route", "cuda_index", "dali_device", "device_caps", "is_cuda",
              "nvdec_caps", "parse_device", "route_for"),
    "probe": ("VideoInfo", "index_probed", "probe_index", "probe_video", "probe_videos"),
    "clips": ("BACKENDS", "ClipBatch", "ClipLoader", "decode_clip", "decoder_of"),
})
