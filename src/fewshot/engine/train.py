"""Meta-training: the outer loop, validation, checkpoints, exact resumption.

The loop only talks to methods through ``Method.loss`` and
``Method.query_logits``. Batch ``k`` of meta-training is a pure function of
(seed, k), and the checkpoint holds weights, optimiser, scheduler, step and
RNG state, so a run that is interrupted and resumed ends with the same
weights as one that never stopped. SIGINT/SIGTERM save a checkpoint first;
the state is also saved just before each validation, so even a SIGKILL during
a long validation loses no training steps. A non-finite loss, gradient norm,
weight or buffer stops training without saving that state: the last checkpoint
stays the last good state, marked so that its resume may lower the rate or clip
the gradients (``NON_FINITE_CURES``).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

from fewshot.config import RESUMABLE_CHANGES, Config, differences, from_yaml, resume_conflicts, to_yaml
from fewshot.engine import checkpoint, distributed
from fewshot.engine.setup import Experiment, build_experiment
from fewshot.errors import FewShotError

STOPPED_NON_FINITE = "non-finite"
"""A checkpoint's ``stopped`` mark: the run stopped on a non-finite value after this state."""


class TrainingStopped(FewShotError):
    """Training cannot go on (a non-finite value); the last good checkpoint was kept."""


class RunMismatch(FewShotError):
    """The run directory holds a run that these settings cannot continue (other settings, or
    trained past ``train.steps``); the new settings belong in another run directory."""


