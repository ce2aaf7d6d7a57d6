"""``atlas-train fit``: the training loop, one process or DDP under torchrun.

Read it top to bottom: set up (DDP if torchrun started us), open the shard
streams, build or resume the model, then the loop: step, log, validate,
checkpoint. Rank 0 logs and checkpoints; every rank runs the same number of
steps because ``ShardStream`` gives each the same number of batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import distributed as dist

from shards import atomic_write_text, check_output_dir
from shards.blocks import DeviceCutter
from shards.manifest import check_compatible, sampling_rates
from shards.reader import ShardStream
from shards.sources import ShardSourceError
from shards.scores import confusion, voxel_scores
from trainer import audit
from trainer import checkpoint as ckpt_io
from trainer.curves import plot, read_rows, write_rows
from trainer.devices import resolve_device
from trainer.augment import flip_pairs, jitter, learning_rate, step_generator
from trainer.config import OPTIMIZERS, SCHEDULES, ModelConfig, TrainConfig
from trainer.models import build_model, memory_format


class TrainError(Exception):
    """Training cannot start: bad run directory, shards without a manifest, wrong checkpoint."""


def fit(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train ``model_cfg`` on ``cfg.shards``; returns a summary (rank 0's view)."""
    try:
        chosen = resolve_device(cfg.device)  # before any work: a GPU that is not there is a one-line error
        cfg = cfg.resolved()  # the recipe's settings, where none was given
        model_cfg = model_cfg.for_recipe(cfg.recipe)  # and its batch norm
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    _check_recipe(cfg)
    check_output_dir(cfg.out)
    ranks = setup_distributed(chosen)
    stop = _sigterm_interrupts()  # `docker stop`, a batch scheduler: a checkpoint, as for Ctrl-C
    try:
        quiet = not ranks.master  # rank 0 logs and checkpoints
        return _train(cfg, model_cfg, resume, ranks, progress and not quiet, (lambda m: None) if quiet else log)
    finally:
        stop()
        if ranks.ddp:
            dist.destroy_process_group()


