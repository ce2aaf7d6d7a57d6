"""``atlas-train fit``: the training loop, one process or DDP under torchrun.

Read it top to bottom: ``fit`` sets up (DDP if torchrun started us), and
``_train`` is the run in a few lines: open the shard streams
(``_open_streams``), build or resume the model (``_start``), the loop
(``_loop``: a step, ``_step``; then log, validate, checkpoint,
``_after_step``), save. ``Run`` holds what a run fixes at its start, ``State``
what changes from step to step. Rank 0 logs and checkpoints; every rank runs
the same number of steps because ``ShardStream`` gives each the same number of
batches.
"""

from __future__ import annotations

import contextlib
import functools
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

from shards.common.atomic import atomic_write_text, check_output_dir
from shards.common.lock import OutputBusy, owned
from shards.common.versions import software
from shards.block_batches import NoVoxelLabels
from shards.blocks import DeviceCutter
from shards.manifest import check_compatible, provenance, sampling_rates
from shards.reader import ShardStream
from shards.sources import NoReadableRecords, ShardSourceError
from shards.common.scores import confusion, voxel_scores
from trainer import audit
from trainer import checkpoint as ckpt_io
from trainer.logbook import plot, read_rows, write_rows
from shards.common.memory import keep_freed_memory
from trainer.devices import cpu_has_bf16, resolve_device
from trainer.forest import FOREST
from trainer.augment import flip_cores, flip_draws, flip_offsets, flip_pairs, jitter, step_generator
from trainer.clock import Clock
from trainer.config import OPTIMIZERS, SCHEDULES, ModelConfig, TrainConfig, shuffle_pool
from trainer.dense import DenseCNN
from trainer.distributed import Ranks, finite_everywhere, setup_distributed
from trainer.models import build_model, memory_format
from trainer.registry import ModelError, model_entry
from trainer.objectives import (
    BATCH,
    ObjectiveError,
    check_dense_shards,
    dense_loss,
    dense_rates,
    dense_weights,
    draws_scale,
    is_dense,
    sampled_loss,
    weight_totals,
    VOXEL_WEIGHTS,
)
from trainer.optim import learning_rate, make_optimizer


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
    if cfg.amp is None:  # the command's default: bf16 where it pays, under the modern recipe
        cfg = replace(cfg, amp=cfg.recipe == "modern" and (chosen.type == "cuda" or cpu_has_bf16()))
    elif cfg.amp and chosen.type == "cpu" and not cpu_has_bf16():
        log(
            "note: --amp: this CPU has no bf16 instructions (avx512_bf16, amx_bf16), where bf16 runs about 10x "
            "slower than float32; training in float32"
        )
        cfg = replace(cfg, amp=False)
    check_output_dir(cfg.out)
    if (Path(cfg.out) / FOREST).exists():
        raise TrainError(f"{cfg.out}: holds a random forest ({FOREST}); a run directory holds one model")
    # rank 0 writes the run directory: it owns it (shards.common.lock) before the ranks meet
    owner = owned(cfg.out, "atlas-train fit") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    try:
        with owner:
            ranks = setup_distributed(chosen)
            stop = _sigterm_interrupts()  # `docker stop`, a batch scheduler: a checkpoint, as for Ctrl-C
            try:
                quiet = not ranks.master  # rank 0 logs and checkpoints
                return _train(cfg, model_cfg, resume, ranks, progress and not quiet, (lambda m: None) if quiet else log)
            finally:
                stop()
                if ranks.ddp:
                    dist.destroy_process_group()
    except OutputBusy as exc:
        raise TrainError(str(exc)) from None


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
    if is_dense(cfg.objective) and cfg.cut_on_device:
        raise TrainError("--cut-on-device is for --objective patch: a dense objective's input is the block itself")
    if cfg.heavy_repeat < 1 or (cfg.heavy_repeat > 1 and (cfg.objective, cfg.voxel_weights) != ("dense", "draws")):
        raise TrainError(
            f"--heavy-repeat is a count >= 1, for --objective dense --voxel-weights draws; got {cfg.heavy_repeat}"
        )
    if cfg.voxel_weights not in VOXEL_WEIGHTS:
        raise TrainError(f"--voxel-weights is one of {', '.join(VOXEL_WEIGHTS)}, got {cfg.voxel_weights!r}")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise TrainError(f"--time-budget must be a positive number of minutes, got {cfg.time_budget}")


