"""Generated trees of Claude Code transcripts for bench.py's replay rows.

Deterministic (seeded), realistic in shape: sessions under project folders, some
sub-agent files, a mix of user prompts, assistant text / thinking / tool_use,
tool_result entries with large outputs (newlines, quotes, backslashes, tabs,
non-ASCII and emoji: every kind of JSON escape), summary, file-history-snapshot,
system, attachment, progress, last-prompt and permission-mode lines. File sizes
and tool outputs are heavy-tailed. The defaults give ~419 MB over ~837 files and
~127,000 lines (3.3 KB a line on average), like a heavy user's ~/.claude/projects.

Trees are cached under ~/.cache/claude_stream-bench/ by their parameters.
"""
import base64
import hashlib
import json
import math
import os
import random
import shutil
import time

GENERATOR_VERSION = 1
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "claude_stream-bench")

# The default tree's shape, scaled with its size.
REF_MB, REF_FILES, REF_LINES = 419, 837, 127000

WORDS = ("the a of to and in is it that for on with as this be are file line test value "
         "function return import class self data path error config server client stream "
         "entry session project tool result output input user assistant message content "
         "token cache buffer socket frame offset cursor replay history live budget memory "
         "parse decode encode json bytes string list dict index range count total").split()
NON_ASCII = ["café", "naïve", "Zürich", "–", "—", "“quoted”", "‘single’", "…", "日本語のテキスト",
             "テスト", "中文字符", "Привет", "αβγδ", "∑∫√∞", "€100", "ñandú", "🚀", "✅", "🔥",
             "👍🏽", "🎉", "❌", "⚠️", "😀", "🧪", "→", "✓"]
TOOLS = ["Bash", "Read", "Edit", "Grep", "Glob", "Write", "Task", "TodoWrite", "WebFetch"]
MODELS = ["claude-sonnet-4-5-20250929", "claude-opus-4-1-20250805", "claude-haiku-4-5-20251001"]


def _pool(rng):
    """Lines of code, logs and prose to assemble texts from (with every JSON escape)."""
    pool = []
    for i in range(4000):
        w = rng.choices(WORDS, k=rng.randint(2, 14))
        kind = i % 10
        if kind == 0:
            line = '    if (%s["%s"] == "%s") { return "%s"; }' % (w[0], w[1], w[-1], " ".join(w))
        elif kind == 1:
            line = 'C:\\Users\\dev\\%s\\%s.py:%d: %sError: "%s"' % (w[0], w[1], rng.randint(1, 999), w[-1].title(),
                                                                  " ".join(w))
        elif kind == 2:
            line = "%s %s %s %s" % (" ".join(w[:3]), rng.choice(NON_ASCII), " ".join(w[3:]), rng.choice(NON_ASCII))
        elif kind == 3:
            line = "\t%s = re.compile(r'\\d+\\s*\\\\%s') # %s" % (w[0], w[1], " ".join(w))
        elif kind == 4:
            line = "%6d\u2192%s" % (rng.randint(1, 5000), "    " * rng.randint(0, 3) + " ".join(w))
        elif kind == 5:
            line = "\x1b[1m%s\x1b[22m %s" % (w[0], " ".join(w[1:]))
        elif kind == 6:
            line = json.dumps({x: rng.randint(0, 10 ** 6) for x in w[:4]})
        elif kind == 7:
            line = "-rw-r--r-- 1 user staff %8d Nov 29 12:%02d %s.%s" % (rng.randint(0, 10 ** 7), rng.randint(0, 59),
                                                                         w[0], rng.choice(["py", "ts", "md", "json"]))
        else:
            line = " ".join(w).capitalize() + "."
        pool.append(line)
    return pool


class _Text:
    def __init__(self, rng):
        self.rng = rng
        self.pool = _pool(rng)
        self.avg = sum(len(p.encode()) + 1 for p in self.pool) / len(self.pool)

    def __call__(self, size):
        k = max(1, int(size / self.avg))
        return "\n".join(self.rng.choices(self.pool, k=k))

    def prose(self, size):
        k = max(1, int(size / 6))
        return " ".join(self.rng.choices(WORDS, k=k)) + " " + self.rng.choice(NON_ASCII)


def _uuid(rng):
    h = "%032x" % rng.getrandbits(128)
    return "%s-%s-4%s-8%s-%s" % (h[:8], h[8:12], h[13:16], h[17:20], h[20:])


def _output_size(rng, scale):
    """A tool output's size: mostly small, some 10-200 KB (heavy-tailed)."""
    r = rng.random()
    if r < 0.55:
        size = rng.lognormvariate(math.log(600), 1.0)
    elif r < 0.93:
        size = rng.lognormvariate(math.log(4000), 0.8)
    else:
        size = math.exp(rng.uniform(math.log(10e3), math.log(200e3)))
    return int(min(200e3, size * scale))


