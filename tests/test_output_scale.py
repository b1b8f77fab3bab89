"""The policy's output scale learned as one inverse temperature (training/output_scale.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params
from rlpa_jax.rl.experience import Experience
from rlpa_jax.rl.objectives import actor_loss_fn, response_tokens
from rlpa_jax.runtime import parallel
from rlpa_jax.training import output_scale
from rlpa_jax.training.optimizer import make_optimizer
from rlpa_jax.training.updater import Updater

CONFIG = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def scaled(params, s):
    return {**params, "final_norm": {"scale": params["final_norm"]["scale"] * s}}


def test_scaling_the_final_norm_is_sampling_at_a_temperature():
    params = init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, CONFIG.vocab_size)
    logits, _ = forward(params, CONFIG, tokens)
    np.testing.assert_allclose(forward(scaled(params, 1.7), CONFIG, tokens)[0], 1.7 * logits, rtol=1e-4, atol=1e-5)


def toy_tree():
    rng = np.random.default_rng(0)
    params = {"final_norm": {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 8), jnp.float32)},
              "embed": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
    grads = {"final_norm": {"scale": jnp.asarray(rng.normal(size=8), jnp.float32)},
             "embed": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
    return params, grads


def one_step(optimizer, params, grads):
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_one_adam_step_multiplies_the_scale_by_exp_of_its_own_learning_rate(direction):
    params, grads = toy_tree()
    # The gradient of the loss with respect to log s is sum(g * w): pick g so its sign is `direction`.
    g = params["final_norm"]["scale"] * direction + 0.01 * grads["final_norm"]["scale"]
    grads = {**grads, "final_norm": {"scale": g}}
    lr, scale_lr = 1e-3, 0.05
    optimizer = output_scale.with_output_scale_lr(optax.adam(lr), lr, scale_lr)
    new = one_step(optimizer, params, grads)
    # Adam's first step is lr * sign(gradient) (bias-corrected), here on the scalar log s.
    ratio = np.asarray(new["final_norm"]["scale"]) / np.asarray(params["final_norm"]["scale"])
    np.testing.assert_allclose(ratio, np.exp(-scale_lr * direction), rtol=1e-5)
    # Every other weight takes exactly the step the plain optimizer gives it.
    np.testing.assert_allclose(new["embed"], one_step(optax.adam(lr), params, grads)["embed"], rtol=1e-6)


def test_clipping_sees_the_log_scale_gradient_at_its_true_size():
    params, grads = toy_tree()
    tied = output_scale.log_scale_gradient().update(grads, optax.EmptyState(), params)[0]
    expected = float(jnp.sum(grads["final_norm"]["scale"] * params["final_norm"]["scale"]))
    assert float(jnp.linalg.norm(tied["final_norm"]["scale"])) == pytest.approx(abs(expected), rel=1e-5)
    assert tied["embed"] is grads["embed"]


def test_no_output_scale_lr_leaves_the_optimizer_alone():
    optimizer = make_optimizer(1e-3, 10)
    assert output_scale.with_output_scale_lr(optimizer, 1e-3, None) is optimizer


def test_policy_update_on_the_eight_device_mesh_rescales_the_final_norm_as_one():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = parallel.param_shardings(CONFIG, mesh)
    optimizer = output_scale.with_output_scale_lr(make_optimizer(1e-4, 4, warmup_ratio=0.0), 1e-4, 1e-2)
    updater = Updater(actor_loss_fn(CONFIG, 0.2, 0.0), optimizer, 4, response_tokens, mesh=mesh, param_shardings=shardings)
    start = jax.tree.map(np.asarray, init_params(CONFIG, jax.random.key(0)))  # the update donates its input
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG.vocab_size, (8, 12)).astype(np.int32)
    response_mask = np.ones((8, 4), bool)
    batch = Experience(tokens=tokens, attention_mask=np.ones_like(tokens, bool), response_mask=response_mask,
                       old_logprobs=np.full((8, 4), -4.8, np.float32),
                       advantages=rng.normal(size=(8, 4)).astype(np.float32))
    trained, _ = updater(updater.init(parallel.shard(start, shardings)), batch)
    ratio = np.asarray(trained.params["final_norm"]["scale"]) / np.asarray(start["final_norm"]["scale"])
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
    assert abs(np.log(ratio[0])) == pytest.approx(1e-2, rel=1e-3)  # first Adam step: the scale's own lr
    assert output_scale.output_scale_ratio(trained.params, start) == pytest.approx(ratio[0], rel=1e-6)
