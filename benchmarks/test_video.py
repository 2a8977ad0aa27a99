"""Video side: clips/s of the DALI clip loader vs PyAV, per codec, routed as on this device.

For each codec the same sample videos are decoded into ``[T, S, S, 3]`` clips two ways:

    decode/<codec>/loader   ``ClipLoader`` (the DALI pipeline; codecs DALI cannot decode on this
                            device are decoded by PyAV and enter the same pipeline raw)
    decode/<codec>/pyav     ``decode_clip(backend="pyav")``: PyAV and a torch resize, one by one

Checks: on a GPU, where DALI decodes every video of the codec (NVDEC), the loader is at least as
fast as PyAV (>= 1x). Where DALI decodes on the CPU (the same kind of software decoders as PyAV)
it may cost at most a fifth more (>= 0.8x); where any video of the codec is routed to PyAV
(mjpeg and mpeg4 on a GPU, and there vp9 clips under NVDEC's 128 px), the loader runs PyAV and
then hands the frames to the DALI pipeline, which may cost up to 30% more (>= 0.7x; measured 0.76
to 0.96x for mpeg4 on 2 CPU cores).
"""
from __future__ import annotations

import pytest

from benchmarks.ledger import Workload
from benchmarks.workloads import make_videos
from bombkd_io.datasets import index_dataset
from bombkd_io.video import ClipLoader, decode_clip, parse_device, probe_videos

CODECS = ("vp9", "mjpeg", "h264", "mpeg4")
GPU_DALI_MIN, CPU_DALI_MIN, PYAV_ROUTE_MIN = 1.0, 0.8, 0.7
PASSES = 3      # passes over the videos per round, so a round is long enough to time


@pytest.fixture(scope="module")
def codec_videos(bench_dir, bench_size):
    """codec -> probed videos (VideoInfo) of a small dataset in that codec, made once."""
    made = {}

    def get(codec: str):
        if codec not in made:
            root = make_videos(bench_dir / f"videos-{codec}", bench_size, codec=codec,
                               per_class=bench_size.codec_per_class)
            paths = [item.path for item in index_dataset("ucf101", root, "train").items]
            paths += [item.path for item in index_dataset("ucf101", root, "test").items]
            infos, failed = probe_videos(paths, device=parse_device("auto"))
            assert not failed, failed
            made[codec] = infos
        return made[codec]

    return get


@pytest.mark.parametrize("codec", CODECS)
def test_decode(benchmark, ledger, codec_videos, bench_size, codec):
    infos = codec_videos(codec)
    step = bench_size.batch_size
    loader = ClipLoader(infos, frames=bench_size.frames, size=bench_size.size, batch_size=step,
                        device=parse_device("auto"))
    batches = [list(range(i, min(i + step, len(infos)))) for i in range(0, len(infos), step)]

    def with_loader() -> int:
        return sum(len(b.positions) for _ in range(PASSES) for b in loader.batches(batches))

    def with_pyav() -> int:
        for info in infos * PASSES:
            decode_clip(info.path, bench_size.frames, bench_size.size, backend="pyav")
        return len(infos) * PASSES

    with loader:
        done = ledger.interleave(benchmark, [
            Workload(f"decode/{codec}/loader", with_loader, len(infos) * PASSES, "clips"),
            Workload(f"decode/{codec}/pyav", with_pyav, len(infos) * PASSES, "clips"),
        ], rounds=bench_size.rounds, group=f"decode-{codec}")
    assert set(done.values()) == {len(infos) * PASSES}
    fast, pyav = ledger.get(f"decode/{codec}/loader"), ledger.get(f"decode/{codec}/pyav")
    routes = sorted({info.route for info in infos})
    route = routes[0] if len(routes) == 1 else "+".join(routes)
    on_gpu = parse_device("auto") == "cuda"
    limit = bench_size.limit(f"decode-{codec}", PYAV_ROUTE_MIN if "pyav" in routes else
                             GPU_DALI_MIN if on_gpu else CPU_DALI_MIN)
    ledger.require(
        f"decode-{codec}", f"{codec} clips/s, clip loader ({route} route, "
        f"{'GPU' if on_gpu else 'CPU'}) {fast.rate:.1f} vs PyAV {pyav.rate:.1f}",
        ledger.ratios(f"decode/{codec}/loader", f"decode/{codec}/pyav"),
        ">=", limit, unit="x",
        details={"route": route, "loader_per_s": fast.rate, "pyav_per_s": pyav.rate})
