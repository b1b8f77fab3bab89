"""The run's configuration: option domains, the typed config tree, the LLM endpoint sections."""
