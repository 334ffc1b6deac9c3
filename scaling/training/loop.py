"""The training loop: one run from a typed config to `result.json`, resumable bit for bit.

Runs that differ only in LR train together as a stack on a leading axis in one compiled step;
one run is a stack of one. The loop knows no optimizer: its step kind (scaling.steps) makes the
state, takes the step and says what to log.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import optim
from scaling import distributed
from scaling.config import RunConfig, SweepConfig, lr_grid, to_dict, validate
from scaling.files import write_json_atomic
from scaling.parametrization import (
    Parametrization,
    abstract_model,
    build_model,
    init_params,
    make_parametrization,
)
from scaling.sharding import Layout, layout_of, place
from scaling.spectral import SpectralLog
from scaling.steps import Step, TrainState, make_step
from scaling.steps.loss import make_eval
from scaling.training import data, preflight, pretrained
from scaling.training.checkpoint import Checkpointer
from scaling.training.metrics_log import MetricsLog
from scaling.training.preemption import StopSignals
from scaling.training.rundir import run_name
from scaling.training.tracking import Tracker

SPECTRAL_LOG = "spectral.jsonl"  # {"step": s, "sigma": {"<param path>[/<layer>]": σ_max}}
# what the loop itself logs; every other metric but a step kind's own is an indicator
LOOP_METRICS = ("step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_second",
                "clipped_fraction", "mean_clip_scale")


def _finished(run_dir: Path) -> dict | None:
    result = run_dir / "result.json"
    return json.loads(result.read_text()) if result.exists() else None


def finished_result(cfg: RunConfig) -> dict | None:
    """The `result.json` of the run `cfg` describes, if that run has finished; else None."""
    return _finished(Path(cfg.train.out_dir) / run_name(cfg))


def member_config(cfg: RunConfig, lr: float) -> RunConfig:
    """The config of one LR of a grid: what a separate run at that LR would be given."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr),
                               sweep=SweepConfig())


def train(cfg: RunConfig) -> dict:
    """Trains (or resumes, or reports) the run whose directory the config determines."""
    return train_lrs(cfg, [cfg.optim.lr])[0]


def sweep_lrs(cfg: RunConfig) -> list[float]:
    """The learning rates `cfg` trains: its sweep's grid, or just optim.lr."""
    return lr_grid(cfg.sweep) or [cfg.optim.lr]


def train_sweep(cfg: RunConfig) -> list[dict]:
    """Every LR of `cfg.sweep`'s grid (or just optim.lr), `sweep.vectorize_lr` at a time."""
    lrs = sweep_lrs(cfg)
    k = cfg.sweep.vectorize_lr
    return [r for i in range(0, len(lrs), k) for r in train_lrs(cfg, lrs[i:i + k])]


def train_lrs(cfg: RunConfig, lrs: list[float]) -> list[dict]:
    """Runs that differ only in LR, trained together in one program; one result per LR.

    Each LR writes its own run directory, checkpoints and `result.json`, exactly as a separate
    run at that LR would, so a grid resumes, skips finished LRs and analyses like separate runs.
    """
    validate(cfg)
    distributed.initialize(cfg.mesh)  # before the first JAX operation, when several hosts run
    splits = data.load(cfg.data, cfg.train.seq_len)  # a bad source fails before anything is written
    members = [_Member(member_config(cfg, lr), Path(cfg.train.out_dir)) for lr in lrs]
    results = {i: done for i, m in enumerate(members) if (done := _finished(m.run_dir))}
    pending = [i for i in range(len(members)) if i not in results]
    if pending:
        trained = _train_together([members[i] for i in pending], splits)
        results |= dict(zip(pending, trained, strict=True))
    return [results[i] for i in range(len(members))]


class _Member:
    """One LR of a group: its run directory, logs, checkpoints and W&B run. With several hosts
    every process trains and checkpoints it; only process 0 writes logs, results and W&B."""

    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.cfg, self.name = cfg, run_name(cfg)
        self.run_dir = out_dir / self.name
        self.step, self.diverged, self.result = 0, False, None
        self.primary = distributed.is_primary()
        self.checkpointer: Checkpointer | None = None
        self.tracker: Tracker | None = None
        self.logs: dict[str, MetricsLog] = {}  # file name -> its log: metrics and the rest

    def open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints")

    def start_logs(self, step: int, names: list[str]) -> None:
        """The logs `names` (metrics.jsonl first), kept through `step`, and the W&B run."""
        self.step = step
        self.logs = {name: MetricsLog(self.run_dir / name, keep_through_step=step,
                                      writes=self.primary) for name in names}
        tracked = self.cfg if self.primary else dataclasses.replace(
            self.cfg, logging=dataclasses.replace(self.cfg.logging, wandb_mode="disabled"))
        self.tracker = Tracker(tracked, self.run_dir, self.name)

    @property
    def metrics(self) -> MetricsLog:
        return self.logs["metrics.jsonl"]

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        for log in self.logs.values():
            log.close()


