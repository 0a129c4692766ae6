"""Load generation and measurement against OpenAI-compatible servers (`disagg bench`), and the
fair comparison of the three architectures on one hardware budget (`disagg compare`)."""
