"""Weights to a forward pass: the Llama-family model, its configs, tokenizer and loaders."""
