"""Routing policies on their own, and session affinity through a real replicated cluster."""

from __future__ import annotations

import signal

from disagg.serve.protocol import ChatCompletionRequest, CompletionRequest
from disagg.serve.routing import Charges, LeastLoad, RoundRobin, SessionAffinity, estimated_tokens, requested_output

W = ["http://a", "http://b", "http://c"]


def test_round_robin_cycles():
    rr = RoundRobin()
    assert [rr.select("workers", W, {}) for _ in range(4)] == ["http://a", "http://b", "http://c", "http://a"]


def test_least_load_counts_outstanding_tokens_and_forgets_finished_ones():
    ll = LeastLoad()
    big = {"prompt": list(range(1000)), "max_tokens": 100}
    small = {"prompt": "hi", "max_tokens": 4}
    assert estimated_tokens(big) == 1100
    first = ll.select("workers", W, big)
    others = {ll.select("workers", W, small), ll.select("workers", W, small)}
    assert first not in others  # the busy worker is avoided while two idle ones remain
    ll.on_complete(first, big)
    assert ll.load[first] == 0
    assert sum(ll.load.values()) == 2 * estimated_tokens(small)


def test_charges_settle_each_placement_once_and_the_sweep_settles_the_rest():
    ll = LeastLoad()
    charges = Charges(ll)
    body = {"prompt": "hi", "max_tokens": 4}
    first, second = charges.select("decode", W, body), charges.select("decode", W, body)
    first.settle()
    first.settle()
    assert sum(ll.outstanding().values()) == estimated_tokens(body)  # the second is still out
    charges.sweep()
    second.settle()
    charges.sweep()
    assert ll.outstanding() == {first.worker: 0, second.worker: 0}
    charges.select("decode", W, body)  # placed after its client request ended: settled at once
    assert not any(ll.outstanding().values())


def test_the_worker_and_the_router_read_one_token_limit():
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "max_completion_tokens": 2}
    assert requested_output(chat) == 2
    assert ChatCompletionRequest(**chat).sampling_params().max_tokens == 2
    assert ChatCompletionRequest(**(chat | {"max_completion_tokens": None})).sampling_params().max_tokens == 20
    completion = {"prompt": "hi", "max_tokens": 20, "max_completion_tokens": 2}  # not a completions field
    assert requested_output(completion) == 20
    assert CompletionRequest(**completion).sampling_params().max_tokens == 20


def test_session_affinity_keeps_a_session_and_moves_it_when_its_worker_is_gone():
    sa = SessionAffinity()
    alice = {"user": "alice", "prompt": "hello", "max_tokens": 8}
    home = sa.select("decode", W, alice)
    for _ in range(5):
        other = sa.select("decode", W, {"user": "bob", "prompt": "x" * 400, "max_tokens": 8})
        assert sa.select("decode", W, alice) == home
    assert other != home or len(W) == 1
    moved = sa.select("decode", [w for w in W if w != home], alice)
    assert moved != home
    assert sa.select("decode", W, alice) == moved  # and stays where it moved
    assert sa.select("prefill", W, alice) in W  # pools are separate


def test_a_session_stays_on_one_replica_and_moves_when_it_dies():
    from test_serve import MODEL, client, metrics, start

    with start("replicated", routing="session") as c:
        urls = c.worker_urls()

        def finished(url: str) -> float:  # requests finished, for any reason
            return sum(v for k, v in metrics(url).items() if k.startswith("disagg_requests_total"))

        def served() -> dict[str, float]:
            return {name: finished(u) for name, u in urls.items()}

        cl = client(c)
        for _ in range(3):
            cl.completions.create(model=MODEL, prompt="Hello", max_tokens=2, user="alice")
        counts = served()
        home = max(counts, key=counts.get)
        assert counts[home] == 3
        assert sum(counts.values()) == 3
        survivor = next(n for n in urls if n != home)
        before = served()[survivor]
        victim = c.procs[home]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        r = cl.completions.create(model=MODEL, prompt="Hello", max_tokens=2, user="alice")
        assert r.usage.completion_tokens == 2
        assert finished(urls[survivor]) == before + 1