@dataclasses.dataclass(frozen=True)
class RunModel:
    """A run's model before training: the graph, the parameters of its seed (laid out for its
    mesh), the parametrization, and the layout (None without a mesh)."""

    model: nnx.Module  # abstract: shapes only
    graphdef: nnx.GraphDef
    params: dict
    parametrization: Parametrization
    layout: Layout | None


def model_on_mesh(cfg: RunConfig, vocab_size: int) -> RunModel:
    """cfg's model at its seed. The parameters are initialized inside one compiled program that
    creates each where the mesh keeps it, so no host ever holds the whole model."""
    layout = layout_of(cfg.mesh)
    if layout is not None:
        layout.check_batch(cfg.train.batch_size, cfg.train.grad_accum)
    parametrization = make_parametrization(cfg.model, cfg.param, vocab_size)
    model = abstract_model(cfg.model, parametrization, vocab_size,
                           None if layout is None else layout.activations)
    graphdef, abstract = nnx.split(model)
    shardings = None if layout is None else layout.state(abstract.to_pure_dict(),
                                                          parametrization.specs)
    params = init_params(cfg.model, parametrization, vocab_size, cfg.train.seed,
                         shardings=shardings)
    return RunModel(model, graphdef, params, parametrization, layout)


def _step_of(cfg: RunConfig, parametrization: Parametrization, graphdef, *,
             runs: int | None = None, shardings=None, layout: Layout | None = None) -> Step:
    t = cfg.train
    return make_step(cfg.optim, parametrization, graphdef, total_steps=t.steps, runs=runs,
                     indicators=cfg.logging.indicators, shardings=shardings,
                     stack=None if layout is None else layout.stack, seed=t.seed,
                     grad_accum=t.grad_accum)


def pretrained_params(cfg: RunConfig, vocab_size: int, like):
    """init.from_run's last parameters, restored through a train state of the source's own
    optimizer, which is what its checkpoints hold."""
    source = pretrained.source_config(cfg.init.from_run)
    pretrained.check_compatible(cfg, source)
    model, parametrization = build_model(source.model, source.param, vocab_size,
                                         source.train.seed)
    graphdef, params = nnx.split(model)
    template = _step_of(source, parametrization, graphdef).init_state(params.to_pure_dict(), 0.0)
    return pretrained.restore_params(cfg.init.from_run, template.as_dict(), like)