@dataclass
class Window:
    """What this rank adds up between two rows of ``metrics.csv``."""

    loss: float = 0.0  # summed over samples
    samples: int = 0
    wait: float = 0.0  # seconds waiting for data
    skipped: int = 0  # damaged records the reader skipped
    loss_max: float = 0.0  # the largest batch loss: spikes a mean hides
    grad_max: float = 0.0  # the largest gradient norm (before clipping)
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, samples: int, waited: float, skipped: int, grad: float = 0.0) -> None:
        self.loss += loss * samples
        self.samples += samples
        self.wait += waited
        self.skipped += skipped
        self.loss_max, self.grad_max = max(self.loss_max, loss), max(self.grad_max, grad)


def _sigterm_interrupts():
    """Turn SIGTERM into KeyboardInterrupt while training (main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool, ranks: Ranks, progress: bool, log) -> dict:
    """Set up, resume, loop, save: the run top to bottom."""
    out = Path(cfg.out)
    kept = keep_freed_memory()  # more steps a CPU-second (shards/common/memory.py)
    ckpt = _resume_point(out, resume, model_cfg.name)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    data = _open_streams(cfg, ranks.world)
    changed = []
    if ckpt is not None:
        _check_resumable(ckpt, model_cfg, data.manifest, out, cfg.shards)
        changed = _check_same_run(ckpt, cfg, data.manifest, out)
    model_cfg = replace(model_cfg, patch=data.patch, norm=data.manifest["norm"])  # the caller's stays
    run = Run(cfg, model_cfg, ranks, out, data, "glibc, freed memory kept" if kept else "the system's, as it comes")
    log(banner(run))
    state = _start(run, ckpt)
    if ranks.master and (note := _no_dense_form(run, state.raw)):
        log(note)
    if ckpt is not None:
        if state.step >= data.total_steps or state.clock.spent():  # a finished run asked to resume: nothing to do
            log(f"{out}: already finished ({state.step} of {data.total_steps} steps); nothing to do")
            return _summary(out, state.step, state.rows, ranks.world, None)
        log(f"resuming {out} at step {state.step}")
    if ranks.master:
        _write_config(run, None if ckpt is None else {"resumed_at_step": state.step, "changed": changed})
    seen = _loop(run, state, progress, log)
    _save(run, state)
    rank_audit = audit.audit(state.raw, seen, ranks.world, out if ranks.master else None)
    if ranks.master:
        plot(state.rows, out / "curves.png", title=f"{model_cfg.name} ({model_cfg.layout})")
    return _summary(out, state.step, state.rows, ranks.world, rank_audit)


@dataclass
class Streams:
    """The shard streams of a run: every rank gets exactly ``steps_per_epoch`` full batches an epoch."""

    train: ShardStream
    val: ShardStream | None
    manifest: dict  # the training shards'
    steps_per_epoch: int
    total_steps: int
    eval_every: int

    @property
    def patch(self) -> int:
        return int(self.manifest["config"]["patch"])


def _open_streams(cfg: TrainConfig, world: int) -> Streams:
    stream_kw = {"timeout": cfg.timeout, "retries": cfg.retries, "seed": cfg.seed}
    unit = "blocks" if is_dense(cfg.objective) else "samples"
    heavy = cfg.heavy_repeat if cfg.objective == "dense" and cfg.voxel_weights == "draws" else 1
    train = ShardStream(  # the source resolved once; its length and pool set below, from the manifest
        cfg.shards,
        cfg.batch_size,
        0,
        batches_per_epoch=1,
        device_cut=cfg.cut_on_device,
        unit=unit,
        heavy_repeat=heavy,
        **stream_kw,
    )
    manifest = train.manifest
    if manifest is None or train.total_units is None:
        raise TrainError(f"{cfg.shards}: no manifest.json beside the shards: the preprocessing config lives there")
    train.shuffle = shuffle_pool(cfg.shuffle, train.format, unit, train.total_units, world)
    if heavy > 1:
        train.shuffle = max(train.shuffle, 8 * heavy)  # a heavy block's copies spread over the batches of a wider pool
    if is_dense(cfg.objective):
        try:
            check_dense_shards(manifest, cfg.shards)
        except ObjectiveError as exc:
            raise TrainError(str(exc)) from None
    steps_per_epoch = cfg.steps_per_epoch or train.total_units // (world * cfg.batch_size)
    if steps_per_epoch < 1:
        raise TrainError(f"{cfg.shards}: {train.total_units} {unit} are fewer than one batch per rank")
    train.batches_per_epoch = steps_per_epoch
    val = None
    if cfg.val_shards:
        val_batch = cfg.batch_size if unit == "samples" else BATCH["patch"]  # --val-batches: the same samples
        val = ShardStream(cfg.val_shards, val_batch, shuffle=0, batches_per_epoch=cfg.val_batches, **stream_kw)
        if val.manifest is not None:
            train_name, val_name = f"training shards {cfg.shards}", f"validation shards {cfg.val_shards}"
            check_compatible(manifest, train_name, val.manifest, val_name)
    total_steps = cfg.epochs * steps_per_epoch
    return Streams(train, val, manifest, steps_per_epoch, total_steps, cfg.eval_every or max(1, total_steps // 10))


# What a run is: resuming with any of these changed would make the checkpoint a claim about another run. How it
# runs (device, workers, amp, compile, layout, logging, validation) may change between its sessions.
RUN_DEFINING = (
    "objective",
    "batch_size",
    "voxel_weights",
    "lesion_share",
    "heavy_repeat",
    "recipe",
    "lr",
    "optimizer",
    "schedule",
    "warmup",
    "weight_decay",
    "augment",
    "class_weights",
    "clip_grad",
    "seed",
    "shuffle",
    "budget_clock",
)
EXTENDABLE = ("epochs", "steps_per_epoch", "time_budget")  # a resumed run may be given longer: config.json says so


def _check_same_run(ckpt: dict, cfg: TrainConfig, manifest: dict, out: Path) -> list[str]:
    """``--resume`` continues the run the checkpoint holds: its training settings and the same samples (the
    shards may have moved: the build and the subjects they came from must not have changed). Returns the
    changes it allows (a longer run: ``EXTENDABLE``), for the run's history."""
    saved = ckpt.get("train_config")
    if saved is None:  # a checkpoint of an earlier version: nothing recorded to compare
        return []
    asked = json.loads(json.dumps(asdict(cfg), default=list))
    changes = [f"{k} {saved.get(k)} -> {asked[k]}" for k in RUN_DEFINING if k in saved and saved[k] != asked[k]]
    before, now = ckpt["preprocessing"], {"build": manifest["config"], "trained_on": provenance(manifest)}
    for key, what in (("build", "the shards' build"), ("trained_on", "the shards' subjects and split")):
        if key in before and before[key] != json.loads(json.dumps(now[key])):
            changes.append(f"{what} ({cfg.shards} is not the {saved.get('shards')} it trained on)")
    if changes:
        raise TrainError(
            f"{out / ckpt_io.LAST}: --resume continues the same run, and this command changes "
            + "; ".join(changes)
            + ". Train into another --out"
        )
    return [f"{k} {saved.get(k)} -> {asked[k]}" for k in EXTENDABLE if k in saved and saved[k] != asked[k]]


