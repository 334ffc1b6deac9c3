"""A user's own byte LM from plain Flax layers, for `model.factory=user_lm:make_lm`: an
embedding, residual MLP blocks and a readout, with the forward-multiplier helpers."""

import jax
from flax import nnx

from models.multipliers import BranchMultiplier, ReadoutMultiplier
from models.tagged import mark_residual


class Block(nnx.Module):
    def __init__(self, width, rngs):
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)
        self.branch = BranchMultiplier()
        mark_residual(self)

    def __call__(self, x):
        return x + self.branch(self.down(jax.nn.gelu(self.up(self.norm(x)))))


class UserLM(nnx.Module):
    def __init__(self, width, depth, vocab_size, rngs):
        self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs) for _ in range(depth)])
        self.head = nnx.Linear(width, vocab_size, use_bias=False, rngs=rngs)
        self.readout = ReadoutMultiplier()

    def __call__(self, tokens_BxT):
        h = self.embed(tokens_BxT)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.head(h))


def make_lm(cfg, vocab_size, *, rngs):
    return UserLM(cfg.width, cfg.depth, vocab_size, rngs)


class Unscaled(UserLM):
    """The same LM with its readout multiplier forgotten."""

    def __call__(self, tokens_BxT):
        h = self.embed(tokens_BxT)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_unscaled_lm(cfg, vocab_size, *, rngs):
    return Unscaled(cfg.width, cfg.depth, vocab_size, rngs)
