"""``bombkd featurize``: videos -> every backbone -> one shard set per model (cache format 1).

Its config is ``bombkd_train.config.FeaturizeConfig``. The modules, in data-flow order:

    state.py     what ``--out`` already holds (manifest, progress file), checked against the run
    sample.py    the student's .cls and .json members of each sample
    estimate.py  the exact bytes the run will write, against the free space (``--dry-run``)
    ranks.py     several processes (torchrun, job arrays): the shard plan, who writes what, the
                 manifest once every shard is there (``finalize_featurize``)
    run.py       probe, decode per need, run the models, write the shards, progress and manifest
    stats.py     what a run did and where its time went; the summary and per-rank lines
"""
from bombkd_train.featurize.estimate import DiskEstimate
from bombkd_train.featurize.ranks import finalize_featurize
from bombkd_train.featurize.run import estimate_featurize, featurize
from bombkd_train.featurize.stats import FeaturizeStats

__all__ = ["DiskEstimate", "FeaturizeStats", "estimate_featurize", "featurize",
           "finalize_featurize"]