def _train_together(members: list[_Member], splits) -> list[dict]:
    cfg, t, k = members[0].cfg, members[0].cfg.train, len(members)
    run = model_on_mesh(cfg, splits.vocab_size)
    params, layout = run.params, run.layout
    if cfg.init.from_run is not None:  # fine-tuning, before anything is written
        params = pretrained_params(cfg, splits.vocab_size, params)
    template = _step_of(cfg, run.parametrization, run.graphdef).init_state(params, 0.0)
    # one run's state layout; runs trained together are stacked on a leading axis kept whole
    shardings = None if layout is None else layout.state(template, run.parametrization.specs)
    step = _step_of(cfg, run.parametrization, run.graphdef, runs=k, shardings=shardings,
                    layout=layout)
    memory = step.compile(*_abstract_arguments(template, k, t, layout, shardings))
    preflight.check_fits(memory, jax.local_devices()[0], t)  # before anything is written
    cost = {"params": int(sum(x.size for x in jax.tree.leaves(params))),
            "flops_per_token": run.model.flops_per_token(t.seq_len),
            "data": splits.description, "lrs_trained_together": k,
            "val_tokens_per_byte": splits.val_tokens_per_byte}
    # the same windows in micro-batches: evaluation fits wherever a training step does
    val_batches = data.val_batches(splits.val, t.eval_batches * t.grad_accum,
                                   t.batch_size // t.grad_accum, t.seq_len)
    if layout is not None:
        cost["sharding"] = layout.describe(run.parametrization.specs)
        template = place(template, shardings)  # so a checkpoint restores onto this mesh
        val_batches = [place(batch, (layout.batch,) * 2) for batch in val_batches]
    for m in members:
        m.open()
    try:
        at, states, wall_before = _restore(members, template)
        if states is None:
            states = [step.init_state(params, m.cfg.optim.lr) for m in members]
        state = TrainState.stack(states)
        # fresh or restored, the same placement: the step compiles once
        state = (jax.device_put(state, _single_device()) if layout is None
                 else place(state, layout.lead(shardings)))
        if members[0].primary:
            _say(splits.summary)
            _say(_start_line(members, at, layout))
        for m in members:
            m.start_logs(at, ["metrics.jsonl", *([step.log_name] if step.log_name else []),
                              *([SPECTRAL_LOG] if cfg.logging.spectral_every > 0 else [])])
        loop = _Loop(members, step, splits, make_eval(run.graphdef, val_batches, k), cost,
                     layout, SpectralLog(state.params, run.parametrization.specs, k)
                     if cfg.logging.spectral_every > 0 else None)
        with StopSignals() as stop:
            loop.run(state, at, wall_before, stop)
    except BaseException:
        for m in members:
            if m.tracker is not None:  # so a later run in this process does not inherit it
                m.tracker.abort()
        raise
    finally:
        for m in members:
            m.close()
    return [m.result for m in members]


def _abstract_arguments(template: TrainState, runs: int, t, layout: Layout | None, shardings
                        ) -> tuple:
    """The step's arguments as shapes and placements: `runs` states stacked like `template`,
    and a batch's inputs and targets, laid out as the loop will pass them."""
    stacked = jax.eval_shape(lambda: TrainState.stack([template] * runs))
    if layout is None:
        state_at, batch_at = jax.tree.map(lambda _: _single_device(), stacked), _single_device()
    else:
        state_at, batch_at = layout.lead(shardings), layout.batch
    state = jax.tree.map(lambda a, at: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=at,
                                                            weak_type=a.weak_type),
                         stacked, state_at)
    batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.int32, sharding=batch_at)
    return state, batch, batch


def _single_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore(members: list[_Member], template: TrainState
             ) -> tuple[int, list[TrainState] | None, float]:
    """(step, per-run states, wall seconds) from checkpoints all runs share, else a fresh start."""
    steps = {m.checkpointer.latest_step() for m in members}
    if len(steps) != 1 or None in steps:
        return 0, None, 0.0
    restored = [m.checkpointer.restore_latest(template.as_dict()) for m in members]
    return (restored[0][0], [TrainState.from_dict(r[1]) for r in restored],
            max(r[2]["wall_seconds"] for r in restored))


