"""Text from a finished run: its newest checkpoint continues a prompt one token at a time.

Each token comes from the model's forward on the last train.seq_len tokens (the context it was
trained on), left-aligned in a window of that fixed length, so one compiled step serves every
position: the models are causal, so the padding after the real tokens changes nothing before it.
Without a KV cache each token costs a whole window's forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.config import ConfigError, RunConfig, from_dict
from scaling.parametrization import abstract_model, make_parametrization
from scaling.training import data, pretrained
from scaling.training.checkpoint import Checkpointer
from scaling.training.token_cache import TOKENIZER
from scaling.training.tokens import read_tokenizer

FIELD = "run_dir"  # how errors name the run


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What to sample: the prompt, how many tokens follow it, how sharply (0: greedy)."""

    prompt: str = "def "
    n_tokens: int = 200
    temperature: float = 0.8
    seed: int = 0

    def __post_init__(self):
        if not self.prompt:
            raise ConfigError("prompt", self.prompt, "text to continue (one character or more)")
        if self.n_tokens <= 0:
            raise ConfigError("n_tokens", self.n_tokens, "a positive number of tokens")
        if not self.temperature >= 0:  # NaN too
            raise ConfigError("temperature", self.temperature, "0 (greedy: the argmax) or more")


@dataclasses.dataclass(frozen=True)
class TextCodec:
    """Text to the run's token ids and back."""

    name: str  # bytes, or the tokenizer.json read
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]  # bytes that are not UTF-8 come out as U+FFFD


BYTES = TextCodec("bytes", lambda text: list(text.encode()),
                  lambda ids: bytes(ids).decode("utf-8", errors="replace"))


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A finished run's model at its newest checkpoint, with the text codec it was trained on."""

    run_dir: Path
    config: RunConfig
    step: int
    graphdef: nnx.GraphDef
    params: nnx.State
    codec: TextCodec

    @property
    def context(self) -> int:
        return self.config.train.seq_len


def load(run_dir: Path) -> TrainedModel:
    """The run's model at its newest checkpoint; ConfigError for a run that did not finish (or
    diverged), has no checkpoint, or whose tokenizer cannot be found."""
    try:
        cfg = from_dict(pretrained.source_result(str(run_dir))["config"])
    except ConfigError as error:  # the same checks as a fine-tune's source, named as ours
        raise ConfigError(FIELD, str(run_dir), error.expected) from None
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    if step is None:
        raise ConfigError(FIELD, str(run_dir), "a run with a checkpoint in checkpoints/")
    codec = text_codec(cfg)
    vocab_size = cfg.data.source_vocab_size
    parametrization = make_parametrization(cfg.model, cfg.param, vocab_size)
    graphdef, state = nnx.split(abstract_model(cfg.model, parametrization, vocab_size))
    state.replace_by_pure_dict(pretrained.restore_params(str(run_dir), None,
                                                         state.to_pure_dict()))
    return TrainedModel(run_dir, cfg, step, graphdef, state, codec)


def text_codec(cfg: RunConfig) -> TextCodec:
    """Bytes, the BPE trained for the run (kept in its token cache folder) or its tokenizer.json."""
    d = cfg.data
    if d.holds_tokens:
        raise ConfigError("data.path", d.path, "text: the run read token ids from a file, and "
                          "knows no tokenizer to write a prompt in them")
    if d.tokenizer == "bytes":
        return BYTES
    file = data.cache_folder(d) / TOKENIZER if d.tokenizer == "bpe" else Path(d.tokenizer)
    if not file.expanduser().is_file():
        raise ConfigError("data.tokenizer", d.tokenizer,
                          f"the run's tokenizer at {file} (data.cache_dir and data.path are "
                          "relative to the folder the run was trained in)")
    tokenizer = read_tokenizer(str(file))
    return TextCodec(str(file), lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                     tokenizer.decode)


def continuation(model: TrainedModel, prompt_ids: list[int], sampling: Sampling) -> list[int]:
    """`sampling.n_tokens` token ids drawn one at a time after `prompt_ids`."""
    tokens, T = list(prompt_ids), model.context
    key = jax.random.key(sampling.seed)
    for i in range(sampling.n_tokens):
        window = tokens[-T:]
        window_1xT = np.zeros((1, T), np.int32)
        window_1xT[0, :len(window)] = window
        tokens.append(int(_next_token(model.graphdef, model.params, window_1xT, len(window) - 1,
                                      key, i, sampling.temperature)))
    return tokens[len(prompt_ids):]


def sample(model: TrainedModel, sampling: Sampling) -> str:
    """The prompt and its continuation, as text."""
    prompt_ids = model.codec.encode(sampling.prompt)
    return model.codec.decode([*prompt_ids, *continuation(model, prompt_ids, sampling)])


@functools.partial(jax.jit, static_argnums=0)
def _next_token(graphdef: nnx.GraphDef, params: nnx.State, window_1xT: jax.Array,
                last: jax.Array, key: jax.Array, index: jax.Array, temperature: jax.Array
                ) -> jax.Array:
    """The token after position `last` of the window: the argmax at temperature 0, else drawn
    from softmax(logits / temperature) with the `index`-th key of `key`. Every argument but the
    graph is traced: one compile serves every token and temperature."""
    logits_V = nnx.merge(graphdef, params)(window_1xT)[0, last]
    scale = jnp.where(temperature > 0, temperature, 1.0)
    drawn = jax.random.categorical(jax.random.fold_in(key, index), logits_V / scale)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits_V))
