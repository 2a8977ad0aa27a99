"""Faults injected into real parts, for the tests (in-process, or in a child process first)."""
from __future__ import annotations

from bombkd_io.video import ClipLoader


def failing_decode(victim: str):
    """A ``ClipLoader.decode_batch`` whose decode of the video at path ``victim`` fails on every
    call (a video that probes fine but cannot be decoded); the others decode as usual."""
    real = ClipLoader.decode_batch

    def decode_batch(self, positions):
        batch = real(self, positions)
        rows = [r for r, p in enumerate(batch.positions) if self.videos[p].path != victim]
        lost = [(p, "injected decode error") for p in batch.positions
                if self.videos[p].path == victim]
        return type(batch)(positions=[batch.positions[r] for r in rows], clips=batch.clips[rows],
                           frame_indices=[batch.frame_indices[r] for r in rows],
                           failed=batch.failed + lost,
                           decoded_by=[batch.decoded_by[r] for r in rows])

    return decode_batch
