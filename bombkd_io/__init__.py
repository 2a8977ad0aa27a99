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
``lock.py`` (one run per output folder), ``workers.py`` (loader workers end with their parent),
``sample_data.py`` (the demo's videos).
"""
