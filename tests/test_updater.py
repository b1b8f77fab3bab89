"""Jitted updates (training/updater.py): micro-batch accumulation is exact, and the 8-device mesh
equals one device. The two steps the Updater jits are pure functions, tested jitted and not
(chex.variants), and they and the PPO losses (rl/objectives.py) reject arguments of the wrong shape."""

import chex
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
from rlpa_jax.training.losses import LossTerms
from rlpa_jax.training.optimizer import lr_schedule, make_optimizer
from rlpa_jax.training.updater import Trainable, Updater, accumulate_gradients, apply_gradients, split_micro_batches

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
        # One update's programs at a time, as the trainer runs them (it reads each minibatch's
        # metrics before the next): several 8-device programs in flight at once have deadlocked
        # XLA:CPU's collectives on the 2-core CI machine (every thread idle in this test).
        actor, actor_metrics, critic, critic_metrics = jax.block_until_ready(
            (actor, actor_metrics, critic, critic_metrics))
    return actor, critic, actor_metrics, critic_metrics


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
    chex.assert_trees_all_close(whole[0].params, single[0].params, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(whole[1].params, single[1].params, atol=1e-5, rtol=0)
    np.testing.assert_allclose(whole[2]["loss_mean"], single[2]["loss_mean"], atol=1e-6)


def test_a_data_and_fsdp_mesh_equals_one_device(single):
    # 4 devices, no tensor axis: on the (2, 2, 2) mesh of all 8, XLA:CPU (jax 0.10.2) now and then
    # ran this update's all-reduce and collective-permute in different orders on different devices
    # and deadlocked (a fresh-clone CI run, and 1 of 5 runs by hand: 4 devices waiting in each);
    # 12 runs of this mesh, two at a time, passed. Tensor splits: tests/test_parallel.py, the sampler's.
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1), jax.devices()[:4])
    actor, critic, actor_metrics, _ = run(mesh)
    assert actor.params["layers"]["mlp"]["up_kernel"].sharding.spec[1] == "fsdp"
    chex.assert_trees_all_close(actor.params, single[0].params, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(critic.params, single[1].params, atol=1e-5, rtol=0)
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


# ----------------------------------------------------------------------------- the jitted steps, jitted and not


def zero_terms(loss_fn, params, micro_batch):
    """The running LossTerms sums as the Updater starts them: scalar zeros of the loss's own structure."""
    return jax.tree.map(lambda _: np.zeros((), np.float32), jax.eval_shape(loss_fn, params, micro_batch))


class UpdateStepsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_micro_batch_gradients_add_up_to_the_full_batch_gradient(self):
        loss_fn = actor_loss_fn(CONFIG, 0.2, 0.01)
        params = init_params(CONFIG, jax.random.key(0))
        batch = ppo_batch(3)
        units = np.float32(batch.response_mask.sum())
        accumulate = self.variant(lambda p, g, t, b, n: accumulate_gradients(loss_fn, p, g, t, b, n))
        grads, terms = jax.tree.map(jnp.zeros_like, params), zero_terms(loss_fn, params, batch)
        for micro in split_micro_batches(batch, ROWS // 2):
            grads, terms = accumulate(params, grads, terms, micro, units)

        def full_batch(p):
            full_terms = loss_fn(p, batch)
            return full_terms.total / units, full_terms

        (_, want_terms), want_grads = jax.value_and_grad(full_batch, has_aux=True)(params)
        chex.assert_trees_all_close(grads, want_grads, atol=1e-6, rtol=1e-5)
        chex.assert_trees_all_close(terms, want_terms, atol=1e-5, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_apply_gradients_takes_one_optimizer_step_and_reports_per_unit_means(self):
        params = init_params(CONFIG, jax.random.key(0))
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
        terms = LossTerms(total=np.float32(6.0), count=np.float32(3.0), sums={"approx_kl": np.float32(1.5)})
        optimizer = sgd()
        trainable, metrics = self.variant(lambda tr, g, t: apply_gradients(optimizer, tr, g, t))(
            Trainable(params, optimizer.init(params)), grads, terms)
        chex.assert_trees_all_close(trainable.params, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads),
                                    atol=1e-6, rtol=0)
        grad_norm = np.sqrt(sum(float(jnp.sum(g.astype(jnp.float32) ** 2)) for g in jax.tree.leaves(grads)))
        chex.assert_trees_all_close(metrics, {"loss_mean": 2.0, "loss_tokens": 3.0, "loss_approx_kl": 0.5,
                                              "grad_norm": grad_norm}, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_the_steps_reject_arguments_of_the_wrong_shape(self):
        loss_fn = critic_loss_fn(CONFIG, 0.2)
        params = critic_params_from_policy(init_params(CONFIG, jax.random.key(0)), CONFIG)
        batch = ppo_batch(0)
        accumulate = self.variant(lambda p, g, t, b, n: accumulate_gradients(loss_fn, p, g, t, b, n))
        grads, terms = jax.tree.map(jnp.zeros_like, params), zero_terms(loss_fn, params, batch)
        with pytest.raises(AssertionError, match="training/updater.py: the running gradient sum is shaped like"):
            accumulate(params, init_params(CONFIG, jax.random.key(0)), terms, batch, np.float32(1.0))
        with pytest.raises(AssertionError, match="training/updater.py: every array of a micro-batch has one row"):
            accumulate(params, grads, terms, batch.replace(returns=batch.returns[:-1]), np.float32(1.0))
        with pytest.raises(AssertionError, match="training/updater.py: the gradients are shaped like the parameters"):
            self.variant(lambda tr, g, t: apply_gradients(sgd(), tr, g, t))(
                Trainable(params, sgd().init(params)), {"value_kernel": params["value_kernel"]}, terms)

    @chex.variants(with_jit=True, without_jit=True)
    def test_the_ppo_losses_reject_batches_of_the_wrong_shape(self):
        params = init_params(CONFIG, jax.random.key(0))
        actor = self.variant(actor_loss_fn(CONFIG, 0.2, 0.01))
        critic = self.variant(critic_loss_fn(CONFIG, 0.2))
        batch = ppo_batch(0)
        with pytest.raises(AssertionError, match=r"rl/objectives.py actor loss: tokens, attention_mask and "
                                                 r"response_mask are \(rows, length\)"):
            actor(params, batch.replace(tokens=batch.tokens[0], attention_mask=batch.attention_mask[0]))
        with pytest.raises(AssertionError, match="rl/objectives.py actor loss: tokens are integer ids"):
            actor(params, batch.replace(tokens=batch.tokens.astype(np.float32)))
        with pytest.raises(AssertionError, match="rl/objectives.py critic loss: response_mask has a row per sequence"):
            critic(params, batch.replace(response_mask=batch.response_mask[:-1]))
        with pytest.raises(AssertionError, match="rl/ppo.py policy_loss: logprobs, old_logprobs, advantages and mask"):
            actor(params, batch.replace(advantages=batch.advantages[:, :-1]))
