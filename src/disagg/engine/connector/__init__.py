"""The engine's KV connector: one interface (base.py) for KV that comes from, or goes to, another
engine (pull.py, push.py over kv/ transports) or the KV pool (pool.py), composed in composite.py and
assembled for a worker by factory.py."""
