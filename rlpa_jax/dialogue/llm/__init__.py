"""The OpenAI-compatible LLM client and what wraps it: settings, cache, limiter, retries, usage, prompts."""
