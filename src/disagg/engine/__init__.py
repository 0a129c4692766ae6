"""Requests to tokens: paged KV cache, block manager, scheduler, runner, sampler."""
