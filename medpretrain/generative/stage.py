"""What the generative entry scripts (``generative/vae.py``, ``dcgan.py``, ``ddpm.py``) share around the
loops they write out: their start-up on :func:`medpretrain.stage.start_stage`, the training data, the
step bookkeeping (:class:`Steps`) and the files a finished run leaves.

The forward pass, the losses, ``accelerator.backward`` and the optimizer steps stay in each script; this
module holds only what would otherwise be copied between them. Nothing here prints: the scripts print
through ``accelerator.print``.

Resumes are exact: the data order comes from a per-epoch seed (``train.seed + epoch``) and the training
noise from a per-process, per-step seed (:meth:`Steps.noise`), not from the global RNG, so a run killed and
resumed from a checkpoint replays the same steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medpretrain.checkpoint import save_state_dict
from medpretrain.config import ConfigError, DataConfig, config_to_dict
from medpretrain.data import MedicalDataset, build_dataset
from medpretrain.data.loader import balanced_weights, image_loader
from medpretrain.faults import fault_hook
from medpretrain.generative.configs import GenTrainConfig, check_data_config
from medpretrain.generative.monitor import sample_statistics
from medpretrain.resume import Counter
from medpretrain.runlog import plot_curves
from medpretrain.stage import DONE_FILE, Stage, start_stage
from medpretrain.utils import atomic_write_text


def start_generative(name: str, cfg: Any, fields: list[str], done_file: str = DONE_FILE) -> Stage:
    """:func:`~medpretrain.stage.start_stage` with the options of ``cfg.train`` (a :class:`GenTrainConfig`),
    after checking that the data is normalised to [-1, 1] (``ConfigError`` otherwise).

    ``done_file`` is the file a finished run holds (``backbone.safetensors``; the DDPM exports none and
    passes ``unet.safetensors``). A ``conditional`` run on a source without single-label classes is refused
    (``ConfigError``, :func:`class_labels`) before a run folder is made.
    """
    check_data_config(cfg.data)
    if getattr(cfg, "conditional", False):
        class_labels(load_split(cfg.data, cfg.split)[0])  # the source is decoded once per process: train_data reuses it
    tc: GenTrainConfig = cfg.train
    return start_stage(name, cfg, out_dir=cfg.out_dir, run_name=cfg.run_name, resume=tc.resume, seed=tc.seed,
                       fields=fields, mixed_precision=tc.mixed_precision, log_with=tc.log_with,
                       checkpoint_total_limit=tc.checkpoint_total_limit, done_file=done_file)


def load_split(data: DataConfig, split: str) -> tuple[MedicalDataset, int]:
    """An unlabeled split and its square image size; ``ValueError`` for non-square images."""
    ds = build_dataset(data, split, unlabeled=True)
    h, w = ds[0]["image"].shape[-2:]
    if h != w:
        raise ConfigError(f"{data.dataset}: generative models need square images, got {h}x{w}; set data.image_size")
    return ds, int(h)


def class_labels(ds: MedicalDataset) -> tuple[Tensor, list[str]]:
    """The single labels of ``ds``'s images (int64 ``[N]``, in ``ds``'s order, read from its source even when
    ``ds`` was built unlabeled) and the class names: what a ``conditional=true`` generator trains on.

    Raises ``ConfigError`` for a source without single-label classes (unlabeled, multilabel, segmentation).
    """
    source = ds.source
    if source.task not in ("binary", "multiclass") or source.labels is None:
        raise ConfigError(f"conditional=true needs a source with single-label classes (binary or multiclass), but "
                          f"{ds.spec} is {source.task}; set conditional=false")
    labels = torch.as_tensor(np.asarray(source.labels)[ds.indices].astype(np.int64))
    return labels, list(ds.class_names)


@dataclass
class TrainData:
    """The training split and its loader (:func:`medpretrain.data.loader.image_loader`)."""

    ds: MedicalDataset
    image_size: int
    loader: Any
    """Unprepared: pass it to ``accelerator.prepare`` and the prepared one to :class:`Steps`."""
    sampler_gen: torch.Generator
    """Seeds the shuffling; :meth:`Steps.epochs` re-seeds it every epoch."""
    to_images: Callable[[Any], Tensor]
    """Batch -> images ``[B, C, S, S]`` in [-1, 1] on the training device."""
    labels: Tensor | None = None
    """Conditional runs: the class index of every image of ``ds`` (int64 ``[N]``, on the training device)."""
    class_names: list[str] = field(default_factory=list)
    """Conditional runs: the names the labels index (empty otherwise)."""

    @property
    def num_classes(self) -> int:
        """K for a conditional run, 0 for an unconditional one."""
        return len(self.class_names) if self.labels is not None else 0

    def to_labels(self, batch: Any) -> Tensor | None:
        """Batch -> the class labels of its images ``[B]`` on the training device (``None`` when unconditional).

        Read through the images' positions in ``ds`` (the cached loader yields them, a sample carries them as
        ``index``), so the labels follow the images through any shuffling and a resume."""
        if self.labels is None:
            return None
        index = batch if isinstance(batch, Tensor) else batch["index"]
        return self.labels[index.to(self.labels.device)]


def train_data(stage: Stage, cfg: Any) -> TrainData:
    """The ``cfg.split`` split of ``cfg.data`` with a shuffling, ``drop_last`` loader of ``cfg.train.batch_size``;
    with ``cfg.conditional`` also the images' class labels (:func:`class_labels`)."""
    ds, image_size = load_split(cfg.data, cfg.split)
    labels, names = class_labels(ds) if getattr(cfg, "conditional", False) else (None, [])
    tc: GenTrainConfig = cfg.train
    device = stage.accelerator.device
    if tc.class_balance and labels is None:
        raise ConfigError("train.class_balance=true needs conditional=true (it balances the classes of the batches)")
    weights = balanced_weights(labels) if tc.class_balance and labels is not None else None
    loader, sampler_gen, to_images = image_loader(ds, tc.batch_size, tc.cache_on_device, device, cfg.data.num_workers,
                                                  weights)
    return TrainData(ds, image_size, loader, sampler_gen, to_images,
                     labels.to(device) if labels is not None else None, names)


