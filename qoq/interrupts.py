"""The `qoq` command's Ctrl-C handler (installed by qoq/__main__.py), and whether it has fired.

A Ctrl-C raises KeyboardInterrupt where it lands, except:
- while the command's modules import (`deferred()`): torch's import runs Python from C++, where a
  KeyboardInterrupt can abort the process (pybind11's error_already_set, status -6); the Ctrl-C is
  only recorded, and the command ends once the imports are done;
- inside an object's finalizer, where Python would print it as "Exception ignored" and carry on
  (the tokenizer's `regex` patterns have such finalizers): it is asked again once the finalizer
  has returned.
A library may also turn the KeyboardInterrupt into another error (transformers' lazy imports
report a module that "could not be imported"), so the command asks `interrupted()` before it
reports an error as such.
"""

from __future__ import annotations

import _thread
import contextlib
import threading

_again: threading.Timer | None = None  # a Ctrl-C that landed in a finalizer, asked again soon
_fired = False
_deferring = False


def handler(signum, frame) -> None:
    global _again, _fired
    _fired = True
    if _deferring:
        return
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            # once the finalizer returns; interrupt_main does nothing once SIGINT is ignored
            _again = threading.Timer(0.05, _thread.interrupt_main)
            _again.daemon = True  # never holds up an exit that comes first
            _again.start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """Ctrl-C inside the block is only recorded (see `interrupted`)."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False


def interrupted() -> bool:
    """Whether a Ctrl-C reached the handler in this process."""
    return _fired


def cancel_retry() -> None:
    if _again is not None:
        _again.cancel()
