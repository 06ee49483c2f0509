"""`ringserve up`: start the local stack, wait until it is ready, optionally send a demo
request, keep the services running until Ctrl-C or SIGTERM, then stop everything in order."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import TextIO, TypeVar

from services.cli.stack import LocalStack, MissingServerError, StackError, exited_cleanly, http_url
from services.cli.terminal import EXIT_ERROR, EXIT_MISSING_SERVER, EXIT_OK, stream_to_terminal, summary_line
from shared.client import RingserveClient, RingserveError
from shared.messages import StatusReply
from shared.settings import Settings

STATE_DIR = ".ringserve"
DEMO_PROMPT = "Hello, ringserve"
DEMO_MAX_NEW_TOKENS = 16
DEFAULT_READY_TIMEOUT_S = 300.0
# How often `up` checks that its children still run.
CHILD_CHECK_INTERVAL_S = 1.0
T = TypeVar("T")


async def _until_stopped(stack: LocalStack, stop: asyncio.Event, err: TextIO) -> None:
    """Until Ctrl-C/SIGTERM, restarting services that die (the others keep serving); raises
    StackError if a server dies."""
    while not stop.is_set():
        for line in stack.supervise():
            print(line, file=err, flush=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=CHILD_CHECK_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def _race(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None when `stop` is set first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def ready_message(status: StatusReply, settings: Settings, log_dir: Path) -> str:
    return "\n".join([
        f"ringserve is up: {len(status.workers)} worker(s), model {status.model}, NATS {settings.nats_url}; "
        f"logs in {log_dir}",
        f'  send a request:   ringserve generate "Hello" --max-new-tokens {DEMO_MAX_NEW_TOKENS}',
        f"  any NATS client:  nats request ringserve.v1.generate "
        f"'{{\"prompt\": \"Hello\", \"max_new_tokens\": {DEMO_MAX_NEW_TOKENS}}}'",
        f"  OpenAI HTTP API:  curl {http_url(settings)}/v1/completions -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{status.model}\", \"prompt\": \"Hello\", \"max_tokens\": {DEMO_MAX_NEW_TOKENS}}}'",
        "  stop:             Ctrl-C",
    ])


def stop_message(exit_codes: dict[str, int]) -> str:
    unclean = [f"{name} ({code})" for name, code in exit_codes.items() if not exited_cleanly(name, code)]
    if unclean:
        return "stopped; exited uncleanly: " + ", ".join(unclean)
    return "stopped; all exited cleanly"


async def cmd_up(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = LocalStack(settings, workers=args.workers, model=args.model, device=args.device,
                       state_dir=Path(args.state_dir))
    try:
        print(f"starting ringserve: {args.workers} worker(s), model {stack.model}, device {stack.device}",
              file=err, flush=True)
        stack.start()
        status = await _race(stack.wait_ready(args.ready_timeout), stop)
        if status is None:
            return EXIT_OK
        print(ready_message(status, settings, stack.log_dir), file=out, flush=True)
        if args.demo_request:
            print(f"demo request: {DEMO_PROMPT!r}", file=out, flush=True)
            client = await RingserveClient.connect(settings)
            try:
                request = {"prompt": DEMO_PROMPT, "max_new_tokens": DEMO_MAX_NEW_TOKENS}
                reply = await _race(stream_to_terminal(client, request, out, err), stop)
            finally:
                await client.close()
            if reply is not None:
                print(summary_line(reply), file=out, flush=True)
        await _until_stopped(stack, stop, err)
        return EXIT_OK
    except MissingServerError as exc:
        print(str(exc), file=err)
        return EXIT_MISSING_SERVER
    except (StackError, RingserveError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    finally:
        print("stopping ringserve", file=err, flush=True)
        print(stop_message(stack.stop()), file=err, flush=True)
