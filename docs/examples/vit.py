"""A small ViT: patch embedding, nnx.MultiHeadAttention and MLP blocks, under μP + Muon.
Width grows the heads (fixed head dim); each block is residual, for the depth rules too."""

import jax
import jax.numpy as jnp
from cnn import CHANNELS, CLASSES, SIZE, loss_fn  # noqa: F401  (the same loss)
from flax import nnx

from models.multipliers import AttentionScale, BranchMultiplier, ReadoutMultiplier
from models.tagged import annotate, mark_residual

PATCH, HEAD_DIM = 4, 16
TOKENS = (SIZE // PATCH) ** 2


def data(n: int = 256, seed: int = 0):
    """`n` random images drawn at `seed`, labelled by the class whose fixed random patch filter
    has the most energy above its expectation over the patches (a task a patch embedding can
    see, where the CNN's is 3×3 filters)."""
    x = jax.random.normal(jax.random.key(seed), (n, SIZE, SIZE, CHANNELS))
    w = jax.random.normal(jax.random.key(12345), (PATCH * PATCH * CHANNELS, CLASSES))
    patches = x.reshape(n, SIZE // PATCH, PATCH, SIZE // PATCH, PATCH, CHANNELS)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, TOKENS, -1)
    energy = jnp.square(patches @ w).mean(axis=1) - jnp.square(w).sum(axis=0)
    return x, jnp.argmax(energy, axis=-1)


class Block(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=width // HEAD_DIM, in_features=width, decode=False, rngs=rngs,
            attention_fn=AttentionScale(HEAD_DIM))  # μP's 1/d attention, set by the rule
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)
        self.branch = BranchMultiplier()  # a depth rule's factor on each branch
        mark_residual(self)

    def __call__(self, x):
        x = x + self.branch(self.attn(self.norm1(x)))
        return x + self.branch(self.down(jax.nn.gelu(self.up(self.norm2(x)))))


class ViT(nnx.Module):
    def __init__(self, width: int, depth: int = 2, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.patch = nnx.Conv(CHANNELS, width, kernel_size=(PATCH, PATCH),
                              strides=(PATCH, PATCH), rngs=rngs)
        # not a layer's parameter: its role says how it scales (the rest follows from shapes)
        self.position = annotate(nnx.Param(jnp.zeros((TOKENS, width))), role="input")
        self.blocks = nnx.List([Block(width, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, CLASSES, rngs=rngs)
        self.readout = ReadoutMultiplier()

    def __call__(self, x_BxHxWxC):
        p = self.patch(x_BxHxWxC)
        h = p.reshape(p.shape[0], -1, p.shape[-1]) + self.position[...]
        for block in self.blocks:
            h = block(h)
        return self.readout(self.head(self.norm(h).mean(axis=1)))


MODEL = ViT
