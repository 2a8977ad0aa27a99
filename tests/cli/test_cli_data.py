"""`bombkd sample-data` and `bombkd probe` through the CLI: outputs, exit codes, messages."""
from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from bombkd_train.cli.main import app

runner = CliRunner()


def test_sample_data_writes_the_dataset(tmp_path):
    out = tmp_path / "data"
    result = runner.invoke(app, ["sample-data", str(out), "--classes", "2", "--per_class", "2",
                                 "--codec", "mjpeg", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 clips (mjpeg)" in result.output
    assert len(list(out.glob("*/v_*_g0?_c01.avi"))) == 4
    assert (out / "ucfTrainTestlist" / "testlist01.txt").read_text().count("\n") == 2


def test_sample_data_refuses_an_unknown_codec(tmp_path):
    result = runner.invoke(app, ["sample-data", str(tmp_path / "x"), "--codec", "theora"])
    assert result.exit_code == 2
    assert "Invalid value for '--codec'" in result.stderr and "'theora'" in result.stderr


def test_probe_prints_codec_size_fps_frames_route_and_why(codec_videos):
    result = runner.invoke(app, ["probe", str(codec_videos["vp9"]), str(codec_videos["h264"]),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith("vp9 160x120 25 fps 24 frames route=dali "
                             "(vp9 on DALI's CPU decoder)")
    assert lines[1].endswith("h264 160x120 25 fps 24 frames route=pyav "
                             "(h264: DALI's CPU decoder takes mjpeg, vp8, vp9 only)")


def test_probe_saves_a_contact_sheet(codec_videos, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["probe", str(codec_videos["mpeg4"]), "--save-frames", str(sheet),
                                 "--frames", "10", "--size", "32"])
    assert result.exit_code == 0, result.output
    with Image.open(sheet) as image:
        assert image.size == (8 * 32, 2 * 32)       # 10 frames, 8 per row


def test_probe_of_a_bad_file_exits_2_naming_it(bad_videos, codec_videos):
    path = bad_videos["empty"]
    result = runner.invoke(app, ["probe", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path}: empty file (re-download or re-encode it)"
    result = runner.invoke(app, ["probe", str(codec_videos["vp9"]), "--device", "tpu"])
    assert result.exit_code == 2 and "Invalid value for '--device': 'tpu': expected auto, cpu, gpu" in result.output
    result = runner.invoke(app, ["probe", str(bad_videos["missing"]), str(codec_videos["vp9"])])
    assert result.exit_code == 2 and "route=dali" in result.stdout
    assert f"error: {bad_videos['missing']}: no such file (check the path)" in result.stderr


def test_save_frames_with_several_videos_says_how_to_do_it(codec_videos, tmp_path):
    sheet = tmp_path / "sheet.png"
    first, second = codec_videos["vp9"], codec_videos["h264"]
    result = runner.invoke(app, ["probe", str(first), str(second), "--save-frames", str(sheet)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --save-frames takes one video, got 2; probe the others without it, "
        f"e.g. `bombkd probe {first} --save-frames {sheet}`")
    assert not sheet.exists() and not list(tmp_path.iterdir())
