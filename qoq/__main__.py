"""`python -m qoq` and the `qoq` command.

Ctrl-C ends the command with exit status 130 and one line, wherever it lands: while the modules
(torch, the engine) are still importing, or inside an object's finalizer, where Python would
print the KeyboardInterrupt as "Exception ignored" and carry on as if no key had been pressed
(the tokenizer's `regex` patterns have such finalizers).
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def _interrupt(signum, frame) -> None:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))  # once it returns
            again.daemon = True  # never holds up an exit that comes first
            again.start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    if in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        from qoq.cli import main as run
    except KeyboardInterrupt:
        print("qoq: interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
