"""The loaders: training batches in the epoch plan of ``bombkd_io.sampling``, one per mode.

- ``clips.py``:  video mode without a model: a split's videos indexed, probed, planned and
  decoded into uint8 clip batches (``VideoClipLoader``); ``bombkd_train.data`` adds the student.
- ``cached.py``: cached mode: feature shards streamed into batch dicts (``make_cached_loader``).
- ``handover.py``: the shared shard slots its worker processes read into.
- ``state.py``: ``state_dict`` / ``load_state_dict`` of both loaders (resume mid-epoch).
"""
