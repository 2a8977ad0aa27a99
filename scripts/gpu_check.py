"""The prepared GPU check: one short run (under 5 minutes, no network) on a machine with a GPU.

Prints one line per check, ``PASS|FAIL|SKIP|INFO <check>: <detail>``, and exits 1 if any check
failed. The torch side needs no DALI: CUDA and its NVDEC row, the device parser, a pinned-memory
transfer, the student on CUDA against the CPU, one fusion-head step. Where DALI is installed: the
CUDA tests, each codec's route against PyAV frame by frame, NVDEC forced on what routing keeps
from it (INFO: do the reasons still hold?), and video mode on the GPU against a cache made on the
CPU. Where it is not, those are SKIP lines that say so.

    bash scripts/gpu_check.sh            # or: python scripts/gpu_check.py
"""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bombkd_io.errors import ConfigError  # noqa: E402
from bombkd_io.sample_data import (GPU_CODECS, class_specs, encode_video,  # noqa: E402
                                   make_codec_clips, make_sample_data, render_clip)
from bombkd_io.sampling import sample_indices  # noqa: E402
from bombkd_io.video.route import device_caps, parse_device  # noqa: E402

STUDENT = "tiny-vjepa2"
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
NO_DALI = "DALI is not installed here"


class Skip(Exception):
    """A check that cannot run here; the message says why."""


def check_cuda() -> str:
    caps = device_caps("cuda:0")
    return (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}; NVDEC row {caps.name}: {', '.join(sorted(caps.codecs))}")


def check_device_parser() -> str:
    count = torch.cuda.device_count()
    try:
        parse_device(f"cuda:{count}")
    except ConfigError as err:
        return f"cuda:{count} refused before any CUDA call: {err}"
    raise AssertionError(f"cuda:{count} accepted on a machine with {count} GPU(s)")


def check_pinned_transfer() -> str:
    host = torch.randint(0, 256, (256 << 20,), dtype=torch.uint8).pin_memory()   # 256 MiB
    torch.cuda.synchronize()
    start = time.perf_counter()
    device = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert host.is_pinned() and torch.equal(device.cpu(), host)
    rate = host.numel() / seconds / 1e9
    return f"256 MiB pinned -> GPU in {seconds * 1e3:.1f} ms ({rate:.1f} GB/s)"


def _student_difference(cpu_model, clips: torch.Tensor) -> tuple[float, float]:
    """(max |GPU - CPU|, that over max |CPU|) of the student's features for ``clips``."""
    ref = cpu_model(clips)                                     # [B, T', D]
    got = copy.deepcopy(cpu_model).to("cuda")(clips).cpu()     # [B, T', D]
    worst = float((got - ref).abs().max())
    return worst, worst / float(ref.abs().max())


def check_student() -> str:
    from bombkd_train.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone(STUDENT, device="cpu")
    clips = torch.randint(0, 256, (2, 16, 112, 112, 3), dtype=torch.uint8)  # [B, T, S, S, 3]
    default = _student_difference(model, clips)
    with _full_fp32():
        exact = _student_difference(model, clips)
    line = (f"{STUDENT} on CUDA vs CPU, max |diff| {exact[0]:.2e} (relative {exact[1]:.2e}) in "
            f"full fp32; {default[0]:.2e} ({default[1]:.2e}) with torch's default TF32 settings")
    assert exact[1] <= 1e-4, line
    return line