class _Loop:
    """Steps until every run is done or diverged; logs a window of steps, evaluates,
    checkpoints, writes results. On a stop signal the step just trained is checkpointed and
    the signal goes on (preemption.py)."""

    def __init__(self, members: list[_Member], step: Step, splits, evaluate, cost: dict,
                 layout: Layout | None, spectral: SpectralLog | None):
        self.members, self.step, self.splits = members, step, splits
        self.evaluate, self.cost, self.layout, self.spectral = evaluate, cost, layout, spectral
        self.cfg = members[0].cfg
        self.t = self.cfg.train
        self.lr_at = [optim.learning_rate(m.cfg.optim, self.t.steps) for m in members]

    def run(self, state: TrainState, step: int, wall_before: float, stop: StopSignals) -> None:
        t, members = self.t, self.members
        started = time.perf_counter()
        self.window_start = (started, step)  # wall time and step of the last record, for tokens/s
        self.wall = lambda: wall_before + time.perf_counter() - started
        self.bar = tqdm(total=t.steps, initial=step, desc=_label(members), dynamic_ncols=True,
                        disable=not (self.cfg.logging.progress and members[0].primary))
        if step == 0 and self.cfg.init.from_run is not None:
            _log_start(members, self.evaluate(state.params))
        while step < t.steps and not all(m.diverged for m in members):
            if self.layout is None:
                inputs, targets = data.train_batch(self.splits.train, t.seed, step,
                                                   t.batch_size, t.seq_len)
            else:  # each process reads only the rows its devices hold
                inputs, targets = data.global_batch(self.splits.train, t.seed, step,
                                                    t.batch_size, t.seq_len, self.layout.batch)
            state, measured = self.step(state, inputs, targets)
            step += 1
            self.bar.update(1)
            self._write_step_records(state, step)
            last = step == t.steps
            if step % t.log_every == 0 or step % t.eval_every == 0 or last:
                state = self._log_window(state, step, inputs, measured)
            if self.spectral is not None and (step % self.cfg.logging.spectral_every == 0
                                              or last):
                self._log_spectra(state, step)
            stopping = not last and stop.requested(step)
            self._checkpoint_or_finish(state, step, checkpointing=(
                step % t.checkpoint_every == 0 or last or stopping))
            if stopping:  # preempted: what the requeued job resumes from is on disk first
                for m in members:
                    if m.result is None:
                        m.checkpointer.wait()
                self.bar.close()
                if members[0].primary:
                    _say(_stop_line(members, step, stop))
                stop.forward()
        self.bar.close()
        for m in members:  # resumed after the last checkpoint but before its result was written
            if m.result is None:
                m.result = _write_result(m, self.cost, self.wall(), self.step.metric_names)

    def _write_step_records(self, state: TrainState, step: int) -> None:
        records = self.step.step_records(state, step)
        if records is not None:
            for m, record in zip(self.members, records, strict=True):
                if not m.diverged:
                    m.logs[self.step.log_name].write(record)

    def _log_window(self, state: TrainState, step: int, inputs, measured: dict) -> TrainState:
        """One record per run of the steps since the last one (their mean train loss and
        clipping), the step's measurements, and at eval steps the validation loss."""
        t = self.t
        window = jax.device_get(state.window())
        values = jax.device_get(self.step.log_values(state, inputs, measured))
        now = time.perf_counter()
        tokens_per_second = ((step - self.window_start[1]) * t.batch_size * t.seq_len
                             / (now - self.window_start[0]))
        self.window_start = (now, step)
        evaluating = step % t.eval_every == 0 or step == t.steps
        val_losses = self.evaluate(state.params) if evaluating else None
        for i, m in enumerate(self.members):
            if m.diverged:
                continue
            record = {"step": step, "tokens": step * t.batch_size * t.seq_len,
                      "lr": float(self.lr_at[i](step - 1)), "tokens_per_second": tokens_per_second,
                      **{name: float(v[i]) for name, v in window.items()}, **_flatten(values, i)}
            m.diverged = not math.isfinite(record["train_loss"])
            if not m.diverged and evaluating:
                record["val_loss"] = val_losses[i]
                m.diverged = not math.isfinite(record["val_loss"])
            m.step = step
            m.metrics.write(record)
            m.tracker.log({key: v for key, v in record.items() if key != "step"}, step)
        losses = [float(x) for x in window["train_loss"]]
        best = min(losses, key=lambda x: x if math.isfinite(x) else math.inf)
        self.bar.set_postfix(loss=f"{best:.3f}", tok_s=f"{tokens_per_second:.0f}")
        return state.next_window()

    def _log_spectra(self, state: TrainState, step: int) -> None:
        for m, sigma in zip(self.members, self.spectral(state.params), strict=True):
            if not m.diverged:
                m.logs[SPECTRAL_LOG].write({"step": step, "sigma": sigma})
                m.tracker.log({f"spectral/{name}": v for name, v in sigma.items()}, step)

    def _checkpoint_or_finish(self, state: TrainState, step: int, checkpointing: bool) -> None:
        """A checkpoint of each unfinished run at checkpoint steps (and when it diverges), and
        its result when it is done."""
        for i, m in enumerate(self.members):
            if m.result is None and (checkpointing or m.diverged):
                m.checkpointer.save(step, state.run(i).as_dict(), {"wall_seconds": self.wall()})
            if m.result is None and (m.diverged or step == self.t.steps):
                m.result = _write_result(m, self.cost, self.wall(), self.step.metric_names)


def _say(line: str) -> None:
    """A line about the run itself on stderr, beside the progress bar (stdout keeps results)."""
    tqdm.write(line, file=sys.stderr)


def _label(members: list[_Member]) -> str:
    return members[0].name + (f" (+{len(members) - 1} LRs)" if len(members) > 1 else "")


def _start_line(members: list[_Member], at: int, layout: Layout | None) -> str:
    """Where the run starts (or resumes) and what it runs on."""
    t = members[0].cfg.train
    if at:
        start = (f"resuming from the checkpoint of step {at} in {members[0].run_dir}/checkpoints, "
                 f"{t.steps - at} of {t.steps} steps to go")
    else:
        start = f"starting, {t.steps} steps"
    accum = f" in {t.grad_accum} micro-batches" if t.grad_accum > 1 else ""
    if layout is None:
        where = f"1 device ({jax.local_devices()[0].platform})"
    else:
        shape, processes = dict(layout.mesh.shape), jax.process_count()
        axes = " ".join(f"{axis}={size}" for axis, size in shape.items() if size > 1) or "1"
        where = (f"mesh {axes} ({math.prod(shape.values())} {layout.mesh.devices.flat[0].platform}"
                 f" devices, {processes} process{'es' if processes > 1 else ''})")
    return (f"{_label(members)}: {start}, batches of {t.batch_size}×{t.seq_len} tokens{accum}, "
            f"on {where}")


