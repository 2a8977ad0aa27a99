"""Files from a stranger: every crafted file here is made by the test, and each must give a clear
error naming the file (or a recorded skip), never a command run, a path outside the cache, an
allocation of what the file claims, or a traceback.

Cases, by the class of problem (see bombkd_io/shards/FORMAT.md, "Threat model"):
names -> paths/commands, pickle by content, writes outside --out, sizes from files, bad values,
outputs that cannot be written.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from bombkd_io.errors import ConfigError, ErrorPolicy, FormatError, OutputError, ShardError
from bombkd_io.shards.import_tc import import_tc_cache
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.names import role_name, sanitize
from bombkd_io.shards.manifest import (Manifest, ModelEntry, ShardEntry, load_manifest,
                                      read_manifest, save_manifest)
from bombkd_io.shards.reader import read_shard
from bombkd_io.shards.verify import verify_cache
from bombkd_io.shards.writer import ShardSetWriter
from bombkd_train.checkpoint import save_checkpoint
from bombkd_train.cli._common import user_errors
from bombkd_train.cli.main import app
from bombkd_train.featurize.estimate import check_free_space
from places import GOLDEN
from synthetic_cache import make_feature_cache

runner = CliRunner()


def golden_copy(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A copy of the golden cache: (root, manifest path, manifest JSON)."""
    root = tmp_path / "cache"
    shutil.copytree(GOLDEN, root)
    path = root / "golden-train.index.json"
    return root, path, json.loads(path.read_text())


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *fragments) -> None:
    assert result.exit_code == 2, result.output
    assert "\nerror: " in "\n" + result.stderr.replace("\r", "\n"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---- names never become commands or paths ------------------------------------------------------

HOSTILE_SHARD_NAMES = [
    "pipe:touch {marker}; cat golden-train-student-000000.tar",
    "../outside/golden-train-student-000000.tar",
    "{abs}",
    "s3://bucket/golden-train-student-000000.tar",
    "golden-train-student-000001.tar",  # a valid name, but not shard 0's
    "golden-train-student-000000.tar\n",  # a grammar checked with `$` would let the newline in
]


@pytest.mark.parametrize("template", HOSTILE_SHARD_NAMES)
def test_manifest_shard_name_is_checked_before_use(tmp_path, monkeypatch, template):
    root, path, data = golden_copy(tmp_path)
    marker = tmp_path / "ran"
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / "golden-train-student-000000.tar", outside)
    name = template.format(marker=marker, abs=outside / "golden-train-student-000000.tar")
    data["models"]["student"]["shards"][0]["name"] = name
    path.write_text(json.dumps(data))
    monkeypatch.chdir(root)  # `--root .`: Path(".") / "pipe:..." would be "pipe:..."
    for args in (["inspect", ".", "--verify"], ["inspect", "./"]):
        refused(cli(*args), "golden-train.index.json", "is named", repr(name))
    with pytest.raises(FormatError, match="not 'golden-train-student-000000.tar'"):
        make_cached_loader(".", "train", num_workers=0)
    assert not marker.exists()


@pytest.mark.parametrize("field, value", [("dataset", "../../escape"), ("split", "a/b"),
                                          ("dataset", "pipe:x"), ("split", "train\n")])
def test_manifest_dataset_and_split_are_names(tmp_path, field, value):
    root, path, data = golden_copy(tmp_path)
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=f"{field} .* is not a valid name"):
        read_manifest(path)


@pytest.mark.parametrize("split", ["../cache", "a/b", "x.y"])
def test_split_argument_is_a_name(tmp_path, split):
    root, _, _ = golden_copy(tmp_path)
    refused(cli("inspect", root, "--split", split), "--split", "not a valid name")
    with pytest.raises(ConfigError, match="--split"):
        load_manifest(root, split)


def test_teacher_roles_and_key_stems_are_sanitised_into_the_grammar():
    assert role_name("tiny-vivit") == "tiny-vivit"
    assert role_name("facebook/vjepa2-vitl-fpc64-256/") == "vjepa2-vitl-fpc64-256"
    assert role_name("/models/my model.v2") == "my_model_v2"
    assert role_name("../..") == "teacher"
    assert sanitize("..My Video (v2).1", "video") == "My_Video_v2_1"


