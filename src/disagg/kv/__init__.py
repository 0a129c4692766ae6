"""KV blocks as bytes: layout and size math, content hashes, wire codecs, the transports that move
KV between workers (transport.py: tcp, shm, nixl, fake), and the KV pool's tiers."""
