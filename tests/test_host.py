"""Host settings: CPU threads follow the CPUs that other work leaves idle."""

import os
import subprocess
import sys
import time

from qoq.host import idle_cpus, set_cpu_threads


def test_a_busy_core_is_not_counted_as_idle():
    allowed = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # running flat out
        assert idle_cpus() <= max(1, allowed - 1)
    finally:
        busy.kill()
        busy.wait()


def test_threads_option_wins_and_is_checked():
    import pytest
    import torch

    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
