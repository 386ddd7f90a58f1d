"""The trainer: wires data, model, engine, strategy, sampler and ledger, and writes the run."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml

from auxilia import __version__
from auxilia.atomic import write_json, write_text
from auxilia.data.batching import Batch, BatchPlanner, IndexStream, one_row_per_loss
from auxilia.data.sources import Pair, Source, Target, check_problem, head_outputs, hold_out
from auxilia.engine import Engine, statistics_to_measure
from auxilia.errors import ConfigError, DataError, NonFiniteLossError, NonFiniteSourceError
from auxilia.ledger import Ledger
from auxilia.models import AuxModel, build_model, build_trunk
from auxilia.samplers import Sampler, all_sources
from auxilia.statistics import Need
from auxilia.strategies import Strategy
from auxilia.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from auxilia.train.distributed import (
    barrier,
    broadcast_parameters,
    check_world,
    join,
    local_device,
    reduce_sums,
    shard,
    share,
)
from auxilia.train.layout import choose_layout
from auxilia.train.progress import TrainingProgress

OptimizerName = Literal["sgd", "adam", "adamw"]


@dataclass(frozen=True)
class TrainSettings:
    """How to train: optimiser, length, evaluation, logging, checkpoints, seed and device."""

    steps: int = 500
    optimizer: OptimizerName = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 1024
    engine_mode: str = "auto"
    holdout: float = 0.1  # share of the target's train set held out, for strategies that need it
    timeout: float = 300.0  # seconds a collective waits for the other processes (torchrun)

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"train.{name}: expected an integer >= 1, got {getattr(self, name)}"
                )
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigError(f"train.timeout: expected a positive number, got {self.timeout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr: expected a positive number, got {self.lr}")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ConfigError(f"train.device: not a torch device: {self.device!r}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {self.device!r} requested but CUDA is not available")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(
                f"train.optimizer: expected 'sgd', 'adam' or 'adamw', got {self.optimizer!r}"
            )


def metric_name(target: Target) -> str:
    return "accuracy" if target.kind == "classification" else "mse"


def per_sample_loss(kind: str, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample (classification) or mean squared error per sample (regression)."""
    if kind == "classification":
        return F.cross_entropy(outputs, labels, reduction="none")
    labels = labels.reshape(outputs.shape).to(outputs.dtype)
    return ((outputs - labels) ** 2).reshape(outputs.shape[0], -1).mean(dim=1)


