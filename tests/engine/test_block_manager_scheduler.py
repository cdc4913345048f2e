"""Block manager and scheduler on their own: no model, fake sequences."""

from qoq.engine.block_manager import BlockManager
from qoq.engine.config import EngineConfig
from qoq.engine.scheduler import Scheduler
from qoq.engine.sequence import Sequence, SequenceStatus
from qoq.sampling import SamplingParams


def seq(num_prompt, rid="r"):
    return Sequence(rid, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=100))


def test_pages_grow_at_page_boundaries_and_return_on_free():
    bm = BlockManager(num_pages=4, page_size=4)
    s = seq(5)
    bm.grow(s)
    assert len(s.block_table) == 2 and bm.num_free_pages == 2
    assert [bm.slot(s, p) for p in (0, 3, 4)] == [s.block_table[0] * 4, s.block_table[0] * 4 + 3, s.block_table[1] * 4]
    s.output_token_ids += [7, 7, 7]  # 8 tokens: still 2 pages
    assert bm.missing_pages(s) == 0
    s.output_token_ids.append(7)  # the 9th token needs a third page
    assert bm.missing_pages(s) == 1
    bm.grow(s)
    bm.free(s)
    assert bm.num_free_pages == 4 and s.block_table == []


def make_scheduler(num_pages=4, page_size=4, **kw):
    bm = BlockManager(num_pages, page_size)
    return Scheduler(EngineConfig(**kw), bm), bm


def test_prefills_respect_token_budget_and_seq_limit():
    sched, _ = make_scheduler(num_pages=16, max_num_batched_tokens=10, max_num_seqs=2)
    for i, n in enumerate((4, 5, 3)):
        sched.add(seq(n, f"r{i}"))
    batch = sched.schedule()
    assert [s.request_id for s in batch.prefills] == ["r0", "r1"] and batch.num_tokens == 9
    batch = sched.schedule()  # r2 waits for a free sequence slot; r0, r1 decode
    assert not batch.prefills and len(batch.decodes) == 2


def test_mixed_step_admits_new_request_beside_decodes():
    sched, _ = make_scheduler(num_pages=16)
    sched.add(seq(3, "a"))
    sched.schedule()
    sched.running[0].output_token_ids.append(9)
    sched.add(seq(2, "b"))
    batch = sched.schedule()
    assert [s.request_id for s in batch.decodes] == ["a"] and [s.request_id for s in batch.prefills] == ["b"]


def test_preemption_frees_newest_and_requeues_it_first():
    sched, bm = make_scheduler(num_pages=4, page_size=4)
    a, b = seq(8, "a"), seq(8, "b")  # two pages each: the pool is full
    sched.add(a)
    sched.add(b)
    assert len(sched.schedule().prefills) == 2 and bm.num_free_pages == 0
    a.output_token_ids.append(1)  # a's 9th token needs a page: b (newest) must go
    b.output_token_ids.append(1)
    batch = sched.schedule()
    assert batch.decodes == [a] and batch.preempted == [b]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and sched.waiting[0] is b
    assert b.output_token_ids == [1]  # recompute keeps the generated tokens
    sched.finish(a, "stop")
    batch = sched.schedule()
    assert batch.prefills == [b] and b.num_tokens == 9 and len(b.block_table) == 3


# -- async scheduling: sequences with a token still in flight (Sequence.num_pending) ------------

def test_a_pending_token_counts_for_pages_and_positions():
    sched, bm = make_scheduler(num_pages=4, page_size=4)
    a = seq(4, "a")
    sched.add(a)
    sched.schedule()  # prefill: one page
    a.num_pending = 1  # its first token is sampled, not read back: the 5th token needs a page
    assert a.num_tokens == 5 and a.num_known_tokens == 4 and bm.missing_pages(a) == 1
    batch = sched.schedule()
    assert batch.decodes == [a] and len(a.block_table) == 2


def test_no_decode_for_a_sequence_whose_pending_token_is_its_last():
    sched, _ = make_scheduler(num_pages=8, page_size=4)
    a, b = seq(3, "a"), seq(3, "b")
    a.params = SamplingParams(max_tokens=3)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    a.output_token_ids += [5, 5]
    a.num_pending = b.num_pending = 1  # a's pending token is its 3rd and last
    batch = sched.schedule()
    assert batch.decodes == [b] and sched.running == [a, b]  # a stays, finishes when processed
    a.num_pending = 0
    a.output_token_ids.append(5)
    sched.finish(a, "length")
    assert sched.running == [b]


def test_preempted_with_a_pending_token_waits_for_it_and_can_finish_while_waiting():
    sched, bm = make_scheduler(num_pages=4, page_size=4)
    a, b = seq(8, "a"), seq(8, "b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    a.num_pending = b.num_pending = 1  # both need a third page for the pending token: b goes
    batch = sched.schedule()
    assert batch.decodes == [a] and batch.preempted == [b] and b.num_pending == 1
    assert not batch.prefills
    sched.finish(a, "stop")  # all pages free, but b's token is still unknown: no prefill for it
    assert not sched.schedule().prefills and sched.waiting[0] is b
    b.num_pending = 0  # processed: known now, prefilled with it
    b.output_token_ids.append(3)
    assert sched.schedule().prefills == [b]
    # Finishing from WAITING (its pending token ended it) leaves the queue and frees nothing twice.
    c = seq(8, "c")
    sched.add(c)
    c.num_pending = 1
    sched.finish(c, "length")
    assert c not in sched.waiting and c.is_finished and bm.num_free_pages == 4 - len(b.block_table)
