"""``python -m otel_dl.collector`` with a probe: the CPU of each of its threads, by name.

``python benchmarks/probes/thread_cpu.py [collector flags]`` (``benchmarks/pipelines.py
--threads`` starts the collector so): once the collector has started, a thread writes the
CPU seconds (user + system, from /proc, so Linux only) of each of the process's threads,
by name, to the JSON file the environment variable ``THREAD_CPU_FILE`` names, every
0.25 s. Numbered threads of a pool count as one; threads Python did not start (gRPC's C
core) count as "C threads". It imports nothing of this repository itself, so the
collector is the one ``PYTHONPATH`` names.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import threading
import time
from pathlib import Path


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, by thread name."""
    names = {t.native_id: re.sub(r"_\d+$", "", t.name) for t in threading.enumerate()}
    seconds: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        name = names.get(int(tid), "C threads")
        seconds[name] = seconds.get(name, 0.0) + used
    return seconds


def _write(path: str) -> None:
    while True:
        Path(path + ".tmp").write_text(json.dumps(thread_cpu()))
        os.replace(path + ".tmp", path)
        time.sleep(0.25)


def main() -> None:
    from otel_dl.collector import pipeline

    start = pipeline.Collector.start

    def start_probed(collector: pipeline.Collector) -> None:
        start(collector)
        path = os.environ["THREAD_CPU_FILE"]
        threading.Thread(target=_write, args=(path,), name="thread-cpu probe", daemon=True).start()

    pipeline.Collector.start = start_probed  # type: ignore[method-assign]
    runpy.run_module("otel_dl.collector", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
