"""The start-up memory check's own arithmetic: what it adds beside the compiled programs."""

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model.qwen2 import Qwen2Config
from rlpa_jax.rl.memory_check import kept_prompt_cache_bytes
from rlpa_jax.runtime import parallel

# Qwen2.5-3B's cache shape: 36 layers, 2 key/value heads of 128, bfloat16.
CONFIG = Qwen2Config(vocab_size=1024, hidden_size=2048, intermediate_size=256, num_layers=36, num_heads=16,
                     num_kv_heads=2, compute_dtype="bfloat16")


def test_kept_prompt_caches_are_counted_per_device_as_the_cache_is_split():
    # 64 prompts x 2048 slots, 3 caches, keys and values, 2 bytes, on fsdp=8: 8 rows per device.
    fsdp = parallel.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    per_device = 3 * 2 * 36 * 8 * 2048 * 2 * 128 * 2
    assert kept_prompt_cache_bytes(CONFIG, fsdp, 64, 2048, 3) == per_device == 1_811_939_328
    # data=2 x fsdp=2 split the rows 4 ways and tensor=2 the 2 key/value heads: the same share.
    mixed = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert kept_prompt_cache_bytes(CONFIG, mixed, 64, 2048, 3) == per_device
    # tensor=8 cannot split 2 heads and leaves no axis for the rows: every device holds them all.
    tensor = parallel.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    assert kept_prompt_cache_bytes(CONFIG, tensor, 64, 2048, 3) == 8 * per_device
    assert kept_prompt_cache_bytes(CONFIG.replace(compute_dtype="float32"), fsdp, 64, 2048, 1) == 2 * per_device // 3
