"""bombkd I/O: datasets, frame sampling, video decoding, feature shards and loaders.

Never imports bombkd_train.
"""
