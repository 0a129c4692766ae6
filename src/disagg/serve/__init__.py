"""The HTTP world: the OpenAI-compatible worker, the proxy, routing policies, the launcher."""