def test_progress_file_names_are_checked(tmp_path):
    from bombkd_io.datasets import VideoIndex
    from bombkd_train.config import FeaturizeConfig
    from bombkd_train.featurize.state import load_state

    out = tmp_path / "out"
    out.mkdir()
    progress = {"format": "bombkd-featurize-progress", "version": 1, "dataset": "folder",
                "split": "train", "classes": ["a"], "shard_size": 2, "final": False,
                "layout": [2], "failed": [],
                "models": {"student": {"backbone": "tiny-vjepa2", "dim": 4, "tokens": 2,
                                       "frames": 4, "size": 32, "pooling": "time",
                                       "dtype": "float16",
                                       "shards": {"0": {"name": "pipe:touch x", "count": 2,
                                                        "bytes": 10, "sha256": ""}}}}}
    (out / "folder-train.progress.json").write_text(json.dumps(progress))
    cfg = FeaturizeConfig(dataset="folder", root=str(tmp_path), split="train",
                          student="tiny-vjepa2", out=str(out), resume=True)
    index = VideoIndex("folder", "train", str(tmp_path), ["a"], [])
    with pytest.raises(FormatError, match="named 'pipe:touch x', not 'folder-train-student"):
        load_state(cfg, index)
    progress["models"]["../x"] = progress["models"].pop("student")
    (out / "folder-train.progress.json").write_text(json.dumps(progress))
    with pytest.raises(FormatError, match="model '../x' is not a valid name"):
        load_state(cfg, index)


class _Touch:
    """A pickle payload: unpickling it creates a file (a stand-in for any code)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def tc_index(folder: Path, names: list[str], **meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "features_ucf101_train.index.json"
    index.write_text(json.dumps({"shards": [{"file": n, "start": i} for i, n in
                                            enumerate(names)], **meta}))
    return index


@pytest.mark.parametrize("name", ["shard0.dat", "x.PKL", "x.pickle", "noext", "x.npy"])
def test_import_decides_pickle_by_content(tmp_path, name):
    marker = tmp_path / "ran"
    index = tc_index(tmp_path / "tc", [name])
    (tmp_path / "tc" / name).write_bytes(pickle.dumps([_Touch(marker)]))
    with pytest.raises(ConfigError, match="is a pickle .by its content.*--trust-pickle"):
        import_tc_cache(index, tmp_path / "out")
    refused(cli("import-cache", index, "--out", tmp_path / "out"), "--trust-pickle", name)
    # SRC given as the file itself, whatever its name
    with pytest.raises(ConfigError, match="--trust-pickle"):
        import_tc_cache(tmp_path / "tc" / name, tmp_path / "out", dataset="d", split="s")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../outside.pkl", "/etc/passwd", "sub/x.pkl", ".."])
def test_import_index_names_only_files_beside_it(tmp_path, name):
    index = tc_index(tmp_path / "tc", [name])
    with pytest.raises(FormatError, match="may only name files beside it"):
        import_tc_cache(index, tmp_path / "out", trust_pickle=True)


def npy_dir(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "student.npy", np.ones((n, 2, 4), np.float16))
    np.save(folder / "labels.npy", np.arange(n) % 2)
    return folder


@pytest.mark.parametrize("dataset", ["../../escape", "/abs", "a.b"])
def test_import_writes_stay_inside_out(tmp_path, dataset):
    src = npy_dir(tmp_path / "tc" / "part0")
    index = tc_index(tmp_path / "tc", ["part0"], dataset=dataset, split="train")
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(FormatError, match="dataset .* is not a valid name"):
        import_tc_cache(index, out)
    with pytest.raises(ConfigError, match="--dataset"):
        import_tc_cache(src, out, dataset=dataset, split="train")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.suffix in (".tar", ".json")
                  and "tc" not in p.parts) == []


def test_import_never_overwrites(tmp_path):
    src = npy_dir(tmp_path / "npy")
    out = tmp_path / "out"
    import_tc_cache(src, out, dataset="toy", split="train")
    shard = out / "toy-train-student-000000.tar"
    before = shard.read_bytes()
    (out / "toy-train.index.json").unlink()  # a shard alone is enough to refuse
    with pytest.raises(ConfigError, match="already holds toy-train-student-000000.tar"):
        import_tc_cache(src, out, dataset="toy", split="train")
    assert shard.read_bytes() == before


# ---- sizes read from files never decide an allocation ------------------------------------------

def set_size_field(raw: bytearray, off: int, field: bytes) -> None:
    """Rewrite a tar header's 12-byte size field at ``off`` and fix its checksum."""
    raw[off + 124:off + 136] = field
    raw[off + 148:off + 156] = b" " * 8
    raw[off + 148:off + 156] = f"{sum(raw[off:off + 512]):06o}\0 ".encode()


