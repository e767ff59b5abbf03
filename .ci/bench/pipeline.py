"""The live path's cost per line, in one process: Tailer -> Broadcast -> a client's Feed;
and, with --replay, what a replay's time is made of, each part against the reference.

    python3 .ci/bench/pipeline.py                      # microseconds a line, best of 5
    python3 .ci/bench/pipeline.py --instructions       # instructions a line, under valgrind
    python3 .ci/bench/pipeline.py --stream OTHER/claude_stream.py --no-usage
    python3 .ci/bench/pipeline.py --replay             # the replay row's parts (419 MB tree)

The live1 row's burst (wsbench's 1.1 KB entries, each a new API response, written to
10 files) is read by the module's own Tailer, published by its Broadcast with the
server's usage totals, and offered to one Feed, with no socket and no event loop: what
is left is the server's work per line. On a shared machine whose speed varies by a
quarter within the hour, ``--instructions`` is the figure that holds: valgrind counts
the instructions of a run with the pipeline and of one that only writes the files,
and prints the difference per line (needs valgrind; about a minute for 20,000 lines).

--replay takes the replay row's tree (generated and cached as bench.py does, or
--replay-from DIR) through, in turn: the row's reference (json.loads of every line in
one loop); the same loop with the module's decode_line, the check every line gets
(strict UTF-8, the decoder, the depth limit): what validating alone costs; the server's
history path in one process (Tailer, a Feed subscribed with since=all, its steps) with
no socket; the same sending every frame over loopback TCP to a process that reads
and drops them (the server's CPU, user and system); and a client process's start-up
(``client --help``: Python compiling the module). Each part is timed right after a
run of the reference, --runs times; shown are the median seconds and the median of
the reference's time divided by the part's: the last line is what the replay's
ratio could be at most, were the rest free.
"""
import argparse
import json
import resource
import socket
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


def tree_files(tree):
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(tree)
                  for name in names if name.endswith(".jsonl"))


def loop_seconds(files, decode):
    """The reference loop (bench.REFERENCE_LOOP) with ``decode`` for json.loads."""
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read()
        for line in data.split(b"\n"):
            if line.strip():
                try:
                    decode(line)
                except ValueError:
                    pass            # (the module's MalformedLine is one)
    return time.perf_counter() - t0


def history_cpu(cs, tree, send):
    """The server's history path over ``tree``: (its CPU seconds, frames)."""
    log = cs.Log()
    tailer = cs.Tailer([tree], 0.25, log, wakeups=False)
    tailer.start()
    sock = child = None
    if send:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        child = os.fork()
        if child == 0:                          # the reader: as fast as the kernel gives
            try:
                peer = socket.create_connection(listener.getsockname())
                while peer.recv(1 << 20):
                    pass
            finally:
                os._exit(0)
        sock, _ = listener.accept()
        listener.close()
    feed = cs.Feed(cs.DEFAULT_LIMITS, log)
    feed.subscribe(cs.Subscription.from_query("since=all", time.time()), list(tailer.files.values()), False)
    gc.collect()
    gc.freeze()
    frames = 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    while feed.phase is cs.Phase.CATCHING_UP:
        out, _ = feed.step(cs.DEFAULT_LIMITS.catchup_tick_budget, 0)
        frames += len(out)
        for i in range(0, len(out), cs.DEFAULT_LIMITS.send_gather_max) if sock else ():
            batch = out[i:i + cs.DEFAULT_LIMITS.send_gather_max]
            sent = sock.sendmsg(batch)          # a blocking socket: all of it, as a rule
            if sent < sum(map(len, batch)):
                sock.sendall(b"".join(batch)[sent:])
    after = resource.getrusage(resource.RUSAGE_SELF)
    if sock:
        sock.close()
        os.waitpid(child, 0)
    tailer.close()
    gc.unfreeze()
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, frames


def replay_parts(args):
    import gentree
    if args.replay_from:
        tree = os.path.abspath(args.replay_from)
    else:
        tree, _ = gentree.tree(args.replay_mb, say=lambda text: print(text, file=sys.stderr))
    files = tree_files(tree)
    cs = load(args.stream)

    def start():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, args.stream, "client", "--help"], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0
    frames = []

    def history(send):
        cpu, count = history_cpu(cs, tree, send)
        frames.append(count)
        return cpu
    parts = [("the same loop with decode_line (every line checked as served)", lambda: loop_seconds(files, cs.decode_line)),
             ("the server's history path, no socket: its CPU", lambda: history(False)),
             ("the same sending every frame over loopback TCP: its CPU", lambda: history(True)),
             ("a client's start-up (client --help)", start)]
    # The machine's speed changes within minutes: each part is timed right after a run
    # of the reference, and what is shown is the median of those pairs' ratios.
    seconds = {name: [] for name, _ in parts}
    ratios = {name: [] for name, _ in parts}
    references, floors = [], []
    for _ in range(args.runs):
        for name, measure in parts:
            reference = loop_seconds(files, json.loads)
            took = max(measure(), 1e-6)     # (a tiny tree's CPU time can round to nothing)
            references.append(reference)
            seconds[name].append(took)
            ratios[name].append(reference / took)
        sent, started = ratios[parts[2][0]][-1], ratios[parts[3][0]][-1]
        floors.append(1 / (1 / sent + 1 / started))

    def spread(values, digits):
        values = sorted(values)
        return "%.*f (%.*f-%.*f)" % (digits, values[len(values) // 2], digits, values[0], digits, values[-1])
    print("%s over %s (%d files, %d frames), %d runs; the median (min-max):"
          % (args.stream, tree, len(files), frames[0], args.runs))
    print("  %-66s %s s" % ("reference: json.loads of every line, one loop", spread(references, 2)))
    for name, _ in parts:
        print("  %-66s %s s  reference/this %s" % (name, spread(seconds[name], 2), spread(ratios[name], 2)))
    print("  %-66s %s" % ("so at most (the history sent, and a client started): reference/this",
                          spread(floors, 2)))


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
    ap.add_argument("--replay", action="store_true", help="the replay row's parts, each against the reference")
    ap.add_argument("--replay-mb", type=float, default=419, help="with --replay: the generated tree's size (419)")
    ap.add_argument("--replay-from", metavar="DIR", help="with --replay: this projects folder instead")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.stream = os.path.abspath(args.stream)
    if args.replay:
        replay_parts(args)
        return
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
