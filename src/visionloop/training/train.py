"""The training loop: one function a reader can hold in their head.

- Device: CUDA when present (``train.device=auto``), else CPU.
- On CUDA the whole dataset lives on the GPU as uint8 (no loader, no host->device copies per step),
  the model runs channels_last under bf16 autocast, optionally ``torch.compile``d.
- AdamW, label smoothing, one-cycle or warmup+cosine schedule, early stopping on val accuracy.
- A checkpoint after every epoch (``last.pt``, written atomically) holds model, optimiser,
  schedule, RNG states and history, so ``resume=True`` continues an interrupted run exactly
  (and refuses to, with a TrainingError, under other epochs, batch size, lr or schedule).
- On CPU a fixed seed gives the same weights run after run.
- Under torchrun (``WORLD_SIZE`` > 1) the same loop runs data-parallel with DistributedDataParallel:
  each rank trains on its share of every global batch, metrics are summed across ranks, and rank 0
  alone writes checkpoints and the model and calls ``on_epoch``. The rules live in
  ``training/distributed.py``; the places below where ranks behave differently say "DDP".

MLflow is not imported here: the caller passes ``on_epoch`` to log metrics wherever it wants.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.nn.parallel import DistributedDataParallel

from visionloop.config import TrainSettings
from visionloop.data.preprocess import Dataset
from visionloop.errors import TrainingError
from visionloop.fsutil import atomic_write_bytes
from visionloop.training import distributed
from visionloop.training.augment import augment
from visionloop.training.model import ModelSpec, ResidualCNN, auto_size, count_parameters

EpochCallback = Callable[[int, dict[str, float]], None]

# Settings that shape the optimisation trajectory (and the schedule's length): a resume under other
# values could not continue the run exactly, and OneCycleLR would fail past its stored total steps.
RESUME_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "schedule", "seed")


@dataclass
class TrainResult:
    model_path: Path  # best weights + spec (``model.pt``)
    spec: ModelSpec
    device: str
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    images_per_second: float
    train_seconds: float
    stopped_early: bool
    resumed_from_epoch: int | None
    parameters: int = 0
    temperature: float = 1.0
    history: list[dict[str, float]] = field(default_factory=list)
    world_size: int = 1  # training processes (DDP ranks); 1 without torchrun


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if settings.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total_steps)
    warmup = steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_model(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The forward pass, as each device runs it best: on CUDA in channels_last under bf16 autocast
    (tensor cores; the loss is then taken in float32), on the CPU in plain float32."""
    if device.type != "cuda":
        return model(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(batch.contiguous(memory_format=torch.channels_last))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """float32 logits for uint8 images (N, C, H, W), on the CPU, computed on the model's device in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        logits = run_model(model, to_float(images[start : start + batch_size].to(device)), device)
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def predict_proba(model: ResidualCNN, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Calibrated softmax outputs for uint8 images (N, C, H, W)."""
    logits = predict_logits(model, images, batch_size)
    return model.probabilities(logits.to(model.temperature.device)).cpu() if len(logits) else logits


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al., 2017): the T minimising validation NLL of softmax(logits / T).

    Label smoothing leaves a network under-confident; one scalar fitted on held-out data fixes most
    of that without changing a single prediction (argmax is unchanged by T)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return min(max(temperature, 0.05), 20.0) if math.isfinite(temperature) else 1.0


def save_model(path: Path, model: ResidualCNN, classes: list[str], dataset_version: str) -> None:
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {
            "spec": model.spec.to_dict(),
            "state_dict": state,
            "classes": classes,
            "dataset_version": dataset_version,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())