def traced_peak(fn) -> int:
    """Peak bytes Python and numpy allocated while ``fn()`` ran."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("field", [b"40000000000\0",                      # 4 GiB, octal
                                   b"\x80" + (2 ** 80).to_bytes(11, "big"),  # GNU base-256
                                   b"\x80" + (1 << 40).to_bytes(11, "big"),
                                   b"\x80" + (12 << 30).to_bytes(11, "big")])
def test_tar_size_field_is_not_allocated(tmp_path, field):
    root, path, _ = golden_copy(tmp_path)
    model = read_manifest(path).models["student"]
    shard = root / "golden-train-student-000000.tar"
    good = traced_peak(lambda: read_shard(shard, model.shards[0], model, labels=True))
    raw = bytearray(shard.read_bytes())
    set_size_field(raw, 0, field)  # the first member (KEY.cls) claims the size
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="truncated"):
        read_shard(shard, model.shards[0], model, labels=True)
    policy = ErrorPolicy("skip")

    def skipping():
        with pytest.warns(RuntimeWarning, match="skipped"):
            return read_shard(shard, model.shards[0], model, labels=True, policy=policy)

    assert traced_peak(skipping) < 2 * good  # the shard's own bytes, never the claimed size
    assert policy.samples == 2
    refused(cli("inspect", root, "--verify"), "bad shards", "truncated")


def test_manifest_count_is_checked_arithmetically(tmp_path):
    root, path, data = golden_copy(tmp_path)
    good = traced_peak(lambda: read_manifest(path))
    data["count"], data["shard_size"] = 10 ** 12, 1
    path.write_text(json.dumps(data))

    def hostile():
        with pytest.raises(FormatError, match="2 shards listed; count=1000000000000"):
            read_manifest(path)

    assert traced_peak(hostile) < 2 * good + 64 * 1024  # (+ the error's own text)


@pytest.mark.parametrize("text, why", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                       (None, "expected an integer")])
def test_manifest_structure(tmp_path, text, why):
    root, path, data = golden_copy(tmp_path)
    if text is None:
        data["count"] = "3"
        text = json.dumps(data)
    path.write_text(text)
    with pytest.raises(FormatError, match=why):
        read_manifest(path)
    refused(cli("inspect", root), str(path), why)


def test_npy_headers_are_checked(tmp_path):
    folder = npy_dir(tmp_path / "huge")
    header = np.lib.format.header_data_from_array_1_0(np.ones((3, 2, 4), np.float16))
    header["shape"] = (10 ** 9, 1024, 1024)  # 2 PB declared in a small file
    with open(folder / "student.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 48)
    with pytest.raises(FormatError, match="declares shape .* but holds"):
        import_tc_cache(folder, tmp_path / "o1", dataset="d", split="s")
    folder = npy_dir(tmp_path / "objects")
    np.save(folder / "student.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="Python objects"):
        import_tc_cache(folder, tmp_path / "o2", dataset="d", split="s")
    folder = tmp_path / "npz"
    folder.mkdir()
    (folder / "clip.npz").write_bytes(pickle.dumps({"z0": np.ones((2, 4))}))
    with pytest.raises(FormatError, match="clip.npz: not an .npy or .npz file"):
        import_tc_cache(folder, tmp_path / "o3", dataset="d", split="s")


# ---- bad values: a clear error, or a recorded skip ---------------------------------------------

def student_cache(root: Path, labels: list, classes: int = 4) -> Path:
    """A student-only cache of tiny-student features (dims of synthetic_cache) whose ``.cls``
    members hold ``labels``: ints as the writer writes them, or raw bytes (crafted)."""
    rng = np.random.default_rng(0)
    crafted = {i: label for i, label in enumerate(labels) if isinstance(label, bytes)}
    with ShardSetWriter(root, "synth", "train", "student", 4, "float32") as writer:
        for i, label in enumerate(labels):
            writer.write(f"{i:06d}_v{i}", rng.normal(size=(4, 16)).astype(np.float32),
                         {"cls": 0 if i in crafted else label, "json": {"path": f"v{i}.webm"}})
    entries = list(writer.entries)
    for i, payload in crafted.items():
        k = i // 4
        entries[k] = rewrite_member(root / entries[k].name, f"{i:06d}_v{i}.cls", payload)
    entry = ModelEntry("student", "tiny-student", 16, 4, 16, 32, "time", "float32", entries)
    save_manifest(Manifest("synth", "train", [f"c{c}" for c in range(classes)], 4,
                           {"student": entry}, len(labels)), root)
    return root


def rewrite_member(shard: Path, member: str, payload: bytes) -> ShardEntry:
    """Replace one member's bytes in a tar shard (as a stranger's tool would); its new entry."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            data = payload if info.name == member else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = shard.read_bytes()
    return ShardEntry(shard.name, 4, len(raw), hashlib.sha256(raw).hexdigest())


