"""DoRA/DVoRA under ``nn.scan`` + ``nn.remat`` saving only layer outputs (``output_name``).

By default the magnitude's gradient needs the pre-scale output, which a policy saving only layer outputs
does not keep, so the backward recomputes every base matmul. With ``output_name`` the layer's scaled
output is the saved tensor and the backward reads the pre-scale output back from it: the compiled step
then has LoRA's token-sized matmuls and no more temporaries than LoRA, with the same gradients.
"""

from __future__ import annotations

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj

T, D, F, LAYERS = 256, 16, 24, 3


class Block(nn.Module):
    name_outputs: bool

    @nn.compact
    def __call__(self, x, _):
        def lin(name, n, h):
            y = nn.Dense(n, use_bias=name == "up", name=name)(h)
            return jax.ad_checkpoint.checkpoint_name(y, "lin_out") if self.name_outputs else y
        x = x + lin("down", D, jnp.tanh(lin("up", F, x)))
        return x, None


class Net(nn.Module):
    remat: bool = True
    name_outputs: bool = True
    policy_names: tuple[str, ...] = ("lin_out",)

    @nn.compact
    def __call__(self, x):
        policy = jax.checkpoint_policies.save_only_these_names(*self.policy_names)
        body = nn.remat(Block, policy=policy, prevent_cse=False) if self.remat else Block
        x, _ = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)(
            self.name_outputs, name="blocks")(x, None)
        return x


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (T, D))
    model = Net()
    variables = model.init(jax.random.key(1), x)
    return x, variables["params"], lj.discover(model, variables, x)


def _randomize(adapter, key):
    leaves, tdef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tdef, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _grads(model, method, params, layouts, x):
    frozen, adapter = lj.init(method, params, jax.random.key(2), layouts=layouts)
    adapter = _randomize(adapter, jax.random.key(3))
    loss = lambda ad: jnp.sum(jnp.sin(lj.apply(model, {"params": frozen}, ad, x)))   # noqa: E731
    step = jax.jit(jax.value_and_grad(loss))
    return step, adapter


def _saved_token_tensors(model, method, params, layouts, x):
    """Shapes of the saved residuals with the token axis (from ``jax.ad_checkpoint.print_saved_residuals``)."""
    frozen, adapter = lj.init(method, params, jax.random.key(2), layouts=layouts)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(
            lambda ad: jnp.sum(jnp.sin(lj.apply(model, {"params": frozen}, ad, x))), adapter)
    shapes = [tuple(int(d) for d in m.group(1).split(",")) for m in re.finditer(r"^f32\[([\d,]+)\]", buf.getvalue(), re.M)]
    return sorted(s for s in shapes if len(s) == 3 and s[1] == T)


def _token_dots(compiled):
    """Dots whose output has the token axis (``T`` rows): base and branch matmuls, not norm terms."""
    return [line for line in compiled.as_text().splitlines()
            if re.search(r"= f32\[" + str(T) + r",\d+\]\{[^}]*\} dot\(", line)]


LORA = lj.LoRA(rank=2, alpha=4.0, targets=r".*kernel")
VERA = lj.VeRA(rank=4, targets=r".*kernel")


@pytest.mark.parametrize("make, direction_only", [
    (lambda name: lj.DoRA(rank=2, alpha=4.0, targets=r".*kernel", output_name=name), LORA),
    (lambda name: lj.DoRA(rank=2, alpha=4.0, targets=r".*kernel", detach_norm=False, output_name=name), LORA),
    (lambda name: lj.DVoRA(rank=4, targets=r".*kernel", output_name=name), VERA),
], ids=["dora", "dora_norm_differentiated", "dvora"])
def test_output_name_saves_only_layer_outputs_and_keeps_the_gradients(setup, make, direction_only):
    """``direction_only``: the same update without the magnitude (LoRA for DoRA, VeRA for DVoRA)."""
    x, params, layouts = setup
    # reference: the same method without remat and without output_name
    ref_step, ref_ad = _grads(Net(remat=False, name_outputs=False), make(None), params, layouts, x)
    ref_loss, ref_g = ref_step(ref_ad)
    # remat saving "lin_out": named by the method (the model does not name the adapted outputs itself)
    step, ad = _grads(Net(name_outputs=False), make("lin_out"), params, layouts, x)
    loss, g = step(ad)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)

    # the compiled programs: LoRA with the model naming its outputs, the method by default, with output_name
    def compiled(model, method):
        s, a = _grads(model, method, params, layouts, x)
        return s.lower(a).compile()
    lora = compiled(Net(), direction_only)
    default = compiled(Net(), make(None))
    named = compiled(Net(name_outputs=False), make("lin_out"))
    n_lora, n_default, n_named = (len(_token_dots(c)) for c in (lora, default, named))
    assert n_default > n_lora            # the default recomputes the base matmuls in the backward
    assert n_named == n_lora             # output_name: no recomputation
    # what the backward keeps of the token-sized tensors: each adapted layer's output and the block input
    # (the scan carry), never a pre-scale tensor: at most one (T, out) per adapted layer + the carry
    token_sized = _saved_token_tensors(Net(name_outputs=False), make("lin_out"), params, layouts, x)
    assert token_sized == sorted([(LAYERS, T, F), (LAYERS, T, D), (LAYERS, T, D)]), token_sized
    with_pre = _saved_token_tensors(Net(policy_names=("lin_out", lj.DORA_PRE_SCALE)), make(None), params, layouts, x)
    assert len(with_pre) > len(token_sized)
    temp = lambda c: c.memory_analysis().temp_size_in_bytes   # noqa: E731
    assert temp(named) < temp(compiled(Net(policy_names=("lin_out", lj.DORA_PRE_SCALE)), make(None)))


def test_zero_magnitude_column_gives_a_nan_gradient_not_a_wrong_one():
    """``m_j = 0``: the scaled output has lost the pre-scale column, so ``∂L/∂m_j`` is NaN (documented);
    every other gradient equals the default path's."""
    params = {"lin": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
    x = jax.random.normal(jax.random.key(2), (5, 6))

    class Lin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, use_bias=False, name="lin")(x)

    def grads(output_name):
        method = lj.DoRA(rank=2, alpha=4.0, targets="lin/kernel", output_name=output_name)
        frozen, adapter = lj.init(method, params, jax.random.key(1))
        node = adapter["lin"]["kernel"]
        ad = {"lin": {"kernel": node.replace(m=node["m"].at[1].set(0.0), b=node["b"] + 0.1)}}
        g = jax.grad(lambda a: jnp.sum(lj.apply(Lin(), {"params": frozen}, a, x) ** 2))(ad)
        return {k: np.asarray(v) for k, v in g["lin"]["kernel"].items()}

    named, ref = grads("out"), grads(None)
    assert np.isnan(named["m"][1]) and np.isfinite(ref["m"][1])
    np.testing.assert_allclose(np.delete(named["m"], 1), np.delete(ref["m"], 1), rtol=1e-5)
    for k in ("a", "b"):
        np.testing.assert_allclose(named[k], ref[k], rtol=1e-5, atol=1e-7)


def test_output_name_must_be_a_string():
    with pytest.raises(TypeError, match="output_name must be None or a non-empty str"):
        lj.DoRA(output_name=3)
    with pytest.raises(TypeError, match="DVoRA: output_name"):
        lj.DVoRA(output_name="")