def _check_resumable(ckpt: dict, model_cfg: ModelConfig, manifest: dict, out: Path, shards: str) -> None:
    """The checkpoint was trained on shards like these, with the model this command asks for."""
    check_compatible(ckpt["preprocessing"], f"checkpoint {out / ckpt_io.LAST}", manifest, f"shards {shards}")
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


@dataclass
class Run:
    """What a run fixes at its start: its settings, this process among the ranks, its directory, its data."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    ranks: Ranks
    out: Path
    data: Streams
    allocator: str = "the system's, as it comes"  # shards/common/memory.py

    @functools.cached_property
    def preprocessing(self) -> dict:
        """What the checkpoint carries to evaluation, so that it cannot drift (computed once a run)."""
        manifest = self.data.manifest
        if self.cfg.objective == "dense":
            rates = dense_rates(manifest, weight_totals(manifest, self.voxel_weights, self.draws_scale))
        else:
            rates = sampling_rates(manifest)
        return {
            "norm": manifest["norm"],
            "build": manifest["config"],
            "sampling": rates,
            "shards": self.cfg.shards,
            "trained_on": provenance(manifest),
        }

    @functools.cached_property
    def voxel_weights(self) -> tuple[float, float] | None:
        """(background, lesion) weights of the dense loss (``--voxel-weights share``); None otherwise."""
        if self.cfg.objective != "dense" or self.cfg.voxel_weights != "share":
            return None
        try:
            return dense_weights(self.data.manifest, self.cfg.lesion_share)
        except ObjectiveError as exc:
            raise TrainError(str(exc)) from None

    @functools.cached_property
    def draws_scale(self) -> float | None:
        """``--voxel-weights draws``: what the records' expected draws are multiplied by (mean weight 1)."""
        if self.cfg.objective != "dense" or self.cfg.voxel_weights != "draws":
            return None
        try:
            return draws_scale(self.data.manifest, self.cfg.shards)
        except ObjectiveError as exc:
            raise TrainError(str(exc)) from None


