"""The training core that PPO (rl/) and the offline stages (offline/) share: losses as exact sums,
the optimizer, the forwards that score a response, and the jitted, micro-batched update."""
