"""Where programs run: mesh and sharding rules, several processes, checkpoints, compiled cost, host memory."""
