"""Fault injection for the isolation tests (engine and server) and the tensor-parallel start."""

import os

POISON = 12345  # a token id the tests put in a prompt to make its request fail


def poison_forward(monkeypatch, model, error: BaseException = ValueError("poisoned token")) -> None:
    """Make `model`'s forward raise `error` for any batch that holds the POISON token."""
    forward = model.forward

    def checked(input_ids, *args, **kwargs):
        if bool((input_ids == POISON).any()):
            raise error
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", checked)


class DieWhileLoading:
    """A shard loader (engine/parallel.launch) whose rank `rank` exits with `code` instead of
    loading its shard; the other ranks run `load`. Picklable, as it travels to the workers."""

    def __init__(self, load, rank: int = 1, code: int = 3) -> None:
        self.load, self.rank, self.code = load, rank, code

    def __call__(self, tp):
        if tp.rank == self.rank:
            os._exit(self.code)
        return self.load(tp)


class DieWhileBuilding:
    """A shard loader whose rank `rank` loads its shard and then exits with `code` while building
    its engine: in `ModelRunner._pages_that_fit`, just before the ranks agree on a page count (rank
    0 is then in that collective), or in `allocate_kv_cache`, just after it (rank 0 then finishes
    its own engine and waits for the workers')."""

    def __init__(self, load, where: str, rank: int = 1, code: int = 5) -> None:
        self.load, self.where, self.rank, self.code = load, where, rank, code

    def __call__(self, tp):
        shard = self.load(tp)
        if tp.rank == self.rank:
            from qoq.engine import model_runner

            owner = model_runner.ModelRunner if self.where == "_pages_that_fit" else model_runner
            setattr(owner, self.where, lambda *args, **kwargs: os._exit(self.code))
        return shard


class DieWhenUnpickled:
    """A shard loader that ends any process unpickling it with `code`: each worker dies as it
    starts, before it joins the group."""

    def __init__(self, code: int = 4) -> None:
        self.code = code

    def __reduce__(self):
        return os._exit, (self.code,)