class Trainer:
    """Train a target with auxiliary sources under a strategy; write a run directory.

    Example::

        trainer = Trainer(target, sources, strategy=ax.strategies.gcs(), out_dir="runs/gcs")
        results = trainer.fit()
    """

    def __init__(
        self,
        target: Target,
        sources: Sequence[Source],
        *,
        strategy: Strategy,
        sampler: Sampler | None = None,
        trunk: str | torch.nn.Module = "mlp",
        trunk_params: Mapping[str, Any] | None = None,
        settings: TrainSettings | None = None,
        out_dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        quiet: bool = False,
    ) -> None:
        check_problem(target, sources)
        self.target = target
        self.sources = list(sources)
        self.strategy = strategy
        self.sampler = sampler or all_sources()
        self.settings = settings or TrainSettings()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.names = [target.name] + [s.name for s in self.sources]
        self.kinds = [target.kind] + [s.kind for s in self.sources]
        self.device = local_device(torch.device(self.settings.device))
        # Under torchrun: every rank runs this same trainer on its share of each batch.
        self.place = join(self.device, self.settings.timeout)
        check_world(self.place, target.batch_size)
        self.quiet = quiet or not self.place.writes

        torch.manual_seed(self.settings.seed)
        heads = {target.name: target.outputs}
        heads.update({s.name: head_outputs(s) for s in self.sources if s.head == "own"})
        trunk_module = build_trunk(trunk, tuple(target.train[0].shape[1:]), trunk_params or {})
        model = build_model(trunk_module, target.train[0][0], heads).to(self.device)
        self.model: AuxModel = model.train()  # train_step calls train() only after an eval
        if self.place.distributed:
            broadcast_parameters(self.model)
        shared = list(self.model.trunk.parameters())
        self.target_head_shared = any(s.head == "target" for s in self.sources)
        if self.target_head_shared:
            shared += list(self.model.heads[target.name].parameters())
        # How each step's losses reach the engine (see ``auxilia.train.layout``).
        extra_needs = {Need.LOSSES, Need.TARGET_ROW} | self.sampler.needs
        step_layout = choose_layout(
            target,
            self.sources,
            every_step_draws_all=self.sampler.name == "all",
            measured=statistics_to_measure(Need.closure(set(strategy.needs) | extra_needs)),
            mode=self.settings.engine_mode,
            model=self.model,
        )
        self.step_layout = step_layout
        self.engine = Engine(
            self.model if step_layout.gives_module else self.model.parameters(),
            strategy=strategy,
            num_sources=len(self.names),
            shared=shared,
            mode=self.settings.engine_mode,
            layout=step_layout.layout,
            extra_needs=extra_needs,
            names=self.names,
            distributed=self.place.distributed,
        )
        self.optimizer = self._optimizer()
        self._stepped: list[torch.Tensor] = list(self.model.parameters())  # grads to clear
        # Strategies that learn from held-out target losses get a slice the model never trains on.
        self.holdout: Pair | None = None
        self.holdout_stream: IndexStream | None = None
        trained = target
        if Need.VALIDATION in self.engine.needs:
            trained, self.holdout = hold_out(target, self.settings.holdout, self.settings.seed)
            self.holdout_stream = IndexStream(len(self.holdout[1]), self.settings.seed + 13)
        self.planner = BatchPlanner(trained, self.sources, self.settings.seed)
        self.sampler_state = self.sampler.init(len(self.names), self.settings.seed + 7)
        self.ledger = Ledger(self.names)
        self.coefficients = torch.ones(len(self.names), dtype=torch.float64)
        self.config = dict(config) if config is not None else self.describe()

    def _stop_copying(self) -> None:
        """The copies were made for ``ghost``; once the engine has left it (``auto`` found it
        cannot measure the model), every step uses the target's shared rows instead."""
        self.step_layout = dataclasses.replace(
            self.step_layout,
            copies_rows=False,
            reason=self.step_layout.reason + "; copies dropped once ghost was left",
        )

    @property
    def copies_rows(self) -> bool:
        """Whether each step copies the target's rows once per task (``one_row_per_loss``)."""
        return self.step_layout.copies_rows

    def _step_params(self, batch: Batch) -> list[torch.Tensor]:
        """The parameters a step can change: the trunk's and those of the heads in the batch.

        Clearing gradients and stepping the optimizer over these, rather than over one head per
        source, keeps the step's cost independent of the number of sources.
        """
        params: list[torch.Tensor] = list(self.model.trunk.parameters())
        for head in dict.fromkeys(segment.head for segment in batch.segments):
            params.extend(self.model.heads[head].parameters())
        return params

    def _optimizer_step(self, params: list[torch.Tensor]) -> None:
        """``optimizer.step()`` over ``params`` only. The update is the same as over all of them:
        every other parameter has no gradient this step, and optimizers skip those."""
        group = self.optimizer.param_groups[0]
        if len(self.optimizer.param_groups) != 1:
            self.optimizer.step()
            return
        every = group["params"]
        group["params"] = params
        try:
            self.optimizer.step()
        finally:
            group["params"] = every

    def _optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        params = self.model.parameters()
        if s.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
            )
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    def describe(self) -> dict[str, Any]:
        """A plain description of the run (written as ``config.yaml`` when no config was given)."""
        return {
            "target": {"name": self.target.name, "kind": self.target.kind},
            "sources": [
                {"name": s.name, "granularity": s.granularity, "head": s.head, "kind": s.kind}
                for s in self.sources
            ],
            "strategy": {"name": self.strategy.name, "params": dict(self.strategy.params)},
            "sampler": {"name": self.sampler.name, "params": dict(self.sampler.params)},
            "train": asdict(self.settings),
        }

    # ---- one step -------------------------------------------------------------------------

    def _losses(
        self, batch: Batch, step: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-sample losses and source ids of the batch, and of a held-out target batch; in
        the shared-input layout, the [B, K+1] table of every task's loss on the target's rows
        and no ids."""
        x = batch.x.to(self.device)
        held: Pair | None = None
        if self.holdout is not None and self.holdout_stream is not None:
            rows = self.holdout_stream.take(min(self.target.batch_size, len(self.holdout[1])))
            rows = rows[share(len(rows), self.place)]  # every rank draws all, keeps its share
            held = (self.holdout[0][rows].to(x.dtype), self.holdout[1][rows])
            x = torch.cat([x, held[0].to(self.device)])  # one forward: one graph for the engine
        features = self.model(x)
        target_outputs = None
        if self.target_head_shared:  # the shared head sees every row once (per-sample modes)
            target_outputs = self.model.heads[self.target.name](features)
        losses, ids = [], []
        for segment in batch.segments:
            if segment.rows.stop == segment.rows.start:  # none of its rows on this rank
                continue
            if target_outputs is not None and segment.head == self.target.name:
                outputs = target_outputs[segment.rows]
            else:
                outputs = self.model.heads[segment.head](features[segment.rows])
            loss = per_sample_loss(
                self.kinds[segment.source], outputs, segment.labels.to(self.device)
            )
            if not self.place.distributed:  # across processes the engine checks global means
                mean = float(loss.detach().mean())
                if not math.isfinite(mean):
                    raise NonFiniteLossError(step, self.names[segment.source], mean)
            losses.append(loss)
            ids.append(torch.full((loss.shape[0],), segment.source, dtype=torch.int64))
        validation = None
        if held is not None:
            n = len(batch.x)
            outputs = (
                target_outputs[n:]
                if target_outputs is not None
                else self.model.heads[self.target.name](features[n:])
            )
            validation = per_sample_loss(self.target.kind, outputs, held[1].to(self.device))
        if self.engine.layout == "shared-input":  # every segment on the target's rows, in order
            return torch.stack(losses, dim=1), None, None
        return torch.cat(losses), torch.cat(ids).to(self.device), validation

    def train_step(self, step: int) -> torch.Tensor:
        """Draw, forward, measure, weight, step; returns the coefficients of this step."""
        drawn, self.sampler_state = self.sampler.draw(self.sampler_state, self.coefficients)
        batch = shard(self.planner.next(drawn), self.place)
        if self.copies_rows:
            batch = one_row_per_loss(batch)
        if not self.model.training:  # train() visits every module: one head per source
            self.model.train()
        params = self._step_params(batch)
        for param in (*self._stepped, *params):  # zero_grad(set_to_none=True), O(drawn)
            param.grad = None
        losses, ids, validation = self._losses(batch, step)
        lr = float(self.optimizer.param_groups[0]["lr"])
        try:
            alpha = self.engine.backward(losses, ids, lr=lr, validation=validation)
        except NonFiniteSourceError as error:
            raise NonFiniteLossError(step, error.source, error.value) from error
        if self.copies_rows and self.engine.fallback is not None:
            self._stop_copying()
        self._optimizer_step(params)
        self._stepped = params
        assert self.engine.last_statistics is not None
        self.sampler_state = self.sampler.observe(
            self.sampler_state, self.engine.last_statistics, drawn
        )
        self.ledger.record(self.engine.last_statistics, alpha)
        self.coefficients = torch.where(drawn, alpha, self.coefficients)
        return alpha

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: Pair) -> float:
        """The target metric (accuracy or mean squared error) on ``split``."""
        self.model.eval()
        x, y = split
        rows = share(len(x), self.place)  # across processes each rank scores its share
        x, y = x[rows], y[rows]
        total, count = 0.0, 0.0
        head = self.model.heads[self.target.name]
        for start in range(0, len(x), self.settings.eval_batch_size):
            xb = x[start : start + self.settings.eval_batch_size].to(self.device)
            yb = y[start : start + self.settings.eval_batch_size].to(self.device)
            out = head(self.model(xb))
            if self.target.kind == "classification":
                total += float((out.argmax(dim=1) == yb).sum())
            else:
                total += float(per_sample_loss("regression", out, yb).sum())
            count += len(xb)
        self.model.train()
        total, count = reduce_sums([total, float(count)], self.place, self.device)
        return total / count

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self, step: int, wall: float) -> dict[str, Any]:
        return {
            "step": step,
            "names": list(self.names),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "engine": self.engine.state_dict(),
            "sampler": dict(self.sampler_state),
            "planner": self.planner.state_dict(),
            "ledger": self.ledger.state_dict(),
            "coefficients": self.coefficients.clone(),
            "torch_rng": torch.get_rng_state(),
            "wall_seconds": wall,
        } | ({} if self.holdout_stream is None else {"holdout": self.holdout_stream.state_dict()})

    def load_state_dict(self, state: Mapping[str, Any]) -> int:
        if list(state["names"]) != self.names:
            raise DataError(
                f"checkpoint sources {list(state['names'])} differ from this run's {self.names}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.engine.load_state_dict(state["engine"])
        if self.copies_rows and self.engine.fallback is not None:
            self._stop_copying()
        self.sampler_state = dict(state["sampler"])
        self.planner.load_state_dict(state["planner"])
        self.ledger.load_state_dict(state["ledger"])
        self.coefficients = state["coefficients"].clone()
        if self.holdout_stream is not None:
            self.holdout_stream.load_state_dict(state["holdout"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])

    # ---- the run --------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> dict[str, Any]:
        """Train for ``settings.steps`` steps (continuing from the last checkpoint on ``resume``)
        and return the results (also written to ``results.json`` when there is a run directory)."""
        s = self.settings
        out = self.out_dir
        start, wall_before = 0, 0.0
        if out is not None:
            start, wall_before = self._prepare_run_dir(out, resume)
            barrier(self.place)  # rank 0 has laid out the run directory
        writes = out is not None and self.place.writes
        began = time.perf_counter()
        metric = metric_name(self.target)
        with TrainingProgress(
            s.steps, self.target.name + ":" + self.strategy.name, quiet=self.quiet
        ) as progress:
            progress.advance(start)
            for step in range(start + 1, s.steps + 1):
                self.train_step(step)
                record: dict[str, Any] | None = None
                if step % s.log_every == 0 or step == s.steps:
                    record = {"step": step, "lr": float(self.optimizer.param_groups[0]["lr"])}
                    record.update(self.ledger.flush_interval())
                if self.target.val is not None and (step % s.eval_every == 0 or step == s.steps):
                    value = self.evaluate(self.target.val)
                    record = record or {"step": step}
                    record["val"] = {"metric": metric, "value": value}
                    progress.log(step, f"val {metric} {value:.4f}")
                    progress.advance(step, f"val {metric} {value:.4f}")
                else:
                    progress.advance(step)
                if writes and record is not None:
                    assert out is not None
                    with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                if writes and (step % s.checkpoint_every == 0 or step == s.steps):
                    assert out is not None
                    wall = wall_before + time.perf_counter() - began
                    save_checkpoint(
                        out / "checkpoints", step, self.state_dict(step, wall), s.keep_checkpoints
                    )
        results = self._results(wall_before + time.perf_counter() - began)
        if writes:
            assert out is not None
            write_json(out / "results.json", results)
            from auxilia.report import render_report

            render_report(out)
        return results

    def _prepare_run_dir(self, out: Path, resume: bool) -> tuple[int, float]:
        """Check the run directory (every rank, so that all stop alike) and lay it out or load
        its last checkpoint; only the writing rank changes files."""
        writes = self.place.writes
        if out.exists() and not out.is_dir():
            raise ConfigError(f"run directory {out} exists and is not a directory")
        checkpoints = list_checkpoints(out / "checkpoints")
        if not resume:
            if checkpoints or (out / "results.json").exists():
                raise ConfigError(
                    f"run directory {out} already holds a run; pass --resume to continue it "
                    "or choose another --out"
                )
            if writes:
                out.mkdir(parents=True, exist_ok=True)
                write_text(out / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
                (out / "metrics.jsonl").write_text("", encoding="utf-8")
            return 0, 0.0
        if not checkpoints:
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        state = load_checkpoint(checkpoints[-1][1])
        if int(state["step"]) > self.settings.steps:
            raise ConfigError(
                f"train.steps: {self.settings.steps} is below the checkpoint's step "
                f"{int(state['step'])}; resume with at least that many steps"
            )
        step = self.load_state_dict(state)
        if writes:
            write_text(out / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
            (out / "results.json").unlink(missing_ok=True)
            self._truncate_metrics(out / "metrics.jsonl", step)
        return step, float(state["wall_seconds"])

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        """Keep the metric lines up to the resumed step (drop later and half-written lines)."""
        kept = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                    kept.append(line)
        write_text(path, "".join(line + "\n" for line in kept))

    def _results(self, wall: float) -> dict[str, Any]:
        split_name, split = "train", self.target.train
        if self.target.test is not None:
            split_name, split = "test", self.target.test
        elif self.target.val is not None:
            split_name, split = "val", self.target.val
        granularity = ["target"] + [s.granularity for s in self.sources]
        heads = [self.target.name] + [
            self.target.name if s.head == "target" else s.name for s in self.sources
        ]
        sources = [
            {
                "name": row["name"],
                "granularity": granularity[k],
                "head": heads[k],
                **{key: value for key, value in row.items() if key != "name"},
            }
            for k, row in enumerate(self.ledger.summary())
        ]
        return {
            "auxilia_version": __version__,
            "strategy": {"name": self.strategy.name, "params": dict(self.strategy.params)},
            "sampler": {"name": self.sampler.name, "params": dict(self.sampler.params)},
            "target": {
                "name": self.target.name,
                "metric": metric_name(self.target),
                "split": split_name,
                "value": self.evaluate(split),
            },
            "sources": sources,
            "engine": self.engine_summary(),
            "steps": self.settings.steps,
            "seed": self.settings.seed,
            "wall_seconds": wall,
        }

    def engine_summary(self) -> dict[str, Any]:
        """The engine mode and layout that ran, and why this layout (``results.json``)."""
        path, _ = self.engine.path()
        return {
            "mode": self.engine.mode.name,
            "layout": self.engine.layout,
            "copies_target_rows": self.copies_rows,
            "path": path,
            "why": "; ".join(
                r for r in (self.step_layout.reason, self.engine.fallback) if r is not None
            ),
        }
