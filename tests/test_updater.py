"""Jitted updates (training/updater.py): micro-batch accumulation is exact, and the 8-device mesh
equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model.qwen2 import Qwen2Config, critic_params_from_policy, init_params
from rlpa_jax.rl.experience import Experience
from rlpa_jax.rl.objectives import actor_loss_fn, critic_loss_fn, response_tokens
from rlpa_jax.runtime import parallel
from rlpa_jax.training.optimizer import lr_schedule, make_optimizer
from rlpa_jax.training.updater import Updater, split_micro_batches

CONFIG = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
PROMPT, RESPONSE, ROWS = 8, 6, 8


def ppo_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CONFIG.vocab_size, (ROWS, PROMPT + RESPONSE)).astype(np.int32)
    attention = np.ones_like(tokens, bool)
    attention[::2, :3] = False  # left padding on half the prompts
    lengths = rng.integers(1, RESPONSE + 1, ROWS)
    response_mask = np.arange(RESPONSE)[None] < lengths[:, None]
    attention[:, PROMPT:] = response_mask
    return Experience(
        tokens=tokens, attention_mask=attention, response_mask=response_mask,
        old_logprobs=rng.normal(-4, 0.3, (ROWS, RESPONSE)).astype(np.float32),
        advantages=rng.normal(size=(ROWS, RESPONSE)).astype(np.float32),
        returns=rng.normal(size=(ROWS, RESPONSE)).astype(np.float32),
        old_values=rng.normal(size=(ROWS, RESPONSE)).astype(np.float32) * 0.1,
    )


def sgd():
    # Plain SGD makes any gradient difference show up 1:1 in the parameters (Adam's first step
    # is ~lr * sign(g), which turns harmless float32 rounding in near-zero gradients into noise).
    return optax.sgd(0.5)


def updaters(mesh=None, micro=4, optimizer=sgd):
    actor_sh = critic_sh = None
    if mesh is not None:
        actor_sh, critic_sh = parallel.param_shardings(CONFIG, mesh), parallel.param_shardings(CONFIG, mesh, "value")
    actor = Updater(actor_loss_fn(CONFIG, 0.2, 0.01), optimizer(), micro, response_tokens,
                    mesh=mesh, param_shardings=actor_sh)
    critic = Updater(critic_loss_fn(CONFIG, 0.2), optimizer(), micro, response_tokens,
                     mesh=mesh, param_shardings=critic_sh)
    return actor, critic


def run(mesh=None, micro=4, steps=2, optimizer=sgd):
    actor_params = init_params(CONFIG, jax.random.key(0))
    critic_params = critic_params_from_policy(actor_params, CONFIG)
    critic_params["value_kernel"] = jax.random.normal(jax.random.key(1), (CONFIG.hidden_size,)) * 0.1
    actor_up, critic_up = updaters(mesh, micro, optimizer)
    if mesh is not None:
        actor_params = parallel.shard(actor_params, actor_up.param_shardings)
        critic_params = parallel.shard(critic_params, critic_up.param_shardings)
    actor, critic = actor_up.init(actor_params), critic_up.init(critic_params)
    for i in range(steps):
        actor, actor_metrics = actor_up(actor, ppo_batch(i))
        critic, critic_metrics = critic_up(critic, ppo_batch(i))
    return actor, critic, actor_metrics, critic_metrics


def assert_trees_close(a, b, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0), a, b)


@pytest.fixture(scope="module")
def single():
    return run()


def test_update_changes_parameters_and_reports_metrics(single):
    actor, critic, actor_metrics, critic_metrics = single
    initial = init_params(CONFIG, jax.random.key(0))
    delta = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), actor.params, initial)
    assert max(jax.tree.leaves(delta)) > 1e-4
    assert float(actor_metrics["loss_tokens"]) == ppo_batch(1).response_mask.sum()
    assert np.isfinite(float(critic_metrics["loss_mean"])) and float(critic_metrics["grad_norm"]) > 0


def test_micro_batch_accumulation_is_exact(single):
    whole = run(micro=ROWS)
    assert_trees_close(whole[0].params, single[0].params, atol=1e-5)
    assert_trees_close(whole[1].params, single[1].params, atol=1e-5)
    np.testing.assert_allclose(whole[2]["loss_mean"], single[2]["loss_mean"], atol=1e-6)


def test_eight_device_mesh_equals_one_device(single):
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    actor, critic, actor_metrics, _ = run(mesh)
    assert actor.params["layers"]["mlp"]["up_kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert_trees_close(actor.params, single[0].params, atol=1e-5)
    assert_trees_close(critic.params, single[1].params, atol=1e-5)
    np.testing.assert_allclose(actor_metrics["loss_mean"], single[2]["loss_mean"], atol=1e-5)


def test_adamw_state_is_sharded_like_the_parameters():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    actor, _, metrics, _ = run(mesh, steps=1, optimizer=lambda: make_optimizer(1e-3, 10))
    mu = actor.opt_state[1][0].mu["layers"]["mlp"]["up_kernel"]
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert np.isfinite(float(metrics["grad_norm"]))


def test_schedule_warms_up_then_decays_to_ten_percent():
    schedule = lr_schedule(1.0, total_steps=100, warmup_ratio=0.03, min_lr_ratio=0.1)
    assert float(schedule(0)) == 0.0 and float(schedule(3)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.1) and 0.1 < float(schedule(50)) < 1.0


def test_batch_must_split_into_micro_batches():
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size=3"):
        split_micro_batches({"x": np.zeros((8, 2))}, 3)


def test_each_loss_reports_its_own_diagnostics(single):
    _, _, actor_metrics, critic_metrics = single
    assert {"loss_clip_fraction", "loss_approx_kl"} <= set(actor_metrics)
    assert "loss_clip_fraction" in critic_metrics and "loss_approx_kl" not in critic_metrics
    assert 0.0 <= float(actor_metrics["loss_clip_fraction"]) <= 1.0
