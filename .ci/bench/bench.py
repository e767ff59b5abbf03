#!/usr/bin/env python3
"""claude_stream's performance figures, each against its reference in the same run.

    python3 .ci/bench/bench.py                 # every row, 3 runs (about 135 s on 2 cores)
    python3 .ci/bench/bench.py --quick         # tiny sizes, one run: a smoke test (~13 s)
    python3 .ci/bench/bench.py --only live1,replay --runs 5

Rows (see .ci/bench/README.md):
  live1       live throughput, 1 client, 100k x 1.1 KB entries, vs websocketd + tail -F
  live10      the same with 10 clients and 50k entries (entries/s each)
  replay      `client --json --since all` over a ~419 MB generated tree, MB/s, vs json.loads
              of every line of the same tree in one Python loop; the client starts once
              the server is settled (its start-up pass over the history done), as with
              a server that runs
  replay_fresh  the same, the client started the moment the server says it serves
  replay_rss  the server's peak RSS during that replay (VmRSS every 50 ms from when it has
              started; VmHWM, which includes compiling the module at start-up, is a detail)
  live10_rss  the server's RSS during the 10-client burst (VmRSS every 50 ms once the
              clients are connected; the largest sample), vs websocketd's process tree
  bigline     a replay of a tree with a 12 MB line: the server's peak RSS, every entry there
  page        `test_claude_stream.py page-bench`: the page's figures in headless Chromium

Every run prints one JSON line ("event": "run"); every row one JSON line ("event": "row")
with the median, min and max of claude_stream, the reference and their ratio; then a
markdown table. Standard library only (wsrecv.c is built with cc, as wsbench.py does).
Only 127.0.0.1 is used; every process started is killed, on Ctrl-C too.
"""
import argparse
import json
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import gentree  # noqa: E402
import wsbench  # noqa: E402

ROWS = ["live1", "live10", "replay", "replay_fresh", "replay_rss", "live10_rss", "bigline", "page"]
MEASURES = {"live1": "live1", "live10": "live10", "live10_rss": "live10", "replay": "replay",
            "replay_fresh": "replay", "replay_rss": "replay", "bigline": "bigline", "page": "page"}
ENTRY = b'{"kind":"entry"'
LIVE = b'{"kind":"live"}'
LIVE_OUTPUT_CAP_MB = 8 * 1048576 / 1e6      # the server's per-client budget of unsent frames
PROCS = set()                               # every process started here, for the last kill


# ---------------------------------------------------------------- processes

