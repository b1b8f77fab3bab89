"""Reinforcement learning for RLPA: multi-turn rollouts, advantages, PPO losses and update steps."""