class _full_fp32:
    """No TF32 in matmuls or cuDNN convolutions inside the block (parity runs)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def check_fusion_step() -> str:
    from bombkd_train.fusion import FusionHead, TeacherSpec

    torch.manual_seed(0)
    head = FusionHead(96, [TeacherSpec("t", 64, 4)], 6)
    student, teacher = torch.randn(8, 8, 96), torch.randn(8, 4, 64)     # [B, Ts, Ds], [B, Tk, Dk]
    labels = torch.randint(0, 6, (8,))
    losses = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(head).to(device)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with _full_fp32():
            out = model(student.to(device), {"t": teacher.to(device)})
            loss = torch.nn.functional.cross_entropy(out.logits, labels.to(device))
            loss.backward()
            optim.step()
        losses[device] = float(loss.detach())
        moved = any(not torch.equal(a.cpu(), b) for a, b in
                    zip(model.parameters(), head.parameters()))
        assert moved and np.isfinite(losses[device]), (device, losses[device])
    rel = abs(losses["cuda"] - losses["cpu"]) / abs(losses["cpu"])
    assert rel <= 1e-5, losses
    return f"one AdamW step on CUDA, loss {losses['cuda']:.6f} (CPU {losses['cpu']:.6f})"


def check_cuda_tests() -> str:
    if not HAS_DALI:
        raise Skip(f"{NO_DALI}: the CUDA tests decode with DALI's mixed decoder")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                          "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True,
                         timeout=150)
    last = (run.stdout.strip().splitlines() or ["no output"])[-1]
    assert run.returncode == 0 and "skipped" not in last, run.stdout[-3000:] + run.stderr[-2000:]
    return last


def check_routes(tmp: Path) -> list[tuple[str, str]]:
    """One (status, line) per codec: its route on this GPU against PyAV, frame by frame."""
    if not HAS_DALI:
        raise Skip(f"{NO_DALI}: no route to compare with PyAV")
    from bombkd_io.video import ClipLoader, decode_clip, probe_videos
    from bombkd_io.video.compare import GPU_TOLERANCE, clip_difference

    infos, failed = probe_videos(make_codec_clips(tmp / "codecs", GPU_CODECS, 176, 144).values(),
                                 device="cuda")
    assert not failed, failed
    with ClipLoader(infos, frames=16, size=112, batch_size=len(infos), device="cuda") as loader:
        batch = loader.decode_batch(list(range(len(infos))))
    lines = [("FAIL", f"{infos[p].codec}: {reason}") for p, reason in batch.failed]
    for pos, clip, by in zip(batch.positions, batch.clips.cpu().numpy(), batch.decoded_by):
        info = infos[pos]
        diff = clip_difference(clip, decode_clip(info.path, 16, 112, backend="pyav"))
        status = "PASS" if diff.within(*GPU_TOLERANCE) else "FAIL"
        lines.append((status, f"{info.codec} {by} ({info.reason}) vs PyAV: {diff}"))
    return lines


def check_forced_nvdec(tmp: Path) -> list[str]:
    """NVDEC on the streams routing keeps from it: does each reason still hold on this GPU?"""
    if not HAS_DALI:
        raise Skip(f"{NO_DALI}: NVDEC cannot be forced")
    from bombkd_io.video import decode_clip, probe_video
    from bombkd_io.video.compare import clip_difference
    from bombkd_io.video.dali import DaliClipDecoder, DaliRunError, encoded_sample

    # 96 frames, 8 sampled: DALI seeks between wanted frames (more than 10 apart), the case in
    # which it does not flush its mpeg4 B-frame filter
    long = tmp / "long_mpeg4_bframes.avi"
    encode_video(render_clip(class_specs(6)[4], np.random.default_rng(7), 96, 176, 144), long,
                 "mpeg4_bframes", fps=25)
    paths = {"mpeg4 (B-frames, seeking)": long, "mjpeg": tmp / "codecs" / "clip_mjpeg.avi",
             "av1": tmp / "codecs" / "clip_av1.mkv", "hevc 128x128": tmp / "hevc_128.mp4"}
    encode_video(render_clip(class_specs(6)[4], np.random.default_rng(7), 24, 128, 128),
                 paths["hevc 128x128"], "hevc", fps=25)
    lines = []
    for what, path in paths.items():
        info = probe_video(path, "cuda")
        indices = sample_indices(info.num_frames, 8)
        decoder = DaliClipDecoder(size=112, batch_size=1, device="cuda", num_threads=1)
        try:
            clip = decoder.run([encoded_sample(info.path, indices)])[0].cpu().numpy()
            outcome = str(clip_difference(clip, decode_clip(info.path, 8, 112, backend="pyav")))
        except DaliRunError as err:
            outcome = str(err)
        finally:
            decoder.close()
        lines.append(f"{what} forced on NVDEC (routed {info.route}: {info.reason}): {outcome}")
    return lines


def check_parity(tmp: Path) -> list[tuple[str, str]]:
    """Student features of video mode on the GPU vs a float32 cache featurized on the CPU."""
    if not HAS_DALI:
        raise Skip(f"{NO_DALI}: featurize and video mode decode with DALI")
    from bombkd_train.config import DataConfig, FeaturizeConfig
    from bombkd_train.data import open_source
    from bombkd_train.featurize import featurize

    videos = make_sample_data(tmp / "videos", classes=2, per_class=4, codec="mixed", seed=0)
    cache = tmp / "cache"
    featurize(FeaturizeConfig(dataset="ucf101", root=str(videos), split="train", student=STUDENT,
                              out=str(cache), shard_size=4, dtype="float32", batch_size=3,
                              decode_threads=2, device="cpu"))
    common = dict(batch_size=3, seed=3, student=STUDENT)
    cached = open_source(DataConfig(loader="wds", root=str(cache), **common), "train").loader
    with _full_fp32():
        video = open_source(DataConfig(loader="dali", root=str(videos), dataset="ucf101",
                                       cache=str(cache), device="cuda", **common), "train").loader
        cached.set_epoch(0), video.set_epoch(0)
        pairs = list(zip(cached, video))
    assert all(a["key"] == b["key"] for a, b in pairs), "the two modes gave different batches"
    worst = max(float((a["student"] - b["student"].cpu()).abs().max()) for a, b in pairs)
    scale = max(float(a["student"].abs().max()) for a, _ in pairs)
    # no bound yet: the decode differs within compare.GPU_TOLERANCE levels, and what that makes
    # of the features is what this line measures, to set the GPU tolerance from (DECODERS.md)
    return [("INFO", f"{len(pairs)} batches, video mode (GPU, full fp32) vs CPU cache: student "
                     f"features max |diff| {worst:.3e}, relative {worst / scale:.3e}")]


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL cuda: torch sees no GPU; nothing else to check")
        return 1
    failed = False
    with tempfile.TemporaryDirectory(prefix="bombkd-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        checks = [("cuda", check_cuda), ("device-parser", check_device_parser),
                  ("pinned-transfer", check_pinned_transfer), ("student", check_student),
                  ("fusion-step", check_fusion_step), ("cuda-tests", check_cuda_tests),
                  ("routes", lambda: check_routes(tmp)),
                  ("forced-nvdec", lambda: check_forced_nvdec(tmp)),
                  ("parity", lambda: check_parity(tmp))]
        for name, check in checks:
            start = time.perf_counter()
            try:
                result = check()
            except Skip as why:
                result = [("SKIP", str(why))]
            except Exception as err:        # one line per check, whatever went wrong
                result = [("FAIL", f"{type(err).__name__}: {str(err)[:1500]}")]
            if isinstance(result, str):
                result = [("PASS", result)]
            for item in result:
                status, line = item if isinstance(item, tuple) else ("INFO", item)
                failed |= status == "FAIL"
                print(f"{status} {name}: {line} [{time.perf_counter() - start:.1f} s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
