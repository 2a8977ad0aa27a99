"""The loaders: batches for training, in the epoch plan of ``bombkd_io.sampling``.

- ``cached.py``: cached mode, feature shards streamed into batch dicts (``make_cached_loader``).
"""
