"""Merge bench_e2e.py outputs (one process per case, see run_e2e_h100.sh) into one results file.

    python benchmarks/merge_e2e.py OUT.json RUN.json [RUN.json ...]

Each record keeps the name of the run (file stem) it came from; the runs' metadata (commit,
date, command, ceilings measured in that process) go under meta.runs. When OUT.json exists, its
runs that the inputs do not re-measure are kept (a partial re-run replaces only its own cases).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(paths: list[Path], previous: dict | None = None) -> dict:
    runs, records = {}, []
    stems = {path.stem for path in paths}
    if previous is not None:
        runs = {k: v for k, v in previous["meta"]["runs"].items() if k not in stems}
        records = [r for r in previous["records"] if r["run"] not in stems]
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
    previous = json.loads(Path(out).read_text()) if Path(out).exists() else None
    Path(out).write_text(json.dumps(merge([Path(p) for p in inputs], previous), indent=1))


if __name__ == "__main__":
    main()
