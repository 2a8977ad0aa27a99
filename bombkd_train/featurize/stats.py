"""What a featurize run did and where its time went (``FeaturizeStats``), and the lines the
command prints from it: the summary, and one line per rank of a run over several processes."""
from __future__ import annotations

from dataclasses import dataclass, field

from bombkd_train.featurize.ranks import Ranks


@dataclass
class FeaturizeStats:
    """Where the time went (seconds) and how much was done; filled in by ``featurize``."""
    clips: int = 0               # samples written (per model set)
    failed: int = 0              # videos skipped (probe + decode)
    shards: int = 0              # shard files written
    bytes: int = 0               # bytes written
    probe_s: float = 0.0
    decode_wait_s: float = 0.0   # time the main thread waited for decoded clips
    infer_s: dict[str, float] = field(default_factory=dict)  # per model
    write_s: float = 0.0         # encoding + tar writing + hashing
    total_s: float = 0.0
    threads: int = 0             # torch intra-op threads the models ran with
    failed_videos: list[dict] = field(default_factory=list)   # the manifest's {"path", "reason"}
    suspect_videos: list[dict] = field(default_factory=list)  # cached, decoded with warnings
    ranks: list[str] = field(default_factory=list)  # one line per rank (several processes)
    found_failed: int = 0        # videos this process found unreadable (its probe, its shards)
    again: int = 0               # samples written twice: their shard's start moved (ranks.py)

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.total_s if self.total_s else 0.0

    def rank_line(self, ranks: Ranks) -> str:
        """This process's part of a run over several: clips, clips/s, failures it found."""
        again = f" ({self.again} written again: a failure moved their shard)" if self.again \
            else ""
        return (f"{ranks.label}: {self.clips} clips{again} in {self.total_s:.1f}s "
                f"({self.clips_per_s:.1f} clips/s), {self.found_failed} failed")

    def summary(self, out: str) -> str:
        """One line of counts and times, then the failed and suspect videos, a few by name."""
        suspect = f", {len(self.suspect_videos)} suspect" if self.suspect_videos else ""
        line = (f"featurized {self.clips} clips ({self.failed} failed{suspect}) in "
                f"{self.total_s:.1f}s ({self.clips_per_s:.1f} clips/s): {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB in {out} (writing {self.write_s:.1f}s, "
                f"decode wait {self.decode_wait_s:.1f}s, models {sum(self.infer_s.values()):.1f}s)")
        named = _named("failed", self.failed_videos) + _named("suspect", self.suspect_videos)
        if not named:
            return line
        return "\n".join([line, *named, f"  all of them, with reasons: `bombkd inspect {out}`"])


def _named(what: str, videos: list[dict], shown: int = 3, width: int = 160) -> list[str]:
    """``what: path: reason`` for the first ``shown`` videos (long reasons cut), then a count."""
    lines = []
    for v in videos[:shown]:
        reason = v["reason"] if len(v["reason"]) <= width else v["reason"][:width - 3] + "..."
        lines.append(f"  {what}: {v['path']}: {reason}")
    if len(videos) > shown:
        lines.append(f"  ... and {len(videos) - shown} more {what}")
    return lines


def gather_stats(stats: FeaturizeStats, ranks: Ranks) -> None:
    """One line per rank, and the run's totals (under torchrun: over every rank)."""
    parts = ranks.gather((stats.rank_line(ranks), stats.clips, stats.shards, stats.bytes))
    stats.ranks = [line for line, *_ in parts]
    stats.clips, stats.shards, stats.bytes = (sum(p[i] for p in parts) for i in (1, 2, 3))
