"""disagg: serve an LLM single, replicated or disaggregated, and learn which one to run."""

__version__ = "0.1.0"
