"""The training loop: one run from a typed config to `result.json`, resumable bit for bit."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import optim
from scaling import distributed
from scaling.config import RunConfig, SweepConfig, lr_grid, to_dict, validate
from scaling.parametrization import build_model
from scaling.sharding import Layout, layout_of, place
from scaling.spectral import SpectralLog
from scaling.training import data, pretrained
from scaling.training.checkpoint import Checkpointer
from scaling.training.files import MetricsLog, write_json_atomic
from scaling.training.preemption import StopSignals
from scaling.training.rundir import run_name
from scaling.training.step import (
    Measure,
    clip_of,
    flops_per_token,
    init_train_state,
    make_eval,
    make_forward_stats,
    make_train_step,
    optimizer_at,
)
from scaling.training.tracking import Tracker
from scaling.training.zo_step import (
    curvature_estimate,
    init_zo_state,
    make_zo_step,
    step_record,
    zo_setup,
)

ZO_LOG = "zo_steps.jsonl"  # MeZO: (step, g, lr) of every step, for replay
SPECTRAL_LOG = "spectral.jsonl"  # {"step": s, "sigma": {"<param path>[/<layer>]": σ_max}}
# the clipping of the steps since the previous log: the state's sums -> the metric
CLIP_SUMS = {"clipped_sum": "clipped_fraction", "clip_scale_sum": "mean_clip_scale"}
# what the loop itself logs; every other metric is an indicator the step measured
LOOP_METRICS = {"step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_second",
                "curvature", *CLIP_SUMS.values()}


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

    def open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints")

    def start_logs(self, step: int) -> None:
        self.step = step
        log = lambda name: MetricsLog(self.run_dir / name, keep_through_step=step,
                                      writes=self.primary)
        self.metrics = log("metrics.jsonl")
        if self.cfg.optim.family == "zeroth_order":
            self.zo_log = log(ZO_LOG)
        if self.cfg.logging.spectral_every > 0:
            self.spectral_log = log(SPECTRAL_LOG)
        tracked = self.cfg if self.primary else dataclasses.replace(
            self.cfg, logging=dataclasses.replace(self.cfg.logging, wandb_mode="disabled"))
        self.tracker = Tracker(tracked, self.run_dir, self.name)

    def close(self) -> None:
        self.checkpointer.close()
        for log in ("metrics", "zo_log", "spectral_log"):
            if hasattr(self, log):
                getattr(self, log).close()


def model_on_mesh(cfg: RunConfig, vocab_size: int):
    """(model, graphdef, parameters as a pure dict, parametrization, layout) of cfg's model at
    its seed, laid out for cfg's mesh (layout None without one); parameters not placed yet."""
    model, parametrization = build_model(cfg.model, cfg.param, vocab_size, cfg.train.seed)
    layout = layout_of(cfg.mesh)
    if layout is not None:
        layout.check_batch(cfg.train.batch_size)
        model.activation_sharding = layout.activations  # static: part of the graphdef
    graphdef, params = nnx.split(model)
    return model, graphdef, params.to_pure_dict(), parametrization, layout


def _optimizer_setup(cfg: RunConfig, parametrization, layout: Layout | None = None):
    """What the train state and step of cfg's optimizer are built from: MeZO's probe setup, or
    the optimizer at any LR (on `layout`'s mesh, if any)."""
    t = cfg.train
    if cfg.optim.family == "zeroth_order":
        return zo_setup(cfg.optim, parametrization, total_steps=t.steps, seed=t.seed)
    return optimizer_at(cfg.optim, parametrization, total_steps=t.steps,
                        stack=None if layout is None else layout.stack)


def _init_state(cfg: RunConfig, setup, params, lr: float) -> dict:
    """The state the loop trains (and checkpoints): a measured step's, for backprop."""
    if cfg.optim.family == "zeroth_order":
        return init_zo_state(params, setup, lr)
    return init_train_state(params, setup, lr, measure=True)


