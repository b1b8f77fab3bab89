"""rlpa-jax: RLPA (dynamic profile modeling for personalized alignment) as a JAX/Flax framework."""
