"""Fault injection for the isolation tests (engine and server)."""

POISON = 12345  # a token id the tests put in a prompt to make its request fail


def poison_forward(monkeypatch, model, error: BaseException = ValueError("poisoned token")) -> None:
    """Make `model`'s forward raise `error` for any batch that holds the POISON token."""
    forward = model.forward

    def checked(input_ids, *args, **kwargs):
        if bool((input_ids == POISON).any()):
            raise error
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", checked)