def pretrained_params(cfg: RunConfig, vocab_size: int, like):
    """init.from_run's last parameters, restored through a train state of the source's own
    optimizer, which is what its checkpoints hold."""
    source = pretrained.source_config(cfg.init.from_run)
    pretrained.check_compatible(cfg, source)
    model, parametrization = build_model(source.model, source.param, vocab_size,
                                         source.train.seed)
    params = nnx.split(model)[1].to_pure_dict()
    template = _init_state(source, _optimizer_setup(source, parametrization), params, 0.0)
    return pretrained.restore_params(cfg.init.from_run, template, like)


def _train_together(members: list[_Member], splits) -> list[dict]:
    cfg, t, k = members[0].cfg, members[0].cfg.train, len(members)
    model, graphdef, params, parametrization, layout = model_on_mesh(cfg, splits.vocab_size)
    if cfg.init.from_run is not None:  # fine-tuning, before anything is written
        params = pretrained_params(cfg, splits.vocab_size, params)
    setup = _optimizer_setup(cfg, parametrization, layout)
    init_state = lambda lr: _init_state(cfg, setup, params, lr)
    template = init_state(0.0)
    # one run's state layout; runs trained together are stacked on a leading axis kept whole
    shardings = None if layout is None else layout.state(template, parametrization.specs)
    if cfg.optim.family == "zeroth_order":  # no gradient: the forward stats by another pass
        zo_step = make_zo_step(graphdef, setup, k, None if shardings is None else shardings["params"])
        forward_stats = make_forward_stats(graphdef, k)
        train_step = lambda state, inputs, targets: (zo_step(state, inputs, targets), {})
        measure_forward = forward_stats if cfg.logging.indicators else None
    else:
        measure = Measure(parametrization.labels(), clip_of(cfg.optim, parametrization),
                          cfg.logging.indicators)
        train_step = make_train_step(graphdef, setup, k, measure, shardings)
        measure_forward = None
    cost = {"params": int(sum(x.size for x in jax.tree.leaves(params))),
            "flops_per_token": flops_per_token(model, parametrization.specs, t.seq_len),
            "data": splits.description, "lrs_trained_together": k}
    val_batches = data.val_batches(splits.val, t.eval_batches, t.batch_size, t.seq_len)
    if layout is not None:
        cost["sharding"] = layout.describe(parametrization.specs)
        template = place(template, shardings)  # so a checkpoint restores onto this mesh
        val_batches = [place(batch, (layout.batch,) * 2) for batch in val_batches]
    evaluate = make_eval(graphdef, val_batches, k)
    for m in members:
        m.open()
    try:
        step, states, wall_before = _restore(members, template)
        if states is None:
            states = [init_state(m.cfg.optim.lr) for m in members]
        state = _stack(states) if k > 1 else states[0]
        if layout is not None:
            state = place(state, shardings if k == 1 else layout.lead(shardings))
        for m in members:
            m.start_logs(step)
        spectral = (SpectralLog(state["params"], parametrization.specs, k)
                    if cfg.logging.spectral_every > 0 else None)
        with StopSignals() as stop:
            _loop(members, state, step, splits, (train_step, measure_forward, spectral),
                  evaluate, cost, wall_before, layout, stop)
    except BaseException:
        for m in members:
            if hasattr(m, "tracker"):  # so a later run in this process does not inherit it
                m.tracker.abort()
        raise
    finally:
        for m in members:
            m.close()
    return [m.result for m in members]