def _stop_line(members: list[_Member], step: int, stop: StopSignals) -> str:
    """What a stop signal left on disk, and how to go on."""
    received = stop.received
    why = signal.Signals(received[0]).name if received else "a preemption notice"
    return (f"{_label(members)}: stopped by {why} after step {step}, checkpointed to "
            f"{members[0].run_dir}/checkpoints; the same command resumes from step {step}")


def _flatten(measured: dict, run: int) -> dict[str, float]:
    """One run's values of runs stacked on a leading axis; per-layer values (shape (depth,))
    become one metric per layer: 'attn_z/0', 'attn_z/1'."""
    out = {}
    for name, value in measured.items():
        value = np.asarray(value)[run]
        if value.ndim == 0:
            out[name] = float(value)
        else:
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
    return out


def _log_start(members: list[_Member], val_losses: list[float]) -> None:
    """Step 0 of a fine-tune: the pretrained weights' validation loss on the new data."""
    for m, val_loss in zip(members, val_losses, strict=True):
        if not m.metrics.records:  # an earlier start that saved no checkpoint logged it already
            m.metrics.write({"step": 0, "tokens": 0, "val_loss": val_loss})
            m.tracker.log({"val_loss": val_loss}, 0)


def _start_val_loss(m: _Member) -> float | None:
    return next((r["val_loss"] for r in m.metrics.records if r["step"] == 0), None)


def _summaries(m: _Member, metric_names: tuple[str, ...]) -> dict:
    """Over the run's logged steps: the fraction of steps clipped and the mean clip factor
    (each log's window weighted by its steps), every indicator's last and largest value, and
    the last σ_max of every matrix. Non-finite values are null, as the losses of a diverged run."""
    finite = lambda x: x if math.isfinite(x) else None
    records, out = m.metrics.records, {}
    windows = [(r, r["step"] - before["step"])
               for before, r in zip([{"step": 0}, *records], records, strict=False)]
    clipped = [(r, steps) for r, steps in windows if "clipped_fraction" in r]
    if clipped:
        mean = lambda name: finite(sum(r[name] * steps for r, steps in clipped)
                                   / sum(steps for _, steps in clipped))
        out["clipping"] = {"fraction": mean("clipped_fraction"),
                           "mean_scale": mean("mean_clip_scale")}
    not_indicators = {*LOOP_METRICS, *metric_names}
    names = [key for key in records[-1] if key not in not_indicators] if records else []
    if names:
        out["indicators"] = {
            "last": {key: finite(records[-1][key]) for key in names},
            "max": {key: finite(float(np.max([r[key] for r in records if key in r])))
                    for key in names}}
    spectral = m.logs.get(SPECTRAL_LOG)
    if spectral is not None and spectral.records:
        out["spectral"] = spectral.records[-1]["sigma"]
    return out


def _write_result(m: _Member, cost: dict, wall_seconds: float,
                  metric_names: tuple[str, ...]) -> dict:
    t = m.cfg.train
    result = {
        # a diverged run has no meaningful loss, whatever was measured before it blew up
        "train_loss": None if m.diverged else m.metrics.last("train_loss"),
        "val_loss": None if m.diverged else m.metrics.last("val_loss"),
        "diverged": m.diverged, "steps": m.step, "tokens": m.step * t.batch_size * t.seq_len,
        **cost, "wall_seconds": wall_seconds, "run_dir": str(m.run_dir), "name": m.name,
    }
    per_byte = cost["val_tokens_per_byte"]
    # nats per byte of validation text: byte and token runs compare (None for a .bin)
    result["val_loss_per_byte"] = (None if per_byte is None or result["val_loss"] is None
                                   else result["val_loss"] * per_byte)
    if m.cfg.init.from_run is not None:  # where fine-tuning started from, on this data
        result["start_val_loss"] = _start_val_loss(m)
    result |= _summaries(m, metric_names)
    summary = {key: v for key, v in result.items() if isinstance(v, (int, float, bool))}
    summary |= {f"clipping/{key}": v for key, v in result.get("clipping", {}).items()
                if v is not None}
    m.tracker.finish(summary)
    result |= {"config": to_dict(m.cfg)}  # what a re-run of the finished run returns, too
    m.checkpointer.close()  # the result must not name a checkpoint still being written
    if m.primary:
        write_json_atomic(m.run_dir / "result.json", result)
    return result