def _session_lines(rng, text, n_lines, sid, cwd, start, agent, scale):
    """About n_lines lines of one session (or sub-agent) file, as bytes."""
    out = []
    t = start
    prev = None
    common = {"isSidechain": agent is not None, "userType": "external", "cwd": cwd, "sessionId": sid,
              "version": "2.0.%d" % rng.randint(20, 60), "gitBranch": "main"}
    if agent:
        common["agentId"] = agent

    def stamp():
        nonlocal t
        t += rng.uniform(0.2, 40)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % rng.randint(0, 999)

    def put(obj):
        out.append(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")

    def entry(kind, **fields):
        nonlocal prev
        u = _uuid(rng)
        obj = {"parentUuid": prev}
        obj.update(common)
        obj.update(fields)
        obj["type"] = kind
        obj["uuid"] = u
        obj["timestamp"] = stamp()
        prev = u
        put(obj)

    def assistant(content, out_tokens):
        msg = {"id": "msg_%s" % _uuid(rng).replace("-", "")[:24], "type": "message", "role": "assistant",
               "model": rng.choice(MODELS), "content": content, "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": rng.randint(1, 50),
                         "cache_creation_input_tokens": rng.randint(0, 20000),
                         "cache_read_input_tokens": rng.randint(0, 150000),
                         "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                         "output_tokens": out_tokens, "service_tier": "standard"}}
        entry("assistant", message=msg, requestId="req_%s" % _uuid(rng).replace("-", "")[:24])

    if not agent and rng.random() < 0.5:
        put({"type": "summary", "summary": text.prose(60)[:80], "leafUuid": _uuid(rng)})
    while len(out) < n_lines:
        r = rng.random()
        if r < 0.03:
            put({"type": "file-history-snapshot", "messageId": _uuid(rng),
                 "snapshot": {"messageId": _uuid(rng), "trackedFileBackups": {
                     "src/%s.py" % rng.choice(WORDS): {"backupFileName": "%s@v%d" % (_uuid(rng)[:16], rng.randint(1, 9)),
                                                       "version": rng.randint(1, 9), "backupTime": stamp()}},
                     "timestamp": stamp()}, "isSnapshotUpdate": rng.random() < 0.5})
        elif r < 0.045:
            entry("system", content="Running \x1b[1mPostToolUse:%s\x1b[22m..." % rng.choice(TOOLS), isMeta=False,
                  level="info", toolUseID="toolu_%s" % _uuid(rng)[:20])
        elif r < 0.07:
            entry("attachment", attachment={"type": "hook_success", "hookName": "SessionStart:startup",
                                            "hookEvent": "SessionStart", "content": "",
                                            "stdout": json.dumps({"additionalContext": text.prose(300)}) + "\n",
                                            "stderr": "", "exitCode": 0, "durationMs": rng.randint(5, 2000)})
        elif r < 0.095:
            entry("progress", data={"type": "bash_progress", "output": text(rng.randint(100, 3000)),
                                    "elapsedTimeSeconds": rng.randint(1, 90)},
                  toolUseID="toolu_%s" % _uuid(rng)[:20], parentToolUseID="toolu_%s" % _uuid(rng)[:20])
        elif r < 0.1:
            put({"type": "last-prompt", "lastPrompt": text.prose(200)[:200] + "…", "sessionId": sid})
        elif r < 0.15:          # a prompt, then the turn it starts
            entry("user", message={"role": "user", "content": text.prose(rng.choice([80, 300, 1200, 4000]))})
            if rng.random() < 0.4:
                assistant([{"type": "thinking", "thinking": text.prose(rng.randint(200, 4000)),
                            "signature": base64.b64encode(_randbytes(rng, rng.randint(200, 900))).decode()}],
                          rng.randint(5, 900))
            assistant([{"type": "text", "text": text.prose(rng.randint(80, 1500))}], rng.randint(5, 500))
        elif r < 0.25:
            assistant([{"type": "text", "text": text.prose(rng.randint(80, 2500))}], rng.randint(5, 800))
        else:                   # a tool call and its result (the bulk of every real transcript)
            tool = rng.choice(TOOLS)
            tid = "toolu_%s" % _uuid(rng).replace("-", "")[:24]
            if tool == "Edit":
                inp = {"file_path": "/home/user/src/%s.py" % rng.choice(WORDS),
                       "old_string": text(rng.randint(100, 2000)), "new_string": text(rng.randint(100, 2500))}
            elif tool == "Write":
                inp = {"file_path": "/home/user/src/%s.md" % rng.choice(WORDS), "content": text(rng.randint(500, 8000))}
            elif tool == "Bash":
                inp = {"command": "cd /home/user/src && grep -rn \"%s\" . | head -%d" % (rng.choice(WORDS), rng.randint(5, 99)),
                       "description": text.prose(40)}
            else:
                inp = {"pattern": rng.choice(WORDS), "path": "/home/user/src"}
            assistant([{"type": "tool_use", "id": tid, "name": tool, "input": inp}], rng.randint(20, 400))
            body = text(_output_size(rng, scale))
            result = {"tool_use_id": tid, "type": "tool_result", "content": body}
            if rng.random() < 0.05:
                result["is_error"] = True
            extra = {"stdout": body, "stderr": "", "interrupted": False, "isImage": False} if tool == "Bash" \
                else {"type": "text", "file": {"filePath": inp.get("file_path", "/home/user/src"),
                                               "numLines": body.count("\n") + 1}}
            entry("user", message={"role": "user", "content": [result]}, toolUseResult=extra)
    return out


def params_for(mb, seed=1, big_line_mb=0.0):
    return {"version": GENERATOR_VERSION, "mb": mb, "seed": seed, "big_line_mb": big_line_mb,
            "files": max(2, round(REF_FILES * mb / REF_MB)), "lines": max(20, round(REF_LINES * mb / REF_MB))}


def tree(mb, seed=1, big_line_mb=0.0, say=print):
    """The cached tree for these parameters: (its projects folder, its stats)."""
    params = params_for(mb, seed, big_line_mb)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    home = os.path.join(CACHE, "tree-%s" % key)
    stats_path = os.path.join(home, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as fh:
            return os.path.join(home, "projects"), json.load(fh)
    os.makedirs(CACHE, exist_ok=True)
    tmp = home + ".tmp-%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    say("generating the tree %s (%s), once; cached in %s" % (key, json.dumps(params), home))
    try:
        stats = _generate(os.path.join(tmp, "projects"), params)
        stats["params"] = params
        stats["generate_s"] = round(time.monotonic() - t0, 1)
        with open(os.path.join(tmp, "stats.json"), "w") as fh:
            json.dump(stats, fh)
        shutil.rmtree(home, ignore_errors=True)
        os.rename(tmp, home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say("generated in %.1f s: %s" % (time.monotonic() - t0, json.dumps(stats)))
    return os.path.join(home, "projects"), stats


def _generate(root, params):
    rng = random.Random(params["seed"])
    text = _Text(rng)
    n_files, n_lines = params["files"], params["lines"]
    weights = [rng.lognormvariate(0, 1.3) for _ in range(n_files)]
    total_w = sum(weights)
    counts = [max(1, round(n_lines * w / total_w)) for w in weights]
    target_avg = params["mb"] * 1e6 / n_lines
    projects = max(1, n_files // 20)
    scale, done_bytes, done_lines = 1.0, 0, 0
    base = 1790000000.0     # 2026-09-21: sessions spread over the following ~60 days
    big_file = n_files // 2 if params["big_line_mb"] else -1
    sessions = []
    for i, count in enumerate(counts):
        p = rng.randrange(projects)
        cwd = "/home/user/work/project-%02d" % p
        folder = os.path.join(root, cwd.replace("/", "-"))
        agent = None
        if sessions and rng.random() < 0.12:      # a sub-agent of an earlier session of this tree
            parent_folder, parent_sid = rng.choice(sessions)
            folder = os.path.join(parent_folder, parent_sid, "subagents")
            agent = "a%s" % _uuid(rng).replace("-", "")[:15]
            sid = parent_sid
            name = "agent-%s.jsonl" % agent
        else:
            sid = _uuid(rng)
            name = sid + ".jsonl"
            sessions.append((os.path.join(root, cwd.replace("/", "-")), sid))
        os.makedirs(folder, exist_ok=True)
        lines = _session_lines(rng, text, count, sid, cwd, base + rng.uniform(0, 60 * 86400), agent, scale)
        if i == big_file:
            blob = base64.b64encode(_randbytes(rng, int(params["big_line_mb"] * 1e6 * 3 / 4))).decode()
            big = {"parentUuid": None, "isSidechain": False, "userType": "external", "cwd": cwd, "sessionId": sid,
                   "type": "user", "message": {"role": "user", "content": [
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": blob}},
                       {"type": "text", "text": "what is in this screenshot?"}]},
                   "uuid": _uuid(rng), "timestamp": "2026-10-01T12:00:00.000Z"}
            lines.insert(len(lines) // 2, json.dumps(big, separators=(",", ":")).encode() + b"\n")
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(b"".join(lines))
        done_bytes += sum(map(len, lines))
        done_lines += len(lines)
        # Steer the tool outputs' size so that the average line ends near the target.
        if done_lines and not (i == big_file):
            scale *= min(1.5, max(0.67, (target_avg / (done_bytes / done_lines)) ** 0.5))
    return tree_stats(root)


def tree_stats(root):
    """Bytes, files and non-blank lines of every *.jsonl under root (what a replay sends)."""
    files = lines = size = biggest = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".jsonl"):
                continue
            with open(os.path.join(folder, name), "rb") as fh:
                data = fh.read()
            files += 1
            size += len(data)
            for line in data.split(b"\n"):
                if line.strip():
                    lines += 1
                    biggest = max(biggest, len(line))
    return {"files": files, "lines": lines, "bytes": size, "longest_line": biggest}


def touch(root, when):
    """Every transcript's mtime to ``when`` (so a replay's --since covers them)."""
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".jsonl"):
                os.utime(os.path.join(folder, name), (when, when))


def _randbytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""
