"""benchmarks/profile_decode.py's exposed-time accounting (the table of a graphed decode step)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_decode.py"


def _module():
    spec = importlib.util.spec_from_file_location("profile_decode", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_exposed_time_counts_overlap_once_and_sums_to_the_busy_time():
    # b starts while a runs (a dependent launch), c after a gap, d inside b's span
    kernels = [("a", 0.0, 10.0), ("b", 5.0, 12.0), ("d", 6.0, 8.0), ("a", 12.0, 20.0), ("c", 25.0, 30.0)]
    table = _module().exposed_times(kernels)
    assert table == {"a": [2, 18.0, 18.0], "b": [1, 7.0, 2.0], "d": [1, 2.0, 0.0], "c": [1, 5.0, 5.0]}
    assert sum(r[2] for r in table.values()) == 25.0  # the 30 us span less the 5 us gap