@dataclass
class State:
    """What changes from step to step: the model (``raw``: the plain module, which checkpoints and validation
    use; ``model``: what trains, wrapped for DDP and compiled when asked), the optimiser, the step, the rows."""

    raw: torch.nn.Module
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    layout: torch.memory_format
    clock: Clock
    weight: torch.Tensor | None
    step: int = 0
    rows: list = field(default_factory=list)
    lr: float = 0.0


def _no_dense_form(run: Run, raw: torch.nn.Module) -> str | None:
    """A note when whole-volume evaluation will have to run this model patch by patch (its pooling does not tile
    the patch: 27, 31, ... for the 3D CNNs, whose dense form needs a patch of 4k + 1), so the user hears it now."""
    cfg = run.model_cfg
    if is_dense(run.cfg.objective) or not model_entry(cfg.name).dense or cfg.layout != "channels":
        return None  # dense training built the dense form already; 2D and concat models run patch by patch anyway
    try:
        DenseCNN(raw)
    except ModelError as exc:
        return (
            f"note: patch {cfg.patch}: {exc}; atlas-evaluate will predict whole volumes patch by patch, about "
            f"300x slower (patches of 4k + 1 voxels, such as {cfg.patch - 2} or {cfg.patch + 2}, run densely)"
        )
    return None


