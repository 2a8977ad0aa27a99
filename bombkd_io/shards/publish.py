"""A cache written to a remote ``--out`` (``bombkd featurize --out s3://bucket/feats``, and
``bombkd import-cache --out URL``).

Featurize writes into a local staging folder exactly as into a local ``--out`` (each shard under
a temporary name, renamed when complete); ``Remote`` moves each finished piece to the remote
root, so the remote holds only whole, verified objects and the manifest comes last:

    staged_out        a local out as is; for a URL a fresh staging folder and its ``Remote``,
                      after ``pull``; the folder is removed at the end
    Remote.pull       the remote progress record and manifest into the stage, so ``--resume``,
                      ``--dry-run`` and adding a teacher read them as a local run would
    Remote.shards     each finished shard: re-hashed against its entry, uploaded, the object's
                      size checked, the local copy deleted
    Remote.record     the progress record, after every shard (kept in the stage too)
    Remote.finish     the manifest (last), then the remote progress record is removed (by
                      ``bombkd_train.featurize.ranks.write_manifest``, the one writer of a manifest)
    Remote.cache      a whole cache of the stage, shards then manifest (``import-cache``)

``--resume`` checks each recorded shard on the remote (``verify_shard`` reads URLs: size,
sha256, sample count) and rewrites the ones that do not verify. Two runs into one remote ``--out``
are not locked against each other (object stores have no file locks): run one at a time.
One process writes a remote ``--out``: featurize over several ranks (torchrun, a job array,
``--finalize``) into a URL is refused (``bombkd_train.featurize.ranks.refuse_remote``).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bombkd_io.errors import ConfigError, ShardError
from bombkd_io.names import manifest_name
from bombkd_io.shards.manifest import PROGRESS_SUFFIX, Manifest, ShardEntry
from bombkd_io.shards.verify import hash_problem
from bombkd_io.storage import (check_root, exists, is_remote, list_names, read_bytes, remove, size,
                               upload)

MAX_RECORD_BYTES = 256 << 20  # a progress record or manifest pulled from the remote


class Remote:
    """The remote root of a featurize run and its local staging folder."""

    def __init__(self, root: str, stage: Path):
        self.root, self.stage = root.rstrip("/"), Path(stage)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def pull(self, dataset: str, split: str) -> None:
        """Copy ``{dataset}-{split}`` progress record and manifest, where they exist."""
        for name in (f"{dataset}-{split}{PROGRESS_SUFFIX}", manifest_name(dataset, split)):
            if exists(self.url(name)):
                (self.stage / name).write_bytes(read_bytes(self.url(name), MAX_RECORD_BYTES))

    def shards(self, entries: list[ShardEntry]) -> None:
        """Publish finished shards of the stage: verify, upload, check, delete the local copy."""
        for entry in entries:
            path = self.stage / entry.name
            if problem := hash_problem(path, entry):
                raise ShardError(path, f"changed after it was written ({problem}); not uploaded")
            url = self.url(entry.name)
            upload(path, url)
            if (got := size(url)) != entry.bytes:
                raise ShardError(url, f"{got} bytes after the upload, "
                                 f"{entry.bytes} were sent", fix="run featurize --resume")
            path.unlink()

    def record(self, path: Path) -> None:
        upload(path, self.url(path.name))

    def finish(self, manifest: Path, progress: Path) -> None:
        upload(manifest, self.url(manifest.name))
        remove(self.url(progress.name))

    def cache(self, manifest: Manifest) -> None:
        """Publish a whole cache written into the stage (``import-cache --out URL``): every
        shard, then the manifest; refused if the remote already holds that (dataset, split)."""
        ours = f"{manifest.dataset}-{manifest.split}"
        taken = [n for n in list_names(self.root) if n.startswith(ours + "-") or
                 n.startswith(ours + ".")]
        if taken:
            raise ConfigError(f"--out {self.root}: already holds {taken[0]} of a {ours} cache; "
                              "choose another --out (nothing is overwritten)")
        for model in manifest.models.values():
            self.shards(model.shards)
        name = manifest_name(manifest.dataset, manifest.split)
        upload(self.stage / name, self.url(name))


@contextlib.contextmanager
def staged_out(out: str, dataset: str | None = None,
               split: str | None = None) -> Iterator[tuple[str, Remote | None]]:
    """(the folder to write into, the ``Remote`` to publish to, or None for a local ``out``);
    with ``dataset`` and ``split``, their remote record and manifest are pulled first."""
    if not is_remote(out):
        yield out, None
        return
    check_root(out, "--out", write=True)
    stage = Path(tempfile.mkdtemp(prefix="bombkd-featurize-"))
    try:
        remote = Remote(out, stage)
        if dataset and split:
            remote.pull(dataset, split)
        yield str(stage), remote
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # our own temporary folder, nothing else