@pytest.mark.parametrize("bad", [99, -1, 4, b"abc", b"99999999999999999999999"])
def test_bad_labels_are_bad_samples(tmp_path, bad):
    labels = [0, 1, 2, 3, 0, 1, bad, 3]
    root = student_cache(tmp_path / "cache", labels)
    loader = make_cached_loader(root, "train", batch_size=4, num_workers=0)
    with pytest.raises(ShardError, match=r"synth-train-student-000001.tar \(sample 000006_v6\)"):
        list(loader)
    skipping = make_cached_loader(root, "train", batch_size=4, num_workers=0, on_error="skip")
    with pytest.warns(RuntimeWarning, match="000006_v6"):
        seen = [k for b in skipping for k in b["key"]]
    assert len(seen) == 7 and "000006_v6" not in seen and skipping.skipped == 1
    problems = verify_cache(root, load_manifest(root, "train"), progress=False)
    assert len(problems) == 1 and "000006_v6" in problems[0]
    refused(cli("inspect", root, "--verify"), "bad shards", "000006_v6")


@pytest.fixture(scope="module")
def converters(tmp_path_factory) -> Path:
    root = make_feature_cache(tmp_path_factory.mktemp("good"))
    result = cli("train-converters", "--root", root, "--split", "train", "--teachers", "ta,tb",
                 "--epochs", "0", "--save-dir", root / "conv")
    assert result.exit_code == 0, result.output
    return root / "conv" / "converters.pt"


def train_args(root, converters, save_dir, *extra):
    return ["train", "--loader", "wds", "--root", root, "--split", "train", "--teachers",
            "ta,tb", "--converters", converters, "--classes", "4", "--batch", "4",
            "--save-dir", save_dir, "--device", "cpu", "--quiet", *extra]


def test_train_with_a_bad_label(tmp_path, converters):
    root = student_cache(tmp_path / "cache", [0, 1, 2, 3, 0, 1, 99, 3])
    refused(cli(*train_args(root, converters, tmp_path / "run")),
            "synth-train-student-000001.tar (sample 000006_v6)", "outside [0, 4)")
    result = cli(*train_args(root, converters, tmp_path / "run2", "--on-error", "skip"))
    assert result.exit_code == 0, result.output
    epoch = [json.loads(line) for line in
             (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["kind"] == "epoch" and epoch["samples"] == 7 and epoch["skipped"] == 1


def test_outputs_that_are_files(tmp_path, converters):
    root = student_cache(tmp_path / "cache", [0, 1, 2, 3])
    taken = tmp_path / "file"
    taken.write_text("not a folder")
    refused(cli(*train_args(root, converters, taken)), f"--save-dir {taken}",
            "not a directory")
    refused(cli("train-converters", "--root", root, "--split", "train", "--teachers", "ta",
                "--save-dir", taken), "not a directory")
    refused(cli("import-cache", npy_dir(tmp_path / "npy"), "--out", taken, "--dataset", "d",
                "--split", "s"), f"--out {taken}", "not a directory")
    refused(cli("featurize", "--dataset", "folder", "--root", tmp_path, "--split", "train",
                "--student", "tiny-vjepa2", "--out", taken), f"--out {taken}",
            "not a directory")
    refused(cli("eval", "--loader", "wds", "--root", root, "--split", "train", "--fusion",
                tmp_path / "fusion_ep1.pt", "--out", taken), f"--out {taken}", "not a directory")
    assert taken.read_text() == "not a folder"


# ---- outputs that cannot be written ------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB filesystem of its own (tmpfs; needs root, as CI runs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({done.stderr.strip()}); CI runs "
                    "as root and mounts it")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_full_disk_checkpoint(tiny_disk):
    import torch

    with pytest.raises(OutputError, match=r"cannot write .*fusion_ep1.pt: no space left on the "
                       r"device; .* free there; free some space .*--resume"):
        save_checkpoint({"w": torch.zeros(1 << 20)}, tiny_disk / "run" / "fusion_ep1.pt")
    assert [p.name for p in (tiny_disk / "run").iterdir()] == []  # no temp file left


def test_full_disk_shards(tiny_disk, capsys):
    rng = np.random.default_rng(0)
    with pytest.raises(typer.Exit) as exit_:
        with user_errors():
            with ShardSetWriter(tiny_disk, "d", "s", "student", 1000, "float32") as writer:
                for i in range(100):
                    writer.write(f"{i:06d}", rng.normal(size=(16, 64)).astype(np.float32))
    assert exit_.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "no space left" in err and "--resume" in err
    assert list(tiny_disk.iterdir()) == []  # the half-written shard is gone


def test_free_space_in_units_that_fit(tiny_disk):
    with pytest.raises(ConfigError, match=r"writes 1.0 MB, only \d+(\.\d)? kB are free"):
        check_free_space(tiny_disk, 10 ** 6)