def load_model(path: Path) -> tuple[ResidualCNN, dict[str, Any]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = ResidualCNN(ModelSpec.from_dict(payload["spec"]))
        model.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        raise TrainingError(f"no trained model at {path} (run `visionloop train` first)") from None
    except Exception as exc:
        raise TrainingError(f"cannot load model {path}: {exc}") from None
    model.eval()
    return model, payload


def _checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _read_checkpoint(path: Path, dataset_version: str, spec: ModelSpec, settings: TrainSettings) -> dict[str, Any]:
    """The checkpoint a resume continues from, after checking that it belongs to this run."""
    if not path.is_file():
        raise TrainingError(f"--resume given but there is no checkpoint at {path}")
    try:
        # weights_only: a checkpoint holds tensors and plain values (see _checkpoint), so nothing in it may run
        # code on load; a file that holds any other pickled object is refused, not executed
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise TrainingError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from None
        first = next((line for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise TrainingError(
            f"checkpoint {path} refused: it holds objects other than tensors and plain values "
            f"({' '.join(first.split())[:200] or 'weights_only load failed'}); delete it to start over"
        ) from None
    except Exception as exc:
        raise TrainingError(
            f"checkpoint {path} is unreadable ({' '.join(str(exc).split())[:300]}); delete it to start over"
        ) from None
    if ckpt["dataset_version"] != dataset_version or ckpt["spec"] != spec.to_dict():
        raise TrainingError(
            f"checkpoint {path} belongs to another dataset or model shape "
            f"({ckpt['dataset_version']} vs {dataset_version}); train without --resume"
        )
    trained_with = ckpt.get("train_settings", {})
    changed = [
        f"{k}={trained_with[k]!r}" for k in RESUME_KEYS if k in trained_with and trained_with[k] != getattr(settings, k)
    ]
    if changed:
        raise TrainingError(
            f"checkpoint {path} was trained with {', '.join(changed)}; resume with the same "
            "training settings, or train without --resume"
        )
    return ckpt


def _validate(
    model: ResidualCNN, x_val: torch.Tensor, y_val: torch.Tensor, world: distributed.World, device: torch.device
) -> tuple[float, float]:
    """Loss and accuracy on the whole val split. DDP: each rank scores its share; the sums are all-reduced."""
    x, y = distributed.rank_share(x_val, world), distributed.rank_share(y_val, world)
    sums = torch.zeros(2, dtype=torch.float64)
    if len(x):
        probs = predict_proba(model, x)
        sums[0] = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y, reduction="sum")
        sums[1] = (probs.argmax(1) == y).sum()
    nll_sum, correct = distributed.all_reduce_sum(sums.to(device)).tolist()
    return nll_sum / len(x_val), correct / len(x_val)


def train(
    dataset: Dataset,
    out_dir: Path,
    settings: TrainSettings,
    hflip: bool = False,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train on ``dataset``'s train split, early-stop on its val split; write ``out_dir/model.pt``.

    Started by torchrun, every process calls this and they train one model together (DDP); rank 0
    writes the files and calls ``on_epoch``, and ``train()`` returns on every rank once it has.
    """
    device = pick_device(settings.device)
    with distributed.process_group(device.type, settings.dist_timeout) as world:
        return _train(dataset, out_dir, settings, device, world, hflip, resume, on_epoch, show_progress)


def _train(
    dataset: Dataset,
    out_dir: Path,
    settings: TrainSettings,
    device: torch.device,
    world: distributed.World,
    hflip: bool,
    resume: bool,
    on_epoch: EpochCallback | None,
    show_progress: bool,
) -> TrainResult:
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)  # DDP: one GPU per process
    if device.type == "cpu":  # DDP: the processes on a node share its cores
        torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    manifest = dataset.manifest
    x_train, y_train = (torch.from_numpy(a) for a in dataset.part("train"))
    x_val, y_val = (torch.from_numpy(a) for a in dataset.part("val"))
    if len(x_train) == 0 or len(x_val) == 0:
        raise TrainingError("the dataset has an empty train or val split")
    distributed.check_world(len(x_train), settings.batch_size, world.size)
    # Data resident on the device: uint8 is 4x smaller than float, converted per batch.
    x_train, y_train = x_train.to(device), y_train.to(device)

    width, depth = auto_size(manifest.image_size, len(x_train), settings.width, settings.depth)
    spec = ModelSpec(
        in_channels=manifest.channels,
        num_classes=len(manifest.classes),
        image_size=manifest.image_size,
        width=width,
        depth=depth,
        mean=tuple(manifest.mean),
        std=tuple(manifest.std),
    )
    torch.manual_seed(settings.seed)
    # Shuffles (and, in a single process, augments): every DDP rank draws the same numbers from it.
    generator = torch.Generator().manual_seed(settings.seed)
    model = ResidualCNN(spec).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    # the number of steps depends on the global batch only, so a schedule resumes under any world size
    steps_per_epoch = math.ceil(len(x_train) / settings.batch_size)
    scheduler = make_scheduler(optimizer, settings, settings.epochs * steps_per_epoch, steps_per_epoch)
    max_shift = max(1, manifest.image_size // 8)

    if world.is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    last_path = out_dir / "last.pt"
    start_epoch, best_acc, best_epoch, best_state = 0, -1.0, 0, None
    history: list[dict[str, float]] = []
    resumed_from = None
    if resume:
        # DDP: rank 0 reads the checkpoint and hands it to every rank (only rank 0 writes them)
        ckpt = distributed.from_rank0(lambda: _read_checkpoint(last_path, manifest.version, spec, settings))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        generator.set_state(ckpt["generator"])
        start_epoch, best_acc, best_epoch = ckpt["epoch"], ckpt["best_acc"], ckpt["best_epoch"]
        best_state, history = ckpt["best_state"], ckpt["history"]
        resumed_from = start_epoch

    # DDP: the wrapper broadcasts rank 0's weights now and averages the gradients in every backward
    # pass; everything else (checkpoints, evaluation, the model file) uses the plain module.
    ddp_model: torch.nn.Module = model
    if world.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(ddp_model) if settings.compile and device.type == "cuda" else ddp_model
    train_seconds, images_seen, stopped_early = 0.0, 0, False
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not (show_progress and world.is_rank0),
        transient=False,
    )
    with progress:
        task = progress.add_task("epochs", total=settings.epochs, completed=start_epoch, status="")
        for epoch in range(start_epoch, settings.epochs):
            if epoch - best_epoch >= settings.patience and best_state is not None:
                stopped_early = True
                break
            ddp_model.train()
            started = time.perf_counter()
            order = torch.randperm(len(x_train), generator=generator)
            order = distributed.pad_to_world(order, settings.batch_size, world.size).to(device)
            # DDP: each rank augments its images from its own generator, seeded from the shared one,
            # so no two ranks draw the same shifts and the checkpointed generator is all the state there is
            augment_generator = generator
            if world.distributed:
                seed = int(torch.randint(2**62, (1,), generator=generator))
                augment_generator = torch.Generator().manual_seed(seed + world.rank)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            for start in range(0, len(order), settings.batch_size):
                # DDP: the global batch is order[start : start + batch_size]; this rank trains on its share
                idx = distributed.rank_share(order[start : start + settings.batch_size], world)
                batch = augment(to_float(x_train[idx]), max_shift, hflip, augment_generator)
                target = y_train[idx]
                logits = run_model(step_model, batch, device)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=settings.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == target).sum()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            images_seen += len(order)
            # DDP: sums over every rank, so all ranks see the same numbers and stop early together
            loss_total, correct_total = distributed.all_reduce_sum(torch.stack([loss_sum, correct])).tolist()
            if not math.isfinite(loss_total):
                raise TrainingError(f"training diverged at epoch {epoch + 1} (loss is not finite); lower train.lr")

            distributed.broadcast_buffers(model)  # DDP: rank 0's BatchNorm statistics everywhere
            val_loss, val_acc = _validate(model, x_val, y_val, world, device)
            metrics = {
                "train_loss": loss_total / len(order),
                "train_accuracy": correct_total / len(order),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": elapsed,
            }
            history.append({"epoch": epoch + 1, **metrics})
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if not world.is_rank0:  # DDP: logging and checkpoints are rank 0's
                continue
            if on_epoch is not None:  # before the checkpoint: an epoch is never saved but unlogged
                on_epoch(epoch + 1, metrics)
            _checkpoint(
                last_path,
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "generator": generator.get_state(),
                    "best_acc": best_acc,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "history": history,
                    "spec": spec.to_dict(),
                    "dataset_version": manifest.version,
                    "train_settings": {k: getattr(settings, k) for k in RESUME_KEYS},
                },
            )
            progress.update(task, advance=1, status=f"loss {metrics['train_loss']:.3f}  val acc {val_acc:.4f}")

    assert best_state is not None  # at least one epoch ran, or resume restored one
    model.load_state_dict(best_state)
    # DDP: rank 0 fits the temperature and writes the model; every rank learns the temperature, and
    # the barrier holds the others until the file exists
    temperature = distributed.from_rank0(lambda: fit_temperature(predict_logits(model, x_val), y_val))
    model.temperature.fill_(temperature)
    model_path = out_dir / "model.pt"
    if world.is_rank0:
        save_model(model_path, model.cpu(), manifest.classes, manifest.version)
    distributed.barrier()
    return TrainResult(
        model_path=model_path,
        spec=spec,
        device=f"{device.type} x{world.size} (DDP, {distributed.backend_for(device.type)})"
        if world.distributed
        else str(device),
        epochs_run=len(history),
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        images_per_second=images_seen / train_seconds if train_seconds else float("nan"),
        train_seconds=train_seconds,
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
        parameters=count_parameters(model),
        temperature=float(model.temperature),
        history=history,
        world_size=world.size,
    )
