"""bombkd I/O: videos in, feature shards out, training batches back. Never imports bombkd_train.

The data path, one module (or package) per stage, in data-flow order:

    datasets.py    index: a dataset root -> items (path, label, class name); recorded paths -> items
    annotations.py the annotation files of ssv2, kinetics, diving48 -> entries, read as hostile
    sampling.py    sample: which frames make a clip; plan: which samples make each batch of an epoch
    video/         decode: route, probe, DALI or PyAV -> uint8 clips [T, S, S, 3]
    shards/        encode, write, read, verify: the feature cache format (FORMAT.md)
    loaders/       batch: video clips (clips.py) or cached features (cached.py) in the plan's order

Beside the path: ``errors.py`` (errors, the raise-or-skip policy, the message naming a missing
extra), ``names.py`` (the one name grammar), ``atomic.py`` (temporary name, then rename),
``storage.py`` (where a cache lives: a folder or a URL through fsspec, retries, access errors),
``lock.py`` (one run per output folder; the shard cache's waiting locks), ``workers.py``
(loader workers end with their parent), ``lazy.py`` (the names below, imported on first use),
``sample_data.py`` (the demo's videos).

The public API, importable from ``bombkd_io`` itself (``from bombkd_io import make_cached_loader``):

    cached mode    make_cached_loader -> CachedLoader over CachedFeatureDataset: batch dicts
                   {"student": [B, T', D] in the cache dtype, "label", "key", "index"}
    video mode     VideoClipLoader -> VideoBatch (a split's clips in the same epoch order);
                   ClipLoader -> ClipBatch (clips of probed videos); decode_clip (one clip);
                   probe_video / probe_videos -> VideoInfo (codec, size, frames, decode route)
    datasets       index_dataset -> VideoIndex of VideoItem; DATASETS (the names it takes)
    sampling       sample_indices (a clip's frames), epoch_batches (an epoch's batches)
    cache format   ShardSetWriter, load_manifest -> Manifest of ModelEntry, read_shard ->
                   ShardData, verify_cache, import_tc_cache
    errors         BombkdError and its kinds (VideoError, DatasetError, ShardError, FormatError,
                   ConfigError, FolderBusyError, TrainingError, OutputError, MissingExtraError),
                   DataWarning

Importing ``bombkd_io`` loads none of its modules: a name above imports its module on first use,
so cached mode (and ``import bombkd_io``) never loads DALI, PyAV or transformers.
"""
from bombkd_io.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "loaders.cached": ("CachedFeatureDataset", "CachedLoader", "make_cached_loader"),
    "loaders.clips": ("VideoBatch", "VideoClipLoader"),
    "video.clips": ("ClipBatch", "ClipLoader", "decode_clip"),
    "video.probe": ("VideoInfo", "probe_video", "probe_videos"),
    "datasets": ("DATASETS", "VideoIndex", "VideoItem", "index_dataset"),
    "sampling": ("epoch_batches", "sample_indices"),
    "shards.writer": ("ShardSetWriter",),
    "shards.manifest": ("Manifest", "ModelEntry", "load_manifest"),
    "shards.reader": ("ShardData", "read_shard"),
    "shards.verify": ("verify_cache",),
    "shards.import_tc": ("import_tc_cache",),
    "errors": ("BombkdError", "ConfigError", "DataWarning", "DatasetError", "FolderBusyError",
               "FormatError", "MissingExtraError", "OutputError", "ShardError", "TrainingError",
               "VideoError"),
})
