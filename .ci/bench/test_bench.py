"""The benchmark's own checks: a --quick run gives every row, pipeline.py its figures,
the trees are deterministic.

    python3 .ci/bench/test_bench.py        # about 35 s
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import gentree  # noqa: E402


def run_bench(*argv):
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--log", log] + list(argv),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        with open(log) as fh:
            lines = [json.loads(line) for line in fh]
    return proc, lines


class QuickRun(unittest.TestCase):
    def test_every_row_has_its_figures(self):
        proc, lines = run_bench("--quick")
        out = proc.stdout.decode()
        self.assertEqual(proc.returncode, 0, out[-2000:])
        self.assertEqual(lines[0]["event"], "machine")
        self.assertEqual(lines[0]["nproc"], os.cpu_count())
        rows = {line["row"]: line for line in lines if line["event"] == "row"}
        self.assertEqual(sorted(rows), sorted(bench.ROWS))
        runs = [line for line in lines if line["event"] == "run"]
        self.assertEqual(len(runs), 5, "one run of each of the five measurements")
        for name, row in rows.items():
            if name == "page" and row["details"].get("error"):
                continue                # no Chromium here: the row says so
            self.assertIsNotNone(row["claude_stream"], row)
            self.assertEqual(row["claude_stream"]["n"], 1, row)
        self.assertEqual(rows["replay"]["details"]["complete_runs"], 1)
        self.assertEqual(rows["bigline"]["details"]["complete_runs"], 1)
        if "reference missing" not in out:
            for name in ("live1", "live10", "live10_rss", "replay"):
                self.assertIsNotNone(rows[name]["ratio"], rows[name])
        self.assertIn("| row | claude_stream | reference | ratio | goal | met |", out)
        # Nothing it started is left: no receiver of its own, no server of its cached trees.
        left = subprocess.run(["pgrep", "-f", "claude_stream-bench/(wsrecv|tree-)"], stdout=subprocess.PIPE)
        self.assertEqual(left.stdout, b"", "a process of the run was left running")

    def test_replay_from_a_folder(self):
        with tempfile.TemporaryDirectory() as tmp:
            root = os.path.join(tmp, "projects")
            gentree._generate(root, gentree.params_for(1, seed=3))
            stats = gentree.tree_stats(root)
            proc, lines = run_bench("--only", "replay", "--runs", "1", "--replay-from", root)
        self.assertEqual(proc.returncode, 0, proc.stdout.decode()[-2000:])
        row = [line for line in lines if line["event"] == "row"][0]
        self.assertEqual(row["details"]["tree"]["lines"], stats["lines"])
        self.assertEqual(row["details"]["complete_runs"], 1)


class Pipeline(unittest.TestCase):
    """pipeline.py: every line through the module's own Tailer, Broadcast and Feed, a figure out."""

    def pipeline(self, *argv):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "pipeline.py")] + list(argv),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        out = proc.stdout.decode()
        self.assertEqual(proc.returncode, 0, out[-2000:])
        return out

    def test_microseconds_with_and_without_the_usage_totals(self):
        for extra in ([], ["--no-usage"]):
            out = self.pipeline("--lines", "2000", "--runs", "1", *extra)
            self.assertRegex(out, r"claude_stream\.py: \d+\.\d\d us a line, best of 1 \(2000 lines")

    def test_instructions_under_valgrind(self):
        # CI installs valgrind (.ci/setup); the count is a difference of two runs.
        out = self.pipeline("--instructions", "--lines", "1000")
        found = re.search(r": (\d+) instructions a line \(1000 lines\)", out)
        self.assertIsNotNone(found, out)
        self.assertGreater(int(found.group(1)), 10000, out)     # a line costs more than nothing

    def test_the_replay_parts_each_against_the_reference(self):
        with tempfile.TemporaryDirectory() as tmp:
            root = os.path.join(tmp, "projects")
            stats = gentree._generate(root, gentree.params_for(2, seed=5))
            out = self.pipeline("--replay", "--replay-from", root, "--runs", "1")
        figure = r"(\d+\.\d\d) \(\d+\.\d\d-\d+\.\d\d\)"
        parts = re.findall(r"^  (.+?) +%s s  reference/this %s$" % (figure, figure), out, re.M)
        self.assertEqual([name for name, _, _ in parts][1:3], ["the server's history path, no socket: its CPU",
                                                               "the same sending every frame over loopback TCP: its CPU"], out)
        self.assertEqual(len(parts), 4, out)
        self.assertTrue(all(float(ratio) > 0 for _, _, ratio in parts), out)
        self.assertIsNotNone(re.search(r"^  so at most .*reference/this +%s$" % figure, out, re.M), out)
        self.assertIn("%d frames)" % (stats["lines"] + 1), out)     # every line, and "live"


class Trees(unittest.TestCase):
    def test_deterministic_and_near_its_shape(self):
        made = []
        for _ in range(2):
            tmp = tempfile.mkdtemp()
            self.addCleanup(__import__("shutil").rmtree, tmp)
            root = os.path.join(tmp, "projects")
            made.append((root, gentree._generate(root, gentree.params_for(20))))
        (a, sa), (b, sb) = made
        self.assertEqual(sa, sb)
        for folder, _, names in os.walk(a):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as fa, open(os.path.join(b, os.path.relpath(path, a)), "rb") as fb:
                    self.assertEqual(fa.read(), fb.read())
        self.assertEqual(sa["files"], 40)
        self.assertLess(abs(sa["bytes"] / 20e6 - 1), 0.2, sa)
        self.assertLess(abs(sa["lines"] / gentree.params_for(20)["lines"] - 1), 0.1, sa)
        text = b""
        for folder, _, names in os.walk(a):
            for name in names:
                with open(os.path.join(folder, name), "rb") as fh:
                    text += fh.read()
        for needle in (b'\\"', b"\\\\", b"\\n", b"\\t", "é".encode(), "🚀".encode(), b'"type":"tool_result"',
                       b'"type":"thinking"', b'"type":"summary"', b'"type":"file-history-snapshot"', b"/subagents/"):
            if needle == b"/subagents/":
                self.assertTrue(any("subagents" in f for f, _, _ in os.walk(a)))
            else:
                self.assertIn(needle, text)
        for line in text.splitlines():
            json.loads(line)


if __name__ == "__main__":
    unittest.main()