class Interrupted(FewShotError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

    exit_code = 130


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_step: int | None
    best_val: float | None
    wall_time_s: float
    resumed_from: int
    """The step this call started at (0 for a new run; ``steps`` when the run was already complete)."""


def build_optimizer(params, config: Config) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning-rate schedule by name: constant, step (x gamma every step_size), cosine, linear to 0."""
    t = config.train
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.steps)
    if t.schedule == "linear":
        return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=t.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def first_non_finite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding nan or inf (None if all are finite).

    Cheap enough for every step: a nan or inf makes its tensor's sum non-finite, so one sum per
    tensor and one synchronisation clear them all (a tenth of the time of ``isfinite``); only a
    non-finite sum, which a huge finite tensor could also give, calls for the element-wise check.
    """
    named = [(name, t) for name, t in named if t.is_floating_point()]
    if not named:
        return None
    with torch.no_grad():
        if bool(torch.isfinite(torch.stack([t.sum().double() for _, t in named])).all()):
            return None
        return next((name for name, t in named if not bool(torch.isfinite(t).all())), None)


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps."""
    flag: dict[str, int] = {}

    def handler(signum, frame):
        flag["signal"] = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Trainer:
    """One run directory: config.yaml, metrics.jsonl, checkpoints/{last,best}.pt, learning_curve.png
    (and checkpoints/step-NNNNNN.pt every ``train.keep_every`` steps)."""

    def __init__(self, config: Config, run_dir: Path, progress: bool = True) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.exp: Experiment = build_experiment(config)
        self.method = self.exp.method
        self.optimizer = build_optimizer(self.method.parameters(), config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.elapsed = 0.0
        self.validation_pending = False
        self.saved_step: int | None = None
        """The step of checkpoints/last.pt: the last good state if a non-finite value stops the run."""
        self.resumed_changes: list[str] = []
        """Rate and clipping changes made on resuming after a non-finite stop, kept in the checkpoint."""

    # --- state ---------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"

    def state(self) -> dict[str, Any]:
        return {
            "config": to_yaml(self.config),
            "method_name": self.config.method.name,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
            "best_val": self.best_val,
            "best_step": self.best_step,
            "elapsed": self.elapsed,
            "preprocess": self.exp.preprocess,
            "validation_pending": self.validation_pending,
            "resumed_changes": self.resumed_changes,
        }

    def save(self, path: Path | None = None) -> Path:
        """Write a checkpoint (rank 0 only under torchrun: every rank holds the same state), after
        checking the whole state, optimiser's included, so that no checkpoint holds nan or inf."""
        path = path or self.last_path
        self._check_finite(self.step, optimizer=True)
        if distributed.is_main():
            checkpoint.save_atomic(self.state(), path)
        if path == self.last_path:
            self.saved_step = self.step
        return path

    def restore(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.saved_step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        self.elapsed = float(state.get("elapsed", 0.0))
        self.validation_pending = bool(state.get("validation_pending", False))
        self.resumed_changes = list(state.get("resumed_changes", []))
        self._apply_cures(from_yaml(state["config"]))
        self._truncate_metrics(self.step, drop_val=self.validation_pending)

    def _apply_cures(self, saved: Config) -> None:
        """Continue at the new rate when resumed with another train.lr (allowed after a non-finite
        stop; ``refuse_mismatch`` has refused any other change), and record the changes."""
        changed = differences(saved, self.config, RESUMABLE_CHANGES)
        if not changed:
            return
        old, new = saved.train.lr, self.config.train.lr
        for group in self.optimizer.param_groups:  # every schedule here scales with the base rate
            group["lr"] = new * (group["lr"] / old)
            group["initial_lr"] = new
        self.scheduler.base_lrs = [new for _ in self.scheduler.base_lrs]
        self.resumed_changes.append(
            f"from step {self.step}: " + ", ".join(f"{key} {a!r} -> {b!r}" for key, a, b in changed)
        )

    # --- non-finite values -----------------------------------------------------------------------
    def _check_finite(self, step: int, optimizer: bool = False) -> None:
        """Stop if a weight or buffer (with ``optimizer``, also the optimiser's state) holds nan or
        inf: a state can go bad with a finite loss, e.g. a BatchNorm running variance overflowing."""
        named = [
            *((f"weight {n}", p) for n, p in self.method.named_parameters()),
            *((f"buffer {n}", b) for n, b in self.method.named_buffers()),
        ]
        if optimizer:
            names = {p: n for n, p in self.method.named_parameters()}
            named += [
                (f"optimiser state {key} of {names.get(p, '?')}", value)
                for p, values in self.optimizer.state.items()
                for key, value in values.items()
                if isinstance(value, torch.Tensor)
            ]
        bad = first_non_finite(named)
        if distributed.any_rank(bad is not None):
            self._stop(f"The {bad or 'state on another rank'} became non-finite", step)

    def _stop(self, what: str, step: int) -> NoReturn:
        """Stop on a non-finite value without saving this state: the last checkpoint stays the last
        good state, marked so that its resume may change the rate and the clipping."""
        t = self.config.train
        clip = 1.0 if t.grad_clip is None else t.grad_clip / 10
        cure = f"--set train.lr={t.lr / 10:g} --set train.grad_clip={clip:g}"
        if self.saved_step is None:  # the initial state itself: nothing good to go back to
            raise TrainingStopped(
                f"{what} before the first step, so nothing was saved in {self.run_dir}; check the method's "
                "settings and the data, then train in a new run directory."
            )
        if distributed.is_main():
            good = checkpoint.load(self.last_path)
            checkpoint.save_atomic({**good, "stopped": STOPPED_NON_FINITE}, self.last_path)
        raise TrainingStopped(
            f"{what} in step {step}, so training stopped with the last good state (step {self.saved_step}) "
            f"kept in {self.last_path}; resume from it at a lower rate or with clipped gradients, which a "
            f"run stopped this way may change: {self._resume_command()} {cure} (or check the data)."
        )

    def _resume_command(self) -> str:
        world = distributed.world_size()
        launcher = f"torchrun --nproc-per-node {world} -m " if world > 1 else ""
        return f"{launcher}fewshot train --run-dir {self.run_dir} --resume"

    # --- logging ---------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int, drop_val: bool = False) -> None:
        """Drop records written after the checkpoint we resume from, so no step is logged twice
        (with ``drop_val``, also the validation record of ``step`` itself, which will be redone)."""

        def kept(record: dict[str, Any]) -> bool:
            return record["step"] < step or (record["step"] == step and not (drop_val and "val" in record))

        from fewshot.engine.plots import read_metrics  # skips a last line cut short by a kill

        path = self.run_dir / "metrics.jsonl"
        if distributed.is_main() and path.is_file():
            keep = [record for record in read_metrics(path) if kept(record)]
            path.write_text("".join(json.dumps(record) + "\n" for record in keep))

    # --- the loop --------------------------------------------------------------------------------
    def validate(self) -> float:
        """Accuracy (or negative MSE for regression) on the fixed validation episodes."""
        return self.exp.validate(self.method)

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``train.steps`` (or ``stop_at``, which acts like an interrupt, for tests)."""
        t = self.config.train
        main = distributed.is_main()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.config))
            if self.step == 0:  # a new run: no records of a run that died before its first checkpoint
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        distributed.broadcast_module(self.method)  # every rank starts from rank 0's weights
        if self.step == 0:
            self.save()  # so that a good state to go back to always exists
        world = distributed.world_size()
        self.method.train()
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            desc=self.config.name,
            unit="step",
            disable=None if self.progress and main else True,
            dynamic_ncols=True,
        )
        window: list[tuple[float, float]] = []
        resumed_from = self.step
        batches = self.exp.batches(self.step)
        with _stop_on_signals() as flag, bar:
            if self.validation_pending:  # resumed from a run killed while it validated
                self._validate_and_select()
            while self.step < t.steps:
                started = time.perf_counter()
                batch = next(batches)
                loss, metrics = self.method.loss(batch)
                # under torchrun: the mean over ranks, so every rank logs and stops alike
                loss_value, *values = distributed.mean_scalars([loss.item(), *metrics.values()])
                metrics = dict(zip(metrics, values, strict=True))
                if not math.isfinite(loss_value):
                    self._stop(f"The meta-training loss became {loss_value}", self.step + 1)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(self.method)
                if t.grad_clip is not None:  # the same on every rank: the gradients are averaged
                    norm = float(torch.nn.utils.clip_grad_norm_(self.method.parameters(), t.grad_clip))
                    if not math.isfinite(norm):
                        self._stop(f"The gradient norm became {norm}", self.step + 1)
                self.optimizer.step()
                distributed.average_buffers(self.method)
                self._check_finite(self.step + 1)
                self.scheduler.step()
                self.step += 1
                took = time.perf_counter() - started
                self.elapsed += took
                window = [*window[-49:], (took, float(batch.tasks * world))]
                tasks_per_s = sum(n for _, n in window) / sum(s for s, _ in window)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    record = {
                        "step": self.step,
                        "loss": loss_value,
                        **metrics,
                        "tasks_per_s": tasks_per_s,
                        "lr": self.scheduler.get_last_lr()[0],
                        "elapsed_s": self.elapsed,
                    }
                    self._log(record)
                    bar.set_postfix(
                        loss=f"{loss_value:.3f}",
                        acc=f"{metrics.get('accuracy', math.nan):.3f}",
                        tasks_s=f"{tasks_per_s:.1f}",
                    )
                if self.step % t.val_every == 0 or self.step == t.steps:
                    self._validate_and_select()  # saves last.pt before and after
                elif self.step % t.checkpoint_every == 0:
                    self.save()
                if t.keep_every and self.step % t.keep_every == 0:
                    self.save(self.run_dir / "checkpoints" / f"step-{self.step:06d}.pt")
                signalled = distributed.any_rank(bool(flag))  # a signal may reach only some ranks
                if signalled or (stop_at is not None and self.step >= stop_at and self.step < t.steps):
                    self.save()
                    why = f"stop_at={stop_at}"
                    if signalled:
                        why = signal.Signals(flag["signal"]).name if flag else "a signal to another rank"
                    if self.step >= t.steps:  # the signal came in the last step or validation
                        raise Interrupted(
                            f"Training is complete ({self.step}/{t.steps} steps, saved in "
                            f"{self.last_path.parent}), but {why} stopped the command before the test "
                            f"evaluation; run it with: {self._resume_command()} (which trains nothing more)"
                        )
                    raise Interrupted(
                        f"Training stopped by {why} at step {self.step}/{t.steps}; state saved in "
                        f"{self.last_path}. Resume with: {self._resume_command()}"
                    )
        if main:
            self.plot()
        return TrainResult(self.run_dir, self.step, self.best_step, self.best_val, self.elapsed, resumed_from)

    def _validate_and_select(self) -> None:
        """Validate, keep ``best.pt``, save ``last.pt``. The state is saved first, marked
        ``validation_pending``, so a kill during a long validation loses no training steps:
        resuming from it redoes this validation, as the interrupted run would have done."""
        self.validation_pending = True
        self.save()
        started = time.perf_counter()
        score = self.validate()
        self.validation_pending = False
        self._log(
            {
                "step": self.step,
                "val": score,
                "val_time_s": time.perf_counter() - started,
                "elapsed_s": self.elapsed,
            }
        )
        if self.best_val is None or score > self.best_val:
            self.best_val, self.best_step = score, self.step
            if distributed.is_main():
                checkpoint.save_atomic({**self.state(), "selected_by": "validation"}, self.best_path)
        if distributed.is_main():
            self.plot()
        self.save()

    def plot(self) -> Path:
        from fewshot.engine.plots import learning_curve

        return learning_curve(
            self.run_dir / "metrics.jsonl", self.run_dir / "learning_curve.png", title=self.config.name
        )


def train(
    config: Config,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Meta-train ``config`` into ``run_dir``; with ``resume``, continue from its last checkpoint."""
    distributed.init_from_env(config.train.threads)
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"

    def check_run_dir() -> None:
        if last.exists() and not resume:
            raise FewShotError(
                f"{run_dir} already holds a run (checkpoints/last.pt). Continue it with --resume, "
                "or choose another --run-dir."
            )
        if resume and not last.exists():
            raise FewShotError(f"Nothing to resume: {last} does not exist. Drop --resume to start a new run.")

    distributed.on_main(check_run_dir)  # rank 0's machine holds the run directory
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    state = distributed.on_main(lambda: checkpoint.load(last)) if resume else None
    if state is not None:  # checked before the data are loaded: a refusal comes at once
        refuse_mismatch(state, config, last)
    trainer = Trainer(config, run_dir, progress)
    if state is not None:
        trainer.restore(state)
    return trainer.run(stop_at=stop_at)


def refuse_mismatch(state: dict[str, Any], config: Config, last: Path) -> None:
    """Raise ``RunMismatch`` unless resuming ``state`` as ``config`` continues one and the same run."""
    if state["method_name"] != config.method.name:
        raise RunMismatch(f"{last} is a {state['method_name']} run, not {config.method.name}.")
    after_non_finite = state.get("stopped") == STOPPED_NON_FINITE  # it may lower the rate, clip gradients
    conflicts = resume_conflicts(from_yaml(state["config"], f"in {last}"), config, after_non_finite)
    if conflicts:
        raise RunMismatch(
            f"{last} was trained with other settings, so resuming it as asked would mix two runs: "
            + "; ".join(conflicts)
            + ". Resume with the run's own settings (its config.yaml), or train the new settings "
            "in another run directory (the same seed gives the same first steps)."
        )
    if state["step"] > config.train.steps:  # its weights are not the shorter run's: refuse, not mislabel
        raise RunMismatch(
            f"{last} is trained to {state['step']} steps, past the {config.train.steps} asked for. "
            "Train the shorter run in another run directory (the same seed gives the same first steps), "
            f"or evaluate a kept checkpoint of this one: fewshot eval {last.parent}/FILE.pt"
        )
