"""The feature cache format (version 1): see FORMAT.md beside this file. In data-flow order:

import_tc.py  a TC-BombKD feature cache -> samples for the writer (``bombkd import-cache``)
codec.py      each member's bytes: features (.mp msgpack), label (.cls), metadata (.json)
writer.py     samples -> one model's shard set (webdataset tars), sha256 taken while writing
manifest.py   {dataset}-{split}.index.json: what the cache holds, each model's record, checks
tar.py        tar headers, member and archive sizes, the member walk, the regular-shard fast path
reader.py     one shard -> ShardData ([N, T', D] features, keys, labels), local or by URL
verify.py     does a shard (featurize --resume), or a cache (inspect --verify), match its manifest
publish.py    a cache written to a URL: a local stage, each finished shard uploaded, manifest last
cache.py      the local shard cache of a remote cache (--shard-cache): verified once, LRU
"""
