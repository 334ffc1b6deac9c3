"""An MLP from nnx.Linear learning a fixed random teacher (regression), under μP + Muon."""

import jax
import jax.numpy as jnp
from flax import nnx

from models.multipliers import ReadoutMultiplier

D_IN, D_OUT = 16, 4


class MLP(nnx.Module):
    def __init__(self, width: int, depth: int = 2, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.inp = nnx.Linear(D_IN, width, rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, D_OUT, rngs=rngs)
        self.readout = ReadoutMultiplier()  # μP's 1/m on the output, set by the parametrization

    def __call__(self, x):
        h = jax.nn.relu(self.inp(x))
        for layer in self.hidden:
            h = jax.nn.relu(layer(h))
        return self.readout(self.out(h))


def data(n: int = 256, seed: int = 0):
    """`n` inputs drawn at `seed` and the outputs of one fixed random two-layer tanh teacher."""
    k1, k2 = jax.random.split(jax.random.key(12345))
    x = jax.random.normal(jax.random.key(seed), (n, D_IN))
    w1 = jax.random.normal(k1, (D_IN, 64)) / D_IN**0.5
    w2 = jax.random.normal(k2, (64, D_OUT)) / 8.0
    return x, jnp.tanh(x @ w1) @ w2


def loss_fn(model, x, y):
    return jnp.mean(jnp.square(model(x) - y))


MODEL = MLP
