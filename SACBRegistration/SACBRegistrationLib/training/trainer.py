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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from ..losses.functional import gradient_l2, local_ncc, one_hot_labels, soft_dice
from ..metrics import dice_per_label, negative_jacobian_percent, sdlogj, surface_metrics_per_label
from ..networks.config import SACBNetConfig
from ..networks.sacbnet import SACBNet
from ..progress import ProgressCallback, format_duration, no_progress
from ..spatial.warping import warp
from .config import SourceSection, TrainConfig

STATE_FORMAT = "sacb-training-state"
STATE_VERSION = 1


class TrainingError(RuntimeError):
    """Training cannot start or continue."""


# --------------------------------------------------------------------------- data


def build_source(source: SourceSection, config: TrainConfig, length: int, seed: int) -> Dataset:
    """A dataset of ``length`` items for one configured source; every item carries the source's
    ``similarity_weight``."""
    from ..data.pairs import SynthPairs, TemplatePairs, WithSimilarityWeight

    shape = tuple(config.data.shape)
    if source.kind == "synth":
        dataset = SynthPairs(shape, length, seed, labels=source.labels, max_std=source.max_std)
    elif source.kind == "template":
        from ..data.template import template_volumes
        image, labels, _ = template_volumes(config.data.spacing_mm, shape)
        dataset = TemplatePairs(image, labels, length, seed, source.mode, source.max_std, source.affine,
                                source.invert_probability, source.identical_probability)
    else:
        from .folders import FolderPairs
        dataset = FolderPairs(source, config, length, seed)
    return WithSimilarityWeight(dataset, source.similarity)


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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    wanted = config.run.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("run.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def train(config: TrainConfig, progress: ProgressCallback = no_progress, write_package: bool = True) -> TrainResult:
    """Train (or resume training) as configured; returns where the results are."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(config, local_rank)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    main = rank == 0
    out = Path(config.run.out)
    checkpoints = out / "checkpoints"
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if distributed:
        dist.barrier()

    model = _initial_model(config).to(device)
    model.gradient_checkpointing = config.run.gradient_checkpointing
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    amp_dtype = _amp(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_step, best, elapsed_before = 0, {"dice": -1.0, "step": -1}, 0.0

    last = checkpoints / "last.pt"
    if config.run.resume and last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise TrainingError(f"{last} is not a training state this version can resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, best, elapsed_before = int(state["step"]), dict(state["best"]), float(state["elapsed"])
        if main:
            progress(start_step / config.optim.steps, f"resuming at step {start_step}")

    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    logger = _Logger(out, main, config.run.tensorboard)
    dataset = build_training_data(config, world)
    validation = None
    if main and config.data.validation_pairs > 0 and config.run.val_every > 0:
        validation = build_source(config.data.validation, config, config.data.validation_pairs,
                                  config.data.validation_seed)
    sampler = StepBatches(start_step, config.optim.steps, config.optim.batch_size, world, rank, len(dataset))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.run.workers,
                        persistent_workers=False, pin_memory=device.type == "cuda")
    num_labels = config.loss.num_labels or max([s.labels + 1 for s in config.data.sources if s.kind == "synth"] +
                                               [17 for s in config.data.sources if s.kind == "template"] + [2])
    if config.loss.dice > 0 and not config.loss.num_labels and any(s.kind == "folder" for s in config.data.sources):
        raise TrainingError("loss.dice > 0 with folder data needs loss.num_labels (the largest label + 1)")

    def save_state(step: int, elapsed: float) -> None:
        if not main:
            return
        _atomic_save({"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "best": best,
                      "elapsed": elapsed, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scaler": scaler.state_dict(), "config": config.to_dict()}, last)

    def run_validation(at_step: int) -> None:
        nonlocal best
        result = validate(model, validation, device, config.data.spacing_mm, amp_dtype)
        logger.row("validation", {"step": at_step, **result.to_dict()})
        progress(at_step / config.optim.steps, f"validation at step {at_step}: Dice {result.dice:.3f} "
                                               f"(identity {result.dice_identity:.3f}), HD95 {result.hd95:.2f} mm, "
                                               f"|J|<0 {result.folding_percent:.3f}%, SDlogJ {result.sdlogj_foreground:.3f}, "
                                               f"self-registration {result.self_displacement_mm:.3f} mm")
        if at_step > 0 and result.dice > best["dice"]:
            best = {"dice": result.dice, "step": at_step, **result.to_dict()}
            _atomic_save({"format": "sacbnet-checkpoint", "version": 1, "config": model.config.to_dict(),
                          "state_dict": model.state_dict(), "metadata": {"step": at_step, **result.to_dict()}},
                         checkpoints / "best.pt")

    if validation is not None and start_step == 0:
        run_validation(0)  # the untrained baseline of the learning curve
    started = time.monotonic()
    step, loss_value = start_step, float("nan")
    window_start, window_steps = time.monotonic(), 0
    for batch in loader:
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        moving = batch["moving"].to(device, non_blocking=True)
        fixed = batch["fixed"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out_net = trained(moving, fixed)
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
        step += 1
        window_steps += 1
        loss_value = float(loss.detach())
        elapsed = elapsed_before + time.monotonic() - started

        if main and (step % config.run.log_every == 0 or step == config.optim.steps):
            per_step = (time.monotonic() - window_start) / window_steps
            window_start, window_steps = time.monotonic(), 0
            logger.row("train_log", {"step": step, "loss": loss_value, "ncc": float(ncc.detach()), "smoothness": float(smooth.detach()),
                                     "dice_loss": float(dice_loss.detach()), "grad_norm": grad_norm, "lr": lr,
                                     "seconds_per_step": per_step,
                                     "elapsed_seconds": elapsed})
            remaining = per_step * (config.optim.steps - step)
            progress(step / config.optim.steps, f"step {step}/{config.optim.steps}  loss {loss_value:.4f} "
                                                f"(ncc {float(ncc.detach()):.4f})  {per_step:.2f} s/step  ETA {format_duration(remaining)}")
        if validation is not None and (step % config.run.val_every == 0 or step == config.optim.steps):
            run_validation(step)
        stop = config.run.max_hours > 0 and elapsed > config.run.max_hours * 3600
        if distributed:
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if step % config.run.checkpoint_every == 0 or step == config.optim.steps or stop:
            save_state(step, elapsed)
        if stop:
            progress(step / config.optim.steps, f"stopping after {format_duration(elapsed)} (run.max_hours)")
            break
    wall = elapsed_before + time.monotonic() - started
    save_state(step, wall)
    logger.close()
    # every rank records a digest of its final weights: distributed ranks must agree
    (out / f"rank{rank}_weights.sha256").write_text(weights_digest(model) + "\n")
    package_path = None
    if main and write_package:
        package_path = package_run(config, model, best, step, wall, device)
    if distributed:
        dist.barrier()
    return TrainResult(steps=step, out=out, package=package_path, best=best, wall_seconds=wall, last_loss=loss_value)


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
