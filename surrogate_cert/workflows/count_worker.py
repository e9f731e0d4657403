"""One counting process of the quickstart's offline stage (``workflows.pipeline``): not a public command.

``python -m surrogate_cert.workflows.count_worker SPEC_JSON RESULT_PATH``, started with torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` = 127.0.0.1, ...): joins the process group,
counts its strided share of every job's split with one thread (``data_gen.generate``; rank 0 merges
each file), and writes ``{"seconds": [...], "error": null | {"type", "message", "silent"}}`` to
``RESULT_PATH``, so the parent raises a worker's error with its type.
"""

from __future__ import annotations

import json
import sys
import time


def run(spec: dict) -> list[float]:
    """Every job of ``spec`` in turn, as this process's shard; seconds per job."""
    import torch

    from data_gen.distributed import launch
    from data_gen.generate import generate_counts

    torch.set_num_threads(1)
    seconds = []
    with launch("cpu") as shard:
        for job in spec["jobs"]:
            started = time.perf_counter()
            generate_counts(
                spec["dataset"],
                job["split"],
                spec["base"],
                spec["sigma"],
                job["n"],
                job["out"],
                n0=job["n0"],
                batch_size=spec["batch_size"],
                seed=spec["seed"],
                limit=job["limit"],
                device="cpu",
                data_root=spec["data_root"],
                progress=spec["progress"],
                command=spec["command"],
                noise_scheme=spec.get("noise_scheme"),
                resume=job["resume"],
                shard=shard,
            )
            seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str]) -> int:
    spec, result = json.loads(argv[0]), argv[1]
    report: dict = dict(seconds=[], error=None)
    try:
        report["seconds"] = run(spec)
    except KeyboardInterrupt:
        report["error"] = dict(type="SurrogateCertError", message="interrupted; committed rows are kept", silent=False)
    except Exception as exc:  # noqa: BLE001 - every failure goes to the parent, with its type
        report["error"] = dict(type=type(exc).__name__, message=str(exc), silent=bool(getattr(exc, "silent", False)))
    with open(result, "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    return 0 if report["error"] is None else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
