"""A small CNN from nnx.Conv classifying images by a fixed random teacher, under μP + Muon."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.multipliers import ReadoutMultiplier

SIZE, CHANNELS, CLASSES = 8, 3, 4


class CNN(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.conv1 = nnx.Conv(CHANNELS, width, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, width, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(width, CLASSES, rngs=rngs)
        self.readout = ReadoutMultiplier()

    def __call__(self, x_BxHxWxC):
        h = jax.nn.relu(self.conv1(x_BxHxWxC))
        h = jax.nn.relu(self.conv2(h))
        return self.readout(self.head(h.mean(axis=(1, 2))))


def data(n: int = 256, seed: int = 0):
    """`n` random images drawn at `seed`, labelled by the channel of one fixed random 3×3
    conv teacher with the most energy above its expectation (balanced classes)."""
    x = jax.random.normal(jax.random.key(seed), (n, SIZE, SIZE, CHANNELS))
    w = jax.random.normal(jax.random.key(12345), (3, 3, CHANNELS, CLASSES))
    scores = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    energy = jnp.square(scores).mean(axis=(1, 2)) - jnp.square(w).sum(axis=(0, 1, 2))
    return x, jnp.argmax(energy, axis=-1)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


MODEL = CNN
