"""The training loop of ``sacb train``: unsupervised NCC + smoothness (paper Eq. 1), optional
Dice on warped labels, Adam with a poly schedule, validation, resumable checkpoints, DDP.

Reproducibility: the model is initialised from ``run.seed`` (inside ``torch.random.fork_rng``,
so the caller's global random state is untouched); item ``i`` of every dataset is a pure
function of its seed and ``i``; step ``s`` of rank ``r`` trains on items
``(s * world + r) * batch ... + batch - 1``. Interrupting and resuming therefore continues
exactly as an uninterrupted run, and ``W`` processes with batch ``B`` see the same items as one
process with batch ``W * B``.

Distributed: launch with ``torchrun --nproc_per_node N -m SACBRegistrationLib.cli train ...``;
the process group uses NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import TrainingError  # noqa: F401  (defined in errors.py; importable from here as before)
from ..losses.functional import gradient_l2, local_ncc, one_hot_labels, soft_dice, weighted_displacement_l2
from ..metrics import dice_per_label, negative_jacobian_percent, sdlogj, surface_metrics_per_label
from ..networks.checkpoints import save_checkpoint, save_tensor_file
from ..networks.config import SACBNetConfig
from ..networks.sacbnet import SACBNet
from ..pipeline.resources import ResourceError, resolve_device, torch_threads
from ..progress import ProgressCallback, format_duration, no_progress
from ..spatial.warping import warp
from .config import RunSection, SourceSection, TrainConfig

STATE_FORMAT = "sacb-training-state"
STATE_VERSION = 1


# --------------------------------------------------------------------------- data


def build_source(source: SourceSection, config: TrainConfig, length: int, seed: int) -> Dataset:
    """A dataset of ``length`` items for one configured source; every item carries the source's
    ``similarity_weight``."""
    from ..data.pairs import SynthPairs, TemplatePairs, WithSimilarityWeight

    shape = tuple(config.data.shape)
    if source.fine_pass:
        return WithSimilarityWeight(fine_pass_source(source, config, length, seed), source.similarity)
    if source.kind == "synth":
        dataset = SynthPairs(shape, length, seed, labels=source.labels, max_std=source.max_std)
    elif source.kind == "template":
        from ..data.template import template_volumes
        image, labels, _ = template_volumes(config.data.spacing_mm, shape)
        dataset = TemplatePairs(image, labels, length, seed, source.mode, source.max_std, source.affine,
                                source.invert_probability, source.identical_probability, source.control_spacing)
    else:
        from .folders import FolderPairs
        dataset = FolderPairs(source, config, length, seed)
    return WithSimilarityWeight(dataset, source.similarity)


def fine_pass_source(source: SourceSection, config: TrainConfig, length: int, seed: int) -> Dataset:
    """Template pairs on the fine pass's grid, warped half-way along ``model.init``'s answer and
    cropped (:class:`.half_way.HalfWayPairs`)."""
    from ..data.pairs import TemplatePairs
    from ..data.template import template_volumes
    from ..pipeline.presets import FINE_PASS_SCALE
    from .half_way import HalfWayPairs

    if not config.model.init:
        raise TrainingError("a fine_pass source needs model.init: the model whose first pass it refines")
    shape = tuple(int(round(s / FINE_PASS_SCALE)) for s in config.data.shape)
    if any(c > s for c, s in zip(source.crop, shape)):
        raise TrainingError(f"a fine_pass source's crop {source.crop} is larger than the fine grid {list(shape)} "
                            f"(data.shape / {FINE_PASS_SCALE}); use a smaller crop")
    image, labels, _ = template_volumes(config.data.spacing_mm * FINE_PASS_SCALE, shape)
    pairs = TemplatePairs(image, labels, length, seed, source.mode, source.max_std, source.affine,
                          source.invert_probability, source.identical_probability, source.control_spacing,
                          coarsening=round(1 / FINE_PASS_SCALE))  # as fast to make as the network grid's pairs
    return HalfWayPairs(pairs, _initial_model(config), FINE_PASS_SCALE, source.crop, seed)


def build_training_data(config: TrainConfig, world: int) -> Dataset:
    from ..data.pairs import MixedPairs

    length = config.optim.steps * config.optim.batch_size * world
    sources = [build_source(s, config, length, config.run.seed + 101 * i) for i, s in enumerate(config.data.sources)]
    if len(sources) == 1:
        return sources[0]
    return MixedPairs(sources, [s.weight for s in config.data.sources], length, config.run.seed)


class StepBatches(Sampler):
    """Dataset indices of each step's batch for one rank, from ``start`` to ``stop``."""

    def __init__(self, start: int, stop: int, batch: int, world: int, rank: int, length: int) -> None:
        self.start, self.stop, self.batch, self.world, self.rank, self.length = start, stop, batch, world, rank, length

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield [(first + j) % self.length for j in range(self.batch)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# --------------------------------------------------------------------------- helpers


def similarity_loss(fixed: torch.Tensor, warped: torch.Tensor, weights: torch.Tensor, window: int) -> torch.Tensor:
    """Batch mean of ``weights[b] * local_ncc(fixed[b], warped[b])``; ``(B, 1, D, H, W)`` images,
    ``(B,)`` weights. Pairs of weight 0 add nothing (and cost nothing)."""
    terms = [weights[b] * local_ncc(fixed[b:b + 1], warped[b:b + 1], window)
             for b in range(fixed.shape[0]) if float(weights[b]) != 0.0]
    if not terms:
        return fixed.new_zeros(())
    return torch.stack(terms).sum() / fixed.shape[0]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Constant, or the authors' poly decay ``lr * (1 - step / steps) ** power``."""
    if config.optim.schedule == "constant":
        return config.optim.lr
    return config.optim.lr * (1.0 - step / config.optim.steps) ** config.optim.power


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    """``run.device`` as the pipeline resolves devices; on CUDA, this process's GPU (``LOCAL_RANK``)."""
    try:
        device = resolve_device(config.run.device)
    except ResourceError:
        raise TrainingError("run.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'") from None
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def _amp(config: TrainConfig, device: torch.device):
    mode = config.run.amp
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


# --------------------------------------------------------------------------- validation


@dataclass
class ValidationResult:
    dice: float
    dice_identity: float
    hd95: float
    folding_percent: float
    sdlogj_foreground: float
    """SD of log |J| inside the fixed image's labelled foreground (the field where it matters)."""
    self_displacement_mm: float
    """Mean |u| (mm) inside the foreground when the fixed image is registered to itself (ideal: 0)."""
    seconds_per_pair: float

    def to_dict(self) -> Dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def validate(model: torch.nn.Module, pairs: Dataset, device: torch.device, spacing_mm: float,
             amp_dtype=None) -> Optional[ValidationResult]:
    """Mean foreground Dice (after and before registration), HD95 (mm), |J|<0 %, SDlogJ in the
    foreground and the self-registration displacement (mm) over the validation pairs."""
    if len(pairs) == 0:
        return None
    was_training = model.training
    model.eval()
    keys = ("dice", "dice_identity", "hd95", "folding_percent", "sdlogj_foreground", "self_displacement_mm",
            "seconds_per_pair")
    values: Dict[str, List[float]] = {key: [] for key in keys}

    def predict(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model(moving, fixed).displacement.float()

    with torch.no_grad():
        for i in range(len(pairs)):
            item = pairs[i]
            moving, fixed = item["moving"][None].to(device), item["fixed"][None].to(device)
            start = time.perf_counter()
            disp = predict(moving, fixed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            values["seconds_per_pair"].append(time.perf_counter() - start)
            field = disp[0].cpu().numpy()
            values["folding_percent"].append(negative_jacobian_percent(field))
            foreground = (item["fixed_labels"][0].numpy() > 0) if "fixed_labels" in item else (item["fixed"][0].numpy() > 0.05)
            values["sdlogj_foreground"].append(sdlogj(field, foreground))
            itself = predict(fixed, fixed)[0].cpu().numpy()
            values["self_displacement_mm"].append(float(np.linalg.norm(itself, axis=0)[foreground].mean()) * spacing_mm)
            if "moving_labels" in item:
                warped = warp(item["moving_labels"][None].float().to(device), disp, mode="nearest").long()
                fixed_labels = item["fixed_labels"][0].numpy()
                moving_labels = item["moving_labels"][0].numpy()
                warped = warped[0, 0].cpu().numpy()
                values["dice"].append(np.nanmean(list(dice_per_label(warped, fixed_labels).values())))
                values["dice_identity"].append(np.nanmean(list(dice_per_label(moving_labels, fixed_labels).values())))
                surface = surface_metrics_per_label(warped, fixed_labels, (spacing_mm,) * 3)
                values["hd95"].append(np.nanmean([v["hd95"] for v in surface.values()]))
    model.train(was_training)
    return ValidationResult(**{key: float(np.mean(v)) if v else float("nan") for key, v in values.items()})


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    steps: int
    out: Path
    package: Optional[Path]
    best: Dict[str, Any]
    wall_seconds: float
    last_loss: float


class _Logger:
    def __init__(self, folder: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.folder = folder
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: logging to CSV only (pip install tensorboard)")

    def row(self, name: str, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self.folder / f"{name}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(values))
            if new:
                writer.writeheader()
            writer.writerow(values)
        if self.writer is not None:
            step = values.get("step", 0)
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{name}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _initial_model(config: TrainConfig) -> SACBNet:
    if config.model.init:
        from ..networks.checkpoints import load_checkpoint
        from ..packages import read_package
        init = Path(config.model.init)
        if (init / "model.json").is_file():
            model = read_package(init).load_model()
        else:
            model, _ = load_checkpoint(init, clusters=config.model.clusters)
        return model.train()
    network = SACBNetConfig(clusters=config.model.clusters, cluster_feature=config.model.cluster_feature,
                            base_channels=config.model.base_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        return SACBNet(network).train()


# --------------------------------------------------------------------------- training stages


@dataclass
class _Process:
    """Where this process trains: its rank among ``world`` processes (torchrun's environment) and its device."""

    world: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class _Model:
    """The network being trained (``trained``: its DDP wrapper when distributed, else itself) and
    what updates it."""

    model: SACBNet
    trained: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]


@dataclass
class _Progress:
    """How far the run is: the next step, the best validation so far, the wall time of earlier sessions."""

    step: int = 0
    best: Dict[str, Any] = field(default_factory=lambda: {"dice": -1.0, "step": -1})
    elapsed_before: float = 0.0
    resumed: bool = False


@dataclass
class _StepLosses:
    """One training step's figures (the loss terms as detached tensors, read only when logged)."""

    loss: float
    ncc: torch.Tensor
    smoothness: torch.Tensor
    dice_loss: torch.Tensor
    identity: torch.Tensor
    grad_norm: float
    lr: float


def _start_process(config: TrainConfig) -> _Process:
    """Rank and device from torchrun's environment, the process group when distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    process = _Process(world, rank, _resolve_device(config, local_rank))
    if process.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if process.device.type == "cuda" else "gloo")
    if process.device.type == "cuda":
        torch.cuda.set_device(process.device)
    return process


def _prepare_output(config: TrainConfig, process: _Process) -> Path:
    """``run.out`` with its ``checkpoints`` folder and the recipe (``config.json``), written by rank 0."""
    out = Path(config.run.out)
    if process.main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if process.distributed:
        dist.barrier()
    return out


def _set_up_model(config: TrainConfig, device: torch.device) -> _Model:
    """The initial network on ``device``, Adam, the mixed-precision scaler (active for fp16 only)."""
    model = _initial_model(config).to(device)
    model.gradient_checkpointing = config.run.gradient_checkpointing
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    amp_dtype = _amp(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return _Model(model=model, trained=model, optimizer=optimizer, scaler=scaler, amp_dtype=amp_dtype)


def _resume(config: TrainConfig, last: Path, state: _Model) -> _Progress:
    """Continue from the training state ``last`` (``run.resume`` and the file exists), else start afresh."""
    if not (config.run.resume and last.is_file()):
        return _Progress()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    if saved.get("format") != STATE_FORMAT or saved.get("version") != STATE_VERSION:
        raise TrainingError(f"{last} is not a training state this version can resume")
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])
    return _Progress(step=int(saved["step"]), best=dict(saved["best"]), elapsed_before=float(saved["elapsed"]),
                     resumed=True)


def _set_up_data(config: TrainConfig, process: _Process, start_step: int) -> Tuple[DataLoader, Optional[Dataset], int]:
    """The loader of this rank's batches from ``start_step`` on, the validation pairs (rank 0, when
    configured) and the number of labels of the Dice loss."""
    dataset = build_training_data(config, process.world)
    validation = None
    if process.main and config.data.validation_pairs > 0 and config.run.val_every > 0:
        validation = build_source(config.data.validation, config, config.data.validation_pairs,
                                  config.data.validation_seed)
    sampler = StepBatches(start_step, config.optim.steps, config.optim.batch_size, process.world, process.rank,
                          len(dataset))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.run.workers,
                        persistent_workers=False, pin_memory=process.device.type == "cuda")
    num_labels = config.loss.num_labels or max([s.labels + 1 for s in config.data.sources if s.kind == "synth"] +
                                               [17 for s in config.data.sources if s.kind == "template"] + [2])
    if config.loss.dice > 0 and not config.loss.num_labels and any(s.kind == "folder" for s in config.data.sources):
        raise TrainingError("loss.dice > 0 with folder data needs loss.num_labels (the largest label + 1)")
    return loader, validation, num_labels


def _training_step(config: TrainConfig, state: _Model, batch: Dict[str, torch.Tensor], step: int,
                   device: torch.device, num_labels: int) -> _StepLosses:
    """One optimiser step on ``batch`` (the ``step``-th of the run): forward pass (under autocast
    when configured), losses in float32, backward, gradient clipping, update."""
    model, optimizer, scaler, amp_dtype = state.model, state.optimizer, state.scaler, state.amp_dtype
    lr = learning_rate(config, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    moving = batch["moving"].to(device, non_blocking=True)
    fixed = batch["fixed"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out_net = state.trained(moving, fixed)
    # losses in float32: NCC of Eq. 12 (each pair weighted by its source's similarity weight),
    # gradient regulariser of Eq. 1, optional soft Dice
    ncc = similarity_loss(fixed, out_net.warped.float(), batch["similarity_weight"].to(device),
                          config.loss.ncc_window)
    smooth = gradient_l2(out_net.displacement.float())
    loss = ncc + config.loss.smoothness * smooth
    dice_loss = torch.zeros((), device=device)
    if config.loss.dice > 0 and "moving_labels" in batch:
        moving_onehot = one_hot_labels(batch["moving_labels"].to(device), num_labels)
        fixed_onehot = one_hot_labels(batch["fixed_labels"].to(device), num_labels)
        dice_loss = soft_dice(warp(moving_onehot, out_net.displacement.float()), fixed_onehot)
        loss = loss + config.loss.dice * dice_loss
    # squared displacement on identical pairs (their true displacement is zero), logged always
    identity = weighted_displacement_l2(out_net.displacement.float(), batch["identical"].to(device))
    if config.loss.identity > 0:
        loss = loss + config.loss.identity * identity
    if not torch.isfinite(loss):
        raise TrainingError(f"the loss became {loss.item()} at step {step}; lower optim.lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    # after backward, DDP has averaged the gradients over ranks: this is the global batch's norm
    grad_norm = float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None])))
    if config.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return _StepLosses(loss=float(loss.detach()), ncc=ncc.detach(), smoothness=smooth.detach(),
                       dice_loss=dice_loss.detach(), identity=identity.detach(), grad_norm=grad_norm, lr=lr)


def _log_step(config: TrainConfig, logger: _Logger, progress: ProgressCallback, step: int, losses: _StepLosses,
              per_step: float, elapsed: float) -> None:
    """A ``train_log`` row and a progress line with the remaining time."""
    ncc = float(losses.ncc)
    logger.row("train_log", {"step": step, "loss": losses.loss, "ncc": ncc, "smoothness": float(losses.smoothness),
                             "dice_loss": float(losses.dice_loss), "identity": float(losses.identity),
                             "grad_norm": losses.grad_norm, "lr": losses.lr,
                             "seconds_per_step": per_step,
                             "elapsed_seconds": elapsed})
    remaining = per_step * (config.optim.steps - step)
    progress(step / config.optim.steps, f"step {step}/{config.optim.steps}  loss {losses.loss:.4f} "
                                        f"(ncc {ncc:.4f})  {per_step:.2f} s/step  ETA {format_duration(remaining)}")


def _run_validation(config: TrainConfig, state: _Model, validation: Dataset, device: torch.device, at_step: int,
                    run: _Progress, logger: _Logger, progress: ProgressCallback, checkpoints: Path) -> None:
    """Validate at ``at_step``, log and report it; with ``run.keep_validated`` keep the weights as
    ``checkpoints/step_<N>.pt``; a better Dice (after step 0) among the validations that pass the
    selection limits (:func:`selectable`) becomes ``run.best`` and its weights ``checkpoints/best.pt``."""
    result = validate(state.model, validation, device, config.data.spacing_mm, state.amp_dtype)
    logger.row("validation", {"step": at_step, **result.to_dict()})
    progress(at_step / config.optim.steps, f"validation at step {at_step}: Dice {result.dice:.3f} "
                                           f"(identity {result.dice_identity:.3f}), HD95 {result.hd95:.2f} mm, "
                                           f"|J|<0 {result.folding_percent:.3f}%, SDlogJ {result.sdlogj_foreground:.3f}, "
                                           f"self-registration {result.self_displacement_mm:.3f} mm")
    row = result.to_dict()
    kept = validated_checkpoint(checkpoints, at_step)
    if config.run.keep_validated:
        save_checkpoint(state.model, kept, metadata={"step": at_step, **row})
    if at_step > 0 and result.dice > run.best["dice"] and selectable(row, config.run):
        run.best = {"dice": result.dice, "step": at_step, **row}
        if config.run.keep_validated:  # the same weights and metadata: copied (atomically), not serialised again
            partial = checkpoints / "best.pt.partial"
            shutil.copyfile(kept, partial)
            os.replace(partial, checkpoints / "best.pt")
        else:
            save_checkpoint(state.model, checkpoints / "best.pt", metadata={"step": at_step, **row})


def validated_checkpoint(checkpoints: Path, step: int) -> Path:
    """Where ``run.keep_validated`` keeps the weights validated at ``step``."""
    return checkpoints / f"step_{step:06d}.pt"


def selectable(validation: Dict[str, Any], run: RunSection) -> bool:
    """Whether a validation row (:meth:`ValidationResult.to_dict`) may become the packaged best:
    its SDlogJ and self-registration within ``run.select_max_sdlogj`` / ``run.select_max_self_mm``
    (each limit off at 0). Dice alone rewards rough fields and drift on identical images."""
    return ((run.select_max_sdlogj == 0 or validation["sdlogj_foreground"] <= run.select_max_sdlogj)
            and (run.select_max_self_mm == 0 or validation["self_displacement_mm"] <= run.select_max_self_mm))


def _save_state(config: TrainConfig, state: _Model, run: _Progress, step: int, elapsed: float, last: Path) -> None:
    """The resumable training state (weights, optimiser, scaler, step, best, wall time, recipe) as ``last``."""
    save_tensor_file({"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "best": run.best,
                      "elapsed": elapsed, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                      "scaler": state.scaler.state_dict(), "config": config.to_dict()}, last)


def _time_is_up(config: TrainConfig, process: _Process, elapsed: float) -> bool:
    """``run.max_hours`` exceeded, as rank 0 decides (every rank stops at the same step)."""
    stop = config.run.max_hours > 0 and elapsed > config.run.max_hours * 3600
    if process.distributed:
        flag = torch.tensor([1.0 if stop else 0.0], device=process.device)
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


def train(config: TrainConfig, progress: ProgressCallback = no_progress, write_package: bool = True) -> TrainResult:
    """Train (or resume training) as configured; returns where the results are. ``run.threads``
    holds inside the call only: the caller's torch thread count is restored after it."""
    with torch_threads(config.run.threads):
        return _train(config, progress, write_package)


def _train(config: TrainConfig, progress: ProgressCallback, write_package: bool) -> TrainResult:
    """:func:`train`'s run, with the thread count set."""
    process = _start_process(config)
    device, main = process.device, process.main
    out = _prepare_output(config, process)
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.pt"

    state = _set_up_model(config, device)
    run = _resume(config, last, state)
    if main and run.resumed:
        progress(run.step / config.optim.steps, f"resuming at step {run.step}")
    start_step = run.step
    if process.distributed:
        state.trained = torch.nn.parallel.DistributedDataParallel(state.model)
    logger = _Logger(out, main, config.run.tensorboard)
    loader, validation, num_labels = _set_up_data(config, process, start_step)

    def save_state(step: int, elapsed: float) -> None:
        if main:
            _save_state(config, state, run, step, elapsed, last)

    def run_validation(at_step: int) -> None:
        _run_validation(config, state, validation, device, at_step, run, logger, progress, checkpoints)

    if validation is not None and start_step == 0:
        run_validation(0)  # the untrained baseline of the learning curve
    started = time.monotonic()
    step, loss_value = start_step, float("nan")
    window_start, window_steps = time.monotonic(), 0
    for batch in loader:
        losses = _training_step(config, state, batch, step, device, num_labels)
        step += 1
        window_steps += 1
        loss_value = losses.loss
        elapsed = run.elapsed_before + time.monotonic() - started
        if main and (step % config.run.log_every == 0 or step == config.optim.steps):
            per_step = (time.monotonic() - window_start) / window_steps
            window_start, window_steps = time.monotonic(), 0
            _log_step(config, logger, progress, step, losses, per_step, elapsed)
        if validation is not None and (step % config.run.val_every == 0 or step == config.optim.steps):
            run_validation(step)
        stop = _time_is_up(config, process, elapsed)
        if step % config.run.checkpoint_every == 0 or step == config.optim.steps or stop:
            save_state(step, elapsed)
        if stop:
            progress(step / config.optim.steps, f"stopping after {format_duration(elapsed)} (run.max_hours)")
            break
    wall = run.elapsed_before + time.monotonic() - started
    save_state(step, wall)
    logger.close()
    # every rank records a digest of its final weights: distributed ranks must agree
    (out / f"rank{process.rank}_weights.sha256").write_text(weights_digest(state.model) + "\n")
    package_path = None
    if main and write_package:
        package_path = package_run(config, state.model, run.best, step, wall, device)
    if process.distributed:
        dist.barrier()
    return TrainResult(steps=step, out=out, package=package_path, best=run.best, wall_seconds=wall,
                       last_loss=loss_value)


def package_run(config: TrainConfig, model: SACBNet, best: Dict[str, Any], steps: int, wall_seconds: float,
                device: torch.device) -> Path:
    """Write ``<out>/package`` from the best validated weights (or the last ones)."""
    from ..networks.checkpoints import load_checkpoint
    from ..packages import write_package

    out = Path(config.run.out)
    chosen = model
    if (out / "checkpoints" / "best.pt").is_file():
        chosen, _ = load_checkpoint(out / "checkpoints" / "best.pt")
    sources = ", ".join(f"{s.kind} ({s.mode}, weight {s.weight})" for s in config.data.sources)
    training = {"steps": steps, "hardware": hardware_description(device), "wall_time_hours": round(wall_seconds / 3600, 3),
                "data": config.package.data_description or f"synthetic pairs: {sources}",
                "spacing_mm": config.data.spacing_mm, "shape": config.data.shape, "recipe": config.to_dict()}
    validation = {"best_step": best.get("step"), **{k: v for k, v in best.items() if k not in ("step",)}} if best.get("step", -1) >= 0 else {}
    return write_package(out / "package", chosen.cpu().eval(), name=config.package.name, version=config.package.version,
                         spacing_mm=[config.data.spacing_mm] * 3, intensity=config.data.intensity,
                         modality=config.package.modality, anatomy=config.package.anatomy,
                         description=config.package.description, licence=config.package.licence,
                         source=f"trained with sacb train ({steps} steps)", shape=config.data.shape,
                         training=training, validation=validation, overwrite=True).path
