"""The training loop: one run from a typed config to `result.json`, resumable bit for bit."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optim
from models import label_tree
from scaling import data
from scaling.checkpoint import Checkpointer
from scaling.config import RunConfig, to_dict, validate
from scaling.files import MetricsLog, write_json_atomic
from scaling.parametrization import build_model
from scaling.rundir import run_name
from scaling.tracking import Tracker


def next_token_loss(graphdef, params, inputs_BxT, targets_BxT) -> jax.Array:
    logits_BxTxV = nnx.merge(graphdef, params)(inputs_BxT).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def make_train_step(graphdef, tx: optax.GradientTransformation):
    """state -> state; the state carries a running loss sum so logged means survive resumes."""

    def train_step(state, inputs_BxT, targets_BxT):
        loss, grads = jax.value_and_grad(
            lambda p: next_token_loss(graphdef, p, inputs_BxT, targets_BxT))(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "loss_sum": state["loss_sum"] + loss, "loss_count": state["loss_count"] + 1}

    return jax.jit(train_step, donate_argnums=0)


def init_train_state(params, tx: optax.GradientTransformation) -> dict:
    return {"params": params, "opt_state": tx.init(params),
            "loss_sum": jnp.zeros((), jnp.float32), "loss_count": jnp.zeros((), jnp.int32)}


def make_eval(graphdef, batches):
    loss_fn = jax.jit(lambda p, x, y: next_token_loss(graphdef, p, x, y))
    return lambda params: float(np.mean([loss_fn(params, x, y) for x, y in batches]))


def flops_per_token(model: nnx.Module, specs, seq_len: int) -> float:
    """6 FLOPs per non-embedding parameter plus the model's attention term (Kaplan et al.)."""
    n = sum(math.prod(s.shape) for s in specs.values() if s.role != "input")
    return 6.0 * n + model.attention_flops_per_token(seq_len)


def _finished(run_dir: Path) -> dict | None:
    result = run_dir / "result.json"
    return json.loads(result.read_text()) if result.exists() else None


def train(cfg: RunConfig) -> dict:
    """Trains (or resumes, or reports) the run whose directory the config determines."""
    validate(cfg)
    t = cfg.train
    splits = data.load(cfg.data, t.seq_len)  # a bad source fails before anything is written
    name = run_name(cfg)
    run_dir = Path(t.out_dir) / name
    if (done := _finished(run_dir)) is not None:
        return done

    model, parametrization = build_model(cfg.model, cfg.param, splits.vocab_size, t.seed)
    tx = optim.build_optimizer(cfg.optim, parametrization, label_tree(model), total_steps=t.steps)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    state = init_train_state(params, tx)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    cost = flops_per_token(model, parametrization.specs, t.seq_len)
    train_step = make_train_step(graphdef, tx)
    evaluate = make_eval(graphdef, data.val_batches(splits.val, t.eval_batches, t.batch_size,
                                                    t.seq_len))

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    step, wall_before = 0, 0.0
    if (restored := checkpointer.restore_latest(state)) is not None:
        step, state, meta = restored
        wall_before = meta["wall_seconds"]
    metrics = MetricsLog(run_dir / "metrics.jsonl", keep_through_step=step)
    tracker = Tracker(cfg, run_dir, name)
    started = time.perf_counter()
    try:
        step, diverged = _loop(cfg, state, step, splits, train_step, evaluate, checkpointer,
                               metrics, tracker, wall_before)
    except BaseException:
        tracker.abort()  # so a later run in this process does not inherit the open W&B run
        raise
    finally:
        checkpointer.close()
        metrics.close()
    tokens = step * t.batch_size * t.seq_len
    result = {
        # a diverged run has no meaningful loss, whatever was measured before it blew up
        "train_loss": None if diverged else metrics.last("train_loss"),
        "val_loss": None if diverged else metrics.last("val_loss"),
        "diverged": diverged, "steps": step, "tokens": tokens,
        "params": int(n_params), "flops_per_token": cost,
        "wall_seconds": wall_before + time.perf_counter() - started,
        "run_dir": str(run_dir), "name": name, "data": splits.description,
    }
    tracker.finish({k: v for k, v in result.items() if isinstance(v, (int, float, bool))})
    result |= {"config": to_dict(cfg)}  # what a re-run of the finished run returns, too
    write_json_atomic(run_dir / "result.json", result)
    return result


def _loop(cfg: RunConfig, state, step: int, splits, train_step, evaluate, checkpointer,
          metrics: MetricsLog, tracker: Tracker, wall_before: float) -> tuple[int, bool]:
    """Steps until done or diverged; logs, evaluates and checkpoints. Returns (step, diverged)."""
    t = cfg.train
    lr_at = optim.learning_rate(cfg.optim, t.steps)
    tokens_per_step = t.batch_size * t.seq_len
    diverged = any(not math.isfinite(r.get("train_loss", 0.0)) for r in metrics.records)
    started = time.perf_counter()
    window = (started, step)  # wall time and step of the last record, for tokens/s
    bar = tqdm(total=t.steps, initial=step, desc=run_name(cfg),
               disable=not cfg.logging.progress, dynamic_ncols=True)
    while step < t.steps and not diverged:
        inputs, targets = data.train_batch(splits.train, t.seed, step, t.batch_size, t.seq_len)
        state = train_step(state, inputs, targets)
        step += 1
        bar.update(1)
        last = step == t.steps
        if step % t.log_every == 0 or step % t.eval_every == 0 or last:
            record = {"step": step, "tokens": step * tokens_per_step, "lr": float(lr_at(step - 1))}
            # the running sum lives in the train state, so a resumed window averages the same steps
            record["train_loss"] = float(state["loss_sum"] / state["loss_count"])
            state["loss_sum"] = jnp.zeros_like(state["loss_sum"])
            state["loss_count"] = jnp.zeros_like(state["loss_count"])
            now = time.perf_counter()
            record["tokens_per_second"] = (step - window[1]) * tokens_per_step / (now - window[0])
            window = (now, step)
            diverged = not math.isfinite(record["train_loss"])
            if not diverged and (step % t.eval_every == 0 or last):
                record["val_loss"] = evaluate(state["params"])
                diverged = not math.isfinite(record["val_loss"])
            metrics.write(record)
            tracker.log({k: v for k, v in record.items() if k != "step"}, step)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                            tok_s=f"{record['tokens_per_second']:.0f}")
        if step % t.checkpoint_every == 0 or last or diverged:
            wall = wall_before + time.perf_counter() - started
            checkpointer.save(step, state, {"wall_seconds": wall})
    bar.close()
    return step, diverged
