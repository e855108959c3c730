"""What every benchmark does with its numbers: print them, and optionally save them as a report row."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def report(result: dict[str, Any], script: str, argv: list[str] | None, json_path: Path | None, *, table: str,
           row: str, values: dict[str, Any], note: str) -> None:
    """Print ``result``; with ``json_path``, save it there with one row for `mammo-tf report` (command, hardware, date)."""
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:>{width}}: {v}")
    if json_path is None:
        return
    from mammo_tf import io
    from mammo_tf.config import provenance

    prov = provenance(f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]))
    hw = prov["hardware"]
    result["results"] = [{"table": table, "row": row, "values": values, "note": note, "command": prov["command"],
                          "hardware": f"{hw['cpu']} ({hw['cpu_count']} cores), GPUs: {hw['gpus']}", "date": prov["date"]}]
    io.save_json(json_path, result)
