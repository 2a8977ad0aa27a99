"""The feature cache format (version 1): see FORMAT.md beside this file.

codec.py     each member's bytes: features (.mp msgpack), label (.cls), metadata (.json)
writer.py    one model's shard set (webdataset tars), sha256 taken while writing
tar.py       tar headers, member and archive sizes, the member walk, the regular-shard fast path
reader.py    shard -> [N, T', D] over local files and webdataset.gopen
verify.py    does a shard (featurize --resume), or a cache (inspect --verify), match its manifest
manifest.py  {dataset}-{split}.index.json: what the cache holds; format/version checks
"""
