"""`python -m tests.service.servedlog.crashing N export ...`: the exporter, SIGKILLed by itself
right after its N-th file rename, before the XACK: the crash that at-least-once delivery
replays."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from launch import logs
from service.servedlog import exporter

publish = exporter._publish


def main() -> int:
    kill_after = int(sys.argv[1])
    done = [0]

    def publish_then_die(tmp: Path, final: Path) -> None:
        publish(tmp, final)
        done[0] += 1
        if done[0] >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    exporter._publish = publish_then_die
    return logs.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
