"""Small Flax models shared by the tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest


class Block(nn.Module):
    """Pre-LN transformer block: multi-head attention (multi-axis DenseGeneral kernels) + MLP."""

    dim: int = 32
    heads: int = 4

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm(name="ln1")(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim, name="attn")(h, h)
        x = x + h
        h = nn.Dense(2 * self.dim, name="fc1")(nn.LayerNorm(name="ln2")(x))
        x = x + nn.Dense(self.dim, name="fc2")(nn.gelu(h))
        return x, None


class TinyModel(nn.Module):
    """Embedding projection, ``layers`` blocks (``nn.scan`` + ``nn.remat`` when ``scan``), classifier."""

    dim: int = 32
    layers: int = 2
    classes: int = 4
    scan: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, name="embed")(x)
        if self.scan:
            blocks = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                             length=self.layers)
            x, _ = blocks(self.dim, name="blocks")(x, None)
        else:
            for i in range(self.layers):
                x, _ = Block(self.dim, name=f"block_{i}")(x)
        return nn.Dense(self.classes, name="head")(x.mean(axis=1))


BLOCK_TARGETS = r"(blocks|block_\d+)/.*kernel"


@pytest.fixture(params=[True, False], ids=["scan", "unrolled"])
def tiny(request):
    model = TinyModel(scan=request.param)
    x = jax.random.normal(jax.random.key(0), (4, 6, 8))
    variables = model.init(jax.random.key(1), x)
    return model, variables, x


def randomize(adapter, seed=0, scale=0.2):
    """The adapter with every array moved by ``scale`` · N(0, 1) noise: nonzero, distinct, deterministic."""
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)])


def rel_err(a, b):
    """Max-abs error of ``a`` relative to the largest magnitude of the reference ``b``."""
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
