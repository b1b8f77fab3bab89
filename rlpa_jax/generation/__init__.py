"""The one generation engine: sampler, decode loop, sampling layout, prefix cache, row placement."""