def _check_recipe(cfg: TrainConfig) -> None:
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise TrainError(f"--lr must be a finite positive number, got {cfg.lr}")
    if cfg.optimizer not in OPTIMIZERS or cfg.schedule not in SCHEDULES:
        raise TrainError(
            f"optimizer {cfg.optimizer!r}, schedule {cfg.schedule!r}: choose from {OPTIMIZERS}, {SCHEDULES}"
        )
    if not 0 <= cfg.warmup < 1 or not cfg.weight_decay >= 0:
        raise TrainError(f"--warmup must be in [0, 1) and --weight-decay >= 0, got {cfg.warmup}, {cfg.weight_decay}")
    if cfg.budget_clock not in ("wall", "cpu"):
        raise TrainError(f"--budget-clock is wall or cpu, got {cfg.budget_clock!r}")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise TrainError(f"--time-budget must be a positive number of minutes, got {cfg.time_budget}")


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adam``, ``adamw``, or ``sgd``: SGD with Nesterov momentum 0.99, as nnU-Net trains. SGD's step is
    proportional to the gradient, where Adam's is about ``lr`` whatever the gradient's size."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class Ranks:
    """This process among the others: its rank, the world size, its device."""

    rank: int
    world: int
    device: torch.device
    ddp: bool

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(chosen: torch.device) -> Ranks:
    """DDP when torchrun started us (``RANK``, ``WORLD_SIZE`` > 1): the process group, a device per local rank."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(0, 1, chosen, ddp=False)
    cuda = chosen.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, ddp=True)


class Clock:
    """Training time against ``--time-budget`` (minutes), across resumes; validation paused out.

    ``wall``: elapsed time. ``cpu``: this process's CPU time over all its
    threads (``--workers 0`` puts the data loading in it too): a budget that
    other work on the machine does not eat into, for comparing models.

    With a budget the schedule's progress is the larger of the step share and
    the time share, so a run cut by its budget still ends its schedule. Every
    rank must stop at the same step (DDP): under torchrun the ranks agree on
    the largest clock (all-reduce max).
    """

    def __init__(self, budget_minutes: float | None, device: torch.device, kind: str = "wall"):
        self.budget = None if budget_minutes is None else 60 * budget_minutes
        self.device = device
        self.read = time.process_time if kind == "cpu" else time.perf_counter  # cpu: this process, all threads
        self.before = 0.0  # seconds trained before a resume
        self.restart()
        self.now = 0.0  # the shared clock at the last tick

    def seconds(self) -> float:
        return self.before + self.read() - self.start - self.paused_for

    def restart(self) -> None:
        self.start, self.paused_for = self.read(), 0.0

    def tick(self) -> None:
        """Read the clock, once a step (all ranks: the largest)."""
        if self.budget is None:
            return
        mine = torch.tensor([self.seconds()], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        self.now = float(mine.item())

    def spent(self) -> bool:
        return self.budget is not None and self.now >= self.budget

    def progress(self, step: int, total_steps: int) -> float:
        share = step / max(total_steps, 1)
        return share if self.budget is None else max(share, self.now / self.budget)

    @contextlib.contextmanager
    def paused(self):
        t0 = self.read()
        try:
            yield
        finally:
            self.paused_for += self.read() - t0


@dataclass
class Window:
    """What this rank adds up between two rows of ``metrics.csv``."""

    loss: float = 0.0  # summed over samples
    samples: int = 0
    wait: float = 0.0  # seconds waiting for data
    skipped: int = 0  # damaged records the reader skipped
    start: float = field(default_factory=time.perf_counter)


def _sigterm_interrupts():
    """Turn SIGTERM into KeyboardInterrupt while training (main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool, ranks: Ranks, progress: bool, log) -> dict:
    from tqdm import tqdm

    world, device, master, out = ranks.world, ranks.device, ranks.master, Path(cfg.out)
    ckpt = _resume_point(out, resume, model_cfg.name)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    # -- data: every rank gets exactly steps_per_epoch full batches per epoch --
    stream_kw = {"timeout": cfg.timeout, "retries": cfg.retries}
    train = ShardStream(  # the source resolved once; its length set below, from the manifest
        cfg.shards,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        batches_per_epoch=1,
        device_cut=cfg.cut_on_device,
        **stream_kw,
    )
    manifest = train.manifest
    if manifest is None or train.total_samples is None:
        raise TrainError(f"{cfg.shards}: no manifest.json beside the shards: the preprocessing config lives there")
    steps_per_epoch = cfg.steps_per_epoch or train.total_samples // (world * cfg.batch_size)
    if steps_per_epoch < 1:
        raise TrainError(f"{cfg.shards}: {train.total_samples} samples are fewer than one batch per rank")
    train.batches_per_epoch = steps_per_epoch
    val = None
    if cfg.val_shards:
        val = ShardStream(
            cfg.val_shards,
            batch_size=cfg.batch_size,
            shuffle=0,
            seed=cfg.seed,
            batches_per_epoch=cfg.val_batches,
            **stream_kw,
        )
        if val.manifest is not None:
            check_compatible(
                manifest, f"training shards {cfg.shards}", val.manifest, f"validation shards {cfg.val_shards}"
            )
    if ckpt is not None:
        check_compatible(ckpt["preprocessing"], f"checkpoint {out / ckpt_io.LAST}", manifest, f"shards {cfg.shards}")
        saved = ModelConfig.from_dict(ckpt["model_config"]).to_dict()
        asked = {**model_cfg.to_dict(), "patch": saved["patch"], "norm": saved["norm"]}
        changed = [k for k in saved if saved[k] != asked.get(k)]
        if changed:
            raise TrainError(
                f"{out / ckpt_io.LAST}: trained with "
                + ", ".join(f"{k} {saved[k]}" for k in changed)
                + "; this command asks for "
                + ", ".join(f"{k} {asked.get(k)}" for k in changed)
            )
    total_steps = cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or max(1, total_steps // 10)

    # -- model, optimiser, resume --
    model_cfg = replace(model_cfg, patch=manifest["config"]["patch"], norm=manifest["norm"])  # the caller's stays
    model = build_model(model_cfg).to(device)
    layout = memory_format(model, cfg.channels_last)
    model = model.to(memory_format=layout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optimizer, trainable, cfg.lr, cfg.weight_decay)
    step, rows, clock = 0, [], Clock(cfg.time_budget, device, cfg.budget_clock)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        clock.before = float(ckpt.get("trained_seconds", 0.0))
        clock.tick()
        ckpt_io.set_rng_state(ckpt["rng"])
        rows = [r for r in read_rows(out / "metrics.csv") if int(r["step"]) <= step]
        if step >= total_steps or clock.spent():  # a finished run asked to resume (a service re-run): nothing to do
            log(f"{out}: already finished ({step} of {total_steps} steps); nothing to do")
            return _summary(out, step, rows, world, None)
        log(f"resuming {out} at step {step}")
    raw = model
    if ranks.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:  # the training forward only; checkpoints and validation use the plain module (raw)
        model = torch.compile(model)
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device) if cfg.class_weights else None
    preprocessing = {
        "norm": manifest["norm"],
        "build": manifest["config"],
        "sampling": sampling_rates(manifest),
        "shards": cfg.shards,
    }
    if master:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out / "config.json",
            json.dumps(
                {
                    "train": asdict(cfg),
                    "model": model_cfg.to_dict(),
                    "preprocessing": preprocessing,
                    "world_size": world,
                    "steps_per_epoch": steps_per_epoch,
                    "total_steps": total_steps,
                },
                indent=1,
                default=list,
            ),
        )

    def save_checkpoint(path: Path = out / ckpt_io.LAST) -> None:
        if master:
            ckpt_io.save(
                path,
                {
                    "model": raw.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    "trained_seconds": clock.seconds(),
                    "rng": ckpt_io.rng_state(),
                    "model_config": model_cfg.to_dict(),
                    "preprocessing": preprocessing,
                    "train_config": json.loads(json.dumps(asdict(cfg), default=list)),
                },
            )

    loader = _loader(train, cfg.workers, device)
    to_device = DeviceCutter(device, manifest["config"]["patch"])  # moves x, or cuts blocks on the device
    seen = []  # sample fingerprints, for the rank audit
    window = Window()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress)
    clock.restart()  # the budget counts training, not the set-up
    try:
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            train.set_epoch(epoch)
            batches = iter(loader)
            done_in_epoch = step - epoch * steps_per_epoch  # batches a resumed run already trained on
            for i in range(steps_per_epoch):
                t0 = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - t0
                if i < done_in_epoch:
                    to_device.load(batch)  # a device pool must still see the blocks these batches brought
                    continue
                model.train()
                lr = learning_rate(cfg.lr, cfg.schedule, cfg.warmup, clock.progress(step, total_steps))
                for group in opt.param_groups:
                    group["lr"] = lr
                x, y = to_device(batch), batch["y"].to(device, non_blocking=True)
                gen = step_generator(cfg.seed, ranks.rank, step) if cfg.augment else None
                x = flip_pairs(x, gen) if cfg.augment else x
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    inputs = raw.prepare(x).contiguous(memory_format=layout)
                    logits = model(jitter(inputs, gen) if cfg.augment else inputs)
                loss = F.cross_entropy(logits.float(), y, weight=weight)
                if not _finite_everywhere(loss, world):  # before backward: the weights are still the last finite ones
                    save_checkpoint()
                    raise TrainError(
                        f"step {step + 1}: the loss is not finite ({loss.item()}); stopped with the last "
                        f"finite weights in {out / ckpt_io.LAST} (step {step}); try a lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                clock.tick()
                if world > 1 and len(seen) < audit.KEEP:
                    seen.append(audit.fingerprint(batch))
                window.loss += loss.item() * len(y)
                window.samples += len(y)
                window.wait += waited
                window.skipped += int(batch["skipped"])
                last = step == total_steps or clock.spent()
                if step % cfg.log_every == 0 or step % eval_every == 0 or last:
                    row, window = (
                        {**_log_row(window, step, epoch, world, device), "lr": lr, "trained_s": clock.seconds()},
                        Window(),
                    )
                    if val is not None and (step % eval_every == 0 or last):
                        with clock.paused():  # validation time is neither throughput nor budget
                            row.update(_validate(model, raw, val, device, cfg.workers, weight))
                        window = Window()
                    bar.set_postfix(
                        loss=f"{row['loss']:.4f}",
                        sps=f"{row['samples_per_s']:.0f}",
                        wait=f"{100 * row['data_wait']:.1f}%",
                    )
                    if master:
                        rows.append(row)
                        write_rows(out / "metrics.csv", rows)
                if step % cfg.checkpoint_every == 0:
                    save_checkpoint()
                if cfg.snapshot_every and step % cfg.snapshot_every == 0 and master:
                    (out / ckpt_io.SNAPSHOTS).mkdir(exist_ok=True)
                    save_checkpoint(out / ckpt_io.SNAPSHOTS / ckpt_io.snapshot_name(step))
                bar.update()
                if clock.spent():
                    break
            if clock.spent():
                log(f"time budget of {cfg.time_budget} minutes spent at step {step} of {total_steps}")
                break
    except (KeyboardInterrupt, ShardSourceError) as exc:
        save_checkpoint()
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else "shards unreachable"
        log(f"\n{why} at step {step}: checkpoint {out / ckpt_io.LAST}; continue with --resume")
        raise
    finally:
        bar.close()
    save_checkpoint()
    rank_audit = audit.audit(raw, seen, world, out if master else None)
    if master:
        plot(rows, out / "curves.png", title=f"{model_cfg.name} ({model_cfg.layout})")
    return _summary(out, step, rows, world, rank_audit)


def _summary(out: Path, step: int, rows: list[dict], world: int, rank_audit: dict | None) -> dict:
    """What ``fit`` returns (rank 0's view): the run, its steps, the last metrics row, the DDP audit."""
    last = rows[-1] if rows else {}
    return {
        "run_dir": str(out),
        "steps": step,
        "checkpoint": str(out / ckpt_io.LAST),
        "last": last,
        "world_size": world,
        "audit": rank_audit,
    }


def _loader(stream: ShardStream, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of ``stream`` from ``workers`` DataLoader workers.

    Under DDP the workers start from a forkserver, not by forking this process:
    a fork taken while a gloo or NCCL thread holds a lock can leave the worker
    deadlocked, and with it every rank.
    """
    context = "forkserver" if workers > 0 and dist.is_initialized() else None
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda", multiprocessing_context=context
    )


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Is the loss finite on every rank? (All ranks must stop together, or DDP would hang.)"""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


def _resume_point(out: Path, resume: bool, model_name: str) -> dict | None:
    last = out / ckpt_io.LAST
    if not resume:
        if last.exists():
            raise TrainError(f"{out}: holds a run already (checkpoint {last}); use --resume, or another --out")
        return None
    if not last.exists():
        return None
    ckpt = ckpt_io.load(last)
    if ckpt["model_config"]["name"] != model_name:
        raise TrainError(f"{last}: a {ckpt['model_config']['name']} checkpoint, not {model_name}")
    return ckpt


def _log_row(window: Window, step: int, epoch: int, world: int, device) -> dict:
    """The metrics row: the window summed over ranks."""
    elapsed = time.perf_counter() - window.start
    totals = torch.tensor(
        [window.loss, window.samples, window.wait, window.skipped], dtype=torch.float64, device=device
    )
    if world > 1:
        dist.all_reduce(totals)
    loss, samples, wait, skipped = totals.tolist()
    row = {
        "step": step,
        "epoch": epoch,
        "samples": int(samples),
        "loss": loss / max(samples, 1),
        "samples_per_s": samples / max(elapsed, 1e-9),
        "data_wait": wait / world / max(elapsed, 1e-9),
        "skipped": int(skipped),
    }
    return row


@torch.no_grad()
def _validate(model, raw, val: ShardStream, device, workers: int, weight) -> dict:
    """Loss and voxel Dice/precision/recall (argmax, i.e. p > 0.5) over the validation stream."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, n, tp, fp, fn
    for batch in _loader(val, min(workers, 1), device):
        x, y = batch["x"].to(device), batch["y"].to(device)
        logits = raw(raw.prepare(x)).float()
        c = confusion(logits.argmax(1) == 1, y == 1)
        sums += torch.tensor(
            [F.cross_entropy(logits, y, weight=weight, reduction="sum").item(), len(y), c["tp"], c["fp"], c["fn"]],
            dtype=torch.float64,
            device=device,
        )
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, n, tp, fp, fn = sums.tolist()
    scores = voxel_scores(tp, fp, fn)
    return {
        "val_loss": loss / max(n, 1),
        "val_dice": scores["dice"],
        "val_precision": scores["precision"],
        "val_recall": scores["recall"],
    }
