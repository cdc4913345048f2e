"""Merge bench_e2e.py outputs (one process per case, see run_e2e_h100.sh) into one results file.

    python benchmarks/merge_e2e.py OUT.json RUN.json [RUN.json ...]

Each record keeps the name of the run (file stem) it came from; the runs' metadata (commit,
date, command, ceilings measured in that process) go under meta.runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(paths: list[Path]) -> dict:
    runs, records = {}, []
    for path in sorted(paths):
        report = json.loads(path.read_text())
        runs[path.stem] = report["meta"]
        for record in report["records"]:
            records.append({"config": report["meta"]["config"], **record, "run": path.stem})
    devices = {m["device"] for m in runs.values()}
    return {"meta": {"device": " / ".join(sorted(devices)), "runs": runs}, "records": records}


def main() -> None:
    out, *inputs = sys.argv[1:]
    if not inputs:
        raise SystemExit(__doc__)
    Path(out).write_text(json.dumps(merge([Path(p) for p in inputs]), indent=1))


if __name__ == "__main__":
    main()