def _stack(states: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _restore(members: list[_Member], template: dict) -> tuple[int, list | None, float]:
    """(step, per-run states, wall seconds) from checkpoints all runs share, else a fresh start."""
    steps = {m.checkpointer.latest_step() for m in members}
    if len(steps) != 1 or None in steps:
        return 0, None, 0.0
    restored = [m.checkpointer.restore_latest(template) for m in members]
    return restored[0][0], [r[1] for r in restored], max(r[2]["wall_seconds"] for r in restored)


def _loop(members: list[_Member], state, step: int, splits, programs, evaluate, cost: dict,
          wall_before: float, layout: Layout | None = None, stop: StopSignals | None = None
          ) -> None:
    """Steps until every run is done or diverged; logs, evaluates, checkpoints, writes results.

    `programs`: the train step, state -> (state, measured); the forward stats of a step that
    measures none itself (MeZO), or None; the spectral log, or None. On a stop signal (`stop`)
    the step just trained is checkpointed and the signal goes on (preemption.py).
    """
    train_step, measure_forward, spectral = programs
    cfg, t, k = members[0].cfg, members[0].cfg.train, len(members)
    lr_at = [optim.learning_rate(m.cfg.optim, t.steps) for m in members]
    tokens_per_step = t.batch_size * t.seq_len
    started = time.perf_counter()
    window = (started, step)  # wall time and step of the last record, for tokens/s
    label = members[0].name if k == 1 else f"{members[0].name} (+{k - 1} LRs)"
    bar = tqdm(total=t.steps, initial=step, desc=label,
               disable=not (cfg.logging.progress and members[0].primary), dynamic_ncols=True)
    wall = lambda: wall_before + time.perf_counter() - started
    member_state = (lambda i: state) if k == 1 else (lambda i: jax.tree.map(lambda x: x[i], state))
    zeroth_order = cfg.optim.family == "zeroth_order"
    curvature = zeroth_order and cfg.optim.curvature
    if step == 0 and cfg.init.from_run is not None:
        _log_start(members, evaluate(state["params"]))
    while step < t.steps and not all(m.diverged for m in members):
        inputs, targets = data.train_batch(splits.train, t.seed, step, t.batch_size, t.seq_len)
        if layout is not None:  # every process draws the whole batch and keeps its shards
            inputs, targets = place((inputs, targets), (layout.batch,) * 2)
        state, measured = train_step(state, inputs, targets)
        step += 1
        bar.update(1)
        if zeroth_order:
            gs, lrs_used = jax.device_get((state["opt_state"]["g"], state["opt_state"]["lr_used"]))
            for i, m in enumerate(members):
                if not m.diverged:
                    m.zo_log.write(step_record(step, *((gs, lrs_used) if k == 1 else
                                                      (gs[i], lrs_used[i]))))
        last = step == t.steps
        if step % t.log_every == 0 or step % t.eval_every == 0 or last:
            # the running sums live in the train state, so a resumed window averages the same steps
            train_losses = np.atleast_1d(state["loss_sum"] / state["loss_count"]).tolist()
            clipping = {name: np.atleast_1d(state[key] / state["loss_count"]).tolist()
                        for key, name in CLIP_SUMS.items() if key in state}
            for key in ("loss_sum", "loss_count", *CLIP_SUMS):
                if key in state:
                    state[key] = jnp.zeros_like(state[key])
            if measure_forward is not None:
                measured = measure_forward(state["params"], inputs)
            measured = jax.device_get(measured)
            now = time.perf_counter()
            tokens_per_second = (step - window[1]) * tokens_per_step / (now - window[0])
            window = (now, step)
            evaluating = step % t.eval_every == 0 or last
            val_losses = evaluate(state["params"]) if evaluating else [None] * k
            if curvature:  # from the two counters, not a per-member slice of the whole state
                traces = np.atleast_1d(curvature_estimate(
                    {key: state["opt_state"][key] for key in ("count", "curvature_sum")},
                    cfg.optim.curvature_decay)).tolist()
            for i, m in enumerate(members):
                if m.diverged:
                    continue
                record = {"step": step, "tokens": step * tokens_per_step,
                          "lr": float(lr_at[i](step - 1)), "train_loss": train_losses[i],
                          "tokens_per_second": tokens_per_second}
                if zeroth_order:  # the LR applied, after any safe-LR cap
                    record["lr"] = m.zo_log.records[-1]["lr"]
                if curvature:  # the Hessian-trace estimate's moving average
                    record["curvature"] = traces[i]
                record |= {name: values[i] for name, values in clipping.items()}
                record |= _flatten(measured, None if k == 1 else i)
                m.diverged = not math.isfinite(record["train_loss"])
                if not m.diverged and evaluating:
                    record["val_loss"] = val_losses[i]
                    m.diverged = not math.isfinite(record["val_loss"])
                m.step = step
                m.metrics.write(record)
                m.tracker.log({key: v for key, v in record.items() if key != "step"}, step)
            best = min(train_losses, key=lambda x: x if math.isfinite(x) else math.inf)
            bar.set_postfix(loss=f"{best:.3f}", tok_s=f"{tokens_per_second:.0f}")
        if spectral is not None and (step % cfg.logging.spectral_every == 0 or last):
            for m, sigma in zip(members, spectral(state["params"]), strict=True):
                if not m.diverged:
                    m.spectral_log.write({"step": step, "sigma": sigma})
                    m.tracker.log({f"spectral/{name}": v for name, v in sigma.items()}, step)
        stopping = stop is not None and not last and stop.requested(step)
        checkpointing = step % t.checkpoint_every == 0 or last or stopping
        for i, m in enumerate(members):
            if m.result is None and (checkpointing or m.diverged):
                m.checkpointer.save(step, member_state(i), {"wall_seconds": wall()})
            if m.result is None and (m.diverged or last):
                m.result = _write_result(m, cost, wall())
        if stopping:  # preempted: what the requeued job resumes from is on disk first
            for m in members:
                if m.result is None:
                    m.checkpointer.wait()
            bar.close()
            stop.forward()
    bar.close()
    for m in members:  # resumed after the last checkpoint but before its result was written
        if m.result is None:
            m.result = _write_result(m, cost, wall())


def _flatten(measured: dict, run: int | None) -> dict[str, float]:
    """One run's values (`run` of those trained together, or None for one); per-layer values
    (shape (depth,)) become one metric per layer: 'attn_z/0', 'attn_z/1'."""
    out = {}
    for name, value in measured.items():
        value = np.asarray(value) if run is None else np.asarray(value)[run]
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


def _summaries(m: _Member) -> dict:
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
    names = [key for key in records[-1] if key not in LOOP_METRICS] if records else []
    if names:
        out["indicators"] = {
            "last": {key: finite(records[-1][key]) for key in names},
            "max": {key: finite(float(np.max([r[key] for r in records if key in r])))
                    for key in names}}
    if getattr(m, "spectral_log", None) is not None and m.spectral_log.records:
        out["spectral"] = m.spectral_log.records[-1]["sigma"]
    return out


def _write_result(m: _Member, cost: dict, wall_seconds: float) -> dict:
    t = m.cfg.train
    result = {
        # a diverged run has no meaningful loss, whatever was measured before it blew up
        "train_loss": None if m.diverged else m.metrics.last("train_loss"),
        "val_loss": None if m.diverged else m.metrics.last("val_loss"),
        "diverged": m.diverged, "steps": m.step, "tokens": m.step * t.batch_size * t.seq_len,
        **cost, "wall_seconds": wall_seconds, "run_dir": str(m.run_dir), "name": m.name,
    }
    if m.cfg.init.from_run is not None:  # where fine-tuning started from, on this data
        result["start_val_loss"] = _start_val_loss(m)
    result |= _summaries(m)
    summary = {key: v for key, v in result.items() if isinstance(v, (int, float, bool))}
    summary |= {f"clipping/{key}": v for key, v in result.get("clipping", {}).items()
                if v is not None}
    m.tracker.finish(summary)
    result |= {"config": to_dict(m.cfg)}  # what a re-run of the finished run returns, too
    m.checkpointer.close()  # the result must not name a checkpoint still being written
    if m.primary:
        write_json_atomic(m.run_dir / "result.json", result)
    return result
