"""`scaling-sample` and scaling/training/sampling.py on one tiny trained run: the restored model
predicts text it was trained on far better than chance, temperature 0 takes the argmax at every
step (the window sliding once the text outgrows the trained context), a seed repeats its draws,
and bad input is one line with exit code 2."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_RUN
from flax import nnx
from synthetic import assert_one_line_cli_error

import experiments.sample
from experiments.compose import compose, to_run_config
from scaling.config import ConfigError
from scaling.training import data
from scaling.training.loop import train
from scaling.training.sampling import BYTES, Sampling, TrainedModel, continuation, load, sample

CHANCE_NLL = math.log(256)  # nats per byte of a model that knows nothing


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, TrainedModel]:
    """(result.json, the model sampling loads) of a finished TINY_RUN on the standard library."""
    out_dir = tmp_path_factory.mktemp("sample")
    result = train(to_run_config(compose([*TINY_RUN, f"train.out_dir={out_dir}"])))
    return result, load(Path(result["run_dir"]))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, params: nnx.State, tokens_1xT: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(tokens_1xT)[0]


def _logits(model: TrainedModel, tokens_T) -> np.ndarray:
    """The model's logits at every position of one text of the trained context's length (one
    shape: one compile for every test)."""
    assert len(tokens_T) == model.context
    return np.asarray(_forward(model.graphdef, model.params, np.asarray([tokens_T], np.int32)))


def test_the_restored_model_predicts_seen_text_better_than_chance(run):
    """The loaded checkpoint is the run's last: its held-out loss is the one the run recorded,
    and on training text its mean loss is below chance, ln 256 = 5.5 nats, by more than a nat:
    each true next byte e times likelier than chance, in geometric mean (measured: 3.4 nats on
    these windows, 3.0 the run's last training loss)."""
    result, model = run
    cfg, T = model.config, model.context
    assert model.step == result["steps"] == cfg.train.steps
    splits = data.load(cfg.data, T)
    val = data.val_batches(splits.val, cfg.train.eval_batches, cfg.train.batch_size, T)
    val_nll = np.mean([_nll(model, x_T, y_T) for x, y in val for x_T, y_T in zip(x, y)])
    assert val_nll == pytest.approx(result["val_loss"], rel=1e-4)

    starts = np.linspace(0, len(splits.train) - T - 1, 16).astype(np.int64)
    windows = splits.train[starts[:, None] + np.arange(T + 1)]
    train_nll = np.mean([_nll(model, w[:-1], w[1:]) for w in windows])
    assert train_nll < CHANCE_NLL - 1.0, (train_nll, result["train_loss"])


def _nll(model: TrainedModel, tokens_T, targets_T) -> float:
    """Mean negative log-likelihood (nats) of the targets, each after the text up to it."""
    log_p_TxV = jax.nn.log_softmax(_logits(model, tokens_T))
    return -float(np.mean(np.take_along_axis(log_p_TxV, np.asarray(targets_T)[:, None], -1)))


def test_temperature_zero_takes_the_argmax_at_every_step(run):
    """Greedy tokens are the argmax of the model's logits on the text so far (one forward on the
    whole text checks them all: the model is causal), whatever the seed; past the trained
    context, of the logits on its last train.seq_len tokens."""
    _, model = run
    T = model.context
    prompt = BYTES.encode("def tokenize(text):\n    return ")[:T - 8]
    greedy = continuation(model, prompt, Sampling(n_tokens=8, temperature=0.0))
    assert greedy == continuation(model, prompt, Sampling(n_tokens=8, temperature=0.0, seed=7))
    logits_TxV = _logits(model, [*prompt, *greedy])
    for j, token in enumerate(greedy):
        at = logits_TxV[len(prompt) + j - 1]
        assert at[token] >= at.max() - 1e-5, (j, token, int(at.argmax()))

    long = BYTES.encode("import os\nimport sys\nimport json\nimport math\n")[:T + 4]
    tokens = [*long, *continuation(model, long, Sampling(n_tokens=3, temperature=0.0))]
    for k in range(len(long), len(tokens)):
        at = _logits(model, tokens[k - T:k])[-1]
        assert at[tokens[k]] >= at.max() - 1e-5, (k, tokens[k], int(at.argmax()))


def test_a_seed_repeats_its_draws_and_another_seed_differs(run):
    _, model = run
    prompt = BYTES.encode("class ")
    draws = {seed: continuation(model, prompt, Sampling(n_tokens=12, temperature=1.0, seed=seed))
             for seed in (0, 1)}
    assert continuation(model, prompt, Sampling(n_tokens=12, temperature=1.0, seed=0)) == draws[0]
    assert draws[0] != draws[1]


def test_the_command_prints_the_prompt_and_its_continuation(run, capsys):
    _, model = run
    experiments.sample.main([str(model.run_dir), "def ", "6", "0"])

    out, err = capsys.readouterr()
    assert out == sample(model, Sampling("def ", 6, 0.0)) + "\n" and out.startswith("def ")
    first = err.splitlines()[0]
    assert model.run_dir.name in first and f"step {model.step}" in first and "bytes" in first


@pytest.mark.parametrize("args, named", [
    (["{missing}"], ["run_dir=", "missing", "finished run"]),
    (["{no_checkpoint}"], ["run_dir=", "no_checkpoint", "checkpoint"]),
    (["{run}", "def ", "0"], ["n_tokens=0", "positive"]),
    (["{run}", "def ", "5", "-0.5"], ["temperature=-0.5", "0 (greedy"]),
    (["{run}", "def ", "five"], ["n_tokens", "'five'"]),
    ([], ["RUN_DIR"]),
])
def test_bad_input_is_one_line(args, named, run, tmp_path, capsys):
    no_checkpoint = tmp_path / "no_checkpoint"
    (no_checkpoint / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(run[1].run_dir) / "result.json", no_checkpoint)
    paths = {"missing": tmp_path / "missing", "no_checkpoint": no_checkpoint,
             "run": run[1].run_dir}
    argv = [a.format(**paths) for a in args]

    assert_one_line_cli_error(experiments.sample.main, argv, capsys, "scaling-sample", named,
                              tmp_path)


def test_a_run_on_token_ids_has_no_text_to_sample(run, tmp_path):
    """A run on a file of token ids knows no tokenizer: refused, not decoded as bytes."""
    result = json.loads((run[1].run_dir / "result.json").read_text())
    result["config"]["data"]["path"] = str(tmp_path / "tokens.bin")
    run_dir = tmp_path / "bin_run"
    shutil.copytree(run[1].run_dir, run_dir)
    (run_dir / "result.json").write_text(json.dumps(result))

    with pytest.raises(ConfigError, match=r"data.path=.*tokens\.bin.*no tokenizer"):
        load(run_dir)
