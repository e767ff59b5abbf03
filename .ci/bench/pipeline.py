"""The live path's cost per line, in one process: Tailer -> Broadcast -> a client's Feed.

    python3 .ci/bench/pipeline.py                      # microseconds a line, best of 5
    python3 .ci/bench/pipeline.py --instructions       # instructions a line, under valgrind
    python3 .ci/bench/pipeline.py --stream OTHER/claude_stream.py --no-usage

The live1 row's burst (wsbench's 1.1 KB entries, each a new API response, written to
10 files) is read by the module's own Tailer, published by its Broadcast with the
server's usage totals, and offered to one Feed, with no socket and no event loop: what
is left is the server's work per line. On a shared machine whose speed varies by a
quarter within the hour, ``--instructions`` is the figure that holds: valgrind counts
the instructions of a run with the pipeline and of one that only writes the files,
and prints the difference per line (needs valgrind; about a minute for 20,000 lines).
"""
import argparse
import gc
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import wsbench  # noqa: E402

DEFAULT_STREAM = os.path.join(HERE, "..", "..", "claude_stream.py")


def load(path):
    spec = importlib.util.spec_from_file_location("claude_stream_measured", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class Client:
    """What Broadcast offers to: a Feed, and the frames it would send, counted."""
    open = True

    def __init__(self, feed):
        self.feed, self.unsent, self.frames = feed, 0, 0

    def send_frames(self, frames):
        self.frames += len(frames)

    def sync(self):
        pass


def one_run(cs, lines, usage, pipeline=True):
    """Seconds to take ``lines`` new lines through the pipeline (or only to write them)."""
    root = tempfile.mkdtemp(prefix="claude_stream-pipeline-")
    try:
        files = wsbench.make_tree(root, 2, 5, 2)
        clock = [1000.0]
        log = cs.Log()
        tailer = cs.Tailer([root], 0.25, log, clock=lambda: clock[0], wakeups=False)
        tailer.start()
        broadcast = cs.Broadcast(log)
        if usage:
            relay = cs.UsageRelay(cs.EventLoop(), tailer, {}, log, cs.BUILTIN_PRICES, cs.DEFAULT_LIMITS)
            broadcast.parsed = relay.count
        client = Client(cs.Feed(cs.DEFAULT_LIMITS, log))
        per_file = {path: [] for path in files}
        for seq in range(lines):
            per_file[files[seq % len(files)]].append(wsbench.entry_line(seq, "s", "/w"))
        for path, chunk in per_file.items():
            wsbench.append(path, b"".join(chunk))
        gc.collect()
        gc.freeze()                     # as serve does once it is started
        t0 = time.perf_counter()
        while pipeline:
            clock[0] += 100.0           # every file due at once
            events = tailer.poll(clock[0])
            if not events:
                break
            broadcast.publish(events, [client])
        seconds = time.perf_counter() - t0
        tailer.close()
        if pipeline and client.frames != lines:
            raise SystemExit("pipeline: %d of %d lines arrived" % (client.frames, lines))
        return seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def instructions(args):
    """valgrind's instruction count of a run with the pipeline minus one without, per line."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install -y valgrind)")
    counts = []
    for pipeline in (True, False):
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               os.path.realpath(sys.executable), os.path.abspath(__file__), "--stream", args.stream,
               "--lines", str(args.lines), "--runs", "1", "--inner"] + (["--no-usage"] if not args.usage else []) \
            + ([] if pipeline else ["--write-only"])
        env = dict(os.environ, PYTHONHASHSEED="0")
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=1800).stdout
        found = re.search(rb"Collected : (\d+)", out)
        if not found:
            raise SystemExit("valgrind gave no count:\n" + out.decode(errors="replace")[-2000:])
        counts.append(int(found.group(1)))
    return (counts[0] - counts[1]) / args.lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stream", default=DEFAULT_STREAM, help="the claude_stream.py to measure")
    ap.add_argument("--lines", type=int, default=40000, help="lines in the burst (default 40,000)")
    ap.add_argument("--runs", type=int, default=5, help="runs; the best is shown (default 5)")
    ap.add_argument("--no-usage", dest="usage", action="store_false", help="without the usage totals")
    ap.add_argument("--instructions", action="store_true", help="instructions a line, under valgrind")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.stream = os.path.abspath(args.stream)
    if args.instructions:
        if args.lines == 40000:
            args.lines = 20000          # under valgrind: a minute, not two
        per_line = instructions(args)
        print("%s: %.0f instructions a line (%d lines%s)"
              % (args.stream, per_line, args.lines, "" if args.usage else ", no usage totals"))
        return
    cs = load(args.stream)
    best = min(one_run(cs, args.lines, args.usage, not args.write_only) for _ in range(args.runs))
    if not args.inner:
        print("%s: %.2f us a line, best of %d (%d lines%s)"
              % (args.stream, best / args.lines * 1e6, args.runs, args.lines, "" if args.usage else ", no usage totals"))


if __name__ == "__main__":
    main()