def test_prefix_routing_follows_a_shared_prefix_until_load_outweighs_it():
    from disagg.serve.routing import PrefixAware

    pa = PrefixAware()
    system = "You are a careful assistant. " * 40  # ~1,100 characters, ~280 tokens
    one = {"prompt": system + "Question one?", "max_tokens": 16}
    first = pa.select("workers", W, one)
    pa.on_complete(first, one)
    again = pa.select("workers", W, {"prompt": system + "Question two, longer?", "max_tokens": 16})
    assert again == first  # the warm worker saves ~280 tokens of prefill
    other = pa.select("workers", W, {"prompt": "Something else entirely. " * 40, "max_tokens": 16})
    assert other != first  # a cold prompt goes where the load is lowest
    # pile load on the warm worker until recomputing elsewhere is cheaper
    for _ in range(5):
        pa.load.charge(first, {"prompt": "x" * 4000, "max_tokens": 0})
    assert pa.select("workers", W, {"prompt": system + "Question three?", "max_tokens": 16}) != first
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    assert PrefixAware.chunks(chat)[0]  # chat prompts are chunked too


def test_prefix_routing_sends_repeats_of_a_prefix_to_the_worker_that_holds_it():
    from test_serve import MODEL, client, metrics, start

    system = "The following is a conversation with a helpful assistant about the sea. " * 6
    with start("replicated", routing="prefix") as c:
        urls = c.worker_urls()
        cl = client(c)
        for q in ("What is a tide?", "Why is the sea salty?", "How deep is the ocean?"):
            cl.completions.create(model=MODEL, prompt=system + q, max_tokens=2)
        done = {n: sum(v for k, v in metrics(u).items() if k.startswith("disagg_requests_total"))
                for n, u in urls.items()}
        warm = max(done, key=done.get)
        assert done[warm] == 3
        assert metrics(urls[warm])["disagg_prefix_cache_hit_blocks"] > 0  # the repeats reused its cache


# ---- routing on the block hashes workers report (serve/kv_index.py) ----


def test_kv_events_follow_the_prefix_cache_and_fall_back_to_a_snapshot(tiny):
    from disagg.engine.sampling import SamplingParams

    log = tiny.block_manager.events
    start = log.number
    prompt = list(range(300, 369))  # four full blocks of 16, new to the shared engine
    tiny.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    stored = [h for _, s, h in log.since(start) if s]
    assert len(stored) == 4
    assert set(stored) <= set(tiny.block_manager.cached_hashes())
    assert log.since(log.number) == []
    assert log.since(start + 1) == log.since(start)[1:]
    while log._log[0][0] <= start + 1:  # events fall off the log: a reader from before them needs a snapshot
        log._log.popleft()
    assert log.since(start) is None
    assert len(log.since(start + 1)) == 3


def test_the_index_matches_leading_blocks_from_reports_and_predictions(monkeypatch):
    from disagg.serve.kv_index import KVIndex

    index = KVIndex(predicted_ttl=5.0)
    h = [bytes([i]) * 16 for i in range(4)]
    index.apply("http://a", {"epoch": "e1", "number": 3, "snapshot": [x.hex() for x in h[:3]]})
    assert index.matched("http://a", h) == 3
    index.apply("http://a", {"epoch": "e1", "number": 4, "events": [[0, h[1].hex()]]})
    assert index.matched("http://a", h) == 1  # block 1 evicted: the prefix stops there
    index.predict("http://b", h)
    assert index.matched("http://b", h) == 4
    clock = [1000.0]
    monkeypatch.setattr("disagg.serve.kv_index.time.monotonic", lambda: clock[0])
    index.predict("http://c", h[:2])
    index.apply("http://c", {"epoch": "e2", "number": 1, "events": [[1, h[0].hex()]]})
    clock[0] += 6  # predictions expire unless a report confirmed them
    assert index.matched("http://c", h) == 1
    assert index.view("http://a").number == 4


def test_the_proxy_hashes_prompts_exactly_as_the_worker_does(smol):
    from disagg.engine.sampling import SamplingParams
    from disagg.model.tokenizer import Tokenizer
    from disagg.serve.kv_index import PromptHasher

    hasher = PromptHasher(Tokenizer.from_dict(smol.tokenizer.to_dict()), smol.model_id, smol.config.block_size)
    messages = [{"role": "system", "content": "You answer in French. " * 8},
                {"role": "user", "content": [{"type": "text", "text": "Say hello "}, {"type": "text", "text": "2x"}]}]
    text = "The capital of France is Paris. " * 8
    for body, prompt in (({"messages": messages}, smol.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "Say hello 2x"}
             for m in messages])), ({"prompt": text}, text)):
        ids = hasher.token_ids(body)
        seq = smol.make_sequence("r", prompt, SamplingParams(max_tokens=1))
        smol.block_manager.update_hashes(seq)
        assert ids == seq.token_ids
        assert hasher.hashes(ids) == seq.block_hashes
        assert len(seq.block_hashes) >= 3
    assert hasher.token_ids({"messages": [{"role": "user"}]}) is None  # unreadable: the worker will say why