def spawn(cmd, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    PROCS.add(proc)
    return proc


def kill(proc):
    """The process and its whole group (it was started in a session of its own)."""
    if proc is None:
        return
    # TERM first (a clean stop) if it still runs, then KILL for whatever of its group is left.
    for sig in ((signal.SIGTERM,) if proc.poll() is None else ()) + (signal.SIGKILL,):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    PROCS.discard(proc)


def kill_all():
    for proc in list(PROCS):
        kill(proc)


def status_kb(pid, field):
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler:
    """VmRSS of one process every interval, on a thread."""

    def __init__(self, pid, interval=0.05):
        self.pid, self.interval = pid, interval
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            kb = status_kb(self.pid, "VmRSS")
            if kb is not None:
                self.samples.append(kb / 1024)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.samples


def cpu_s(pid):
    """utime + stime of a live process, in seconds."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def wait_started(proc, logs, timeout=60):
    """Until the server has said it serves (its start-up done: the first scan, freed memory)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        logs.seek(0)
        if b" serving " in logs.read():
            return
        time.sleep(0.01)


def wait_settled(proc, quiet=0.5, timeout=120):
    """Until the server has used no CPU for ``quiet`` seconds: its background work done
    (the usage totals count every file's history after start-up), so that a figure is
    the replay's alone."""
    since = time.monotonic()
    deadline, before = since + timeout, cpu_s(proc.pid)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        now = cpu_s(proc.pid)
        if now != before:
            before, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break


def wait_listening(proc, port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited with status %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("the server did not listen within %d s" % timeout)


# ---------------------------------------------------------------- live rows (wsbench)

def live_run(args, clients, entries, which):
    ns = argparse.Namespace(path="/", clients=clients, entries_burst=entries, burst_timeout=120.0)
    if which == "claude_stream":
        tpl = "%s %s serve --root {root} --port {port} --no-auth" % (shlex.quote(args.python),
                                                                     shlex.quote(args.stream))
    else:
        tpl = "sh %s {root} {port}" % shlex.quote(os.path.join(HERE, "peers", "websocketd-tail.sh"))
    return wsbench.scenario_throughput(tpl, ns)


def measure_live(args, name, clients, entries, run):
    have_ref = shutil.which("websocketd") is not None
    order = ["claude_stream", "websocketd"] if run % 2 == 0 else ["websocketd", "claude_stream"]
    out = {}
    for which in order:
        if which == "websocketd" and not have_ref:
            out[which] = {"error": "reference missing: websocketd (apt-get install -y websocketd)"}
            continue
        try:
            out[which] = live_run(args, clients, entries, which)
        except Exception as exc:  # noqa: BLE001
            out[which] = {"error": "%s: %s" % (type(exc).__name__, str(exc)[:300])}
    return {"claude_stream": out["claude_stream"], "reference": out["websocketd"]}


# ---------------------------------------------------------------- replay rows

REFERENCE_LOOP = r'''
import json, os, sys, time
t0 = time.perf_counter()
n = 0
for folder, _, names in os.walk(sys.argv[1]):
    for name in names:
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name), "rb") as fh:
                data = fh.read()
            for line in data.split(b"\n"):
                if line.strip():
                    json.loads(line)
                    n += 1
print(json.dumps({"seconds": time.perf_counter() - t0, "entries": n}))
'''


def replay_reference(args, tree, stats):
    proc = spawn([args.python, "-c", REFERENCE_LOOP, tree], stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        kill(proc)
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["mb_per_s"] = stats["bytes"] / 1e6 / res["seconds"]
    return res


def replay_stream(args, tree, stats, quiet=60.0, settle=True):
    """serve + client --json --since all: until the client has written every entry.

    With ``settle``, the client starts once the server has done its start-up work (its
    pass over every file's history, for the usage totals, that checks each line once),
    as a running server has; without, the moment it says it serves."""
    port = wsbench.free_port()
    logs = tempfile.TemporaryFile()
    server = client = None
    try:
        server = spawn([args.python, args.stream, "serve", "--root", tree, "--port", str(port), "--no-auth"],
                       stdout=logs, stderr=logs)
        wait_listening(server, port)
        wait_started(server, logs)
        if settle:
            wait_settled(server)
        idle_kb = status_kb(server.pid, "VmRSS")
        sampler = RssSampler(server.pid)
        cpu0 = cpu_s(server.pid)
        t0 = time.monotonic()
        client = spawn([args.python, args.stream, "client", "ws://127.0.0.1:%d/" % port, "--json",
                        "--since", "all", "--no-reconnect"], stdout=subprocess.PIPE, stderr=logs, bufsize=0)
        fd = client.stdout.fileno()
        count, tail, first, live_at, done_at, nbytes = 0, b"", None, None, None, 0
        last = time.monotonic()
        keep = max(len(ENTRY), len(LIVE)) - 1
        # This reader shares the 2 cores with the server and the client, so it reads
        # into one buffer and counts there. A new 1 MB bytes per read, copied again to
        # join the previous tail, cost 0.37 to 0.96 s of CPU over the 452 MB of a
        # replay (system time faulting in fresh buffers), against 0.24 to 0.26 s now.
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            now = time.monotonic()
            if not ready:
                if now - last > quiet:
                    break
                continue
            got = os.readv(fd, [buf])
            if not got:
                break
            last = now
            nbytes += got
            seam = tail + bytes(view[:min(keep, got)])     # a message cut between two reads
            found = buf.count(ENTRY, 0, got) + seam.count(ENTRY)
            if found:
                count += found
                if first is None:
                    first = now - t0
            if live_at is None and (buf.find(LIVE, 0, got) >= 0 or LIVE in seam):
                live_at = now - t0
            tail = seam[-keep:] if got < keep else bytes(view[got - keep:got])
            if count >= stats["lines"]:
                done_at = now - t0
                break
            if live_at is not None:
                break
        hwm_kb = status_kb(server.pid, "VmHWM")
        server_cpu, client_cpu = cpu_s(server.pid), cpu_s(client.pid)
        samples = sampler.stop()
        seconds = done_at if done_at is not None else (live_at or (time.monotonic() - t0))
        return {"entries": count, "expected": stats["lines"], "complete": count >= stats["lines"],
                "seconds": seconds, "first_entry_s": first, "live_s": live_at, "client_bytes": nbytes,
                "mb_per_s": stats["bytes"] / 1e6 / seconds if count >= stats["lines"] else None,
                "server_vmhwm_mb": hwm_kb / 1024 if hwm_kb else None,
                "server_rss_max_mb": max(samples) if samples else None,
                "server_idle_rss_mb": idle_kb / 1024 if idle_kb else None,
                "server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
                "server_replay_cpu_s": server_cpu - cpu0 if server_cpu is not None and cpu0 is not None else None,
                "server_exit": server.poll()}
    finally:
        kill(client)
        kill(server)
        logs.close()


def warm(tree):
    """Read the tree once, so that the page cache holds it for every contestant."""
    for folder, _, names in os.walk(tree):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def replay_tree(args):
    if args.replay_from:
        tree = os.path.abspath(args.replay_from)
        return tree, gentree.tree_stats(tree)
    tree, stats = gentree.tree(args.replay_mb, say=say)
    gentree.touch(tree, time.time() - 3600)     # --since all covers them; also in the last day
    return tree, stats


def measure_replay(args, run, ctx):
    if "replay" not in ctx:
        ctx["replay"] = replay_tree(args)
        warm(ctx["replay"][0])
    tree, stats = ctx["replay"]
    order = [0, 1, 2] if run % 2 == 0 else [2, 1, 0]
    out = {}
    for i in order:
        try:
            out[i] = replay_stream(args, tree, stats, settle=i == 0) if i != 1 else \
                replay_reference(args, tree, stats)
        except Exception as exc:  # noqa: BLE001
            out[i] = {"error": "%s: %s" % (type(exc).__name__, str(exc)[:300])}
    return {"claude_stream": out[0], "reference": out[1], "fresh": out[2], "tree": stats}


def measure_bigline(args, run, ctx):
    if "bigline" not in ctx:
        mb = 1 if args.quick else 8
        big = args.bigline_mb
        ctx["bigline"] = (gentree.tree(mb, seed=2, big_line_mb=big, say=say),
                          gentree.tree(mb, seed=2, say=say))
        for tree, _ in ctx["bigline"]:
            gentree.touch(tree, time.time() - 3600)
            warm(tree)
    (tree, stats), (base_tree, base_stats) = ctx["bigline"]
    out = {}
    for key, (t, s) in (("claude_stream", (tree, stats)), ("reference", (base_tree, base_stats))):
        try:
            out[key] = replay_stream(args, t, s)
        except Exception as exc:  # noqa: BLE001
            out[key] = {"error": "%s: %s" % (type(exc).__name__, str(exc)[:300])}
    out["tree"] = stats
    return out


# ---------------------------------------------------------------- page row

def measure_page(args, run, ctx):
    test = os.path.join(os.path.dirname(os.path.abspath(args.stream)), "test_claude_stream.py")
    if not os.path.exists(test):
        return {"claude_stream": {"error": "no test_claude_stream.py beside %s" % args.stream}}
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return {"claude_stream": {"error": "chromium missing (apt-get install -y chromium)"}}
    cmd = [args.python, test, "page-bench"] + (["1000"] if args.quick else [])
    proc = spawn(cmd, cwd=os.path.dirname(test), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        return {"claude_stream": {"error": "page-bench took over 900 s"}}
    finally:
        kill(proc)
    try:
        return {"claude_stream": json.loads(out.decode())}
    except ValueError:
        return {"claude_stream": {"error": "page-bench: status %s: %s" % (proc.returncode, err.decode()[-400:])}}


# ---------------------------------------------------------------- rows

def fig(d, key):
    if not isinstance(d, dict) or d.get("error"):
        return None
    return d.get(key)


def live_complete(d):
    return isinstance(d, dict) and not d.get("error") and d.get("complete")


def row_values(row, runs, args):
    """Per run: (claude_stream, reference, ratio) and the row's notes."""
    vals = []
    for r in runs:
        cs, ref = r.get("claude_stream"), r.get("reference")
        if row in ("live1", "live10"):
            a = fig(cs, "entries_per_s") if live_complete(cs) else None
            b = fig(ref, "entries_per_s") if live_complete(ref) else None
        elif row == "live10_rss":
            a, b = fig(cs, "rss_steady_mb"), fig(ref, "rss_steady_mb")
        elif row == "replay":
            a, b = fig(cs, "mb_per_s"), fig(ref, "mb_per_s")
        elif row == "replay_fresh":
            a, b = fig(r.get("fresh"), "mb_per_s"), fig(ref, "mb_per_s")
        elif row == "replay_rss":
            a, b = fig(cs, "server_rss_max_mb"), None
        elif row == "bigline":
            a = fig(cs, "server_vmhwm_mb") if fig(cs, "complete") else None
            b = fig(ref, "server_vmhwm_mb")
        elif row == "page":
            a, b = fig(cs, "load_ms"), None
        ratio = a / b if a is not None and b else None
        vals.append((a, b, ratio))
    return vals


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def extras(row, runs, args):
    """A row's other figures, as medians over the runs."""
    def med(side, key):
        return spread([fig(r.get(side), key) for r in runs])
    if row in ("live1", "live10"):
        return {"complete_runs": sum(1 for r in runs if live_complete(r.get("claude_stream"))),
                "reference_complete_runs": sum(1 for r in runs if live_complete(r.get("reference"))),
                "server_cpu_s": med("claude_stream", "server_cpu_s"),
                "reference_cpu_s": med("reference", "server_cpu_s"),
                "receiver": fig(runs[0].get("claude_stream"), "receiver")}
    if row == "live10_rss":
        return {"claude_stream_vmhwm_mb": med("claude_stream", "rss_peak_mb"),
                "reference_vmhwm_mb": med("reference", "rss_peak_mb")}
    if row in ("replay", "replay_fresh"):
        side = "claude_stream" if row == "replay" else "fresh"
        return {"seconds": med(side, "seconds"), "first_entry_s": med(side, "first_entry_s"),
                "server_replay_cpu_s": med(side, "server_replay_cpu_s"), "client_cpu_s": med(side, "client_cpu_s"),
                "live_s": med(side, "live_s"), "reference_seconds": med("reference", "seconds"),
                "complete_runs": sum(1 for r in runs if fig(r.get(side), "complete")),
                "tree": runs[0].get("tree")}
    if row == "replay_rss":
        return {"server_vmhwm_mb": med("claude_stream", "server_vmhwm_mb"),
                "server_idle_rss_mb": med("claude_stream", "server_idle_rss_mb")}
    if row == "bigline":
        line_mb = (runs[0].get("tree") or {}).get("longest_line", 0) / 1e6
        return {"complete_runs": sum(1 for r in runs if fig(r.get("claude_stream"), "complete")),
                "entries": fig(runs[0].get("claude_stream"), "entries"),
                "expected": fig(runs[0].get("claude_stream"), "expected"),
                "line_mb": round(line_mb, 1), "seconds": med("claude_stream", "seconds")}
    if row == "page":
        keys = ["load_ms", "load_busy_ms", "history_ms", "select_ms", "live_frame_p95_ms", "live_blocked_p95_ms",
                "live_long_tasks", "dom_nodes", "heap_mb", "search_ms", "reconnections", "entries", "megabytes"]
        out = {k: med("claude_stream", k) for k in keys}
        out["live_during_history"] = [fig(r.get("claude_stream"), "live_during_history") for r in runs]
        errors = [r["claude_stream"]["error"] for r in runs
                  if isinstance(r.get("claude_stream"), dict) and r["claude_stream"].get("error")]
        if errors:
            out["error"] = errors[0]
        return out
    return {}


def goal(row, cs, ref, ratio, ex, runs):
    """(the goal as words, whether the median meets it)."""
    if row == "live1":
        return "ratio ≥ 1.0", ratio is not None and ratio["median"] >= 1.0
    if row == "live10":
        return "ratio ≥ 2.0", ratio is not None and ratio["median"] >= 2.0
    if row == "replay":
        return "ratio ≥ 0.7", ratio is not None and ratio["median"] >= 0.7
    if row == "replay_fresh":           # the same goal, shown for a server that has just started
        return "(shown: ratio ≥ 0.7)", ratio is not None and ratio["median"] >= 0.7
    if row == "replay_rss":
        return "≤ 40 MB", cs is not None and cs["median"] <= 40
    if row == "live10_rss":
        return "≤ 25 MB", cs is not None and cs["median"] <= 25
    if row == "page":                   # the viewer issue's goal: the end of a long session at once
        return "< 2,000 ms", cs is not None and cs["median"] < 2000
    if row == "bigline":
        if cs is None or ref is None:
            return "every entry; peak ≤ baseline + 8 MiB + 3 × line", False
        bound = ref["median"] + LIVE_OUTPUT_CAP_MB + 3 * ex["line_mb"]
        ex["bound_mb"] = round(bound, 1)
        return ("every entry; peak ≤ baseline + 8 MiB + 3 × line = %.0f MB" % bound,
                ex["complete_runs"] == len(runs) and cs["max"] <= bound)
    return "", None


UNITS = {"live1": ("entries/s", "entries/s"), "live10": ("entries/s each", "entries/s each"),
         "replay": ("MB/s", "MB/s"), "replay_fresh": ("MB/s", "MB/s"), "replay_rss": ("MB peak RSS", ""), "live10_rss": ("MB steady RSS", "MB"),
         "bigline": ("MB VmHWM", "MB (baseline: same tree without the line)"), "page": ("ms to last screen", "")}
REFS = {"live1": "websocketd + tail -F", "live10": "websocketd + tail -F",
        "replay": "json.loads loop, same tree", "replay_fresh": "json.loads loop, same tree", "replay_rss": "", "live10_rss": "websocketd (process tree)",
        "bigline": "same tree without the long line", "page": ""}


def fmt(v, unit=""):
    if v is None:
        return "–"
    if "entries" in unit:
        return "{:,.0f}".format(v)
    if unit == "ratio":
        return "%.2f" % v
    if float(v).is_integer() or abs(v) >= 1000:
        return "{:,.0f}".format(v)
    return "%.1f" % v


def fmt_spread(s, unit):
    if s is None:
        return "–"
    if s["n"] == 1:
        return fmt(s["median"], unit)
    return "%s (%s–%s)" % (fmt(s["median"], unit), fmt(s["min"], unit), fmt(s["max"], unit))


# ---------------------------------------------------------------- main

def say(text):
    print("# " + text, flush=True)


def machine(args):
    model = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = status = None
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) // 1024
    except OSError:
        pass
    pyver = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(args.stream)), "log", "-1",
                             "--format=%h %cI", "--", os.path.basename(args.stream)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    status = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(args.stream)), "status", "--porcelain",
                             "--", os.path.basename(args.stream)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    wsd = shutil.which("websocketd")
    return {"event": "machine", "nproc": os.cpu_count(), "cpu": model, "mem_mb": mem,
            "python": pyver, "python_path": args.python, "kernel": platform.release(),
            "stream": args.stream, "stream_commit": commit + (" (modified)" if status else ""),
            "websocketd": wsd or "missing", "loadavg_at_start": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=None, help="runs of every row (default 3; 1 with --quick)")
    ap.add_argument("--only", default="", help="rows, comma-separated: " + ",".join(ROWS))
    ap.add_argument("--python", default=sys.executable, help="the interpreter for claude_stream and the reference "
                    "loop (default: this one)")
    ap.add_argument("--stream", default=os.path.join(REPO, "claude_stream.py"), help="the claude_stream.py to "
                    "measure (default: the repository's)")
    ap.add_argument("--replay-mb", type=float, default=None, help="size of the generated replay tree (default 419)")
    ap.add_argument("--replay-from", metavar="DIR", help="replay this projects folder instead of a generated one "
                    "(its mtimes are left alone)")
    ap.add_argument("--bigline-mb", type=float, default=None, help="the long line's size (default 12)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke run in under a minute")
    ap.add_argument("--log", help="also append every JSON line to this file")
    args = ap.parse_args(argv)
    args.stream = os.path.abspath(args.stream)
    args.python = shutil.which(args.python) or args.python
    runs = args.runs or (1 if args.quick else 3)
    if args.replay_mb is None:
        args.replay_mb = 4 if args.quick else 419
    if args.bigline_mb is None:
        args.bigline_mb = 2 if args.quick else 12
    live1 = (5000, 1) if args.quick else (100000, 1)
    live10 = (2000, 10) if args.quick else (50000, 10)
    rows = [r.strip() for r in args.only.split(",") if r.strip()] or ROWS
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error("unknown rows %s: choose from %s" % (",".join(bad), ",".join(ROWS)))
    logfile = open(args.log, "a") if args.log else None
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Everything temporary (wsbench's trees, websocketd-tail.sh's file lists) in one folder,
    # removed at the end.
    scratch = tempfile.mkdtemp(prefix="claude_stream-bench-")
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None
    try:
        return run_rows(args, ap, runs, live1, live10, rows, logfile)
    finally:
        kill_all()
        shutil.rmtree(scratch, ignore_errors=True)


def run_rows(args, ap, runs, live1, live10, rows, logfile):
    def emit(obj):
        line = json.dumps(obj, default=str)
        print(line, flush=True)
        if logfile:
            logfile.write(line + "\n")
            logfile.flush()

    info = machine(args)
    say("machine: %d cores, %s, %s MB, Python %s (%s), kernel %s, load %s"
        % (info["nproc"], info["cpu"], info["mem_mb"], info["python"], args.python, info["kernel"],
           " ".join("%.2f" % x for x in info["loadavg_at_start"])))
    say("measuring %s (%s), %d run(s) of: %s" % (args.stream, info["stream_commit"] or "no git", runs,
                                                  ", ".join(rows)))
    emit(info)
    measures = []
    for r in rows:
        if MEASURES[r] not in measures:
            measures.append(MEASURES[r])
    results, took, ctx = {}, {}, {}
    started = time.monotonic()
    interrupted = False
    try:
        for m in measures:
            t0 = time.monotonic()
            results[m] = []
            for run in range(runs):
                if m == "live1":
                    res = measure_live(args, m, live1[1], live1[0], run)
                elif m == "live10":
                    res = measure_live(args, m, live10[1], live10[0], run)
                elif m == "replay":
                    res = measure_replay(args, run, ctx)
                elif m == "bigline":
                    res = measure_bigline(args, run, ctx)
                else:
                    res = measure_page(args, run, ctx)
                results[m].append(res)
                emit(dict({"event": "run", "measure": m, "run": run + 1}, **res))
            took[m] = time.monotonic() - t0
            say("%s: %d run(s) in %.0f s" % (m, runs, took[m]))
    except KeyboardInterrupt:
        say("interrupted: the rows measured so far")
        interrupted = True
    finally:
        kill_all()
    table = []
    for row in rows:
        runs_ = results.get(MEASURES[row])
        if not runs_:
            continue
        vals = row_values(row, runs_, args)
        cs, ref, ratio = (spread([v[i] for v in vals]) for i in range(3))
        ex = extras(row, runs_, args)
        words, met = goal(row, cs, ref, ratio, ex, runs_)
        errors = sorted({str(r.get(side, {}).get("error")) for r in runs_ for side in ("claude_stream", "reference")
                         if isinstance(r.get(side), dict) and r[side].get("error")})
        if row in ("replay_rss", "page"):
            errors = [e for e in errors if "reference" not in e]
        obj = {"event": "row", "row": row, "unit": UNITS[row][0], "claude_stream": cs,
               "reference_name": REFS[row], "reference": ref, "ratio": ratio, "goal": words, "met": met,
               "seconds": round(took.get(MEASURES[row], 0), 1), "details": ex}
        if errors:
            obj["errors"] = errors
        emit(obj)
        table.append(obj)
    print()
    say("%d row(s) in %.0f s" % (len(table), time.monotonic() - started))
    print("| row | claude_stream | reference | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for t in table:
        unit = t["unit"]
        ref_text = "–"
        if t["reference_name"]:
            ref_text = t["reference_name"] + ": " + fmt_spread(t["reference"], unit) \
                if t["reference"] else t["reference_name"] + ": " + (
                    "reference missing" if any("reference missing" in e for e in t.get("errors", [])) else "–")
        extra = ""
        d = t["details"]
        if t["row"] in ("replay", "replay_fresh"):
            extra = "; first entry %s s, all in %s s (CPU: server %s s, client %s s)" % (
                fmt_spread(d["first_entry_s"], "ratio"), fmt_spread(d["seconds"], ""),
                fmt_spread(d["server_replay_cpu_s"], ""), fmt_spread(d["client_cpu_s"], ""))
        elif t["row"] in ("live1", "live10") and d.get("server_cpu_s"):
            # The CPU each side took for the same burst: on a machine whose speed
            # changes within minutes, this says how fast the machine was in each run.
            extra = "; server CPU %s s" % fmt_spread(d["server_cpu_s"], "ratio")
            if d.get("reference_cpu_s"):
                ref_text += "; CPU %s s" % fmt_spread(d["reference_cpu_s"], "ratio")
        elif t["row"] == "live10_rss":
            extra = "; VmHWM %s" % fmt_spread(d["claude_stream_vmhwm_mb"], "")
            if d.get("reference_vmhwm_mb"):
                ref_text += "; VmHWM %s" % fmt_spread(d["reference_vmhwm_mb"], "")
        elif t["row"] == "bigline":
            extra = "; %s of %s entries, line %.1f MB" % (d["entries"], d["expected"], d["line_mb"])
        elif t["row"] == "page":
            extra = "; history %s ms, click %s ms, frame p95 %s ms, heap %s MB, reconnections %s" % (
                fmt_spread(d["history_ms"], ""), fmt_spread(d["select_ms"], ""),
                fmt_spread(d["live_frame_p95_ms"], ""), fmt_spread(d["heap_mb"], ""),
                fmt_spread(d["reconnections"], ""))
            if d.get("error"):
                extra += "; " + d["error"][:200]
        met = {True: "yes", False: "**no**", None: ""}[t["met"]]
        print("| %s | %s %s%s | %s | %s | %s | %s |" % (
            t["row"], fmt_spread(t["claude_stream"], unit), unit, extra, ref_text,
            fmt_spread(t["ratio"], "ratio"), t["goal"], met))
    if logfile:
        logfile.close()
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        kill_all()
