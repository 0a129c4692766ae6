"""Load generation and measurement against OpenAI-compatible servers (`disagg bench`), the
fair comparison of the three architectures on one hardware budget (`disagg compare`), this
machine's cost-model factors (`disagg calibrate`) and KV transfer speed (`disagg transfer-bench`)."""
