"""KV blocks: layout and size math, content hashes (transports and pool come later)."""
