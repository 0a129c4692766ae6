"""kv_transfer_params: what the two phases of a disaggregated request tell each other.

vLLM's fields, with the meaning vLLM gives them, plus our extensions (all optional, so vLLM's
proxy and workers interoperate with ours). One typed model, read from the HTTP body by the worker
and handed to the engine's KV connector as is.

    proxy -> prefill   do_remote_decode (+ decode_max_tokens; push_id, push_host, push_port to
                       push layer by layer)
    prefill -> proxy   do_remote_prefill, remote_engine_id, remote_host, remote_port,
                       remote_block_ids, remote_request_id (+ num_tokens, kv_dtype, kv_transport,
                       first_token_ids, lease_s, and push_id echoed when a push started)
    proxy -> decode    the prefill's answer as is (or do_remote_prefill + push_id for a push)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class KVTransferParams(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    do_remote_decode: bool = False  # proxy -> prefill: compute the prompt and hold its KV
    # ours, proxy -> prefill: the decode's max_tokens, so a prompt that could not fit it with them is
    # refused before its prefill is computed
    decode_max_tokens: int | None = Field(default=None, ge=1)
    do_remote_prefill: bool = False  # proxy -> decode: the KV is on the remote worker below
    remote_engine_id: str | None = Field(default=None, max_length=256)
    remote_host: str | None = Field(default=None, max_length=256)
    remote_port: int | None = Field(default=None, ge=1, le=65535)
    remote_block_ids: list[int] | None = Field(default=None, max_length=1_000_000)
    remote_request_id: str | None = Field(default=None, max_length=256)
    num_tokens: int | None = Field(default=None, ge=1)  # ours: prompt tokens the KV covers
    first_token_ids: list[int] | None = Field(default=None, max_length=1_000_000)  # ours: tokens already sampled
    #   (token 1 from prefill; every token streamed so far when the proxy migrates a request)
    kv_dtype: str | None = Field(default=None, max_length=16)  # ours: dtype of the held KV
    kv_transport: Literal["tcp", "shm", "nixl"] = "tcp"  # ours: how to pull it
    lease_s: float | None = Field(default=None, gt=0)  # ours: how long prefill holds it unless renewed
    # ours, layer-wise push: proxy -> prefill: push the KV to push_host:push_port as it is computed;
    # proxy -> decode: wait for the KV pushed under push_id; prefill -> proxy: push_id echoed when
    # the push started
    push_id: str | None = Field(default=None, min_length=1, max_length=128)
    push_host: str | None = Field(default=None, max_length=256)
    push_port: int | None = Field(default=None, ge=1, le=65535)

    @property
    def pulls(self) -> bool:
        """A decode request whose KV waits on a prefill worker's port."""
        return bool(self.do_remote_prefill and self.remote_host and self.remote_port and self.remote_request_id)

    @property
    def awaits_push(self) -> bool:
        """A decode request whose KV a prefill worker pushes under push_id (a prefill's answer, which
        echoes the push_id and says where the KV is held, is a pull: the proxy's fallback)."""
        return bool(self.do_remote_prefill and self.push_id and not self.pulls)

    @property
    def pushes(self) -> bool:
        """A prefill request that pushes its KV to a decode worker as it computes."""
        return bool(self.do_remote_decode and self.push_id and self.push_host and self.push_port)
