"""`python -m qoq` and the `qoq` command.

Ctrl-C ends the command with exit status 130 and one line, wherever it lands: while the modules
(torch, the engine) are still importing (once they are done), inside an object's finalizer, or
where a library turns it into an error of its own (the handler: qoq/interrupts.py).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading

from qoq import interrupts


def _done(code: int) -> int:
    """An interrupted command's 130 is final. A later Ctrl-C (or one asked again) is ignored, and
    the process ends here: CPython marks a KeyboardInterrupt that passed through code an extension
    ran (PyRun_*, as torch's import does) as unhandled even when it was caught, and would end the
    process by SIGINT (status -2) at shutdown. Exit handlers still run; finalizers do not."""
    if code != 130 or threading.current_thread() is not threading.main_thread():
        return code
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interrupts.cancel_retry()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    if in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupts.handler)
    try:
        with interrupts.deferred():
            from qoq.cli import main as run
    except KeyboardInterrupt:  # a Ctrl-C that came before the handler went in
        print("qoq: interrupted", file=sys.stderr)
        return _done(130)
    if interrupts.interrupted():
        print("qoq: interrupted", file=sys.stderr)
        return _done(130)
    return _done(run(argv))


if __name__ == "__main__":
    sys.exit(main())
