"""A sampling profiler for every Python process of a bench run, with nothing to install.

Put this folder on PYTHONPATH and set STACK_SAMPLES_DIR: each Python process that starts then
samples all its threads' stacks every STACK_SAMPLES_INTERVAL_S (default 5 ms) and rewrites
`<dir>/<pid>.txt` every few seconds with its collapsed stacks, most frequent first (one line per
thread and stack: `count thread;outer;...;inner`, flamegraph.pl's input). The sampler takes the
GIL to sample, so a thread holding the GIL through a long C call is seen once it lets go: the
counts say where threads wait and run Python, not exact CPU time.

    PYTHONPATH=bench/stack_sampler STACK_SAMPLES_DIR=/tmp/stacks python3 bench/serve.py ...
"""

import collections
import os
import sys
import threading
import time
import traceback

DEPTH = 14  # innermost frames kept per stack
FLUSH_EVERY_S = 5.0


def _start(out_dir: str, interval: float) -> None:
    counts: collections.Counter = collections.Counter()
    path = os.path.join(out_dir, f"{os.getpid()}.txt")
    me = threading.get_ident()

    def flush() -> None:
        with open(path + ".tmp", "w") as f:
            f.write(f"# argv: {' '.join(sys.argv)}\n")
            for stack, n in counts.most_common():
                f.write(f"{n} {stack}\n")
        os.replace(path + ".tmp", path)

    def loop() -> None:
        last_flush = time.monotonic()
        while True:
            time.sleep(interval)
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                frames = traceback.extract_stack(frame)[-DEPTH:]
                stack = ";".join(f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}" for f in frames)
                counts[f"{names.get(ident, ident)};{stack}"] += 1
            if time.monotonic() - last_flush > FLUSH_EVERY_S:
                flush()
                last_flush = time.monotonic()

    thread = threading.Thread(target=loop, name="stack-sampler", daemon=True)
    thread.start()
    me = thread.ident


_dir = os.environ.get("STACK_SAMPLES_DIR")
if _dir:
    os.makedirs(_dir, exist_ok=True)
    _start(_dir, float(os.environ.get("STACK_SAMPLES_INTERVAL_S", "0.005")))
