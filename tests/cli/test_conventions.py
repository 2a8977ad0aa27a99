"""The CLI follows the conventions: choices click checks and help lists, --version,
``python -m bombkd``, the seed's spellings, defaults read from the data, no bars in piped logs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest
import torch
from typer.testing import CliRunner

from bombkd_io.errors import ConfigError
from bombkd_train.cli._common import join_list_options
from bombkd_train.cli.main import app
from places import REPO, TESTS
from synthetic_cache import make_feature_cache

runner = CliRunner()
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}  # help rows unwrapped, whole choice lists
SEED = TESTS / "assets" / "seed_commands.md"  # the users' guide's commands, quoted


def _run_module(*args, cwd=REPO):
    """``python -m bombkd ARGS`` in a fresh process, stderr piped (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bombkd", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache with splits train and test, and converters fitted with the seed's spelling."""
    root = make_feature_cache(tmp_path_factory.mktemp("cache"))
    make_feature_cache(root, split="test", count=20, seed=1)
    result = runner.invoke(app, ["train-converters", "--root", str(root), "--split", "train",
                                 "--teachers", "ta", "tb", "--epochs", "0",
                                 "--save-dir", str(root / "conv"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("command, shown", [
    ("train", ["dali|wds", "raise|skip", "<auto|cpu|gpu|cuda|cuda:N>", "--fusion-rank",
               "--weight-decay", "--use-cached-features", "tiny-vjepa2",
               "names of models in the feature cache", "folder dataset"]),
    ("eval", ["dali|wds", "raise|skip", "--quiet"]),
    ("featurize", ["<wds>", "float16|float32", "time|mean|none", "--quiet", "tiny-vjepa2",
                   "ROOT/<split>/<class>/<video>"]),
    ("train-converters", ["linear|mlp", "--quiet"]),
    ("import-cache", ["float16|float32"]),
    ("probe", ["<auto|cpu|gpu|cuda|cuda:N>"]),
])
def test_help_lists_the_choices(command, shown):
    result = runner.invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.output)
    missing = [s for s in shown if s not in text]
    assert not missing, result.output


def test_every_option_has_help():
    import typer.main

    group = typer.main.get_command(app)
    bare = [f"{name} {opt}" for name, command in group.commands.items()
            for param in command.params if getattr(param, "help", None) in (None, "")
            and (opt := "/".join(param.opts)).startswith("--")]
    assert not bare, f"options without help text: {bare}"


@pytest.mark.parametrize("args, option", [
    (["train", "--loader", "tar"], "--loader"),
    (["featurize", "--pool", "max"], "--pool"),
    (["featurize", "--dtype", "int8"], "--dtype"),
    (["featurize", "--format", "pkl"], "--format"),
    (["eval", "--on-error", "ignore"], "--on-error"),
    (["train", "--device", "tpu"], "--device"),
    (["probe", "x.mp4", "--device", "cuda:99"], "--device"),
])
def test_a_bad_choice_is_refused_naming_the_option(args, option):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}" in result.output, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["probe", "x.mp4"], ["train"], ["featurize"]])
def test_a_gpu_the_machine_lacks_is_refused(command):
    result = runner.invoke(app, [*command, "--device", "gpu"])
    assert result.exit_code == 2
    assert "Invalid value for '--device'" in result.output and "torch sees no GPU" in result.output
    assert "route=" not in result.output


def test_version_and_python_m_bombkd(tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert runner.invoke(app, ["--version"]).output.strip() == f"bombkd {version}"
    for cwd in (REPO, tmp_path):  # the repo root, and elsewhere as an installed package is
        result = _run_module("--version", cwd=cwd)
        assert result.returncode == 0 and result.stdout.strip() == f"bombkd {version}", result
    result = _run_module("train", "--help")
    assert result.returncode == 0 and "Usage: bombkd train" in result.stdout
    result = _run_module("train", "--loader", "tar")
    assert result.returncode == 2 and "Invalid value for '--loader'" in result.stderr


def test_the_bombkd_package_is_installed():
    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    assert "bombkd" in find_packages(str(REPO), include=include)


def test_list_options_take_space_separated_values():
    assert join_list_options(["train", "--teachers", "a", "b", "c", "--epochs", "2"]) == \
        ["train", "--teachers", "a,b,c", "--epochs", "2"]
    assert join_list_options(["x", "--teachers=a", "b", "--teachers", "c,d"]) == \
        ["x", "--teachers=a,b", "--teachers", "c,d"]
    assert join_list_options(["x", "--teachers", "--epochs", "1"]) == \
        ["x", "--teachers", "--epochs", "1"]  # click says --teachers needs a value


def _seed_command(module: str, which: int) -> list[str]:
    """The ``which``-th ``python -m <module>`` command of the seed document, as argv."""
    text = SEED.read_text().replace("\\\n", " ")
    found = re.findall(rf"python -m {re.escape(module)} ([^\n`]*)", text)
    return found[which].split()


class Captured(ConfigError):
    """Raised by the stand-in for the library call: the CLI's parse ends there."""


def _capture(monkeypatch, target: str, name: str) -> list:
    seen: list = []

    def stand_in(config, **_):
        seen.append(config)
        raise Captured("captured")
    monkeypatch.setattr(target, name, stand_in)
    return seen


def test_the_seeds_commands_parse_into_the_right_config(monkeypatch):
    import bombkd_train.featurize
    import bombkd_train.trainer

    trained = _capture(monkeypatch, bombkd_train.trainer, "train")
    video = _seed_command("polyspace.train.train_fusion", 0)
    result = runner.invoke(app, ["train", *video])
    assert "captured" in result.output, result.output
    cfg = trained[-1]
    assert (cfg.data.loader, cfg.data.dataset, cfg.data.student, cfg.data.frames) == \
        ("dali", "ucf101", "vjepa2", 16)
    assert cfg.teachers == ["videomae", "timesformer", "vivit"]
    assert (cfg.classes, cfg.data.batch_size, cfg.epochs, cfg.data.device) == (101, 4, 5, "auto")

    cached = _seed_command("polyspace.train.train_fusion", 1)
    assert "--use_cached_features" in cached
    runner.invoke(app, ["train", *cached])
    cfg = trained[-1]
    assert (cfg.data.loader, cfg.data.root, cfg.data.batch_size, cfg.epochs) == \
        ("wds", "./features/ucf101", 32, 20)
    assert cfg.teachers == ["videomae", "timesformer", "vivit"]

    featurized = _capture(monkeypatch, bombkd_train.featurize, "featurize")
    result = runner.invoke(app, ["featurize", *_seed_command("polyspace.data.featurize", 0)])
    assert "captured" in result.output, result.output
    cfg = featurized[-1]
    assert cfg.teachers == ["videomae", "timesformer", "vivit"]
    assert (cfg.shard_size, cfg.dtype, cfg.decode_threads, cfg.frames, cfg.batch_size,
            cfg.device) == (1000, "float16", 4, 16, 8, "auto")


def test_use_cached_features_contradicting_loader_is_refused():
    result = runner.invoke(app, ["train", "--root", "r", "--split", "train", "--teachers", "a",
                                 "--converters", "c.pt", "--loader", "dali",
                                 "--use_cached_features"])
    assert result.exit_code == 2 and "--use_cached_features and --loader dali" in result.stderr


def test_seed_spelling_trains_with_the_caches_classes_and_a_converters_folder(cache, tmp_path):
    result = runner.invoke(app, ["train", "--root", str(cache), "--split", "train",
                                 "--teachers", "ta", "tb", "--converters", str(cache / "conv"),
                                 "--batch", "8", "--epochs", "1", "--use_cached_features",
                                 "--fusion-rank", "8", "--weight-decay", "0",
                                 "--save-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "run" / "fusion_ep1.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["classes"] == 4   # the cache's
    assert (ckpt["config"]["fusion_rank"], ckpt["config"]["weight_decay"]) == (8, 0)


def test_converters_directory_without_one_checkpoint_is_named(cache, tmp_path):
    def train(converters):
        return runner.invoke(app, ["train", "--use_cached_features", "--root", str(cache),
                                   "--split", "train", "--teachers", "ta", "tb", "--converters",
                                   str(converters), "--save-dir", str(tmp_path / "run"),
                                   "--device", "cpu"])
    empty = tmp_path / "empty"
    empty.mkdir()
    result = train(empty)
    assert result.exit_code == 2
    assert f"--converters {empty}: a directory that holds no .pt file" in result.stderr
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.pt", "b.pt"):
        (several / name).write_bytes(b"")
    result = train(several)
    assert result.exit_code == 2
    assert "a directory that holds 2 .pt files (a.pt, b.pt); pass one of them" in result.stderr


def test_a_missing_split_names_the_caches_splits(cache, tmp_path):
    result = runner.invoke(app, ["train", "--use_cached_features", "--root", str(cache),
                                 "--split", "val", "--teachers", "ta", "tb", "--converters",
                                 str(cache / "conv"), "--save-dir", str(tmp_path / "run"),
                                 "--device", "cpu"])
    assert result.exit_code == 2
    message = result.stderr
    assert "no split 'val' in this cache" in message and "it has test (synth), train (synth)" \
        in message, message
    assert ".tar" not in message


def test_no_progress_bars_in_a_piped_log(cache, tmp_path):
    """stderr is a pipe here: train, eval, train-converters and inspect --verify draw no bars."""
    runs = [
        ["train-converters", "--root", str(cache), "--split", "train", "--teachers", "ta", "tb",
         "--epochs", "2", "--save-dir", str(tmp_path / "conv")],
        ["train", "--use_cached_features", "--root", str(cache), "--split", "train",
         "--teachers", "ta", "tb", "--converters", str(tmp_path / "conv"), "--epochs", "1",
         "--save-dir", str(tmp_path / "run"), "--device", "cpu"],
        ["eval", "--use_cached_features", "--root", str(cache), "--split", "test",
         "--fusion", str(tmp_path / "run" / "fusion_ep1.pt"), "--device", "cpu"],
        ["inspect", str(cache), "--verify"],
    ]
    for args in runs:
        result = _run_module(*args)
        assert result.returncode == 0, result.stderr
        assert not re.search(r"\d+%\||it/s|s/it|batch/s", result.stderr), (args, result.stderr)