def _start(run: Run, ckpt: dict | None) -> State:
    """The model and optimiser, from the checkpoint when resuming."""
    cfg, device = run.cfg, run.ranks.device
    raw = build_model(run.model_cfg).to(device)
    layout = memory_format(raw, cfg.channels_last)
    raw = raw.to(memory_format=layout)
    opt = make_optimizer(cfg.optimizer, [p for p in raw.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    weights = run.voxel_weights or cfg.class_weights
    weight = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    state = State(raw, raw, opt, layout, Clock(cfg.time_budget, device, cfg.budget_clock), weight)
    if is_dense(cfg.objective):
        try:
            state.model = DenseCNN(raw)  # raw's own layers and parameters, run over whole blocks
        except ModelError as exc:
            raise TrainError(f"--objective {cfg.objective}: {run.model_cfg.name} ({run.model_cfg.layout}): {exc}")
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state.step = int(ckpt["step"])
        state.clock.before = float(ckpt.get("trained_seconds", 0.0))
        state.clock.tick()
        ckpt_io.set_rng_state(ckpt["rng"])
        state.rows = [r for r in read_rows(run.out / "metrics.csv") if int(r["step"]) <= state.step]
    if run.ranks.ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        state.model = torch.nn.parallel.DistributedDataParallel(state.model, device_ids=device_ids)
    if cfg.compile:  # the training forward only; checkpoints and validation use the plain module (raw)
        state.model = torch.compile(state.model)
    return state


def banner(run: Run) -> str:
    """What this run is, said first: model, device, ranks, objective, shards, steps, budget, output."""
    cfg, data, m = run.cfg, run.data, run.model_cfg
    unit = "blocks" if is_dense(cfg.objective) else "samples"
    units = data.train.total_units
    budget = f"{cfg.time_budget:g} {cfg.budget_clock.upper()}-minutes" if cfg.time_budget else "none"
    return (
        f"fit {m.name} ({m.layout}) on {run.ranks.device}, world size {run.ranks.world}, objective {cfg.objective}, "
        f"{cfg.batch_size} {unit} a step a rank{', bf16' if cfg.amp else ''}\n"
        f"  shards {cfg.shards}: {units} {unit}, {data.steps_per_epoch} steps an epoch x {cfg.epochs} epochs = "
        f"{data.total_steps} steps; shuffle pool {data.train.shuffle} {unit}; time budget {budget}; out {run.out}"
    )


def _write_config(run: Run, resumed: dict | None) -> None:
    """``config.json``: the run's settings as this session runs it; ``history`` lists each resume (with what it
    changed), kept from the file a resumed run finds."""
    history = []
    if resumed is not None:
        try:
            history = json.loads((run.out / "config.json").read_text()).get("history", [])
        except (OSError, ValueError):
            history = [{"note": "config.json of the earlier sessions missing or unreadable"}]
        history = history + [resumed]
    config = {
        "train": asdict(run.cfg),
        "model": run.model_cfg.to_dict(),
        "preprocessing": run.preprocessing,
        "world_size": run.ranks.world,
        "steps_per_epoch": run.data.steps_per_epoch,
        "total_steps": run.data.total_steps,
        "device": str(run.ranks.device),  # as resolved (``--device auto`` says which)
        "software": software(),
        "allocator": run.allocator,
        "history": history,
    }
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out / "config.json", json.dumps(config, indent=1, default=list))


def _save(run: Run, state: State, path: Path | None = None) -> None:
    """Rank 0 writes the checkpoint (``last.pt``, or a snapshot's ``path``)."""
    if not run.ranks.master:
        return
    content = {
        "model": state.raw.state_dict(),
        "optimizer": state.opt.state_dict(),
        "step": state.step,
        "epoch": state.step // run.data.steps_per_epoch,
        "trained_seconds": state.clock.seconds(),
        "rng": ckpt_io.rng_state(),
        "model_config": run.model_cfg.to_dict(),
        "preprocessing": run.preprocessing,
        "train_config": json.loads(json.dumps(asdict(run.cfg), default=list)),
    }
    ckpt_io.save(path or run.out / ckpt_io.LAST, content)


def _loop(run: Run, state: State, progress: bool, log) -> list:
    """Train to the end of the last epoch or of the time budget; returns the sample fingerprints kept for the
    DDP audit. A Ctrl-C, SIGTERM or unreachable shards save a checkpoint first."""
    from tqdm import tqdm

    cfg, data, device = run.cfg, run.data, run.ranks.device
    loader = _loader(data.train, cfg.workers, device)
    to_device = DeviceCutter(device, data.patch)  # moves x, or cuts blocks on the device
    seen, window = [], Window()  # sample fingerprints, for the rank audit; this rank's sums since the last row
    bar = tqdm(total=data.total_steps, initial=state.step, desc="train", unit="step", disable=not progress)
    state.clock.restart()  # the budget counts training, not the set-up
    try:
        for epoch in range(state.step // data.steps_per_epoch, cfg.epochs):
            data.train.set_epoch(epoch)
            batches = iter(loader)
            done_in_epoch = state.step - epoch * data.steps_per_epoch  # batches a resumed run already trained on
            for i in range(data.steps_per_epoch):
                t0 = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - t0
                if i < done_in_epoch:
                    to_device.load(batch)  # a device pool must still see the blocks these batches brought
                    continue
                loss, count, grad = _step(run, state, batch, to_device)
                if run.ranks.world > 1 and len(seen) < audit.KEEP:
                    seen.append(audit.fingerprint(batch))
                window.add(loss, count, waited, int(batch["skipped"]), grad)
                window = _after_step(run, state, window, epoch, bar)
                bar.update()
                if state.clock.spent():
                    break
            if state.clock.spent():
                log(f"time budget of {cfg.time_budget} minutes spent at step {state.step} of {data.total_steps}")
                break
    except (KeyboardInterrupt, ShardSourceError) as exc:
        _save(run, state)
        why = (
            "interrupted"
            if isinstance(exc, KeyboardInterrupt)
            else "shards unreadable"
            if isinstance(exc, NoReadableRecords)
            else "shards unreachable"
        )
        log(f"\n{why} at step {state.step}: checkpoint {run.out / ckpt_io.LAST}; continue with --resume")
        raise
    except NoVoxelLabels as exc:  # a version-3 shard whose block lost its labels: damage a dense run cannot skip
        _save(run, state)
        raise TrainError(f"{cfg.shards}: {exc}; check the shards with atlas-shards verify, or rebuild them") from None
    finally:
        bar.close()
    return seen


def _step(run: Run, state: State, batch: dict, to_device: DeviceCutter) -> tuple[float, int, float]:
    """One optimisation step on a batch (of pairs, or of whole blocks for a dense objective); returns its mean
    loss, how many labelled voxels it covered, and the gradient's norm (before ``--clip-grad``)."""
    cfg, world = run.cfg, run.ranks.world
    state.model.train()
    state.lr = learning_rate(cfg.lr, cfg.schedule, cfg.warmup, state.clock.progress(state.step, run.data.total_steps))
    for group in state.opt.param_groups:
        group["lr"] = state.lr
    gen = step_generator(cfg.seed, run.ranks.rank, state.step) if cfg.augment else None
    loss, count = _loss(run, state, batch, to_device, gen)
    if not finite_everywhere(loss, world):  # before backward: the weights are still the last finite ones
        _save(run, state)
        raise TrainError(
            f"step {state.step + 1}: the loss is not finite ({loss.item()}); stopped with the last "
            f"finite weights in {run.out / ckpt_io.LAST} (step {state.step}); try a lower --lr"
        )
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad = torch.nn.utils.clip_grad_norm_(state.raw.parameters(), cfg.clip_grad or math.inf)
    state.opt.step()
    state.step += 1
    state.clock.tick()
    return loss.item(), count, float(grad)


def _loss(run: Run, state: State, batch: dict, to_device: DeviceCutter, gen) -> tuple[torch.Tensor, int]:
    """The batch's loss by the run's objective (``trainer/objectives.py``), and the voxels it covers."""
    cfg, device = run.cfg, run.ranks.device
    y = batch["y"].to(device, non_blocking=True).long()
    if not is_dense(cfg.objective):
        x = flip_pairs(to_device(batch), gen) if cfg.augment else to_device(batch)
        return F.cross_entropy(_forward(run, state, x, gen), y, weight=state.weight), len(y)
    x = batch["block"].to(device, non_blocking=True)
    draws = flip_draws(len(x), gen) if cfg.augment else None
    if cfg.objective == "dense":
        labels = batch["labels"].to(device, non_blocking=True)
        weight = state.weight if run.draws_scale is None else _draws(run, batch) * run.draws_scale
        if draws is not None:
            x, labels = flip_pairs(x, gen, labels, draws)
            weight = weight if run.draws_scale is None else flip_cores(weight, draws)
        return dense_loss(_forward(run, state, x, gen), labels, weight)
    owner, off = batch["owner"].to(device), batch["off"].to(device)
    if draws is not None:
        x, off = flip_pairs(x, gen, draws=draws), flip_offsets(off, owner, x.shape[2] - run.data.patch + 1, draws)
    return sampled_loss(_forward(run, state, x, gen), owner, off, y, state.weight)


def _draws(run: Run, batch: dict) -> torch.Tensor:
    """The batch's expected draws a voxel; a block without them (a version-3 record) ends the run by name."""
    if "draws" not in batch:
        raise NoVoxelLabels(f"a batch of blocks ({', '.join(sorted(set(batch['scan'])))}) carries no expected draws")
    return batch["draws"].to(run.ranks.device, non_blocking=True)


def _forward(run: Run, state: State, x: torch.Tensor, gen) -> torch.Tensor:
    """Float logits of stored ``x`` (pairs, or blocks through the dense form), augmented as the recipe says."""
    with torch.autocast(run.ranks.device.type, dtype=torch.bfloat16, enabled=run.cfg.amp):
        inputs = state.raw.prepare(x).contiguous(memory_format=state.layout)
        return state.model(jitter(inputs, gen) if run.cfg.augment else inputs).float()


def _after_step(run: Run, state: State, window: Window, epoch: int, bar) -> Window:
    """Log a metrics row (with validation), checkpoint, keep a snapshot, as the step asks; the window to go on
    adding to (a new one after a row)."""
    cfg, data, step, out = run.cfg, run.data, state.step, run.out
    last = step == data.total_steps or state.clock.spent()
    if step % cfg.log_every == 0 or step % data.eval_every == 0 or last:
        row = {**_log_row(window, step, epoch, run.ranks.world, run.ranks.device), "lr": state.lr}
        row["trained_s"] = state.clock.seconds()
        window = Window()
        if data.val is not None and (step % data.eval_every == 0 or last):
            with state.clock.paused():  # validation time is neither throughput nor budget
                weight = None if cfg.objective == "dense" else state.weight  # validation: the pairs' loss
                row.update(_validate(state.model, state.raw, data.val, run.ranks.device, cfg.workers, weight))
            window = Window()
        bar.set_postfix(
            loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}", wait=f"{100 * row['data_wait']:.1f}%"
        )
        if run.ranks.master:
            state.rows.append(row)
            write_rows(out / "metrics.csv", state.rows)
    if step % cfg.checkpoint_every == 0:
        _save(run, state)
    if cfg.snapshot_every and step % cfg.snapshot_every == 0 and run.ranks.master:
        (out / ckpt_io.SNAPSHOTS).mkdir(exist_ok=True)
        _save(run, state, out / ckpt_io.SNAPSHOTS / ckpt_io.snapshot_name(step))
    return window


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
        "skipped": sum(int(float(r.get("skipped") or 0)) for r in rows),  # damaged records, over the run
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
    peaks = torch.tensor([window.loss_max, window.grad_max], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    loss, samples, wait, skipped = totals.tolist()
    row = {
        "step": step,
        "epoch": epoch,
        "samples": int(samples),
        "loss": loss / max(samples, 1),
        "samples_per_s": samples / max(elapsed, 1e-9),
        "data_wait": wait / world / max(elapsed, 1e-9),
        "skipped": int(skipped),
        "loss_max": peaks[0].item(),
        "grad_norm": peaks[1].item(),
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
