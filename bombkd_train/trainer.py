"""One trainer for both loaders: frozen converters -> residual-gated fusion head.

Reads top to bottom: ``setup_data`` (the only place the two modes differ), ``setup_model``,
``setup_optim``, then a straight ``train()`` loop. A batch is always
``{"student": float32 [B, T', D], "label": int64 [B], "key": list[str], "index": int64 [B]}``.

The seed determines the run: it seeds the head's initialisation and the epoch plan (a pure
function of seed and epoch, see ``bombkd_io.sampling``). Checkpoints hold the model, optimizer,
RNG state, config, the plan's inputs and the cache manifest's sha256; an epoch checkpoint is
written after every epoch, a step checkpoint every ``--save-every`` steps or
``--save-every-minutes`` minutes (the last ``--keep`` kept), and one when a stop signal comes
(``runtime.stop_signals``: the step finishes, the checkpoint is written, ``train`` returns with
``stopped`` set). A step checkpoint also holds the loader's position (``loader.state_dict()``)
and every rank's running epoch sums, so ``--resume`` continues mid-epoch without reading what was
consumed and ends with the same weights and step records as an uninterrupted run. Under
``torchrun`` the head is wrapped in DDP, each rank reads its own part of every epoch, and the
ranks agree after each step whether to checkpoint or stop (one all-reduce of two flags), so all
stop at the same step.

One run per save dir: rank 0 locks it (``bombkd_io.lock``) from the start to ``close()``, and
clears the temporary files a killed run left of its checkpoints and metrics.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bombkd_io.atomic import atomic_path, remove_temps
from bombkd_io.errors import ConfigError, TrainingError
from bombkd_io.lock import lock_folder
from bombkd_io.video.route import is_cuda
from bombkd_train.checkpoint import (FUSION_KIND, checkpoint_header, is_step_checkpoint,
                                     newest_valid, prune_steps, run_checkpoints, save_checkpoint)
from bombkd_train.config import TrainConfig
from bombkd_train.converters import load_converters
from bombkd_train.data import open_source
from bombkd_train.evaluate import evaluate_model, topk_hits
from bombkd_train.fusion import FusionHead, FusionModel, teacher_specs
from bombkd_train.runtime import (StopRequest, all_gather_rows, all_reduce_sum, init_distributed,
                                  is_distributed, launch_rank, model_threads, parity_settings,
                                  stop_signals)

# Settings a resumed run must share with the run that wrote the checkpoint (besides the plan).
RESUME_KEYS = ("split", "teachers", "classes", "lr", "weight_decay", "gate_l1", "fusion_rank")
RUN_FILES = ["fusion_ep*.pt", "metrics.jsonl"]  # what a run writes into its save dir


@dataclass
class TrainResult:
    epochs: int              # epochs completed in total (including resumed ones)
    steps: int
    checkpoint: Path | None  # the last checkpoint written (rank 0; None on the other ranks)
    last: dict               # the last epoch's metrics record
    wall_s: float            # this process's training time (setup excluded)
    stopped: str | None = None  # the signal that stopped the run early (SIGTERM, ...), if one did
    save_s: float = 0.0      # of wall_s, the time spent writing checkpoints


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.save_dir = Path(cfg.save_dir)
        self.source = self.val = None
        # under torchrun only rank 0 writes (checkpoints, metrics), so only rank 0 locks
        self.lock = (lock_folder(self.save_dir, argument="--save-dir") if launch_rank() == 0
                     else None)
        try:
            self._start()
        except BaseException:
            self._release()
            raise

    def _start(self) -> None:
        """The rest of ``__init__``, with the save dir locked (unlocked again if it fails)."""
        cfg = self.cfg
        self.start_epoch, self.step = 0, 0
        self.resumed_from: Path | None = None
        self.resumed_at: tuple[int, bool] | None = None  # (step, epoch checkpoint?) resumed from
        self.midway = None  # a step checkpoint's loader state, epoch sums and time, to resume
        self.state = self._resume_state()
        self.stop = StopRequest()  # train() catches the stop signals while it runs
        self.saved, self.save_s, self.last_save = self.resumed_from, 0.0, time.monotonic()
        if self.lock is not None:  # with the lock held, these temporary files are a killed run's
            remove_temps(self.save_dir, RUN_FILES)
        # Process-wide state from here on; close() gives it back.
        joined = is_distributed()
        self.device, self.rank, self.world = init_distributed(cfg.data.device)
        # leave a process group the caller made; close the one torchrun's environment made here
        self.owns_group = not joined and self.world > 1
        self.main = self.rank == 0
        self.settings = contextlib.ExitStack()
        # full fp32 and deterministic kernels, as featurize and video mode's student run
        self.settings.enter_context(parity_settings())
        # torch's CPU threads, capped for a shared machine (see bombkd_train.runtime)
        self.settings.enter_context(model_threads(self.device, cfg.data.loader_workers))

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> "Trainer":
        self.setup_data()
        self.setup_model()
        self.setup_optim()
        return self

    def setup_data(self) -> None:
        """The only place the two modes differ: which loader yields the batch dicts."""
        data = replace(self.cfg.data, device=self.device)
        self.source = open_source(data, self.cfg.split, rank=self.rank, world_size=self.world)
        if self.cfg.val_split:
            # the student exactly as training resolved it; the order of evaluation is free
            stu = self.source.student
            val = replace(data, student=stu.backbone, frames=stu.frames, size=stu.size,
                          pooling=stu.pool, cache=None)
            self.val = open_source(val, self.cfg.val_split, rank=self.rank, world_size=self.world)
        if self.cfg.classes is None:  # the head covers every class the splits name
            found = [len(src.classes) for src in (self.source, self.val) if src is not None]
            self.cfg = replace(self.cfg, classes=max(found))
        for src, split in ((self.source, self.cfg.split), (self.val, self.cfg.val_split)):
            if src is not None and len(src.classes) > self.cfg.classes:
                n = len(src.classes)
                raise ConfigError(f"--classes {self.cfg.classes}: split {split!r} has {n} "
                                  f"classes; pass --classes {n} or more")

    def setup_model(self) -> None:
        stu = self.source.student
        converters, stats = load_converters(self.cfg.converters, student_dim=stu.dim,
                                            student_tokens=stu.tokens,
                                            teachers=self.cfg.teachers)
        torch.manual_seed(self.cfg.data.seed)  # the seed alone fixes the head's initial weights
        head = FusionHead(stu.dim, teacher_specs(converters), self.cfg.classes,
                          rank=self.cfg.fusion_rank)
        if self.state is not None:
            self._check_resume(self.state)
            head.load_state_dict(self.state["model"])
        self.head = head
        self.fusion = self.model = FusionModel(converters, head, stats).to(self.device)
        if self.world > 1:
            ids = [self.device] if is_cuda(self.device) else None
            self.model = DistributedDataParallel(self.fusion, device_ids=ids)

    def setup_optim(self) -> None:
        params = [p for p in self.head.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.state is not None:
            self.optim.load_state_dict(self.state["optimizer"])
            self.start_epoch, self.step = self.state["epoch"], self.state["step"]
            _set_rng(self.state["rng"])
            if "loader" in self.state:  # a step checkpoint: the rest of its epoch comes first
                self.midway = (self.state["loader"], self.state["sums"][self.rank],
                               self.state["elapsed"])
            self.state = None  # the weights now live in the model and optimizer

    # --- the loop ----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        log = MetricsLog(self.save_dir / "metrics.jsonl", upto=self.resumed_at,
                         enabled=self.main)
        start, last = time.perf_counter(), {}
        done = lambda epochs, stopped=None: TrainResult(  # noqa: E731
            epochs=epochs, steps=self.step, checkpoint=self.saved, last=last,
            wall_s=time.perf_counter() - start, stopped=stopped, save_s=self.save_s)
        with stop_signals() as self.stop:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                record = self.train_epoch(epoch, log)
                if record is None:  # a stop signal: a step checkpoint is written
                    return done(epoch, self._stopped())
                last = record
                if self.val is not None:
                    # the bare model: evaluation needs no gradient sync (ranks sum their counts)
                    val = evaluate_model(self.fusion, self.val.loader, self.val.classes,
                                         self.cfg.classes, device=self.device,
                                         progress=self.main and self.cfg.progress)
                    last.update(val_top1=val.top1, val_top5=val.top5, val_samples=val.count)
                log.write(last)
                self.saved = self.save(epoch + 1)
                if self._agree(self.stop.signal is not None, False)[0] and \
                        epoch + 1 < self.cfg.epochs:  # a signal during evaluation or the save
                    return done(epoch + 1, self._stopped())
        return done(self.cfg.epochs)

    def train_epoch(self, epoch: int, log: MetricsLog) -> dict | None:
        """One pass over this rank's batches (the rest of it, after a step checkpoint); returns
        the epoch record (all ranks summed), or None when a stop signal ended it early."""
        loader = self.source.loader
        names = self.head.teacher_names
        # loss, top1, top5, count, skipped, gate per teacher
        sums = torch.zeros(5 + len(names), dtype=torch.float64)
        first, elapsed = 0, 0.0
        if self.midway is not None:
            # this rank's own sums (and skip count) from the step checkpoint; the loader starts
            # at the batch after the checkpoint's (every rank at rank 0's position)
            state, row, elapsed = self.midway
            sums, self.midway = row.clone(), None
            loader.load_state_dict({**state, "skipped": int(sums[4])})
            first, sums[4] = state["batch"], 0.0  # the loader counts the skipped from here on
        loader.set_epoch(epoch)
        self.model.train()
        t_epoch = time.perf_counter() - elapsed
        t_step = time.perf_counter()
        bar = tqdm(loader, total=loader.num_batches(epoch) - first, unit="it",
                   desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not (self.main and self.cfg.progress))
        for batch in bar:
            # the cache dtype crosses to the device; the cast to float32 is exact
            student = batch["student"].to(self.device, non_blocking=True).float()  # [B, T', D]
            labels = batch["label"].to(self.device, non_blocking=True)  # [B]
            out = self.model(student)
            n = len(labels)
            if n:
                loss = F.cross_entropy(out.logits, labels) + self.cfg.gate_l1 * out.gate_l1()
            else:
                # an empty batch (every clip of it failed to decode on this rank): a zero step
                # that still joins the other ranks' gradient all-reduce
                loss = out.logits.sum() * 0.0
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            self.optim.step()
            self.step += 1
            # one device->host copy per step: loss, top-1, top-5, mean gate per teacher
            if n:
                loss_v, top1, top5, *gates = _step_stats(loss, out, labels, names).tolist()
                if not math.isfinite(loss_v):
                    raise _non_finite(loss_v, epoch, self.step, batch.get("key"), self.cfg)
                sums += torch.tensor([loss_v * n, top1, top5, n, 0, *(g * n for g in gates)],
                                     dtype=torch.float64)
                now = time.perf_counter()
                log.write({"kind": "step", "epoch": epoch + 1, "step": self.step,
                           "loss": loss_v, "top1": 100.0 * top1 / n,
                           "samples_per_s": n * self.world / max(now - t_step, 1e-9)})
                bar.set_postfix(loss=f"{loss_v:.4f}")
                t_step = now
            if self._checkpoint_step(epoch, sums, time.perf_counter() - t_epoch):
                bar.close()
                return None
        wall = time.perf_counter() - t_epoch
        # samples this rank's loader left out: corrupt ones (--on-error skip), unreadable videos
        sums[4] = loader.skipped
        loss_sum, top1, top5, count, skipped, *gates = all_reduce_sum(sums, self.device).tolist()
        mean = 1.0 / max(count, 1.0)
        return {"kind": "epoch", "epoch": epoch + 1, "step": self.step, "loss": loss_sum * mean,
                "top1": 100.0 * top1 * mean, "top5": 100.0 * top5 * mean,
                "samples_per_s": count / max(wall, 1e-9), "samples": int(count),
                "skipped": int(skipped), "gates": {k: g * mean for k, g in zip(names, gates)}}

    # --- checkpoints -------------------------------------------------------------------------

    def _checkpoint_step(self, epoch: int, sums: torch.Tensor, elapsed: float) -> bool:
        """After each step: write a step checkpoint when one is due (``--save-every``,
        ``--save-every-minutes``; not at the epoch's last batch, whose epoch checkpoint follows)
        or a stop signal came, on this rank or another. True: stop now."""
        cfg, loader = self.cfg, self.source.loader
        due = bool((cfg.save_every and self.step % cfg.save_every == 0) or
                   (cfg.save_every_minutes and
                    time.monotonic() - self.last_save >= 60 * cfg.save_every_minutes))
        due = due and loader.state_dict()["batch"] < loader.num_batches(epoch)
        stop, due = self._agree(self.stop.signal is not None, due)
        if stop or due:
            self.saved = self.save_step(epoch, sums, elapsed)
        return stop

    def _agree(self, stop: bool, save: bool) -> tuple[bool, bool]:
        """Whether any rank asks to stop, and to save: every rank acts on the same answer."""
        if self.world == 1:
            return stop, save
        flags = all_reduce_sum(torch.tensor([stop, save], dtype=torch.float64), self.device)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _stopped(self) -> str:
        """Wait for rank 0's checkpoint (torchrun ends every rank once one exits), then name the
        signal that stopped the run."""
        if is_distributed():
            dist.barrier()
        return self.stop.signal or "a signal to another rank"

    def save(self, epochs_done: int) -> Path | None:
        """``fusion_ep{N}.pt``: weights, optimizer, progress, RNG and the run's config."""
        if not self.main:
            return None
        return self._write(self._contents(epochs_done), f"fusion_ep{epochs_done}.pt")

    def save_step(self, epoch: int, sums: torch.Tensor, elapsed: float) -> Path | None:
        """``fusion_ep{N}_step{S}.pt``: what ``save`` writes, plus the loader's position and
        every rank's epoch sums so far (rank r's: row r), then only the last ``--keep`` kept.
        Every rank calls it (the sums are gathered); rank 0 writes."""
        loader = self.source.loader
        mine = sums.clone()
        mine[4] = loader.skipped
        rows = all_gather_rows(mine, self.device)  # [world, 5 + teachers]
        self.last_save = time.monotonic()
        if not self.main:
            return None
        ckpt = {**self._contents(epoch), "loader": loader.state_dict(), "sums": rows,
                "elapsed": elapsed}
        path = self._write(ckpt, f"fusion_ep{epoch + 1}_step{self.step}.pt")
        prune_steps(self.save_dir, self.cfg.keep)
        return path

    def _contents(self, epochs_done: int) -> dict:
        return {**checkpoint_header(FUSION_KIND), "model": self.head.state_dict(),
                "head": self.head.spec(), "optimizer": self.optim.state_dict(),
                "epoch": epochs_done, "step": self.step, "rng": _get_rng(),
                "config": asdict(self.cfg), "student": asdict(self.source.student),
                "classes": list(self.source.classes), "num_samples": self.source.num_samples,
                "plan": self.plan(), "manifest_sha256": self.source.manifest_sha256}

    def _write(self, ckpt: dict, name: str) -> Path:
        start = time.perf_counter()
        path = save_checkpoint(ckpt, self.save_dir / name)
        self.save_s += time.perf_counter() - start
        return path

    def plan(self) -> dict[str, int]:
        """What the epoch plan (``bombkd_io.sampling.epoch_batches``) is a function of, besides
        the epoch: a resumed run must replay the same plan to end with the same weights. Its keys
        are the ones checkpoints have always recorded (``batch``: ``batch_size``), so older
        checkpoints still resume; loader workers are not among them (they only prefetch)."""
        data = self.cfg.data
        return {"world_size": self.world, "shard_size": self.source.shard_size,
                "batch": data.batch_size, "seed": data.seed,
                "num_samples": self.source.num_samples}

    def _resume_state(self) -> dict | None:
        """The newest valid checkpoint in the save dir with ``--resume`` (None without one)."""
        found = run_checkpoints(self.save_dir)
        if found and not self.cfg.resume:
            raise ConfigError(f"--save-dir {self.save_dir}: already holds {found[-1].name}; "
                              "pass --resume to continue that run, or another --save-dir")
        if not found or not self.cfg.resume:
            return None
        picked = newest_valid(found, kind=FUSION_KIND, argument="--resume")
        if picked is None:
            raise ConfigError(f"--resume: none of the {len(found)} checkpoints in "
                              f"{self.save_dir} can be read; pass another --save-dir")
        self.resumed_from, state = picked
        self.resumed_at = (state["step"], not is_step_checkpoint(self.resumed_from))
        return state

    def _check_resume(self, ckpt: dict) -> None:
        old, new = ckpt["config"], asdict(self.cfg)
        saved = _saved_plan(ckpt)
        if "loader" not in ckpt:  # an epoch checkpoint: the next epoch is this world size's
            saved.pop("world_size", None)
        elif saved["world_size"] != self.world:
            raise _other_world(self.resumed_from, ckpt["epoch"], saved["world_size"], self.world)
        problems = (_differences("", new, {k: old.get(k) for k in RESUME_KEYS})
                    + _differences("student ", asdict(self.source.student), ckpt["student"])
                    + _differences("epoch plan ", self.plan(), saved))
        if ckpt.get("manifest_sha256") not in (None, self.source.manifest_sha256):
            problems.append(f"cache manifest sha256: {self.source.manifest_sha256} here, "
                            f"{ckpt['manifest_sha256']} in the checkpoint (the cache changed "
                            "since)")
        if problems:
            raise ConfigError([f"--resume: the checkpoint in {self.save_dir} is from another "
                               f"configuration ({'; '.join(problems)}); resume with the same "
                               "settings or pass another --save-dir"])

    def close(self) -> None:
        """Release the loaders, restore the precision, determinism and thread settings, leave
        our process group, unlock the save dir."""
        try:
            for source in (self.source, self.val):
                if source is not None:
                    source.close()
            self.settings.close()
            if self.owns_group and dist.is_initialized():
                dist.destroy_process_group()
        finally:
            self._release()

    def _release(self) -> None:
        """Give the save dir back to the next run."""
        if self.lock is not None:
            self.lock.release()


def train(cfg: TrainConfig) -> TrainResult:
    """``bombkd train``: set up, train, and leave the process group."""
    trainer = Trainer(cfg)
    try:
        return trainer.setup().train()
    finally:
        trainer.close()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line.

    Opened ``upto`` the checkpoint a run resumes from (its step, and whether it is an epoch
    checkpoint, which comes after that step's epoch record): records written after it (by a run
    interrupted after its last checkpoint) are dropped, so a resumed run continues the file
    without repeating steps, and a fresh run (``None``) starts an empty one. So is a line that
    does not decode: the last line of a run killed while appending to the file.
    """

    def __init__(self, path: Path, *, upto: tuple[int, bool] | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file() and upto is not None:
            kept = [line for line in path.read_text(errors="replace").splitlines()
                    if _record_at(line) <= upto]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _record_at(line: str) -> tuple[float, bool]:
    """Where a metrics line stands: (its step, whether it is an epoch record, which follows that
    step's record); infinity for one that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return float("inf"), True
    step = record.get("step") if isinstance(record, dict) else None
    return (step, record.get("kind") == "epoch") if isinstance(step, int) else (float("inf"), True)


def _step_stats(loss: torch.Tensor, out, labels: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``[loss, top-1 hits, top-5 hits, gate per teacher]`` as one float64 CPU tensor."""
    top1, top5 = topk_hits(out.logits.detach(), labels)
    values = [loss.detach(), top1, top5, *(out.gates[k].detach() for k in names)]
    return torch.stack([v.double() for v in values]).cpu()


def _differences(what: str, here: dict, recorded: dict) -> list[str]:
    """``{what}{key}: {here} here, {recorded} in the checkpoint`` for each recorded value that
    this run does not share: the one "does the run contradict its checkpoint" decision."""
    return [f"{what}{k}: {here.get(k)!r} here, {v!r} in the checkpoint"
            for k, v in recorded.items() if here.get(k) != v]


def _saved_plan(ckpt: dict) -> dict:
    """The checkpoint's epoch plan; for one written before plans were saved, what its config
    tells of it (a flat config of that time: ``batch``, ``seed``, ``workers`` at the top)."""
    if "plan" in ckpt:  # loader workers were part of it once; they no longer change the order
        return {k: v for k, v in ckpt["plan"].items() if k != "workers"}
    cfg = ckpt["config"]
    return {"batch": cfg["batch"], "seed": cfg["seed"], "num_samples": ckpt["num_samples"]}


def _other_world(path: Path, epochs_done: int, saved: int, world: int) -> ConfigError:
    """A step checkpoint resumed with another number of ranks: the rest of its epoch was
    planned for the ranks it was written with."""
    before = f"fusion_ep{epochs_done}.pt" if epochs_done else "the start"
    return ConfigError(f"--resume: {path} stopped in the middle of epoch {epochs_done + 1} with "
                       f"{saved} rank(s), this run has {world}; resume with {saved} rank(s) "
                       f"(torchrun --nproc_per_node {saved}) to finish that epoch, or delete the "
                       f"step checkpoints fusion_ep*_step*.pt in {path.parent} to restart epoch "
                       f"{epochs_done + 1} from {before} with {world}")


def _get_rng() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _non_finite(loss: float, epoch: int, step: int, keys, cfg: TrainConfig) -> TrainingError:
    """Stop a run whose loss is nan/inf before it writes a checkpoint of broken weights."""
    shown = ", ".join(map(str, (keys or [])[:4])) + (", ..." if len(keys or []) > 4 else "")
    check = (f"`bombkd inspect {cfg.data.root} --split {cfg.split} --verify` checks the cache"
             if cfg.data.loader == "wds" else "`bombkd probe` checks the videos")
    return TrainingError(f"epoch {epoch + 1}, step {step}: the loss is {loss} (batch: {shown}); "
                         f"corrupt features or a diverging run: {check}, or lower --lr "
                         f"{cfg.lr:g}; no checkpoint was written for this epoch")