def first_images(ds: MedicalDataset, n: int) -> Tensor:
    """The first ``min(n, len(ds))`` images of ``ds`` stacked, ``[n, C, S, S]``."""
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


def optimizer_step(accelerator: Any, loss: Tensor, optimizer: torch.optim.Optimizer,
                   parameters: Iterable[nn.Parameter], grad_clip: float = 0.0) -> None:
    """``accelerator.backward(loss)``, the gradient norm clipped to ``grad_clip`` (0: off), the optimizer
    step and ``zero_grad`` (the single-optimizer step of the VAE and the DDPM)."""
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Steps:
    """Step bookkeeping of one generative run, around the loop the script writes out.

    The budget is ``train.max_steps`` optimizer steps, or ``train.epochs`` passes over ``loader`` (the
    prepared loader). The script's loop::

        steps.begin({...})                       # resume; then the progress bar
        for epoch, batches in steps.epochs():    # per-epoch order seed, skips the batches a resume has done
            for batch in batches:
                ... forward with steps.noise(), backward, optimizer step(s) ...
                steps.advance(loss)              # count the step, loss guard, bar
                if steps.log_due():
                    steps.log({...})             # loss guard check, then trackers + metrics.csv
                if steps.after_step():           # checkpoint when due, fault hook; True: budget spent
                    break
            ... end of epoch: validation, samples if steps.samples_due() ...
        steps.finish()                           # last loss check and checkpoint

    ``value`` is the number of optimizer steps done; ``epoch`` the current (after the loop: the last) epoch.
    """

    def __init__(self, stage: Stage, train: GenTrainConfig, loader: Any, sampler_gen: torch.Generator) -> None:
        self.stage, self.train, self.loader, self.sampler_gen = stage, train, loader, sampler_gen
        self.steps_per_epoch = len(loader)
        self.total = train.max_steps if train.max_steps > 0 else train.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total / self.steps_per_epoch)
        self.counter = Counter()
        self.state: dict[str, Any] = {"step": self.counter}
        self.epoch = 0
        self.start = time.time()
        self.bar: Any = None
        self._noise = torch.Generator(device=stage.accelerator.device)

    @property
    def value(self) -> int:
        return self.counter.value

    @property
    def done(self) -> bool:
        return self.counter.value >= self.total

    def begin(self, state: Mapping[str, Any] | None = None) -> int:
        """:meth:`Stage.begin` with the step counter and ``state`` (more objects with ``state_dict()`` to
        checkpoint, e.g. a collapse monitor), then the clock and the bar. Returns the step resumed from."""
        self.state.update(state or {})
        step = self.stage.begin(self.state, self.counter)
        self.epoch = step // self.steps_per_epoch
        self.start = time.time()
        self.bar = self.stage.progress(self.total, step)
        return step

    def epochs(self) -> Iterator[tuple[int, Any]]:
        """``(epoch, batches)`` from the epoch of the current step to the end of the budget; the shuffling is
        seeded with ``train.seed + epoch``, and the batches a resumed run already did are skipped."""
        for epoch in range(self.counter.value // self.steps_per_epoch, self.num_epochs):
            self.epoch = epoch
            if self.done:
                return
            self.sampler_gen.manual_seed(self.train.seed + epoch)  # same order per epoch, so a resume replays it
            skip = self.counter.value - epoch * self.steps_per_epoch
            yield epoch, self.stage.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader

    def noise(self) -> torch.Generator:
        """The generator for this step's noise (on the device), seeded from ``train.seed``, the process and the
        step: processes draw different noise, and a resumed run draws the same as an uninterrupted one (the
        global RNG would not do: a resume shifts it by creating the data iterator after restoring it)."""
        process = self.stage.accelerator.process_index
        return self._noise.manual_seed((self.train.seed << 40) + (process << 32) + self.counter.value)

    def advance(self, loss: Tensor) -> int:
        """One optimizer step done: count it, feed ``loss`` to the loss guard, move the bar. Returns the step."""
        self.counter.value += 1
        self.stage.guard.update(loss, self.counter.value)
        self.bar.update(1)
        return self.counter.value

    def log_due(self) -> bool:
        """Every ``train.log_every`` steps and at the last one."""
        return self.counter.value % self.train.log_every == 0 or self.counter.value == self.total

    def log(self, values: Mapping[str, Any], check: bool = True) -> None:
        """``values`` with the epoch and the elapsed time to the trackers and ``metrics.csv`` at this step;
        ``check``: first the loss guard (every process raises if any saw a NaN/inf loss)."""
        if check:
            self.stage.check_finite()
        row = {"epoch": self.epoch, **values, "elapsed_s": time.time() - self.start}
        self.stage.log(row, self.counter.value)

    def after_step(self) -> bool:
        """A checkpoint every ``train.checkpoint_every`` steps (after the loss guard), the test-only fault hook
        (:func:`medpretrain.faults.fault_hook`). Returns whether the step budget is spent."""
        step = self.counter.value
        if self.train.checkpoint_every and step % self.train.checkpoint_every == 0:
            self.stage.checkpoint(step, self.state)
        fault_hook(step)
        return self.done

    def samples_due(self) -> bool:
        """At the end of an epoch: is a sample grid due (every ``train.sample_every`` epochs and at the end)?
        Only on the main process."""
        due = (self.epoch + 1) % max(1, self.train.sample_every) == 0 or self.done
        return self.stage.is_main and due

    def samples_path(self) -> Path:
        return self.stage.run_dir / f"samples_epoch{self.epoch + 1:03d}.png"

    def finish(self) -> None:
        """After the loop: close the bar, a last loss check and a checkpoint of the last step (unless the
        newest checkpoint holds it)."""
        self.bar.close()
        self.stage.check_finite()
        self.stage.checkpoint_at_end(self.counter.value, self.state)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_outputs(stage: Stage, steps: Steps, data: TrainData, model_file: str, model: nn.Module,
                  meta: Mapping[str, Any], samples: Tensor, curves: Sequence[str], title: str,
                  **results: Any) -> dict[str, Any]:
    """Main process, after training: the image model, the loss plot and ``results.json``.

    * ``model_file`` in the run folder: ``model``'s weights with ``meta`` (what rebuilds it:
      :func:`~medpretrain.generative.sampling.generator_meta`, :func:`~medpretrain.generative.ddpm.ddpm_meta`)
      plus the method, dataset, normalisation, steps and config (conditional runs: ``class_counts``, the
      training images per class);
    * ``loss.png``: ``curves`` of ``metrics.csv``;
    * ``results.json``: ``results`` plus method, steps, epochs, image size, training wall time, run folder,
      ``num_classes`` and ``class_names`` (conditional runs) and ``sample_stats``
      (:func:`~medpretrain.generative.monitor.sample_statistics` of ``samples`` against as many validation
      images).

    Returns what ``results.json`` holds.
    """
    cfg, run_dir = stage.cfg, stage.run_dir
    counts = ({"class_counts": torch.bincount(data.labels.cpu(), minlength=data.num_classes).tolist()}
              if data.labels is not None and data.num_classes else {})  # the real class mix: what ``sample.py mix=data`` draws in
    save_state_dict(run_dir / model_file, model.state_dict(),
                    {**meta, **counts, "method": stage.name, "dataset": data.ds.spec, "dataset_hash": data.ds.fingerprint,
                     "mean": cfg.data.mean, "std": cfg.data.std, "steps": steps.value, "config": config_to_dict(cfg)})
    val_ds, _ = load_split(cfg.data, "val")
    stats = sample_statistics(samples, first_images(val_ds, len(samples)))
    plot_curves(run_dir / "metrics.csv", run_dir / "loss.png", tuple(curves), title=title)
    classes = {"num_classes": data.num_classes, "class_names": data.class_names} if data.num_classes else {}
    out = {"method": stage.name, "steps": steps.value, "epochs": steps.epoch + 1, "image_size": data.image_size,
           "train_wall_s": time.time() - steps.start, **classes, **results, "sample_stats": stats,
           "run_dir": str(run_dir)}
    write_json(run_dir / "results.json", out)
    return out
