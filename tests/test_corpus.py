from qoq.data.corpus import load_corpus, rst_to_prose


def test_rst_cleaning_keeps_prose_and_drops_code():
    src = """Title
=====

This is a :func:`print` call with ``literal`` and a `link <https://x.org>`_ in it. For example::

    x = 1
    y = 2

.. code-block:: python

   import os

.. note::

   A note that is kept as prose here.

>>> 1 + 1
2
"""
    text = rst_to_prose(src)
    assert "This is a print call with literal and a link in it. For example:" in text
    assert "x = 1" not in text and "import os" not in text and ">>>" not in text
    assert "A note that is kept as prose here." in text
    assert "=====" not in text


def test_corpus_is_large_and_splits_disjoint(bundled):
    _, tokenizer = bundled
    eval_text, calib_text = load_corpus("eval"), load_corpus("calib")
    total = sum(len(tokenizer(t)["input_ids"]) for t in (eval_text, calib_text))
    assert total >= 300_000
    eval_paras = set(eval_text.split("\n\n"))
    overlap = [p for p in calib_text.split("\n\n") if p in eval_paras and len(p) > 200]
    assert len(overlap) < 10
