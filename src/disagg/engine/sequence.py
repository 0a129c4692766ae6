"""One request's state as the scheduler sees it: token ids, progress, blocks. No tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from disagg.engine.sampling import SamplingParams
from disagg.kv.params import KVTransferParams


class Status(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks allocated, KV arriving from elsewhere (kv connector)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by outputs
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against the context length
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in this sequence's blocks
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks of known tokens
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on admission
    kv: KVTransferParams | None = None  # where its KV comes from or goes to (engine/connector)
    prepared: bool = False  # the connector's prepare() ran
    num_pooled_blocks: int = 0  # leading prompt blocks the KV pool holds (its prepare() says; kept here,
    #                             not by the connector, so a request abandoned before it was queued leaves nothing)
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: int | str | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]
