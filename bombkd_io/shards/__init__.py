"""The feature cache format (version 1): see FORMAT.md beside this file.

codec.py     one tensor <-> one msgpack member
writer.py    one model's shard set (webdataset tars), sha256 taken while writing
reader.py    lean tar parsing over webdataset.gopen; shard -> [N, T', D]; verification
tarfmt.py    tar headers: one at a time, or a whole regular shard at once (numpy)
manifest.py  {dataset}-{split}.index.json: what the cache holds; format/version checks
"""
