#!/usr/bin/env python3
"""claude_stream: watch Claude Code sessions live, from another terminal or machine.

Claude Code writes every session as JSONL under ``~/.claude/projects``. This one
file, Python 3.8+ standard library only, streams every new transcript line the
moment its newline is written:

    python claude_stream.py serve     # tail every transcript, serve WebSocket clients
    python claude_stream.py client    # show the stream readably (or --json for NDJSON)
    python claude_stream.py usage     # token and cost totals per session and day, from disk

Design: one ``selectors`` event loop, no threads, no asyncio. A polling stat loop
(the tailer), woken early by inotify on Linux, turns file bytes into complete
lines; a hand-rolled RFC 6455 WebSocket server sends each line, wrapped once in
a JSON envelope and framed once, to every connected client. The client is the
same protocol code with masking on. ``GET /`` serves a live page (embedded
below) that speaks the same protocol.

Wire format (server to client, one JSON object per text frame, ``kind`` first):

    {"kind": "entry", "path": "<project>/<file>.jsonl", "offset": <byte offset>,
     "project": "<project folder>", "session": "<id>", "agent": "<id>|null",
     "entry": {...the transcript line, byte for byte...}}

``(path, offset)`` names a line for ever: it is the cursor. Every kind
(``hello``, ``subscribed``, ``entry``, ``malformed``, ``gap``, ``reset``,
``live``, ``error``) and the client's ``subscribe`` are listed in the
"Wire format" section below, where each is built; README.md documents them.

Security model: the server binds to 127.0.0.1 and ::1 by default; a random
token (or one from --token-file) is required (Bearer header or ``?token=``);
foreign Origins and, on loopback, foreign Hosts get 403; TLS with
--certfile/--keyfile. Everything from outside is hostile: control characters
from transcripts, peers and file names are shown, never sent to a terminal or a
log; only regular files are read, never through a link, never blocking; what
any peer can make the server hold is bounded, before and after it
authenticates. Nothing from a transcript and no token is ever written to the
server's own log.

Limits: every limit and default is a named constant just below; ``Limits``
gathers them into one frozen value that the tailer, the server and each
endpoint are given (``dataclasses.replace(DEFAULT_LIMITS, ...)`` to change one).

Map, top to bottom, each part using only those above it:
  constants, Limits, Timer/TimerHeap, Log
  Log models            dataclasses for entries and blocks; decode_line, the one JSON decoder
  Tailer                host_name, FileRecord, split_lines (the one splitter), Discovery (roots,
                        folders, inotify), Tailer (schedule, reads), LineReader and
                        LastLines (history, a file's end first)
  WebSocket protocol    frames, the opening handshake, MessageAssembler, Connection
  Event loop            EventLoop, Stream, TLSStream, sockets, WebSocketEndpoint
  Token files
  Wire format           Filters, Subscription, one builder per message kind (line_message: an entry)
  Usage and cost        Price, BUILTIN_PRICES, KeyHashes, UsageBook (deduplicated totals), read_usage
  Session registry      RegistryRecord, ProcessProbe (/proc), Registry (Claude Code's own
                        live states), status_message
  Request policy        Host, Origin, token, routes, statuses
  Per-client feed       Backlog, Phase, Feed: live, history, resume and catch-up alike
  Broadcast             Backpressure, Broadcast
  Server                ServerSession, StatusRelay (the registry in the loop), UsageRelay
                        (totals on the server), BoxStatus (a hub's boxes), StreamServer
  The live page         PAGE_CONSTANTS, PAGE_LIB (tested by node), the page
  Client                Columns, EntryText (what a line says), SessionBoard (live states), Renderer,
                        Alerts (--notify, --notify-command), ClientLink, ClientApp
  Mirror                MirrorApp (a hub's byte-for-byte copies), PushLink/PushApp (a box
                        that dials its hub)
  Command line          argparse, run_serve, run_client, run_usage, main
A line's way: Tailer.poll -> split_lines -> LinesEvent -> Broadcast.publish ->
line_message (framed once) -> Feed.offer per client -> ServerSession.send_frames ->
Connection -> WebSocketEndpoint.sync -> Stream.writelines -> EventLoop._flush ->
Stream.flush (sendmsg).
"""

import argparse
import array
import base64
import binascii
import bisect
import codecs
import collections
import enum
import errno
import gc
import heapq
import itertools
import json
import marshal
import math
import os
import random
import re
import select
import selectors
import shlex
import signal
import socket
import stat
import struct
import sys
try:                                # Unix only: how much of our output the peer has taken
    import fcntl
    import termios
    _F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)
except ImportError:                 # pragma: no cover - Windows
    _F_SETPIPE_SZ = None
import time
import unicodedata
from dataclasses import dataclass, field, replace as replace_fields
from datetime import datetime, timedelta, timezone
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Set,
                    Tuple, Union)
from urllib.parse import parse_qs, quote, urlsplit
# OpenSSL is loaded only where TLS is used (``import ssl`` in the functions that use it):
# ssl, hashlib, hmac and secrets each load it, and it costs 7.7 MB resident, a third of a
# server serving ws:// on loopback. The handshake's SHA-1 and the comparison we need are
# built in; the page's two SHA-256 hashes are written down (see PAGE_SCRIPT_SHA256).
# So are subprocess (1 MB, with threading), gzip and traceback imported where they are
# used, by the client's commands, the OTLP export and a bug's report.
if TYPE_CHECKING:                   # pragma: no cover - for the annotations only
    import ssl
    import subprocess
try:
    from _sha1 import sha1
except ImportError:                 # pragma: no cover - a Python built without it
    from hashlib import sha1
try:                                # hmac.compare_digest where OpenSSL is absent: constant time
    from _operator import _compare_digest as compare_digest
except ImportError:                 # pragma: no cover
    from hmac import compare_digest

__version__ = "0.1.0"
__license__ = "MIT"

# --- Defaults ----------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = "ws://127.0.0.1:8765/"
DEFAULT_POLL_INTERVAL = 0.02        # seconds between stats of a hot file
PROTOCOL_VERSION = 1                # of the JSON messages; bumped on incompatible change

# --- Tailer ------------------------------------------------------------------
# Polling tiers: a file is "hot" while it grew recently and is stat()ed every
# poll interval; idle files are stat()ed less often. Cost stays proportional to
# the number of active files, not to the size of the tree. On Linux, inotify
# watches on the folders wake the poller the moment a file changes; polling
# stays the truth, so with those wake-ups every interval is WAKEUP_FACTOR
# times longer: a safety net, not the way changes are found.
HOT_AGE = 60.0                      # seconds since the last growth to stay hot
WARM_AGE = 3600.0                   # ... to stay warm; older files are cold
WARM_FACTOR = 25                    # warm interval = poll interval x this (0.5 s)
COLD_FACTOR = 100                   # cold interval = poll interval x this (2 s)
DIR_CHECK_FACTOR = 50               # roots and folder mtimes checked every poll x this (1 s)
WAKEUP_FACTOR = 150                 # with inotify: hot 3 s, warm 75 s, cold 300 s, folders 150 s
FULL_RESCAN_INTERVAL = 30.0         # every folder re-listed, as a safety net
WAKEUP_RESCAN_INTERVAL = 300.0      # ... when inotify reports changes (and its overflows)
RACY_DIR_SECONDS = 2.0              # a folder changed this recently is re-listed again
WAKEUP_READ_BYTES = 64 << 10        # inotify events read per call
SCHEDULE_SLOTS = 10                 # a tier's stats are batched into interval / this slots
MAX_SLOT_SECONDS = 1.0              # ... of at most this long
READ_BLOCK = 1 << 20                # bytes per read() call
TICK_READ_BUDGET = 128 << 10         # bytes read from all files per loop tick; well below
                                    # LIVE_OUTPUT_CAP, so one tick never trips a fast client
MAX_LINE_BYTES = 64 << 20           # longer lines are reported, not delivered
MAX_JSON_DEPTH = 200                # deeper nesting is malformed (real entries nest < 20)
DEPTH_WALK_MAX_BYTES = 256 << 10    # lines up to this have their depth checked on the decoded
                                    # object (a list per level: 16 bytes an object at most, for
                                    # a moment); longer ones by counting their brackets
CHECKED_LINES_MAX = 200_000         # lines remembered as checked (CheckedLines), all files: 23 bytes each
ENVELOPE_DEPTH = 1                  # the levels a message adds around its entry (for the client)
JSON_TEXT_CACHE_SIZE = 4096         # encoded paths and ids kept for envelopes
JSON_TEXT_CACHE_MAX_CHARS = 256     # ... if they are no longer than this
MAX_OPEN_FILES = 256                # hot files kept open; others reopened per read
BOUNDARY_SCAN_BLOCK = 64 << 10      # backwards scan for a line start at startup
TRANSCRIPT_SUFFIX = ".jsonl"

# --- WebSocket and HTTP ------------------------------------------------------
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3
MAX_HEAD_BYTES = 16 << 10           # request or response head, all headers
MAX_HEADERS = 100
MAX_CLIENT_MESSAGE = 4 << 20        # messages a client may send to the server: a resume
                                    # carries a cursor (~70 bytes) per file it has seen, so this
                                    # holds about 60,000 files (64 KiB held 900: no resume past)
MIN_FRAGMENTS = 1024                # a message may come in max(this, its size limit / 64) frames
MAX_SERVER_MESSAGE = MAX_LINE_BYTES + (1 << 20)    # what our client accepts
HANDSHAKE_TIMEOUT = 10.0            # seconds for a server to answer our opening handshake
REQUEST_HEAD_TIMEOUT = 5.0          # seconds for a new connection to send its whole request head
PING_INTERVAL = 20.0                # an idle peer is pinged after this long
PING_TIMEOUT = 20.0                 # ... and dropped if no pong comes back
CLOSE_TIMEOUT = 5.0                 # seconds to finish a closing handshake
LINGER_TIMEOUT = 2.0                # after our FIN, seconds to wait for the peer's
LIVE_OUTPUT_CAP = 8 << 20           # unsent bytes past which a client gets no live entries
                                    # and is caught up from disk instead, from its cursors
CATCHUP_LOW_WATER = 1 << 20         # catch-up reads more only while less than this is unsent
CATCHUP_FIRST_BLOCK = 16 << 10      # first read of each file behind: small, as there may be many
CATCHUP_BLOCK = 256 << 10           # bytes read per file per catch-up step, at most ...
CATCHUP_READAHEAD = 4 << 20         # ... as the files a client is behind share this much read-ahead
CATCHUP_MIN_BLOCK = 4 << 10         # ... but a read is never less than this, unless the files
CATCHUP_LEAST_BLOCK = 512           # are so many that it must be, down to this
CATCHUP_TICK_BUDGET = 4 << 20       # bytes read for all catching-up clients per loop tick
CATCHUP_INTERVAL = 0.005            # seconds between catch-up steps while any client is behind
CONGESTION_GRACE = 1.0              # seconds the tailer waits for a live client to drain
MAX_HELD_LINES = 1000               # untimed lines kept while looking for the start of --since,
MAX_HELD_BYTES = 256 << 10          # ... and bytes of them a file (with the latest, whatever its size)
SLOW_CLIENT_TIMEOUT = 30.0          # a client that reads nothing this long is closed ...
CLOSE_TOO_SLOW = 4000               # ... with this code; it reconnects and resumes
OUTPUT_HIGH_WATER = 3 * MAX_LINE_BYTES   # absolute bound on one client's unsent bytes
# Every frame queued for a peer (entries, notices, pongs, errors) counts against
# LIVE_OUTPUT_CAP: past it a peer's further input is not read until its output
# drains to half of it, so a ping flood or a stream of bad messages from a peer
# that does not read is held back by TCP, not buffered here.
MAX_CONNECTIONS = 256               # WebSocket clients (with the token); more are answered 503
MAX_PUSHES = 64                     # boxes pushing to a hub at once, apart from the clients
MAX_PENDING_CONNECTIONS = 64        # connections not yet authenticated; at this many, a new
                                    # one pushes out the oldest, so a flood cannot lock clients out
ACCEPTS_PER_TICK = 16               # well below the above: a new connection is read before it could
                                    # be pushed out
PENDING_PEEKS = 8                   # pending connections looked at for one that sent nothing yet
ACCEPT_PAUSE = 0.5                  # seconds the listener rests when out of descriptors (EMFILE)
MAX_FILTER_VALUES = 100             # values in one filter list (project, session, type) ...
MAX_FILTER_CHARS = 200              # ... each at most this long
SUBSCRIBE_BURST = 10                # subscribe messages a client may send at once ...
SUBSCRIBE_RATE = 2.0                # ... then this many a second; more get an error
LISTEN_BACKLOG = 128
LISTEN_ATTEMPTS = 5                 # ports tried with --port 0 until ::1 has the same one free
LOOPBACK_HOSTS = frozenset(("localhost", "127.0.0.1", "::1", "[::1]", "localhost."))
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(\d+))?$")     # name[:port]
RECV_SIZE = 256 << 10
SEND_GATHER_MAX = 512               # buffers handed to one sendmsg() (IOV_MAX is 1024)

# --- Authentication ----------------------------------------------------------
TOKEN_ENV = "CLAUDE_STREAM_TOKEN"   # a token for serve and client, instead of --token
PUSH_PATH = "/push"                 # where a hub takes boxes that dial it (serve --push-to)
TOKEN_BYTES = 32                    # of randomness in a generated token
MAX_TOKEN_FILE_BYTES = 4096         # read of a token file; its first line is the token

# --- Client ------------------------------------------------------------------
OTLP_BATCH_BYTES = 4 << 20          # records per OTLP request, before gzip (a Collector takes 20 MiB)
OTLP_MAX_DELAY = 1.0                # seconds a record waits for its batch
OTLP_LINE_LIMIT = 256 << 10         # a record's body is cut here (Loki's default line limit)
OTLP_PENDING_MAX = 16 << 20         # past this much waiting, the client stops reading its servers
OTLP_RETRY_AFTER_MAX = 60.0         # the longest Retry-After taken as said
STATE_SAVE_INTERVAL = 1.0           # --state is written at most this often (and on exit)
OUTPUT_GATHER_BYTES = 1 << 20       # --json output of one read written at once, up to this much
MAX_STATE_BYTES = 64 << 20          # a --state file: cursors of about a million files
RECONNECT_MIN = 0.5                 # first reconnect delay, seconds
RECONNECT_MAX = 30.0                # backoff cap
CONNECT_TIMEOUT = 10.0
EXCERPT_CHARS = 120                 # bytes of a malformed line shown to clients
TOOL_NAME_MEMORY = 4096             # tool_use ids remembered to name results
# --notify-command: the user's program, started for each alert and never waited
# for; past this many still running, an alert runs nothing (said in a warning)
# rather than piling up processes behind a command that hangs.
NOTIFY_COMMANDS_MAX = 4
NOTIFY_REAP_INTERVAL = 1.0          # seconds between looks for finished commands, while any run
NOTIFY_TEXT_MAX = 160               # columns of a desktop notification's text (from the registry: cut)
NOTIFY_ENV_MAX = 4096               # characters of one CLAUDE_STREAM_* value given to the command

# --- Usage and cost -----------------------------------------------------------
# A message is written on several lines while it streams; its usage is counted
# once, so the totals remember each message id they counted. Forks and replays
# copy a message into another file at any distance, so the memory cannot be only
# the last few lines: it keeps up to this many distinct messages, and when full
# forgets the oldest half of those known by hash (a copy of a message made after
# that many others would be counted again; ``forgotten`` says how often). The latest
# are kept with what they counted (about 500 bytes each), as a larger later line
# replaces the count; every one by a 64-bit hash of its key in a table of 8-byte slots
# (16 to 32 bytes a message, where a set of ints takes 80): two tables of at most
# 262,144 slots (4 MiB) and the latest 1,024 (0.5 MB), where a set took 20 MB.
USAGE_MAX_MESSAGES = 1 << 18
USAGE_RECENT_MESSAGES = 1024        # ... of which the latest with their counts; a message's lines
                                    # come within seconds, not 1,024 other messages, apart
MAX_TOKEN_COUNT = 1 << 40          # more tokens than any response has; past it a count is not one
PRICE_TIER_TOKENS = 200_000         # per token kind and message, the part above is priced higher
MAX_PRICES_FILE_BYTES = 1 << 20     # a --prices file
PRICE_MEMORY = 256                  # model names whose price lookup is remembered

# --- Claude Code's session registry (<config>/sessions/<pid>.json) ---------------
USAGE_INTERVAL = 1.0                # a session's usage message is sent at most this often
USAGE_YIELD_STEPS = 20             # while a client catches up, the totals' history reads one step in this many
USAGE_SNAPSHOT_MAX = 1000           # usage messages sent on a subscribe: the latest sessions (~1 KB each)

REGISTRY_POLL_INTERVAL = 0.5        # seconds between listings of the folder without wake-ups ...
REGISTRY_POLL_FACTOR = 4            # ... and this many times longer with inotify (still the truth)
REGISTRY_LIVENESS_INTERVAL = 1.0    # a record's pid is checked this often: a kill -9 leaves it
REGISTRY_RETRY_DELAY = 0.03         # a torn read (rewritten in place) is read again after this ...
REGISTRY_RETRIES = 3                # ... this many times, then that version is skipped
REGISTRY_FRESH_WINDOW = 2.0         # a record written this recently is read again at each scan
REGISTRY_IDLE_DEBOUNCE = 0.3        # idle must last this long to be said (blips of 7-65 ms exist)
REGISTRY_MAX_RECORD_BYTES = 64 << 10   # a record is ~700 bytes; larger is not Claude Code's
REGISTRY_MAX_EPOCH_MS = 253402300799000   # 9999-12-31T23:59:59Z: the last time a datetime can say
REGISTRY_MAX_RECORDS = 4096         # records followed per folder (one per live process)

# --- Logging -----------------------------------------------------------------
LOG_BURST = 20                      # warnings of one kind written at once ...
LOG_RATE = 1.0                      # ... then at most this many a second; the rest are counted
LOG_UNWRITTEN_MAX = 4096            # bytes of a half-written line kept for a full stderr

# --- Small numbers that were inline ------------------------------------------
BOUNDARY_FIRST_BLOCK = 4096         # first step of that scan: most lines are short
FRAME_COPY_MAX = 4096               # payloads up to this are joined to their header, larger sent apart
WAKE_DRAIN_BYTES = 4096             # signal wake-up bytes read per recv
TIMESTAMP_LOOKAHEAD = 50            # read-ahead lines searched for a time to sort an untimed line
HOUSEKEEPING_INTERVAL = 1.0         # seconds between checks for clients that read nothing
MEMORY_RELEASE_INTERVAL = 5.0       # free memory given back at most this often (after a catch-up)
SHUTDOWN_GRACE = 1.0                # seconds clients get to answer our close before we stop
RETRY_AFTER = 5                     # seconds a refused client is told to wait (503)
TIMER_SLACK = 0.01                  # a keepalive check is never scheduled closer than this
PING_PAYLOAD_BYTES = 4              # random bytes in our pings

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
# Ctrl-C, kill, and closing the terminal all stop cleanly (clients get close 1001).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))
PROG = "claude_stream"


@dataclass(frozen=True)
class Limits:
    """Every limit and timer as one value, handed to the tailer, the server and each
    endpoint: tests and embedders shorten one without touching the module. The
    defaults are the constants above, where each one's reason is written."""
    hot_age: float = HOT_AGE
    warm_age: float = WARM_AGE
    warm_factor: int = WARM_FACTOR
    cold_factor: int = COLD_FACTOR
    dir_check_factor: int = DIR_CHECK_FACTOR
    wakeup_factor: int = WAKEUP_FACTOR
    full_rescan_interval: float = FULL_RESCAN_INTERVAL
    wakeup_rescan_interval: float = WAKEUP_RESCAN_INTERVAL
    racy_dir_seconds: float = RACY_DIR_SECONDS
    wakeup_read_bytes: int = WAKEUP_READ_BYTES
    schedule_slots: int = SCHEDULE_SLOTS
    max_slot_seconds: float = MAX_SLOT_SECONDS
    read_block: int = READ_BLOCK
    tick_read_budget: int = TICK_READ_BUDGET
    max_line_bytes: int = MAX_LINE_BYTES
    max_open_files: int = MAX_OPEN_FILES
    boundary_first_block: int = BOUNDARY_FIRST_BLOCK
    boundary_scan_block: int = BOUNDARY_SCAN_BLOCK
    max_head_bytes: int = MAX_HEAD_BYTES
    max_headers: int = MAX_HEADERS
    max_client_message: int = MAX_CLIENT_MESSAGE
    max_server_message: int = None      # type: ignore[assignment] # derived: see __post_init__
    min_fragments: int = MIN_FRAGMENTS
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    request_head_timeout: float = REQUEST_HEAD_TIMEOUT
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    ping_payload_bytes: int = PING_PAYLOAD_BYTES
    timer_slack: float = TIMER_SLACK
    close_timeout: float = CLOSE_TIMEOUT
    linger_timeout: float = LINGER_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    live_output_cap: int = LIVE_OUTPUT_CAP
    output_high_water: int = None       # type: ignore[assignment] # derived: see __post_init__
    recv_size: int = RECV_SIZE
    send_gather_max: int = SEND_GATHER_MAX
    frame_copy_max: int = FRAME_COPY_MAX
    catchup_low_water: int = CATCHUP_LOW_WATER
    catchup_first_block: int = CATCHUP_FIRST_BLOCK
    catchup_block: int = CATCHUP_BLOCK
    catchup_min_block: int = CATCHUP_MIN_BLOCK
    catchup_least_block: int = CATCHUP_LEAST_BLOCK
    catchup_readahead: int = CATCHUP_READAHEAD
    catchup_tick_budget: int = CATCHUP_TICK_BUDGET
    catchup_interval: float = CATCHUP_INTERVAL
    congestion_grace: float = CONGESTION_GRACE
    max_held_lines: int = MAX_HELD_LINES
    max_held_bytes: int = MAX_HELD_BYTES
    timestamp_lookahead: int = TIMESTAMP_LOOKAHEAD
    slow_client_timeout: float = SLOW_CLIENT_TIMEOUT
    housekeeping_interval: float = HOUSEKEEPING_INTERVAL
    shutdown_grace: float = SHUTDOWN_GRACE
    retry_after: int = RETRY_AFTER
    max_connections: int = MAX_CONNECTIONS
    max_pushes: int = MAX_PUSHES
    max_pending_connections: int = MAX_PENDING_CONNECTIONS
    accepts_per_tick: int = ACCEPTS_PER_TICK
    accept_pause: float = ACCEPT_PAUSE
    max_filter_values: int = MAX_FILTER_VALUES
    max_filter_chars: int = MAX_FILTER_CHARS
    subscribe_burst: int = SUBSCRIBE_BURST
    subscribe_rate: float = SUBSCRIBE_RATE
    listen_backlog: int = LISTEN_BACKLOG
    listen_attempts: int = LISTEN_ATTEMPTS
    reconnect_min: float = RECONNECT_MIN
    reconnect_max: float = RECONNECT_MAX
    state_save_interval: float = STATE_SAVE_INTERVAL
    otlp_batch_bytes: int = OTLP_BATCH_BYTES
    otlp_max_delay: float = OTLP_MAX_DELAY
    otlp_line_limit: int = OTLP_LINE_LIMIT
    otlp_pending_max: int = OTLP_PENDING_MAX
    otlp_retry_after_max: float = OTLP_RETRY_AFTER_MAX
    notify_commands_max: int = NOTIFY_COMMANDS_MAX
    notify_reap_interval: float = NOTIFY_REAP_INTERVAL
    usage_max_messages: int = USAGE_MAX_MESSAGES
    usage_recent_messages: int = USAGE_RECENT_MESSAGES
    usage_interval: float = USAGE_INTERVAL
    usage_snapshot_max: int = USAGE_SNAPSHOT_MAX
    registry_poll_interval: float = REGISTRY_POLL_INTERVAL
    registry_poll_factor: int = REGISTRY_POLL_FACTOR
    registry_liveness_interval: float = REGISTRY_LIVENESS_INTERVAL
    registry_retry_delay: float = REGISTRY_RETRY_DELAY
    registry_retries: int = REGISTRY_RETRIES
    registry_idle_debounce: float = REGISTRY_IDLE_DEBOUNCE
    registry_fresh_window: float = REGISTRY_FRESH_WINDOW
    registry_max_record_bytes: int = REGISTRY_MAX_RECORD_BYTES
    registry_max_records: int = REGISTRY_MAX_RECORDS

    def __post_init__(self) -> None:
        """The limits that follow from the longest line, unless given: a shorter
        ``max_line_bytes`` shrinks what a client accepts and what a server holds."""
        derived = {"max_server_message": self.max_line_bytes + (MAX_SERVER_MESSAGE - MAX_LINE_BYTES),
                   "output_high_water": self.max_line_bytes * (OUTPUT_HIGH_WATER // MAX_LINE_BYTES)}
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)      # frozen: filled in once, here


DEFAULT_LIMITS = Limits()


class UsageError(Exception):
    """Bad command-line usage: one line on stderr, exit status 2."""


class OperationalError(Exception):
    """A failure the user must act on (port in use, cannot connect): exit 1."""


# C0, DEL, C1; and the bidi embeddings, overrides and isolates, which reorder what
# follows them on the line ("Trojan Source": a command shown otherwise than it reads).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _show_control(match: "re.Match[str]") -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)       # the Control Pictures block: NUL is \u2400, ESC \u241b
    if code == 0x7F:
        return "\u2421"
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code   # C1; a bidi control


def visible(text: str) -> str:
    """``text`` with every C0, DEL and C1 control character, and every bidi control that
    reorders the rest of a line, shown instead of obeyed.

    Transcripts hold fetched web pages and command output, and a peer can send
    anything: an ESC that reached a terminal could set its title, write the
    clipboard (OSC 52) or clear the screen. Everything from outside passes here
    on its way to a terminal or a log; our own colours are added afterwards.
    """
    return _CONTROL_RE.sub(_show_control, text)


def peer_value(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A value a peer sent, for a log line: its repr, cut (a peer's 8 MB path is not
    logged whole), a container by its type."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("\u2026 (%d characters)" % len(value) if len(value) > limit else "")
    if isinstance(value, (dict, list)):
        return "a JSON %s" % ("object" if isinstance(value, dict) else "array")
    return repr(value)[:limit]


class RateLimit:
    """A token bucket: ``burst`` at once, then ``rate`` a second."""

    def __init__(self, burst: int, rate: float, now: float):
        self.burst, self.rate = float(burst), rate
        self.allowance, self.last = float(burst), now

    def allow(self, now: float) -> bool:
        self.allowance = min(self.burst, self.allowance + (now - self.last) * self.rate)
        self.last = now
        if self.allowance < 1.0:
            return False
        self.allowance -= 1.0
        return True


class Timer:
    """A loop callback due at ``when``."""
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class TimerHeap:
    """Things due at times, earliest first: the one schedule mechanism, for the
    event loop's timers and for the tailer's stats. Rescheduling or cancelling
    leaves the old entry in the heap; ``stale(when, item)`` says so when it
    reaches the top, where it is dropped: O(log n) to add, nothing to cancel, and
    no object per entry beyond the item itself (10,000 files are rescheduled
    all the time). Clock-free: the caller says what time it is."""

    def __init__(self, stale: Callable[[float, Any], bool]):
        self._heap: List[Tuple[float, int, Any]] = []
        self._seq = itertools.count()       # ties keep their order
        self._stale = stale

    def add(self, when: float, item: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), item))

    def next_when(self) -> Optional[float]:
        heap = self._heap
        while heap and self._stale(heap[0][0], heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> Any:
        """The earliest item due at ``now`` (taken out), or None."""
        when = self.next_when()
        if when is None or when > now:
            return None
        return heapq.heappop(self._heap)[2]


_C_LIBRARY: Any = None      # the C library we run on, through ctypes; False where it cannot be had
_MALLOC_TRIM: Any = None    # glibc's malloc_trim, False where there is none (musl, macOS)


def c_library() -> Any:
    """The C library this process runs on (ctypes, errno kept), loaded on first use, so
    that ctypes costs nothing where neither inotify nor malloc_trim is wanted; None
    where there is none. ``CDLL(None)``: the library already loaded, where
    ``ctypes.util.find_library`` would run ldconfig to find it."""
    global _C_LIBRARY
    if _C_LIBRARY is None:
        try:
            import ctypes
            _C_LIBRARY = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            _C_LIBRARY = False
    return _C_LIBRARY or None


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system.

    What start-up (compiling this module, the first scan) and a replay's buffers
    free stays in glibc's heap, held for this process: without this a server's RSS
    stays near its highest ever. Cheap (a walk of the free lists); called after
    start-up and after a client's history is sent.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = getattr(c_library(), "malloc_trim", False)
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


class Log:
    """One-line messages on stderr that can neither block the loop nor flood it.

    Never given transcript content or tokens; file names and peers' words are
    shown through ``visible``. Warnings of one ``key`` are rate-limited (a
    burst, then a steady rate). A pipe or terminal that nobody drains gets a
    private non-blocking descriptor, so a full one drops lines instead of
    stopping the server. Dropped lines are counted and said with the next line.
    """

    def __init__(self, debug: bool = False, stream=None, clock: Callable[[], float] = time.monotonic):
        self.debug_enabled = debug
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.dropped = 0
        self._limits: Dict[str, RateLimit] = {}        # one per kind of warning
        self._fd = self._nonblocking_fd(self.stream)
        self._unwritten = b""           # the rest of a line a full pipe took only part of

    @staticmethod
    def _nonblocking_fd(stream: Any) -> Optional[int]:
        """A non-blocking descriptor of our own for a pipe or terminal, else None.

        O_NONBLOCK on stderr itself would change it for the shell and every
        process sharing it; opening it again through /proc makes a new open file
        description that is ours alone. Regular files never block for long.
        """
        try:
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
        except (AttributeError, ValueError, OSError):
            return None
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            return None
        try:
            return os.open("/proc/self/fd/%d" % fd, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None             # no /proc (not Linux): write as before

    def _allowed(self, key: Optional[str]) -> bool:
        if key is None:
            return True
        now = self.clock()
        limit = self._limits.get(key)
        if limit is None:
            limit = self._limits[key] = RateLimit(LOG_BURST, LOG_RATE, now)
        return limit.allow(now)

    def _write(self, text: str, key: Optional[str] = None) -> None:
        if not self._allowed(key):
            self.dropped += 1
            return
        line = "%s: %s\n" % (PROG, visible(text))
        if self.dropped:
            line = "%s: warning: %d log lines dropped (too many alike, or stderr was full)\n%s" % (
                PROG, self.dropped, line)
        if self._fd is None:
            try:
                self.stream.write(line)
                self.stream.flush()
                self.dropped = 0
            except (OSError, ValueError):
                pass                # a closed stderr must not stop the loop
            return
        data = self._unwritten + line.encode("utf-8", "replace")
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            self.dropped += 1
            return
        except OSError:
            return
        self.dropped = 0
        self._unwritten = data[written:][:LOG_UNWRITTEN_MAX]

    def info(self, text: str, key: Optional[str] = None) -> None:
        self._write(text, key)

    def warn(self, text: str, key: Optional[str] = None) -> None:
        self._write("warning: " + text, key)

    def debug(self, text: str) -> None:
        if self.debug_enabled:
            for line in text.split("\n"):   # a traceback: one log line per line of it
                self._write("debug: " + line)

    def internal_error(self, exc: BaseException) -> None:
        """A bug caught where it must not spread: one rate-limited line, a traceback with --debug."""
        self.warn("internal error: %s: %s" % (type(exc).__name__, exc), key="internal")
        import traceback
        self.debug(traceback.format_exc().rstrip())


# =============================================================================
# Log models: dataclasses built by a tolerant parser
# =============================================================================
#
# Claude Code publishes no schema; every field is optional and every enum is
# open (see the format notes). The parser therefore never raises on a JSON
# object: unknown types become UnknownEntry, unknown fields are ignored by the
# model and kept in ``raw``, and fields of the wrong type read as None.

_TIMESTAMP_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?\s*$")


def parse_timestamp(value: Any) -> Optional[datetime]:
    """An aware UTC datetime from an ISO-8601 string or epoch number, else None.

    Accepts ``Z`` and any number of fractional digits (Claude Code writes
    milliseconds; a desktop build once wrote nanoseconds), on every Python
    from 3.8, whose ``fromisoformat`` accepts neither. Epoch numbers above
    1e11 are read as milliseconds (``history.jsonl``, ``fileMtime``).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = value / 1000.0 if abs(value) > 1e11 else float(value)
        try:
            return datetime.fromtimestamp(seconds, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    match = _TIMESTAMP_RE.match(value)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        if zone is None or zone in "Zz":
            tz = timezone.utc
        else:
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
            tz = timezone(offset if zone[0] == "+" else -offset)   # ValueError past 24 h
        parsed = datetime(int(year), int(month), int(day), int(hour or 0),
                          int(minute or 0), int(second or 0), micro, tz)
        # Year 1 east of UTC, or 9999 west of it, is outside datetime's range in UTC.
        return parsed.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None


def _str(obj: Dict[str, Any], key: str) -> Optional[str]:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _bool(obj: Dict[str, Any], key: str) -> bool:
    return obj.get(key) is True


def _dict(obj: Dict[str, Any], key: str) -> Dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


@dataclass
class ContentBlock:
    """One block of a message's content; ``raw`` is the block as written."""
    type: str
    raw: Dict[str, Any] = field(repr=False)


@dataclass
class TextBlock(ContentBlock):
    text: str = ""


@dataclass
class ThinkingBlock(ContentBlock):
    thinking: str = ""              # empty since early 2026: only a signature is kept


@dataclass
class RedactedThinkingBlock(ContentBlock):
    pass


@dataclass
class ToolUseBlock(ContentBlock):
    id: str = ""
    name: str = ""
    input: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResultBlock(ContentBlock):
    tool_use_id: str = ""
    is_error: bool = False
    text: str = ""                  # the text parts of the result, joined
    size: int = 0                   # characters of text plus bytes of media


@dataclass
class ImageBlock(ContentBlock):
    media_type: str = ""
    size: int = 0                   # characters of base64 data


@dataclass
class DocumentBlock(ContentBlock):
    media_type: str = ""
    size: int = 0


@dataclass
class UnknownBlock(ContentBlock):
    pass


def _media(raw: Dict[str, Any]) -> Tuple[str, int]:
    source = _dict(raw, "source")
    data = source.get("data")
    return (_str(source, "media_type") or "", len(data) if isinstance(data, str) else 0)


def _tool_result_block(raw: Dict[str, Any]) -> ToolResultBlock:
    content = raw.get("content")
    texts: List[str] = []
    size = 0
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                size += _media(part)[1]
    text = "\n".join(texts)
    return ToolResultBlock("tool_result", raw, tool_use_id=_str(raw, "tool_use_id") or "",
                           is_error=_bool(raw, "is_error"), text=text, size=size + len(text))


def parse_block(raw: Any) -> ContentBlock:
    """A content block model for any value; never raises."""
    if isinstance(raw, str):
        return TextBlock("text", {"type": "text", "text": raw}, text=raw)
    if not isinstance(raw, dict):
        return UnknownBlock("", {"value": raw})
    kind = _str(raw, "type") or ""
    if kind == "text":
        return TextBlock(kind, raw, text=_str(raw, "text") or "")
    if kind == "thinking":
        return ThinkingBlock(kind, raw, thinking=_str(raw, "thinking") or "")
    if kind == "redacted_thinking":
        return RedactedThinkingBlock(kind, raw)
    if kind == "tool_use":
        tool_input = raw.get("input")
        return ToolUseBlock(kind, raw, id=_str(raw, "id") or "", name=_str(raw, "name") or "",
                            input=tool_input if isinstance(tool_input, dict) else {})
    if kind == "tool_result":
        return _tool_result_block(raw)
    if kind == "image":
        media_type, size = _media(raw)
        return ImageBlock(kind, raw, media_type=media_type, size=size)
    if kind == "document":
        media_type, size = _media(raw)
        return DocumentBlock(kind, raw, media_type=media_type, size=size)
    return UnknownBlock(kind, raw)


@dataclass
class Message:
    """The ``message`` of a user or assistant entry (an Anthropic API message)."""
    role: str = ""
    content: List[ContentBlock] = field(default_factory=list)
    content_is_text: bool = False   # content was a plain string (typed prompts)
    id: Optional[str] = None
    model: Optional[str] = None
    stop_reason: Optional[str] = None
    usage: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any) -> "Message":
        if not isinstance(raw, dict):
            return cls()
        content = raw.get("content")
        if isinstance(content, list):
            blocks = [parse_block(block) for block in content]
        elif isinstance(content, str):
            blocks = [parse_block(content)]
        else:
            blocks = []
        return cls(role=_str(raw, "role") or "", content=blocks,
                   content_is_text=isinstance(content, str), id=_str(raw, "id"),
                   model=_str(raw, "model"), stop_reason=_str(raw, "stop_reason"),
                   usage=_dict(raw, "usage"))


@dataclass
class Entry:
    """Fields common to transcript entries; ``raw`` is the line's whole object."""
    type: str
    raw: Dict[str, Any] = field(repr=False)
    uuid: Optional[str] = None
    parent_uuid: Optional[str] = None
    session_id: Optional[str] = None
    timestamp: Optional[datetime] = None
    cwd: Optional[str] = None
    version: Optional[str] = None
    git_branch: Optional[str] = None
    is_sidechain: bool = False
    is_meta: bool = False
    agent_id: Optional[str] = None


@dataclass
class UserEntry(Entry):
    message: Message = field(default_factory=Message)
    tool_use_result: Any = None     # Claude Code's structured copy of a tool outcome
    is_compact_summary: bool = False


@dataclass
class AssistantEntry(Entry):
    message: Message = field(default_factory=Message)
    request_id: Optional[str] = None
    is_api_error: bool = False


@dataclass
class SystemEntry(Entry):
    subtype: Optional[str] = None   # None on 1.0.x/2.0.x hook status lines
    content: str = ""
    level: Optional[str] = None


@dataclass
class SummaryEntry(Entry):
    summary: str = ""
    leaf_uuid: Optional[str] = None


@dataclass
class FileHistorySnapshotEntry(Entry):
    message_id: Optional[str] = None
    is_snapshot_update: bool = False
    tracked_files: int = 0


@dataclass
class QueueOperationEntry(Entry):
    operation: str = ""
    content: str = ""


@dataclass
class ProgressEntry(Entry):
    data_type: str = ""
    data: Dict[str, Any] = field(default_factory=dict)
    tool_use_id: Optional[str] = None
    parent_tool_use_id: Optional[str] = None


@dataclass
class AttachmentEntry(Entry):
    attachment_type: str = ""
    attachment: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MetadataEntry(Entry):
    """The small uuid-less kinds: titles, modes, last prompt, PR links."""
    value: str = ""


@dataclass
class UnknownEntry(Entry):
    """A type this version does not know: kept whole, forwarded unchanged."""


# The field that carries each small metadata kind's value, in order of preference.
METADATA_FIELDS: Dict[str, Tuple[str, ...]] = {
    "permission-mode": ("permissionMode",),
    "mode": ("mode",),
    "last-prompt": ("lastPrompt", "leafUuid"),
    "ai-title": ("aiTitle",),
    "custom-title": ("customTitle",),
    "agent-name": ("agentName",),
    "agent-setting": ("agentSetting",),
    "pr-link": ("prUrl", "prNumber"),
    "bridge-session": ("bridgeSessionId",),
}

def _text_of(value: Any) -> str:
    """Plain text of a string or a list of content blocks."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(block.text for block in map(parse_block, value)
                         if isinstance(block, TextBlock))
    return ""


def _type_fields(kind: str, raw: Dict[str, Any]) -> Tuple[type, Dict[str, Any]]:
    """The model class for ``kind`` and the fields particular to it."""
    if kind == "user":
        return UserEntry, dict(message=Message.parse(raw.get("message")),
                               tool_use_result=raw.get("toolUseResult"),
                               is_compact_summary=_bool(raw, "isCompactSummary"))
    if kind == "assistant":
        return AssistantEntry, dict(message=Message.parse(raw.get("message")),
                                    request_id=_str(raw, "requestId"),
                                    is_api_error=_bool(raw, "isApiErrorMessage"))
    if kind == "system":
        return SystemEntry, dict(subtype=_str(raw, "subtype"), content=_text_of(raw.get("content")),
                                 level=_str(raw, "level"))
    if kind == "summary":
        return SummaryEntry, dict(summary=_str(raw, "summary") or "", leaf_uuid=_str(raw, "leafUuid"))
    if kind == "file-history-snapshot":
        snapshot = _dict(raw, "snapshot")
        return FileHistorySnapshotEntry, dict(
            message_id=_str(raw, "messageId"), is_snapshot_update=_bool(raw, "isSnapshotUpdate"),
            tracked_files=len(_dict(snapshot, "trackedFileBackups")))
    if kind == "queue-operation":
        return QueueOperationEntry, dict(operation=_str(raw, "operation") or "",
                                         content=_text_of(raw.get("content")))
    if kind == "progress":
        data = _dict(raw, "data")
        return ProgressEntry, dict(data_type=_str(data, "type") or "", data=data,
                                   tool_use_id=_str(raw, "toolUseID"),
                                   parent_tool_use_id=_str(raw, "parentToolUseID"))
    if kind == "attachment":
        attachment = _dict(raw, "attachment")
        return AttachmentEntry, dict(attachment_type=_str(attachment, "type") or "",
                                     attachment=attachment)
    if kind in METADATA_FIELDS:
        values = (raw.get(key) for key in METADATA_FIELDS[kind])
        value = next((v for v in values if isinstance(v, (str, int)) and not isinstance(v, bool)), "")
        return MetadataEntry, dict(value=str(value))
    return UnknownEntry, {}


def parse_entry(raw: Dict[str, Any]) -> Entry:
    """The model of one transcript object. Never raises on a dict."""
    kind = _str(raw, "type") or ""
    cls, fields = _type_fields(kind, raw)
    return cls(kind, raw, uuid=_str(raw, "uuid"), parent_uuid=_str(raw, "parentUuid"),
               session_id=_str(raw, "sessionId"), timestamp=parse_timestamp(raw.get("timestamp")),
               cwd=_str(raw, "cwd"), version=_str(raw, "version"), git_branch=_str(raw, "gitBranch"),
               is_sidechain=_bool(raw, "isSidechain"), is_meta=_bool(raw, "isMeta"),
               agent_id=_str(raw, "agentId"), **fields)


class MalformedLine(ValueError):
    """A transcript line that is not one JSON object in valid UTF-8."""


def _reject_constant(name: str) -> None:
    raise ValueError("%s is not JSON" % name)


_LINE_DECODER = json.JSONDecoder(parse_constant=_reject_constant)   # built once, not per line


def _nested_deeper(obj: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` in a decoded line, walking its
    containers a level at a time: exact, and asked only of lines ``_shallow`` cannot clear."""
    level = [obj]
    for _ in range(limit):
        level = [value for container in level
                 for value in (container.values() if type(container) is dict else container)
                 if type(value) is dict or type(value) is list]
        if not level:
            return False
    return True


_REFERENTS = gc.get_referents
_NOT_OPENING = bytes(b for b in range(256) if b not in b"[{")


def _shallow(obj: Any, limit: int) -> bool:
    """Whether a decoded line certainly nests no deeper than ``limit``: a level of its
    values per call, walked in C by gc.get_referents (a dict's values, a list's items;
    a string or a number has none), so the level after the deepest is empty.

    Just decoded, the object is still in the cache, and this costs half of what
    counting the line's brackets does, a pass over every byte that was a tenth
    of a replay; on a long line of small values, the lists of a level would cost
    more memory than the count (see DEPTH_WALK_MAX_BYTES). A leaf container that a
    traversal skipped (none does today; the documentation allows it) could hide
    one level: hence ``limit - 1``.
    """
    level = [obj]
    for _ in range(limit - 1):
        level = _REFERENTS(*level)
        if not level:
            return True
    return False


def decode_line(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Dict[str, Any]:
    """The JSON object on one line, or MalformedLine saying briefly why not.

    UTF-8 is checked strictly first: ``json.loads(bytes)`` would accept
    encoded surrogates, and the line's bytes are forwarded as they are.
    Nesting deeper than ``max_depth`` is malformed: Python's own limit depends on
    its version (3.13 parses what 3.8 cannot), so one fixed limit lets every client
    read what the server forwards. A line too deep for this Python's decoder stops
    it with RecursionError; one it parsed is checked after, if long enough to be.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedLine("invalid UTF-8 at byte %d" % exc.start) from None
    obj: Any = None
    try:                            # the common case in one C call, no whitespace handling
        obj, end = _LINE_DECODER.scan_once(text, 0)
        if end != len(text):
            obj = None
    except (StopIteration, ValueError):
        pass
    except RecursionError:
        raise MalformedLine(_too_deep(max_depth)) from None
    if not isinstance(obj, dict):
        try:                        # anything else: the full decoder, for its message
            obj = _LINE_DECODER.decode(text)
        except RecursionError:
            raise MalformedLine(_too_deep(max_depth)) from None
        except ValueError as exc:
            reason = "invalid JSON: %s" % (exc.args[0] if exc.args else exc)
            if "Extra data" in reason:
                reason += " (two records spliced onto one line?)"
            raise MalformedLine(reason) from None
        if not isinstance(obj, dict):
            raise MalformedLine("a JSON %s, not an object" % type(obj).__name__)
    if len(data) > 2 * max_depth:
        cleared = _shallow(obj, max_depth) if len(data) <= DEPTH_WALK_MAX_BYTES else \
            len(data.translate(None, _NOT_OPENING)) <= max_depth      # fewer openers than levels
        if not cleared and _nested_deeper(obj, max_depth):
            raise MalformedLine(_too_deep(max_depth))
    return obj


def _too_deep(max_depth: int) -> str:
    return "invalid JSON: nested deeper than %d levels" % max_depth


def excerpt(data: bytes, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable, always-decodable excerpt of a bad line."""
    decoded = data[:limit * 4].decode("utf-8", "replace")
    shown = "".join(ch if ch.isprintable() else "\ufffd" for ch in decoded[:limit])
    cut = len(decoded) > limit or len(data) > limit * 4
    return shown + ("\u2026" if cut else "")


# =============================================================================
# Tailer: transcript files -> complete lines
# =============================================================================
#
# Semantics follow ``tail -F`` and Filebeat: a line is emitted only once its
# newline is on disk and the cursor never passes an unterminated line; a file
# that shrinks was truncated and is read again from 0; a new (device, inode)
# under the same name is a new file, read from 0; a vanished file is forgotten.
# Files present at start are followed from their end (clients ask for history
# explicitly); files that appear later are read from their first byte.


def classify_path(rel: str) -> Tuple[str, Optional[str], Optional[str]]:
    """(project, session, agent) from a path relative to its root.

    Layouts: ``<project>/<session>.jsonl`` (main session),
    ``<project>/agent-<id>.jsonl`` (2.0.x sub-agent; session from its entries),
    ``<project>/<session>/subagents/[workflows/<run>/]agent-<id>.jsonl`` and
    ``journal.jsonl`` (2.1.x sub-agents and workflows).
    """
    parts = rel.split("/")
    stem = parts[-1][:-len(TRANSCRIPT_SUFFIX)] if parts[-1].endswith(TRANSCRIPT_SUFFIX) else parts[-1]
    project = parts[0] if len(parts) > 1 else ""
    agent = stem[len("agent-"):] if stem.startswith("agent-") else None
    if len(parts) >= 3:
        return project, parts[1], agent or stem
    return project, (None if agent else stem), agent


HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")    # a machine's name: one safe path component


def host_name(name: Any) -> Optional[str]:
    """``name`` if it can name a machine (and a folder of the hub's mirror), else None."""
    return name if isinstance(name, str) and HOST_NAME.match(name) and name not in (".", "..") else None


def own_host_name() -> str:
    """This machine's name, as far as it is a safe one (``serve --name`` sets another)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63].lstrip("._-")
    return host_name(name) or "localhost"


def mirror_parts(path: Any) -> Optional[List[str]]:
    """A box's transcript path as safe parts of a path under DIR/<host>/, or None:
    no '..', no absolute path, no empty part, nothing but a transcript."""
    if not isinstance(path, str) or len(path) > 4096 or not path.endswith(TRANSCRIPT_SUFFIX):
        return None
    parts = path.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p or len(p.encode("utf-8", "replace")) > 255
           for p in parts):
        return None
    return parts


@dataclass(eq=False)
class FileRecord:
    """What the tailer knows of one transcript file."""
    root: str
    rel: str                        # relative to root, "/"-separated: the cursor's path
    abspath: str
    project: str
    session: Optional[str]
    agent: Optional[str]
    dev: int
    ino: int
    read_pos: int                   # next byte to read
    line_start: int                 # offset of the first byte of ``pending``
    last_growth: float              # monotonic time the file last grew
    mtime: float = 0.0              # st_mtime at the last stat (wall clock)
    boundary_known: bool = True     # False until we know read_pos starts a line
    pending: bytearray = field(default_factory=bytearray, repr=False)
    skipping: bool = False          # inside an oversize line, dropping to its newline
    fh: Any = field(default=None, repr=False)
    due: float = 0.0                # when the next stat is scheduled
    gone: bool = False
    host: Optional[str] = None      # the machine it is from: this server's name, or a mirrored box's
    # Its lines' envelope pieces by (session, agent, type, cwd): see envelope_pieces.
    envelopes: Dict[Tuple[Any, ...], Tuple[bytes, bytes, int, "MessageMeta"]] = field(
        default_factory=dict, repr=False, compare=False)
    checked: Optional["CheckedLines"] = field(default=None, repr=False, compare=False)   # see CheckedLines

    @property
    def delivered_end(self) -> int:
        """Where what the tailer has delivered ends: history reads up to here.

        Inside an oversize line that is the read position: its ``gap`` is out,
        and a reader from before it must reach it to report it too.
        """
        return self.read_pos if self.skipping else self.line_start


@dataclass
class LinesEvent:
    """The complete lines of one read of ``file``, in order: (offset, the line without
    its newline) each, or (offset, None) for a line longer than ``max_line_bytes``,
    which is skipped. One event per read, not per line: a burst is 100,000 lines."""
    file: FileRecord
    lines: List[Tuple[int, Optional[bytes]]]


@dataclass
class ResetEvent:
    """The file was truncated or replaced; it is read again from offset 0."""
    file: FileRecord
    reason: str


@dataclass
class RemovedEvent:
    file: FileRecord


TailEvent = Union[LinesEvent, ResetEvent, RemovedEvent]


@dataclass
class DirState:
    root: "RootState"
    mtime_ns: int
    ino: int = 0                    # a folder deleted and made again, or renamed, is another one
    files: set = field(default_factory=set)
    subdirs: set = field(default_factory=set)


@dataclass
class RootState:
    path: str
    present: bool = False


class Inotify:
    """Linux inotify through ctypes: wakes the poller when a watched folder changes.

    One watch per folder reports changes to the files in it by name (growth,
    creation, deletion, renames), so a tree of 10,000 files in 200 folders
    costs 200 watches. It is a wake-up, never the truth: events can be lost
    (queue overflow), and other machines' writes to a network file system
    raise none, so the tailer still polls, only less often.
    """

    IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
    IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
    IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x1000000
    WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
                  | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
    _HEADER = struct.Struct("iIII")     # wd, mask, cookie, name length

    def __init__(self, read_bytes: int = WAKEUP_READ_BYTES) -> None:
        import ctypes                   # only here: no cost where inotify is not used
        self._ctypes = ctypes
        libc = c_library()
        if libc is None:
            raise OSError(errno.ENOSYS, "no C library through ctypes")
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add_watch.restype = ctypes.c_int
        self._rm_watch = libc.inotify_rm_watch
        self._rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.read_bytes = read_bytes        # of events per read() call
        self.paths: Dict[int, str] = {}     # watch descriptor -> folder
        self.watches: Dict[str, int] = {}   # folder -> watch descriptor

    @classmethod
    def create(cls, log: "Log", read_bytes: int = WAKEUP_READ_BYTES) -> Optional["Inotify"]:
        if not sys.platform.startswith("linux"):
            return None
        try:
            return cls(read_bytes)
        except (OSError, AttributeError, ImportError) as exc:
            log.info("no inotify (%s); polling at full rate" % exc)
            return None

    def fileno(self) -> int:
        return self.fd

    def watch(self, path: str) -> int:
        """Watch a folder: 0, or the errno of the kernel's refusal (ENOSPC: out of watches)."""
        if path in self.watches:
            return 0
        wd = self._add_watch(self.fd, os.fsencode(path), self.WATCH_MASK)
        if wd < 0:
            return self._ctypes.get_errno() or errno.EIO
        old = self.paths.get(wd)
        if old is not None and old != path:    # the same folder, renamed: one watch per inode
            self.watches.pop(old, None)
        self.watches[path] = wd
        self.paths[wd] = path
        return 0

    def unwatch(self, path: str) -> None:
        wd = self.watches.pop(path, None)
        if wd is not None:
            self.paths.pop(wd, None)
            self._rm_watch(self.fd, wd)     # EINVAL if the kernel dropped it already: fine

    def read(self) -> Tuple[List[Tuple[str, str, int]], bool]:
        """Pending events as (folder, name, mask), and whether the queue overflowed."""
        events: List[Tuple[str, str, int]] = []
        overflow = False
        while True:
            try:
                data = os.read(self.fd, self.read_bytes)
            except (BlockingIOError, InterruptedError):
                break
            pos, size = 0, self._HEADER.size
            while pos + size <= len(data):
                wd, mask, _, length = self._HEADER.unpack_from(data, pos)
                name = data[pos + size:pos + size + length].split(b"\0", 1)[0]
                pos += size + length
                if mask & self.IN_Q_OVERFLOW:
                    overflow = True
                    continue
                folder = self.paths.get(wd)
                if folder is None:
                    continue
                if mask & self.IN_IGNORED:  # the watch is gone with its folder
                    if self.watches.get(folder) == wd:
                        del self.watches[folder]
                    self.paths.pop(wd, None)
                events.append((folder, os.fsdecode(name), mask))
        return events, overflow

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileChanged(OSError):
    """The path names another file than the one examined: look again later."""


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0))


def open_regular_fd(path: str, identity: Optional[Tuple[int, int]] = None, follow: bool = False,
                    ours: bool = False) -> int:
    """Open a file found on disk to read, without ever blocking or following a link.

    O_NONBLOCK: a FIFO opens at once instead of waiting for a writer for ever;
    O_NOFOLLOW (unless ``follow``, for a file the user named): a symbolic link
    is refused (it could point anywhere, e.g. at a private key). Then the
    descriptor itself must be a regular file, owned by us if ``ours``, and, when
    ``identity`` (device, inode) is given, the very file that was examined: a
    name can be renamed over between a stat() and an open().
    """
    fd = os.open(path, _OPEN_FLAGS & ~getattr(os, "O_NOFOLLOW", 0) if follow else _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if ours and hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise OSError(errno.EPERM, "owned by another user")
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise FileChanged(errno.ESTALE, "replaced while being opened")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str, identity: Optional[Tuple[int, int]] = None, follow: bool = False,
                    ours: bool = False) -> Any:
    """``open_regular_fd``'s descriptor as an unbuffered binary file."""
    fd = open_regular_fd(path, identity, follow, ours)
    try:
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str, identity: Optional[Tuple[int, int]], offset: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` of the file examined as ``identity``: a
    history read, one a block, so without a file object or a seek (pread)."""
    fd = open_regular_fd(path, identity)
    try:
        if _PREAD is not None:
            return _PREAD(fd, size, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)
    finally:
        os.close(fd)


_PREAD = getattr(os, "pread", None)         # POSIX; elsewhere a seek and a read


def write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` to a regular file (a short write goes on where it stopped)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def split_lines(state: Any, chunk: bytes, limit: int) -> List[Tuple[int, Optional[bytes]]]:
    """Cut newly read bytes into complete lines: the one splitter, live and history alike.

    ``state`` (a FileRecord or a LineReader) holds ``read_pos`` (the offset
    ``chunk`` was read at), ``line_start`` (the offset of ``pending``, an
    unterminated line) and ``skipping`` (inside an oversize line). Returns
    (offset, line) per complete line, and (offset, None) once for a line
    longer than ``limit``, at its first byte, as soon as it is known to be too
    long; its bytes up to its newline are dropped. One rule, whatever the
    chunking: both paths report the same thing at the same offset.
    """
    out: List[Tuple[int, Optional[bytes]]] = []
    state.read_pos += len(chunk)
    start = 0                       # where the next line begins in chunk
    if state.skipping:
        newline = chunk.find(b"\n")
        if newline < 0:
            return out
        state.skipping = False
        state.line_start = state.read_pos - len(chunk) + newline + 1
        start = newline + 1
    # find (memchr) from newline to newline, not bytes.split: split compares every
    # byte in a loop of its own, five times the cost on lines of a kilobyte or more.
    find = chunk.find
    end = find(b"\n", start)
    if end >= 0:
        offset = state.line_start
        if state.pending:           # the line begun in an earlier read ends here
            state.pending += chunk[start:end]
            line = bytes(state.pending)
            state.pending = bytearray()
            out.append((offset, line if len(line) <= limit else None))
            offset += len(line) + 1
            start = end + 1
            end = find(b"\n", start)
        while end >= 0:
            out.append((offset, chunk[start:end] if end - start <= limit else None))
            offset += end - start + 1
            start = end + 1
            end = find(b"\n", start)
        state.line_start = offset
    if start < len(chunk):
        state.pending += chunk[start:] if start else chunk
        if len(state.pending) > limit:
            out.append((state.line_start, None))
            state.pending = bytearray()
            state.skipping = True
    return out


# --- discovery: which files there are ----------------------------------------


def nearest_folder(path: str) -> str:
    """The nearest folder above ``path`` that exists."""
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent) and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def default_roots() -> List[str]:
    """``$CLAUDE_CONFIG_DIR/projects``, else ``~/.claude/projects`` and the XDG one."""
    config_dir = os.environ.get("CLAUDE_CONFIG_DIR")
    if config_dir:
        return [os.path.join(os.path.expanduser(config_dir), "projects")]
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join("~", ".config")
    return [os.path.expanduser(os.path.join("~", ".claude", "projects")),
            os.path.expanduser(os.path.join(xdg, "claude", "projects"))]


class Discovery:
    """Finds transcript files: roots that appear and vanish, folders listed on change.

    Owns the roots, the listed folders and the inotify watches on them; says
    which files appeared (``Found``) and which are gone (paths). Reads no file.
    Folder mtimes are compared every ``dir_check`` interval; with wake-ups the
    folders report their own changes and are listed at a slowed-down rate.
    """

    def __init__(self, roots: Iterable[str], poll_interval: float, log: Log, limits: Limits,
                 wakeups: bool, wall: Callable[[], float]):
        self.roots = [RootState(os.path.abspath(os.path.expanduser(r))) for r in roots]
        self.poll_interval, self.log, self.limits, self.wall = poll_interval, log, limits, wall
        self.dirs: Dict[str, DirState] = {}
        self.notify = Inotify.create(log, limits.wakeup_read_bytes) if wakeups else None
        self.slowdown = limits.wakeup_factor if self.notify is not None else 1
        self.started = False
        self.next_dir_check = 0.0
        self.next_listing = 0.0
        self.next_full_scan = 0.0
        self._warned: set = set()
        self._ancestors: set = set()        # watched parents of roots that do not exist yet

    def warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log.warn(text, key="files")

    def file_gone(self, path: str) -> None:
        parent = self.dirs.get(os.path.dirname(path))
        if parent is not None:
            parent.files.discard(path)

    def check(self, now: float, full: bool) -> Tuple[List[Tuple[RootState, str]], List[str]]:
        """Notice roots that appear or vanish; re-list folders whose mtime changed.

        Returns (files found, paths gone): gone first, as a path can be both
        (a folder deleted and made again).
        """
        found: List[Tuple[RootState, str]] = []
        gone: List[str] = []
        limits = self.limits
        self.next_dir_check = now + self.poll_interval * limits.dir_check_factor
        if full:
            self.next_full_scan = now + (limits.full_rescan_interval if self.notify is None
                                         else limits.wakeup_rescan_interval)
        listing = full or now >= self.next_listing
        if listing:
            self.next_listing = now + self.poll_interval * limits.dir_check_factor * self.slowdown
        for root in self.roots:
            if os.path.isdir(root.path):
                if not root.present:
                    root.present = True
                    if self.started:
                        self.log.info("now watching %s" % root.path)
                    self.scan(root, root.path, found, gone)
                    continue
            elif root.present:
                root.present = False
                self.log.warn("%s is gone; waiting for it to come back" % root.path)
                self._forget_dir(root.path, gone)
                continue
            else:
                continue
            if listing:
                self._relist_changed(root, full, found, gone)
        self._update_ancestors()
        return found, gone

    def _relist_changed(self, root: RootState, full: bool, found: List[Tuple[RootState, str]], gone: List[str]) -> None:
        wall = self.wall()
        for path, state in list(self.dirs.items()):
            if state.root is not root or path not in self.dirs:
                continue
            try:
                st = os.stat(path)
            except OSError:
                self._forget_dir(path, gone)
                continue
            racy = wall - state.mtime_ns / 1e9 < self.limits.racy_dir_seconds
            if full or racy or st.st_mtime_ns != state.mtime_ns or st.st_ino != state.ino:
                self.scan(root, path, found, gone)

    def _update_ancestors(self) -> None:
        """Watch the nearest existing folder above each missing root, so that a root
        is found the moment it is made, not at the next check of the roots.

        ``mkdir -p`` makes the chain faster than we move the watch down it: after
        each new watch the chain is looked at again, and a root found complete
        meanwhile is checked at once.
        """
        if self.notify is None:
            return
        wanted = set()
        for root in self.roots:
            if root.present:
                continue
            parent, nearest = None, nearest_folder(root.path)
            while nearest != parent:
                parent = nearest
                if parent not in self.notify.watches and self.notify.watch(parent) != 0:
                    break               # cannot watch: the regular checks find the root
                nearest = nearest_folder(root.path)
            wanted.add(parent)
            if os.path.isdir(root.path):
                self.next_dir_check = 0.0
        for old in self._ancestors - wanted:
            if old not in self.dirs:
                self.notify.unwatch(old)
        self._ancestors = {p for p in wanted if p in self.notify.watches}

    def scan(self, root: RootState, top: str, found: List[Tuple[RootState, str]], gone: List[str]) -> None:
        """List ``top`` and every folder below it not listed yet; note new files and gone ones."""
        stack = [top]
        while stack:
            path = stack.pop()
            self.watch(path)                # before listing: nothing created meanwhile is missed
            try:
                st = os.stat(path)                       # before listing: a change during
                with os.scandir(path) as it:             # the listing shows up next time
                    entries = list(it)
            except FileNotFoundError:
                self._forget_dir(path, gone)
                continue
            except OSError as exc:
                self.warn_once(path, "cannot list %s: %s" % (path, exc.strerror or exc))
                continue
            state = self.dirs.get(path)
            if state is not None and state.ino != st.st_ino:
                self._forget_dir(path, gone)            # deleted and made again, or renamed
                self.watch(path)
                state = None
            if state is None:
                state = self.dirs[path] = DirState(root, st.st_mtime_ns, st.st_ino)
            state.mtime_ns = st.st_mtime_ns
            files, subdirs = self._entries(entries, gone)
            gone.extend(state.files - files)
            for old in state.subdirs - subdirs:
                self._forget_dir(old, gone)
            found.extend((root, p) for p in files - state.files)
            state.files, state.subdirs = files, subdirs
            stack.extend(d for d in subdirs if d not in self.dirs)

    def _entries(self, entries: List[os.DirEntry], gone: List[str]) -> Tuple[set, set]:
        files, subdirs = set(), set()
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.add(entry.path)
                    known = self.dirs.get(entry.path)
                    if known is not None and known.ino != entry.inode():
                        self._forget_dir(entry.path, gone)   # listed again below
                elif entry.name.endswith(TRANSCRIPT_SUFFIX):
                    # Regular files only: a FIFO would block a reader, and a link
                    # can point outside the root (at a private key, say).
                    if entry.is_file(follow_symlinks=False):
                        files.add(entry.path)
                    elif entry.is_symlink():
                        self.warn_once(entry.path, "not following the symbolic link %s" % entry.path)
            except OSError:
                continue
        return files, subdirs

    def _forget_dir(self, path: str, gone: List[str]) -> None:
        prefix = path + os.sep
        for dir_path in [p for p in self.dirs if p == path or p.startswith(prefix)]:
            gone.extend(self.dirs.pop(dir_path).files)
            if self.notify is not None:
                self.notify.unwatch(dir_path)

    def watch(self, path: str) -> None:
        """Watch a folder; if the kernel refuses, poll at the full rate from now on."""
        if self.notify is None or path in self.notify.watches:
            return
        err = self.notify.watch(path)
        if err in (0, errno.ENOENT, errno.ENOTDIR):     # gone already: its listing says so
            return
        self.warn_once("inotify", "cannot watch %s for changes (%s); polling every file at "
                       "the full rate instead" % (path, os.strerror(err)))
        if self.slowdown != 1:
            self.slowdown = 1
            self.next_listing = 0.0

    def wakeups(self, now: float) -> Tuple[List[str], bool, List[Tuple[RootState, str]], List[str]]:
        """(paths inotify named, overflowed?, files found, paths gone); folders re-listed as needed."""
        found: List[Tuple[RootState, str]] = []
        gone: List[str] = []
        if self.notify is None:
            return [], False, found, gone
        changes, overflow = self.notify.read()
        if overflow:                    # events were lost: look at everything now
            self.next_dir_check = self.next_listing = self.next_full_scan = now
            return [], True, found, gone
        named: List[str] = []
        relist: Dict[str, None] = {}
        for folder, name, mask in changes:
            if folder in self._ancestors:   # on the way to a missing root: check the roots now
                self.next_dir_check = now
            named.append(os.path.join(folder, name) if name else folder)
            if mask & (Inotify.IN_CREATE | Inotify.IN_DELETE | Inotify.IN_MOVED_FROM | Inotify.IN_MOVED_TO):
                relist[folder] = None
            if mask & (Inotify.IN_DELETE_SELF | Inotify.IN_MOVE_SELF | Inotify.IN_IGNORED):
                relist[os.path.dirname(folder)] = None      # the folder itself went away
        for folder in relist:
            state = self.dirs.get(folder)
            if state is not None:
                self.scan(state.root, folder, found, gone)
        return named, False, found, gone

    def close(self) -> None:
        if self.notify is not None:
            self.notify.close()


# --- the tailer: when each file is looked at, and what it gained ----------------


class Tailer:
    """Follows every file Discovery finds and turns appended bytes into TailEvents.

    Sans-I/O towards the network: ``poll(now)`` does the due stats and reads,
    bounded by ``tick_read_budget``, and returns events; ``next_due()`` tells
    the event loop when to call again. Polling tiers: a file is stat()ed at
    the hot, warm or cold interval by how recently it grew, in shared slots.
    """

    def __init__(self, roots: Iterable[str], poll_interval: float = DEFAULT_POLL_INTERVAL,
                 log: Optional[Log] = None, clock: Callable[[], float] = time.monotonic,
                 wakeups: bool = True, limits: Limits = DEFAULT_LIMITS,
                 wall: Callable[[], float] = time.time, host: Optional[str] = None,
                 mirrors: Iterable[str] = ()):
        self.poll_interval = poll_interval
        self.host = host                # the name of this machine, on its own files
        # Mirror roots hold <host>/<the box's own path>: the first part names the machine.
        self.mirrors = {os.path.abspath(os.path.expanduser(m)) for m in mirrors}
        self.log = log or Log()
        self.clock, self.wall, self.limits = clock, wall, limits
        self.discovery = Discovery(roots, poll_interval, self.log, limits, wakeups, wall)
        self.files: Dict[str, FileRecord] = {}
        self._schedule_heap = TimerHeap(lambda due, rec: rec.gone or rec.due != due)   # next stats
        self._slowdown = self.discovery.slowdown    # the rate the schedule was made for
        self._open_files = 0

    # --- scheduling ---------------------------------------------------------

    def _schedule(self, rec: FileRecord, due: float) -> None:
        rec.due = due                   # an entry of another time for rec is stale
        self._schedule_heap.add(due, rec)

    def _interval(self, rec: FileRecord, now: float) -> float:
        age, limits, slowdown = now - rec.last_growth, self.limits, self.discovery.slowdown
        if age < limits.hot_age:
            return self.poll_interval * slowdown
        if age < limits.warm_age:
            return self.poll_interval * limits.warm_factor * slowdown
        return self.poll_interval * limits.cold_factor * slowdown

    def _next_check(self, rec: FileRecord, now: float, fraction: float = 1.0) -> float:
        """When ``rec`` is due: ``fraction`` of its tier's interval from now, rounded up
        to a shared slot, so idle files are stat()ed in batches.

        10,000 cold files each due at its own instant would wake the loop a
        hundred times a second for one stat each; slots of a tenth of the
        interval (at most a second) make that one wake-up per slot.
        """
        interval = self._interval(rec, now)
        slot = min(interval / self.limits.schedule_slots, self.limits.max_slot_seconds)
        return math.ceil((now + fraction * interval) / slot) * slot

    def next_due(self) -> float:
        due = self.discovery.next_dir_check
        first = self._schedule_heap.next_when()
        return due if first is None else min(due, first)

    # --- the tick -------------------------------------------------------------

    def start(self) -> List[TailEvent]:
        """Find every transcript; existing files are followed from their end."""
        events: List[TailEvent] = []
        self._discover(self.clock(), events, full=True)
        self.discovery.started = True
        return events

    def poll(self, now: Optional[float] = None) -> List[TailEvent]:
        now = self.clock() if now is None else now
        events: List[TailEvent] = []
        self.take_wakeups(now, events)     # before the stats: what changed is due now
        if now >= self.discovery.next_dir_check:
            self._discover(now, events, full=now >= self.discovery.next_full_scan)
        budget = self.limits.tick_read_budget
        while budget > 0:
            rec = self._schedule_heap.pop_due(now)
            if rec is None:
                break
            used, more = self._check_file(rec, now, events, budget)
            budget -= used
            if rec.gone:
                continue
            if more:
                self._schedule(rec, now)       # budget spent mid-file: next tick
            else:
                self._schedule(rec, self._next_check(rec, now))
                if rec.fh is not None and now - rec.last_growth >= self.limits.hot_age:
                    self._close(rec)
        return events

    def close(self) -> None:
        self.discovery.close()
        for rec in self.files.values():
            self._close(rec)

    def take_wakeups(self, now: float, events: List[TailEvent]) -> None:
        """Make the files inotify named due now; re-list folders whose entries changed.

        Reads no file: the server calls this on every wake-up, even while it
        holds reads back for slow clients, so the descriptor never stays readable.
        """
        named, overflow, found, gone = self.discovery.wakeups(now)
        if overflow:
            self.log.debug("inotify queue overflowed; checking every file")
            for rec in self.files.values():
                self._schedule(rec, now)
            return
        for path in named:
            rec = self.files.get(path)
            if rec is not None and rec.due > now:
                self._schedule(rec, now)
        self._apply(found, gone, now, events)

    def _discover(self, now: float, events: List[TailEvent], full: bool) -> None:
        found, gone = self.discovery.check(now, full)
        self._apply(found, gone, now, events)

    def _apply(self, found: List[Tuple[RootState, str]], gone: List[str], now: float,
               events: List[TailEvent]) -> None:
        for path in gone:
            rec = self.files.get(path)
            if rec is not None:
                self._forget(rec, events)       # Discovery has let go of it already
        if self.discovery.slowdown != self._slowdown:
            self._rate_changed(now)
        wall = self.wall()
        for root, path in found:
            if path not in self.files:
                self._add_file(root, path, now, wall)

    def _rate_changed(self, now: float) -> None:
        """Wake-ups failed: every file at the full rate from now, not after its slow interval."""
        self._slowdown = self.discovery.slowdown
        for rec in self.files.values():
            due = self._next_check(rec, now)
            if due < rec.due:
                self._schedule(rec, due)

    def _add_file(self, root: RootState, path: str, now: float, wall: float) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        rel = path[len(root.path):].lstrip(os.sep).replace(os.sep, "/")   # path is below root
        host, inner = self.host, rel
        if root.path in self.mirrors:
            host, _, inner = rel.partition("/")
            if host_name(host) is None or not inner:
                return                      # not a box's folder: nothing the hub wrote
        project, session, agent = classify_path(inner)
        # Existing files at start: follow from the end; their idle age sets the tier.
        # Files that appear later are new content: read them from the first byte.
        existing = not self.discovery.started
        start = st.st_size if existing else 0
        idle = max(0.0, wall - st.st_mtime) if existing else 0.0
        rec = FileRecord(root.path, rel, path, project, session, agent, st.st_dev, st.st_ino,
                         read_pos=start, line_start=start, last_growth=now - idle,
                         mtime=st.st_mtime, boundary_known=start == 0, host=host)
        self.files[path] = rec
        if existing:   # spread the first stats of a big tree over one interval
            self._schedule(rec, self._next_check(rec, now, random.random()))
        else:
            self._schedule(rec, now)

    def _forget(self, rec: FileRecord, events: List[TailEvent]) -> None:
        rec.gone = True
        self._close(rec)
        forget_checked(rec)             # its lines will not be read again: their memory goes now
        self.files.pop(rec.abspath, None)
        events.append(RemovedEvent(rec))

    def _lost(self, rec: FileRecord, events: List[TailEvent]) -> None:
        """A file its own stat found gone: forgotten, and out of its folder's listing too.

        (What Discovery reports gone it has let go of already; telling it again
        could take a new file of the same name out of a folder made again.)
        """
        self._forget(rec, events)
        self.discovery.file_gone(rec.abspath)

    # --- reading --------------------------------------------------------------

    def _check_file(self, rec: FileRecord, now: float, events: List[TailEvent],
                    budget: int) -> Tuple[int, bool]:
        """Stat one file, notice truncation or replacement, read what is new."""
        try:
            st = os.lstat(rec.abspath)
        except (FileNotFoundError, NotADirectoryError):
            self._lost(rec, events)
            return 0, False
        except OSError as exc:
            self.discovery.warn_once(rec.abspath, "cannot stat %s: %s" % (rec.rel, exc.strerror or exc))
            return 0, False
        if not stat.S_ISREG(st.st_mode):        # renamed over by a FIFO, a link, a folder
            self.discovery.warn_once(rec.abspath, "%s is no longer a regular file; no longer followed" % rec.rel)
            self._lost(rec, events)
            return 0, False
        rec.mtime = st.st_mtime
        if (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
            self._reset(rec, st, "replaced", events)
        elif st.st_size < rec.read_pos:
            self._reset(rec, st, "truncated", events)
        if st.st_size <= rec.read_pos:
            return 0, False
        try:
            return self._read(rec, now, events, budget)
        except FileChanged:
            return 0, True              # replaced between stat and open: look again next tick
        except OSError as exc:
            self._close(rec)
            self.discovery.warn_once(rec.abspath, "cannot read %s: %s" % (rec.rel, exc.strerror or exc))
            return 0, False

    def _reset(self, rec: FileRecord, st: os.stat_result, reason: str,
               events: List[TailEvent]) -> None:
        self._close(rec)
        rec.dev, rec.ino = st.st_dev, st.st_ino
        rec.read_pos = rec.line_start = 0
        forget_checked(rec)             # another file's bytes now: what was checked is of no use
        rec.pending = bytearray()
        rec.skipping = False
        rec.boundary_known = True
        events.append(ResetEvent(rec, reason))

    def _close(self, rec: FileRecord) -> None:
        if rec.fh is not None:
            rec.fh.close()
            rec.fh = None
            self._open_files -= 1

    def _read(self, rec: FileRecord, now: float, events: List[TailEvent],
              budget: int) -> Tuple[int, bool]:
        fh = rec.fh
        if fh is None:
            fh = open_regular(rec.abspath, (rec.dev, rec.ino))
            if self._open_files < self.limits.max_open_files:
                rec.fh = fh
                self._open_files += 1
        try:
            if not rec.boundary_known:
                self._find_line_start(rec, fh)
            elif rec.read_pos and not self._same_last_byte(rec, fh):
                # Truncated and rewritten past our offset between two stats: the
                # byte before our offset changed, so these are not the same lines.
                self._reset(rec, os.fstat(fh.fileno()), "rewritten", events)
                return 0, True          # read again from 0 on the next tick
            fh.seek(rec.read_pos)
            total = 0
            while total < budget:
                chunk = fh.read(min(self.limits.read_block, budget - total))
                if not chunk:
                    break
                total += len(chunk)
                lines = split_lines(rec, chunk, self.limits.max_line_bytes)
                if lines:
                    events.append(LinesEvent(rec, lines))
        finally:
            if rec.fh is not fh:
                fh.close()
        rec.last_growth = now
        return total, total >= budget

    @staticmethod
    def _same_last_byte(rec: FileRecord, fh: Any) -> bool:
        fh.seek(rec.read_pos - 1)
        expected = rec.pending[-1:] if rec.pending else b"\n"
        return fh.read(1) == expected or rec.skipping

    def _find_line_start(self, rec: FileRecord, fh: Any) -> None:
        """Position a file found at startup on the start of its last, partial line.

        Done lazily, when the file first grows: a line still being written when
        the server started is delivered once completed, and never in part.
        """
        end = start = rec.read_pos
        block = self.limits.boundary_first_block
        while start > 0:
            if end - start > self.limits.max_line_bytes:
                rec.skipping = True             # an oversize partial line: skip it
                rec.line_start = end
                rec.boundary_known = True
                return
            lo = max(0, start - block)
            fh.seek(lo)
            newline = fh.read(start - lo).rfind(b"\n")
            if newline >= 0:
                start = lo + newline + 1
                break
            start = lo
            block = self.limits.boundary_scan_block
        rec.line_start = start
        if start < end:
            fh.seek(start)
            rec.pending = bytearray(fh.read(end - start))
        rec.boundary_known = True



# --- history: one client's reader of one file ----------------------------------


class LineReader:
    """Complete lines of one file from ``offset`` up to a limit, for one client.

    History and catch-up read files on their own, a bounded block at a time, so
    a client that is behind never holds up the tailer or other clients. The file
    is opened per block (thousands of readers cost no descriptors), and each time
    it must still be the file the reader was made for. An oversize line comes
    out as (offset, None), exactly as the tailer reports it.
    """

    def __init__(self, rec: FileRecord, offset: int, max_line_bytes: int = MAX_LINE_BYTES):
        self.abspath = rec.abspath
        self.max_line_bytes = max_line_bytes
        self.identity = (rec.dev, rec.ino)
        self.read_pos = self.line_start = offset    # split_lines' state
        self.pending = bytearray()
        self.skipping = False
        self.blocks = 0                 # blocks read so far
        self.lines: Deque[Tuple[int, Optional[bytes]]] = collections.deque()   # read ahead, in order

    def fill(self, limit: int, block: int = READ_BLOCK) -> int:
        """Read up to ``block`` bytes below ``limit``; return how many were read.

        OSError if the file cannot be read; none at all (0) if it was replaced
        meanwhile: the tailer reports that as a reset.
        """
        if self.read_pos >= limit:
            return 0
        try:
            chunk = read_regular(self.abspath, self.identity, self.read_pos, min(block, limit - self.read_pos))
        except (FileChanged, FileNotFoundError):
            return 0
        if not chunk:
            return 0
        self.blocks += 1
        self.lines.extend(split_lines(self, chunk, self.max_line_bytes))
        return len(chunk)

    def give_up(self, limit: int) -> None:
        """Read nothing more below ``limit`` (the file cannot be read)."""
        self.read_pos = limit
        self.pending = bytearray()
        self.lines.clear()


# =============================================================================
# WebSocket protocol (RFC 6455), sans-I/O: bytes in, events and bytes out
# =============================================================================


class Opcode(enum.IntEnum):
    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


KNOWN_OPCODES = frozenset(int(op) for op in Opcode)
CONTROL_OPCODES = frozenset((Opcode.CLOSE, Opcode.PING, Opcode.PONG))


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005                # local only: the peer's Close had no code
    ABNORMAL = 1006                 # local only: no Close at all
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


def close_code_allowed_on_wire(code: int) -> bool:
    """RFC 6455 section 7.4: 1000-1003, 1007-1014 (IANA) and 3000-4999 only."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class ProtocolError(Exception):
    """The peer broke RFC 6455: fail the connection with ``close_code``."""
    close_code = CloseCode.PROTOCOL_ERROR


class InvalidPayload(ProtocolError):
    close_code = CloseCode.INVALID_DATA


class PayloadTooBig(ProtocolError):
    close_code = CloseCode.MESSAGE_TOO_BIG


MASK_CHUNK = 1 << 16                # bytes XORed as one integer; a multiple of 4


def apply_mask(data: bytes, key: bytes, phase: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` started at key byte ``phase`` (section 5.3).

    Pure Python's fastest way: XOR 64 KiB at a time as one big integer, about
    twice as fast as per-lane translate() and 20 times a per-byte loop.
    """
    if phase:
        key = key[phase:] + key[:phase]
    n = len(data)
    if n <= MASK_CHUNK:
        repeated = (key * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")
    wide = int.from_bytes(key * (MASK_CHUNK // 4), "little")
    view = memoryview(data)
    whole = n - n % MASK_CHUNK
    parts = [(int.from_bytes(view[i:i + MASK_CHUNK], "little") ^ wide).to_bytes(MASK_CHUNK, "little")
             for i in range(0, whole, MASK_CHUNK)]
    if whole < n:
        parts.append(apply_mask(view[whole:], key))
    return b"".join(parts)


def frame_header(opcode: int, n: int, fin: bool = True, masked: bool = False) -> bytes:
    """The first bytes of a frame with an ``n``-byte payload, minimal length encoding (section 5.2)."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        return _FRAME_HEAD_7(first, mask_bit | n)
    if n < 65536:       # every entry of a transcript, nearly: made once per line
        return _FRAME_HEAD_16(first, mask_bit | 126, n)
    return _FRAME_HEAD_64(first, mask_bit | 127, n)


_FRAME_HEAD_7 = struct.Struct(">BB").pack
_FRAME_HEAD_16 = struct.Struct(">BBH").pack
_FRAME_HEAD_64 = struct.Struct(">BBQ").pack


def frame_parts(opcode: int, payload: bytes, fin: bool = True,
                mask_key: Optional[bytes] = None) -> Tuple[bytes, bytes]:
    """(header, payload as sent) of one frame."""
    head = frame_header(opcode, len(payload), fin, mask_key is not None)
    if mask_key is None:
        return head, payload
    return head + mask_key, apply_mask(payload, mask_key)


def encode_frame(opcode: int, payload: bytes, fin: bool = True,
                 mask_key: Optional[bytes] = None) -> bytes:
    """One frame as one bytes object; masked if a key is given."""
    head, body = frame_parts(opcode, payload, fin, mask_key)
    return head + body


def encode_close_payload(code: Optional[int], reason: str = "") -> bytes:
    if code is None:
        return b""
    data = reason.encode("utf-8")
    while len(data) > 123:          # section 5.5: control payloads are at most 125 bytes
        reason = reason[:-1]
        data = reason.encode("utf-8")
    return code.to_bytes(2, "big") + data


def parse_close_payload(payload: bytes) -> Tuple[int, str]:
    """(code, reason) of a received Close frame; ProtocolError if it is invalid."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not close_code_allowed_on_wire(code):
        raise ProtocolError("invalid close code %d" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("close reason is not valid UTF-8") from None
    return code, reason


class Side(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


# --- the opening handshake (section 4) ----------------------------------------


class HandshakeError(Exception):
    """A request we refuse, or a response we reject; one HTTP status each."""

    def __init__(self, status: int, message: str, headers: Iterable[Tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


HTTP_REASONS = {
    101: "Switching Protocols", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


@dataclass
class HttpHead:
    """A parsed request or response head: start line and headers in order."""
    start: Tuple[str, str, str]     # (method, target, version) or (version, status, reason)
    headers: List[Tuple[str, str]]

    def get(self, name: str) -> Optional[str]:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> List[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def tokens(self, name: str) -> List[str]:
        """Comma-separated header tokens, lower-cased (``Connection: keep-alive, Upgrade``)."""
        return [t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()]


class HeadReader:
    """Collects bytes up to the blank line ending an HTTP head, within a limit.

    Remembers how far it has searched (h11's trick), so a slow trickle of bytes
    costs linear time. Bytes after the head belong to the frame layer.
    """

    def __init__(self, limit: int = MAX_HEAD_BYTES):
        self.limit = limit              # bytes of the head, headers included
        self.buffer = bytearray()
        self._searched = 0

    def feed(self, data: bytes) -> Optional[Tuple[bytes, bytes]]:
        """(head, rest) once the head is complete, else None."""
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n", max(0, self._searched - 3))
        if end < 0:
            if len(self.buffer) > self.limit:
                raise HandshakeError(431, "request head over %d bytes" % self.limit)
            self._searched = len(self.buffer)
            return None
        if end > self.limit:
            raise HandshakeError(431, "request head over %d bytes" % self.limit)
        return bytes(self.buffer[:end]), bytes(self.buffer[end + 4:])


_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def parse_head(head: bytes, request: bool, max_headers: int = MAX_HEADERS) -> HttpHead:
    """Parse a request or response head (without the final blank line)."""
    try:
        text = head.decode("latin-1")      # RFC 9110: field values are octets
    except UnicodeDecodeError:             # pragma: no cover - latin-1 decodes anything
        raise HandshakeError(400, "undecodable head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) != 3:
        raise HandshakeError(400, "malformed %s line" % ("request" if request else "status"))
    if request:
        method, target, version = parts
        if not _TOKEN_RE.match(method) or not target or " " in target:
            raise HandshakeError(400, "malformed request line")
        if not re.match(r"^HTTP/\d\.\d$", version):
            raise HandshakeError(400, "malformed HTTP version")
    elif not re.match(r"^HTTP/\d\.\d$", parts[0]) or not parts[1].isdigit():
        raise HandshakeError(400, "malformed status line")
    if len(lines) - 1 > max_headers:
        raise HandshakeError(431, "more than %d headers" % max_headers)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.match(name):
            raise HandshakeError(400, "malformed header line")
        headers.append((name, value.strip(" \t")))
    return HttpHead((parts[0], parts[1], parts[2]), headers)


def accept_value(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (section 4.2.2, step 5.4)."""
    return base64.b64encode(sha1((key + WS_GUID).encode("ascii")).digest()).decode("ascii")


def is_upgrade_request(request: HttpHead) -> bool:
    """Does the request try to open a WebSocket (however badly)?"""
    return (request.get("Upgrade") is not None or request.get("Sec-WebSocket-Key") is not None
            or "upgrade" in request.tokens("Connection"))


def check_upgrade_request(request: HttpHead) -> str:
    """Validate a WebSocket opening request (section 4.2.1); return its key.

    Raises HandshakeError with the status to answer: 405 for a method other
    than GET, 400 for HTTP/1.0 or a bad key, 426 for missing upgrade tokens or
    a version other than 13 (with ``Sec-WebSocket-Version: 13``, section 4.4).
    """
    method, _, version = request.start
    if method != "GET":
        raise HandshakeError(405, "WebSocket requests must use GET", [("Allow", "GET")])
    if version != "HTTP/1.1":
        raise HandshakeError(400, "WebSocket requires HTTP/1.1, got %s" % version)
    if len(request.get_all("Host")) != 1:
        raise HandshakeError(400, "exactly one Host header is required")
    upgrade_needed = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if [v.strip().lower() for v in request.get_all("Upgrade")] != ["websocket"]:
        raise HandshakeError(426, "the Upgrade header must be 'websocket'", upgrade_needed)
    if "upgrade" not in request.tokens("Connection"):
        raise HandshakeError(426, "the Connection header must include 'Upgrade'", upgrade_needed)
    versions = request.get_all("Sec-WebSocket-Version")
    if versions != ["13"]:
        raise HandshakeError(426, "only WebSocket version 13 is supported",
                             [("Sec-WebSocket-Version", "13")])
    keys = request.get_all("Sec-WebSocket-Key")
    if len(keys) != 1:
        raise HandshakeError(400, "exactly one Sec-WebSocket-Key header is required")
    try:
        raw_key = base64.b64decode(keys[0].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw_key = b""
    if len(raw_key) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return keys[0]


def build_response(status: int, headers: Iterable[Tuple[str, str]] = (),
                   body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> bytes:
    """An HTTP/1.1 response head (and body, with its length) as bytes."""
    lines = ["HTTP/1.1 %d %s" % (status, HTTP_REASONS.get(status, "Unknown"))]
    lines += ["%s: %s" % (k, v) for k, v in headers]
    if status != 101:
        lines += ["Content-Type: %s" % content_type, "Content-Length: %d" % len(body),
                  "Cache-Control: no-store", "X-Content-Type-Options: nosniff",
                  "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def build_accept_response(key: str) -> bytes:
    # No Sec-WebSocket-Extensions or -Protocol: we negotiate none (section 4.2.2).
    return build_response(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                ("Sec-WebSocket-Accept", accept_value(key))])


def build_error_response(error: HandshakeError) -> bytes:
    body = ("%d %s: %s\n" % (error.status, HTTP_REASONS.get(error.status, ""), error)).encode("utf-8")
    return build_response(error.status, error.headers, body)


def build_client_request(host_header: str, target: str, key: str,
                         extra_headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    lines = ["GET %s HTTP/1.1" % target, "Host: %s" % host_header, "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: %s" % key, "Sec-WebSocket-Version: 13",
             "User-Agent: claude_stream/%s" % __version__]
    lines += ["%s: %s" % (k, v) for k, v in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def check_upgrade_response(response: HttpHead, key: str) -> None:
    """Section 4.1, client side: anything but a correct 101 fails the handshake."""
    version, status, reason = response.start
    if status != "101":
        raise HandshakeError(int(status), "HTTP %s %s" % (status, reason))
    if [v.strip().lower() for v in response.get_all("Upgrade")] != ["websocket"]:
        raise HandshakeError(101, "server answered 101 without 'Upgrade: websocket'")
    if "upgrade" not in response.tokens("Connection"):
        raise HandshakeError(101, "server answered 101 without 'Connection: Upgrade'")
    if response.get_all("Sec-WebSocket-Accept") != [accept_value(key)]:
        raise HandshakeError(101, "server sent a wrong Sec-WebSocket-Accept")
    if response.get("Sec-WebSocket-Extensions") or response.get("Sec-WebSocket-Protocol"):
        raise HandshakeError(101, "server selected an extension or subprotocol we did not offer")


@dataclass
class RequestReceived:
    """Server side: a complete request head; answer with accept, respond or reject."""
    request: HttpHead


@dataclass
class Opened:
    """Client side: the server accepted our opening handshake."""


@dataclass
class HandshakeFailed:
    """The opening handshake failed: a bad request (answered already) or a refusal."""
    error: HandshakeError


class Handshake:
    """The opening handshake's bytes for one side: a head in, checked, and the rest after it."""

    def __init__(self, side: Side, head_limit: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADERS):
        self.side = side
        self.reader = HeadReader(head_limit)
        self.max_headers = max_headers
        self.key = ""                   # the client's Sec-WebSocket-Key

    def request(self, host_header: str, target: str, key: str,
                extra_headers: Iterable[Tuple[str, str]] = ()) -> bytes:
        self.key = key
        return build_client_request(host_header, target, key, extra_headers)

    def receive(self, data: bytes) -> Optional[Tuple[Union[RequestReceived, Opened], bytes]]:
        """(event, bytes after the head) once the head is complete; HandshakeError if it is bad."""
        done = self.reader.feed(data)
        if done is None:
            return None
        head, rest = done
        if self.side is Side.SERVER:
            return RequestReceived(parse_head(head, True, self.max_headers)), rest
        check_upgrade_response(parse_head(head, False, self.max_headers), self.key)
        return Opened(), rest


class State(enum.Enum):
    CONNECTING = "connecting"       # the opening handshake (section 4) is under way
    OPEN = "open"
    CLOSING = "closing"             # we sent Close and wait for the peer's
    CLOSED = "closed"               # both Close frames passed, or the connection failed


class TextMessage:
    """A text message: its text, and its UTF-8 ``data`` as it came when it was one
    frame, so a client that writes messages out as they are (``--json``) neither
    decodes nor encodes them again. Each is made from the other when first asked."""

    __slots__ = ("_text", "_data")

    def __init__(self, text: Optional[str] = None, data: Optional[bytes] = None):
        self._text, self._data = text, data

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._data.decode("utf-8")     # validated already: see MessageAssembler.add
        return self._text

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self._text.encode("utf-8")
        return self._data

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, TextMessage) and self.text == other.text

    __hash__ = None             # type: ignore[assignment] - equal by text, mutable cache

    def __repr__(self) -> str:
        return "TextMessage(%r)" % self.text


@dataclass
class BinaryMessage:
    data: bytes


@dataclass
class PingReceived:
    payload: bytes


@dataclass
class PongReceived:
    payload: bytes


@dataclass
class CloseReceived:
    code: int
    reason: str


WsEvent = Union[TextMessage, BinaryMessage, PingReceived, PongReceived, CloseReceived,
                RequestReceived, Opened, HandshakeFailed]


class MessageAssembler:
    """A data message from its frames (section 5.4): order, size and count
    limits, and UTF-8 validated as it arrives, even inside a frame."""

    def __init__(self, max_size: int, max_fragments: int):
        self.max_size, self.max_fragments = max_size, max_fragments
        self.opcode: Optional[int] = None       # of the message being assembled, if any
        self.parts: List[Any] = []
        self.size = 0
        self.fragments = 0
        self.decoder: Any = None

    def check_frame(self, opcode: int, length: int) -> None:
        """A data frame's header, before its payload is buffered."""
        # Section 5.4: a continuation needs an open message; a new one needs none.
        if opcode == Opcode.CONT and self.opcode is None:
            raise ProtocolError("continuation frame without a message to continue")
        if opcode != Opcode.CONT and self.opcode is not None:
            raise ProtocolError("new data frame inside a fragmented message")
        # Section 10.4: refuse an oversize message from its header, before buffering it.
        if self.size + length > self.max_size:
            raise PayloadTooBig("message over %d bytes" % self.max_size)
        # Nor may a message go on for ever in tiny (or empty) fragments.
        if self.fragments >= self.max_fragments:
            raise PayloadTooBig("message in over %d fragments" % self.max_fragments)

    def is_text(self, opcode: int) -> bool:
        return opcode == Opcode.TEXT or (opcode == Opcode.CONT and self.opcode == Opcode.TEXT)

    def validate_partial(self, piece: bytes) -> None:
        """Fail fast on invalid UTF-8 inside a frame whose payload is still arriving."""
        if self.decoder is None:
            self.decoder = codecs.getincrementaldecoder("utf-8")()
        self._decode(piece, final=False)

    def _decode(self, data: bytes, final: bool) -> None:
        """Validate ``data``, the next piece of a text message, and keep its bytes: the
        message is its UTF-8 as received, its text decoded only if asked for."""
        try:
            self.decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            raise InvalidPayload("invalid UTF-8 in text message") from exc
        if data:
            self.parts.append(data)

    def add(self, fin: bool, opcode: int, payload: bytes, length: int) -> Optional[WsEvent]:
        """A checked frame's payload (less what validate_partial took); the message once complete."""
        if fin and opcode == Opcode.TEXT and self.decoder is None:
            # A whole text message in one frame, none of it seen yet (the common case):
            # validated in one call, ASCII by a word-at-a-time test, and kept as bytes.
            if payload.isascii():
                return TextMessage(None, payload)
            try:
                return TextMessage(payload.decode("utf-8"), payload)
            except UnicodeDecodeError as exc:
                raise InvalidPayload("invalid UTF-8 in text message") from exc
        if opcode != Opcode.CONT:
            self.opcode = opcode
            if opcode == Opcode.TEXT and self.decoder is None:   # else made by validate_partial
                self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.size += length
        self.fragments += 1
        if self.opcode == Opcode.TEXT:
            self._decode(payload, final=fin)
        elif payload:
            self.parts.append(payload)
        if not fin:
            return None
        parts, kind = self.parts, self.opcode
        self.parts, self.opcode, self.size, self.fragments, self.decoder = [], None, 0, 0, None
        if kind == Opcode.TEXT:
            return TextMessage(None, b"".join(parts))
        return BinaryMessage(b"".join(parts))


class Connection:
    """One WebSocket connection, from its opening handshake, as a state machine.

    Made with ``state=State.CONNECTING`` it starts with the handshake: a server
    gets ``RequestReceived`` and answers with ``accept``, ``respond`` or
    ``reject``; a client sends ``send_request`` and gets ``Opened`` or
    ``HandshakeFailed``. Made OPEN, it is the frame layer alone.
    ``receive_data(bytes)`` buffers input; ``next_event()`` parses one frame at
    a time, so the application handles (and answers) each message before the
    next frame is even looked at. Output accumulates until ``data_to_send()``.
    Pings are answered and Close frames echoed automatically. Any violation
    fails the connection: a Close with the code from the exception's class is
    queued, input is discarded from then on, and ``wants_transport_close``
    tells the I/O layer to drop TCP once the output is flushed.
    """

    def __init__(self, side: Side, max_message_size: int,
                 mask_source: Callable[[int], bytes] = os.urandom,
                 min_fragments: int = MIN_FRAGMENTS, frame_copy_max: int = FRAME_COPY_MAX,
                 state: State = State.OPEN, head_limit: int = MAX_HEAD_BYTES,
                 max_headers: int = MAX_HEADERS):
        self.side = side
        self.min_fragments = min_fragments
        self.allow_messages(max_message_size)
        self.frame_copy_max = frame_copy_max
        self.mask_source = mask_source
        self.state = state
        self.handshake = Handshake(side, head_limit, max_headers) if state is State.CONNECTING else None
        self._handshake_events: Deque[WsEvent] = collections.deque()
        self._answered_http = False     # a plain HTTP answer (or a refused handshake) ends it
        self.close_code: Optional[int] = None       # as received, or 1006
        self.close_reason = ""
        self.failure: Optional[ProtocolError] = None
        self._buffer = bytearray()
        self._out: List[bytes] = []
        self._out_size = 0
        # a text frame whose payload is still arriving: validated as it comes
        self._partial_fed = 0

    def allow_messages(self, max_message_size: int) -> None:
        """Messages of up to this size, from now on (before any arrives: a hub's /push end
        takes a box's lines, as long as any its client takes)."""
        self.max_message_size = max_message_size
        # Enough for any message cut into 64-byte fragments (Autobahn 9.3 and 9.4 do).
        self.message = MessageAssembler(max_message_size, max(self.min_fragments, max_message_size // 64))

    # --- output -------------------------------------------------------------

    @property
    def output_size(self) -> int:
        return self._out_size

    def data_to_send(self) -> List[bytes]:
        out, self._out, self._out_size = self._out, [], 0
        return out

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        mask = self.mask_source(4) if self.side is Side.CLIENT else None
        head, body = frame_parts(opcode, payload, fin, mask)
        if len(body) > self.frame_copy_max:     # big payloads are not copied just to prepend a header
            self._queue(head)
            self._queue(body)
        else:
            self._queue(head + body)

    def send_text(self, text: Union[str, bytes]) -> None:
        self._check_open()
        self._send_frame(Opcode.TEXT, text.encode("utf-8") if isinstance(text, str) else text)

    def send_binary(self, data: bytes) -> None:
        self._check_open()
        self._send_frame(Opcode.BINARY, data)

    def send_prebuilt_frames(self, frames: List[bytes]) -> None:
        """Queue complete unmasked frames built once for many clients (server only)."""
        assert self.side is Side.SERVER
        self._check_open()
        self._out.extend(frames)
        self._out_size += sum(map(len, frames))

    def ping(self, payload: bytes = b"") -> None:
        self._check_open()
        self._send_frame(Opcode.PING, payload)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (section 7.1.2). No data may follow."""
        if self.state is not State.OPEN:
            return
        self._send_frame(Opcode.CLOSE, encode_close_payload(code, reason))
        self.state = State.CLOSING

    def _check_open(self) -> None:
        if self.state is not State.OPEN:
            raise RuntimeError("connection is %s" % self.state.value)

    @property
    def wants_transport_close(self) -> bool:
        """The server closes TCP first once closed (section 7.1.1); a client waits."""
        return self.state is State.CLOSED and (self.side is Side.SERVER or self.failure is not None
                                               or self._answered_http)

    # --- the opening handshake ------------------------------------------------

    def send_request(self, host_header: str, target: str,
                     extra_headers: Iterable[Tuple[str, str]] = ()) -> None:
        """Client: queue the opening request (section 4.1), with a fresh key."""
        assert self.handshake is not None and self.side is Side.CLIENT
        key = base64.b64encode(self.mask_source(16)).decode("ascii")
        self._queue(self.handshake.request(host_header, target, key, extra_headers))

    def accept(self, key: str) -> None:
        """Server: answer 101 (section 4.2.2); frames flow from here, the bytes after the head first."""
        self._check_connecting()
        self._queue(build_accept_response(key))
        self.state = State.OPEN
        self.handshake = None           # its buffer too

    def respond(self, response: bytes) -> None:
        """Server: answer plain HTTP instead (the page, an error); nothing more is read."""
        self._check_connecting()
        self._queue(response)
        self._end_handshake()

    def reject(self, error: HandshakeError) -> None:
        self.respond(build_error_response(error))

    def _check_connecting(self) -> None:
        if self.state is not State.CONNECTING or self.side is not Side.SERVER:
            raise RuntimeError("connection is %s" % self.state.value)

    def _end_handshake(self) -> None:
        self.state = State.CLOSED
        self._answered_http = True
        self._buffer = bytearray()
        self.handshake = None

    def _receive_head(self, data: bytes) -> None:
        assert self.handshake is not None
        if self._handshake_events:          # a request waits for its answer: keep what follows
            self._buffer += data
            return
        try:
            done = self.handshake.receive(data)
        except HandshakeError as exc:
            if self.side is Side.SERVER:
                self.reject(exc)            # the status that says what was wrong
            else:
                self._end_handshake()
            self._handshake_events.append(HandshakeFailed(exc))
            return
        if done is not None:
            event, rest = done
            self._buffer += rest
            self._handshake_events.append(event)
            if isinstance(event, Opened):
                self.state = State.OPEN
                self.handshake = None

    # --- input --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CONNECTING:
            self._receive_head(data)
        elif self.state is not State.CLOSED:
            self._buffer += data

    def receive_eof(self) -> None:
        """TCP closed by the peer: without a Close frame that is 1006."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            if self.close_code is None:
                self.close_code = CloseCode.ABNORMAL
        self._buffer = bytearray()

    def next_event(self) -> Optional[WsEvent]:
        """The next event, or None until more bytes arrive (or once closed)."""
        if self._handshake_events:
            return self._handshake_events.popleft()
        while self.state is not State.CLOSED and self.state is not State.CONNECTING:
            try:
                frame = self._parse_frame()
                if frame is None:
                    return None
                event = self._handle_frame(*frame)
            except ProtocolError as exc:
                self._fail(exc)
                return None
            if event is not None:
                return event
        return None

    def _fail(self, exc: ProtocolError) -> None:
        """Section 7.1.7: send a Close if we may, then stop reading for good."""
        self.failure = exc
        if self.state is State.OPEN:
            self._send_frame(Opcode.CLOSE, encode_close_payload(exc.close_code, str(exc)))
        self.state = State.CLOSED
        self.close_code, self.close_reason = exc.close_code, str(exc)
        self._buffer = bytearray()

    def _parse_frame(self) -> Optional[Tuple[bool, int, bytes, int]]:
        """(fin, opcode, payload, length) of the next complete frame, checked, or None.

        ``payload`` lacks the bytes already validated by ``MessageAssembler.validate_partial``.
        """
        buf = self._buffer
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode, length = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
        # Section 5.2: RSV1-3 MUST be 0 unless an extension defines them; we negotiate none.
        if b0 & 0x70:
            raise ProtocolError("reserved bits set")
        if opcode not in KNOWN_OPCODES:
            raise ProtocolError("reserved opcode %d" % opcode)
        # Section 5.1: clients MUST mask, servers MUST NOT.
        masked = bool(b1 & 0x80)
        if masked != (self.side is Side.SERVER):
            raise ProtocolError("unmasked client frame" if masked is False else "masked server frame")
        if opcode in CONTROL_OPCODES:
            # Section 5.5: control frames are never fragmented and carry at most 125 bytes.
            if not fin:
                raise ProtocolError("fragmented control frame")
            if length > 125:
                raise ProtocolError("control frame payload over 125 bytes")
        head = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = int.from_bytes(buf[2:4], "big")
            head = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = int.from_bytes(buf[2:10], "big")
            if length >> 63:
                raise ProtocolError("64-bit length with the most significant bit set")
            head = 10
        if opcode not in CONTROL_OPCODES:
            self.message.check_frame(opcode, length)
        if masked and len(buf) < head + 4:
            return None             # the mask key is still arriving, even for an empty payload
        key = bytes(buf[head:head + 4]) if masked else b""
        head += len(key)
        available = len(buf) - head
        if available < length:
            if length and available > self._partial_fed and self.message.is_text(opcode):
                piece = self._unmasked(buf, head + self._partial_fed, head + available, key,
                                       self._partial_fed)
                self.message.validate_partial(piece)
                self._partial_fed = available
            return None
        # A text frame validated while it arrived: only its unseen rest is unmasked again.
        fed, self._partial_fed = self._partial_fed, 0
        payload = self._unmasked(buf, head + fed, head + length, key, fed)
        del buf[:head + length]
        return fin, opcode, payload, length

    @staticmethod
    def _unmasked(buf: bytearray, start: int, end: int, key: bytes, phase: int) -> bytes:
        """Payload bytes ``buf[start:end]``, unmasked, copied once."""
        with memoryview(buf) as view, view[start:end] as body:
            return apply_mask(body, key, phase % 4) if key else bytes(body)

    def _handle_frame(self, fin: bool, opcode: int, payload: bytes, length: int) -> Optional[WsEvent]:
        if opcode == Opcode.PING:
            if self.state is State.OPEN:                 # section 5.5.2; nothing after our Close
                self._send_frame(Opcode.PONG, payload)
            return PingReceived(payload)
        if opcode == Opcode.PONG:
            return PongReceived(payload)
        if opcode == Opcode.CLOSE:
            return self._handle_close(payload)
        if self.state is State.CLOSING:
            return None           # section 5.5.1: data after our Close is not processed
        return self.message.add(fin, opcode, payload, length)

    def _handle_close(self, payload: bytes) -> CloseReceived:
        code, reason = parse_close_payload(payload)
        self.close_code, self.close_reason = code, reason
        if self.state is State.OPEN:
            # Section 5.5.1: answer with a Close, echoing the status code received.
            echo = None if code == CloseCode.NO_STATUS else code
            self._send_frame(Opcode.CLOSE, encode_close_payload(echo))
        self.state = State.CLOSED
        self._buffer = bytearray()
        return CloseReceived(code, reason)


# =============================================================================
# Event loop: one selectors loop, non-blocking streams, timers, signals
# =============================================================================


class EventLoop:
    """A ``selectors`` loop with a timer heap and deferred, coalesced writes.

    Handlers are called as ``handler(mask)``. Streams written to during a tick
    are flushed once at its end, so every frame due to one client in one tick
    leaves in a single send(). Signals arrive through a wake-up socket and run
    their callbacks between ticks, never inside a handler.
    """

    def __init__(self, log: Optional[Log] = None, clock: Callable[[], float] = time.monotonic):
        self.log = log or Log()
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.timers = TimerHeap(lambda when, timer: timer.cancelled)
        self._dirty: Dict["Stream", None] = {}
        self._signals: List[int] = []
        self._signal_callback: Optional[Callable[[int], None]] = None
        self.stopping = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.register(self._wake_reader, selectors.EVENT_READ, self._drain_wakeups)

    def time(self) -> float:
        return self.clock()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        self.timers.add(when, timer)
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.time() + delay, callback)

    def register(self, fileobj: Any, events: int, handler: Callable[[int], None]) -> None:
        self.selector.register(fileobj, events, handler)

    def modify(self, fileobj: Any, events: int, handler: Callable[[int], None]) -> None:
        self.selector.modify(fileobj, events, handler)

    def unregister(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def mark_dirty(self, stream: "Stream") -> None:
        self._dirty[stream] = None

    def handle_signals(self, signals: Iterable[int], callback: Callable[[int], None]) -> None:
        self._signal_callback = callback
        signal.set_wakeup_fd(self._wake_writer.fileno(), warn_on_full_buffer=False)
        for signum in signals:
            signal.signal(signum, lambda signum, frame: self._signals.append(signum))

    def _drain_wakeups(self, mask: int) -> None:
        try:
            while self._wake_reader.recv(WAKE_DRAIN_BYTES):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        """Run until stop() is called (by a handler, timer or signal callback)."""
        self.stopping = False
        while not self.stopping:
            timeout = None
            first = self.timers.next_when()
            if self._dirty:
                timeout = 0.0
            elif first is not None:
                timeout = max(0.0, first - self.time())
            for key, mask in self.selector.select(timeout):
                self._call(key.data, mask)
            while self._signals:
                signum = self._signals.pop(0)
                if self._signal_callback is not None:
                    self._call(self._signal_callback, signum)
            self._run_timers()
            self._flush()
        self._flush()

    def _run_timers(self) -> None:
        now = self.time()
        while True:
            timer = self.timers.pop_due(now)
            if timer is None:
                return
            self._call(timer.callback)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for stream in dirty:
            self._call(stream.flush)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """Run one callback; a bug in it is logged and never stops the loop."""
        try:
            callback(*args)
        except Exception as exc:                 # noqa: BLE001 - isolation is the point
            self.log.internal_error(exc)
            owner = getattr(callback, "__self__", None)
            if isinstance(owner, Stream):
                owner.abort(exc)

    def close(self) -> None:
        self.unregister(self._wake_reader)
        self._wake_reader.close()
        self._wake_writer.close()
        self.selector.close()


class Protocol:
    """What a Stream reports to: the asyncio Protocol shape, without asyncio."""

    def connection_made(self, stream: "Stream") -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def output_drained(self) -> None:
        """Some queued output was sent (the protocol may read on)."""

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        pass


class Stream:
    """A connected non-blocking socket: reads go to a protocol, writes are buffered.

    Write interest is registered only while output is pending: a socket is
    almost always writable, and permanent write interest would spin the loop.
    """

    def __init__(self, loop: EventLoop, sock: socket.socket, protocol: Protocol,
                 limits: Limits = DEFAULT_LIMITS):
        self.loop = loop
        self.sock = sock
        self.protocol = protocol
        self.limits = limits
        self.closed = False
        self.bytes_sent = 0
        self._out: Deque[Any] = collections.deque()    # bytes or memoryviews, in order
        self._out_size = 0
        self._close_when_flushed = False
        self._lingering: Optional[Timer] = None
        self._reading = True                # False once the peer's EOF came
        self._paused = False                # the protocol wants no input for now
        self._interest = selectors.EVENT_READ
        self._gather = hasattr(sock, "sendmsg")
        sock.setblocking(False)
        loop.register(sock, self._interest, self._on_ready)
        protocol.connection_made(self)

    @property
    def pending_output(self) -> int:
        return self._out_size

    @property
    def bytes_delivered(self) -> int:
        """Bytes the peer has taken: sent, less what still waits in the kernel's queue.

        On Linux the queue is TIOCOUTQ (SIOCOUTQ): for TCP what is not yet
        acknowledged, for a Unix socket what the peer has not read. Elsewhere,
        what was sent.
        """
        try:
            queued = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (NameError, AttributeError, OSError, ValueError):
            return self.bytes_sent
        return self.bytes_sent - queued

    def write(self, data: bytes) -> None:
        if not self.closed and not self._close_when_flushed and data:
            self._out.append(data)
            self._out_size += len(data)
            self.loop.mark_dirty(self)

    def writelines(self, chunks: List[bytes]) -> None:
        """Queue many chunks at once (a tick's frames for one client)."""
        if not self.closed and not self._close_when_flushed and chunks:
            self._out.extend(chunks)
            self._out_size += sum(map(len, chunks))
            self.loop.mark_dirty(self)

    def close(self) -> None:
        """Close once everything written so far has been sent."""
        if not self.closed:
            self._close_when_flushed = True
            self.loop.mark_dirty(self)

    @property
    def reading_paused(self) -> bool:
        return self._paused

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self._set_interest()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._set_interest()

    def abort(self, exc: Optional[BaseException] = None) -> None:
        """Close now, dropping unsent output."""
        if self.closed:
            return
        self.closed = True
        if self._lingering is not None:
            self._lingering.cancel()
        self.loop.unregister(self.sock)
        try:
            self.sock.close()
        finally:
            self.protocol.connection_lost(exc)

    @property
    def _wants_input(self) -> bool:
        """Until the peer's EOF, unless paused; while lingering, always (to see its FIN)."""
        return self._reading and (not self._paused or self._lingering is not None)

    def _on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_READ and self._wants_input:
            self._read()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(self.limits.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(exc)
            return
        if data:
            if self._lingering is None:        # after our half-close, input is dropped
                self._deliver(data)
            return
        if self._lingering is not None:
            self.abort()
            return
        self._reading = False                  # EOF: stop asking for reads
        self._set_interest()
        self.protocol.eof_received()

    def _deliver(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def flush(self) -> None:
        if self.closed:
            return
        out = self._out
        drained = False
        while out:
            try:
                if len(out) == 1 or not self._gather:
                    sent = self.sock.send(out[0])
                else:   # every pending frame in one system call
                    sent = self.sock.sendmsg(list(itertools.islice(out, 0, self.limits.send_gather_max)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.abort(exc)
                return
            self._out_size -= sent
            self.bytes_sent += sent
            drained = True
            while sent:
                first = out[0]
                if sent >= len(first):
                    out.popleft()
                    sent -= len(first)
                else:
                    out[0] = memoryview(first)[sent:]
                    sent = 0
                    break
            if out and not self._gather:
                break                           # a short send: the socket is full
        if not out and self._close_when_flushed:
            self._half_close()
            return
        self._set_interest()
        if drained:
            self.protocol.output_drained()

    def _half_close(self) -> None:
        """Send FIN, then read until the peer's FIN before closing ("lingering close").

        Closing a socket with unread input makes the kernel send RST, which can
        destroy our last bytes (a Close frame, an HTTP error) before the peer
        reads them. So we half-close and wait, at most ``linger_timeout``.
        """
        if not self._reading or self._lingering is not None:
            if self._lingering is None:
                self.abort()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        self._lingering = self.loop.call_later(self.limits.linger_timeout, self.abort)
        self._set_interest()

    def _set_interest(self) -> None:
        interest = (selectors.EVENT_READ if self._wants_input else 0) | \
                   (selectors.EVENT_WRITE if self._out else 0)
        if interest != self._interest and not self.closed:
            if not self._interest:
                self.loop.register(self.sock, interest, self._on_ready)
            elif not interest:
                self.loop.unregister(self.sock)
            else:
                self.loop.modify(self.sock, interest, self._on_ready)
            self._interest = interest


def is_tls_error(exc: Optional[BaseException], kind: str) -> bool:
    """Whether ``exc`` is ssl's exception ``kind``; never, where ssl was not loaded (no TLS used)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, getattr(ssl, kind))


class TLSStream(Stream):
    """A Stream speaking TLS through ``ssl.SSLObject`` and two memory BIOs.

    The socket stays a plain non-blocking socket in the same loop: ciphertext
    from recv() goes into the incoming BIO, plaintext comes out of read(); our
    plaintext goes into write() and the outgoing BIO's ciphertext joins the
    ordinary output queue. No SSLWantRead/WriteError ever reaches the loop,
    and decrypted bytes cannot hide inside OpenSSL between two epoll events.
    """

    def __init__(self, loop: EventLoop, sock: socket.socket, protocol: Protocol,
                 context: Any, server_side: bool, server_hostname: Optional[str] = None,
                 limits: Limits = DEFAULT_LIMITS):
        import ssl
        self._ssl = ssl
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._handshaken = False
        self._plaintext: List[bytes] = []       # written before the handshake finished
        self._closing_tls = False
        super().__init__(loop, sock, protocol, limits)
        if not server_side:
            self._handshake()                   # the client speaks first

    @property
    def pending_output(self) -> int:
        return super().pending_output + sum(len(p) for p in self._plaintext)

    def write(self, data: bytes) -> None:
        if self.closed or self._close_when_flushed or not data:
            return
        if not self._handshaken:
            self._plaintext.append(bytes(data))
            return
        self._tls.write(data)
        self._send_ciphertext()

    def writelines(self, chunks: List[bytes]) -> None:
        for chunk in chunks:            # each through the TLS object, in order
            self.write(chunk)

    def _send_ciphertext(self) -> None:
        ciphertext = self._outgoing.read()
        if ciphertext:
            super().write(ciphertext)

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
            self._handshaken = True
        except self._ssl.SSLWantReadError:
            pass
        self._send_ciphertext()
        if self._handshaken:
            pending, self._plaintext = self._plaintext, []
            for data in pending:
                self.write(data)

    def _deliver(self, data: bytes) -> None:
        self._incoming.write(data)
        try:
            if not self._handshaken:
                self._handshake()
            while self._handshaken and not self.closed:
                try:
                    plaintext = self._tls.read(self.limits.recv_size)
                except self._ssl.SSLWantReadError:
                    break
                except self._ssl.SSLZeroReturnError:   # the peer's close_notify: an EOF
                    self._reading = False
                    self._set_interest()
                    self.protocol.eof_received()
                    break
                if not plaintext:
                    break
                super()._deliver(plaintext)
            self._send_ciphertext()             # e.g. session tickets, alerts
        except self._ssl.SSLError as exc:
            self.abort(exc)

    def close(self) -> None:
        """Send close_notify after what is queued, then close as a plain stream does."""
        if self.closed or self._closing_tls:
            return
        self._closing_tls = True
        if self._handshaken:
            try:
                self._tls.unwrap()
            except self._ssl.SSLError:
                pass                            # want-read: the peer's half is optional
            self._send_ciphertext()
        super().close()


def listen_socket(host: str, port: int, backlog: int, fatal: bool = True) -> socket.socket:
    """A listening socket; OperationalError saying what to do (or the OSError, if not ``fatal``)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if not fatal:
            raise
        raise OperationalError("cannot use --host %s: %s" % (host, exc.strerror or exc)) from None
    try:
        if os.name == "posix":      # rebind at once after a restart; never share a live port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if not fatal:
            raise
        if exc.errno == errno.EADDRINUSE:
            raise OperationalError(
                "port %d on %s is already in use (another claude_stream serve?); "
                "pick another with --port" % (port, host)) from None
        if exc.errno == errno.EACCES:
            raise OperationalError("no permission to listen on port %d of %s"
                                   % (port, host)) from None
        raise OperationalError("cannot listen on %s port %d: %s"
                               % (host, port, exc.strerror or exc)) from None
    sock.setblocking(False)
    return sock


def open_connection(loop: EventLoop, host: str, port: int, protocol: Protocol,
                    on_error: Callable[[OSError], None], tls: Any = None,
                    limits: Limits = DEFAULT_LIMITS) -> None:
    """Connect without blocking the loop, trying each address of ``host`` in turn.

    Name resolution itself is a blocking getaddrinfo() (the stdlib has no other);
    for the usual numeric or localhost addresses it returns at once.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        on_error(OSError(exc.errno, "cannot resolve %s: %s" % (host, exc.strerror)))
        return
    errors: List[OSError] = []

    def attempt() -> None:
        if not addresses:
            on_error(errors[0] if errors else OSError("no address for %s" % host))
            return
        family, kind, proto, _, address = addresses.pop(0)
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        timer: List[Timer] = []

        def give_up(exc: OSError) -> None:
            loop.unregister(sock)
            sock.close()
            for t in timer:
                t.cancel()
            errors.append(exc)
            attempt()

        def on_writable(mask: int) -> None:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                give_up(OSError(code, os.strerror(code)))
                return
            loop.unregister(sock)
            for t in timer:
                t.cancel()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is None:
                Stream(loop, sock, protocol, limits)
            else:
                TLSStream(loop, sock, protocol, tls, server_side=False, server_hostname=host,
                          limits=limits)

        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, getattr(errno, "WSAEWOULDBLOCK", -1)):
            give_up(OSError(code, os.strerror(code)))
            return
        loop.register(sock, selectors.EVENT_WRITE, on_writable)
        timer.append(loop.call_later(limits.connect_timeout, lambda: give_up(
            OSError(errno.ETIMEDOUT, "timed out after %gs" % limits.connect_timeout))))

    attempt()


class WebSocketEndpoint(Protocol):
    """A Connection driven over a Stream, server or client alike: the opening
    handshake and its one deadline, output, keepalive and close deadlines.

    Subclasses get ``on_connect`` (a client sends its request), ``on_request``
    (a server answers with ``accept``, ``respond`` or ``reject``),
    ``on_handshake_failed``, ``on_message`` and ``on_closed``. With
    ``handshake=False`` the connection starts open (a test peer, say).
    """

    side = Side.SERVER

    def __init__(self, loop: EventLoop, limits: Limits = DEFAULT_LIMITS, handshake: bool = True):
        self.loop = loop
        self.limits = limits
        self.handshake = handshake
        self.max_message_size = limits.max_client_message if self.side is Side.SERVER \
            else limits.max_server_message
        self.output_cap = limits.live_output_cap    # past this much unsent, the peer's input waits
        self.stream: Optional[Stream] = None
        self.ws: Optional[Connection] = None
        self.opened = False                 # the handshake completed: a WebSocket
        self._last_heard = 0.0
        self._ping_sent_at: Optional[float] = None
        self._delivered_at_ping = 0         # stream.bytes_delivered when the ping went out
        self._keepalive: Optional[Timer] = None
        self._handshake_deadline: Optional[Timer] = None
        self._close_deadline: Optional[Timer] = None
        self.lost_reason: Optional[str] = None

    # --- to override ----------------------------------------------------------

    def on_connect(self) -> None:
        """The transport is up (a client sends its request here)."""

    def on_request(self, request: HttpHead) -> None:
        """Server: a complete request head; answer it."""
        self.reject(HandshakeError(404, "nothing here"))

    def on_handshake_failed(self, error: HandshakeError) -> None:
        pass

    def on_message(self, message: Union[TextMessage, BinaryMessage]) -> None:
        pass

    def on_closed(self, code: int, reason: str) -> None:
        pass

    # --- the opening handshake -------------------------------------------------

    @property
    def handshake_timeout(self) -> float:
        """A server waits this long for a whole request head; a client for the answer."""
        return self.limits.request_head_timeout if self.side is Side.SERVER \
            else self.limits.handshake_timeout

    def connection_made(self, stream: Stream) -> None:
        self.stream = stream
        self.ws = Connection(self.side, self.max_message_size, min_fragments=self.limits.min_fragments,
                             frame_copy_max=self.limits.frame_copy_max,
                             state=State.CONNECTING if self.handshake else State.OPEN,
                             head_limit=self.limits.max_head_bytes, max_headers=self.limits.max_headers)
        if not self.handshake:
            self._opened()
            return
        self._handshake_deadline = self.loop.call_later(self.handshake_timeout, self._handshake_expired)
        self.on_connect()
        self.sync()

    def _handshake_expired(self) -> None:
        if self.ws is not None and self.ws.state is State.CONNECTING and self.stream is not None:
            self.lost_reason = ("no complete request within %gs" if self.side is Side.SERVER
                                else "no handshake answer within %gs") % self.handshake_timeout
            self.stream.abort()

    def _opened(self) -> None:
        self.opened = True
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
        self._last_heard = self.loop.time()
        self._keepalive = self.loop.call_later(self.limits.ping_interval, self._check_alive)

    def accept(self, key: str) -> None:
        assert self.ws is not None
        self.ws.accept(key)
        self._opened()
        self.sync()

    def respond(self, response: bytes) -> None:
        """Answer plain HTTP (the page, /status) and close."""
        assert self.ws is not None
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
        self.ws.respond(response)
        self.sync()

    def reject(self, error: HandshakeError) -> None:
        self.respond(build_error_response(error))

    # --- plumbing -------------------------------------------------------------

    @property
    def unsent(self) -> int:
        """Bytes queued for the peer and not yet taken by the kernel."""
        stream_bytes = self.stream.pending_output if self.stream is not None else 0
        return stream_bytes + (self.ws.output_size if self.ws is not None else 0)

    def data_received(self, data: bytes) -> None:
        if self.ws is None:
            return
        self._last_heard = self.loop.time()
        self._ping_sent_at = None
        self.ws.receive_data(data)
        self._handle_input()

    def _handle_input(self) -> None:
        """Handle buffered frames one at a time while the peer's output has room.

        Each frame may queue an answer (a pong, an error); a peer that sends
        but does not read would make those grow without end. Over the cap its
        input stays unread, in this buffer (one recv at most) and then in TCP.
        """
        while self.ws is not None and self.stream is not None and not self.stream.closed:
            if self.unsent > self.output_cap:
                self.stream.pause_reading()
                break
            event = self.ws.next_event()
            if event is None:
                break
            if isinstance(event, (TextMessage, BinaryMessage)):
                self.on_message(event)
            elif isinstance(event, RequestReceived):
                self.on_request(event.request)
            elif isinstance(event, Opened):
                self._opened()
            elif isinstance(event, HandshakeFailed):
                if self._handshake_deadline is not None:
                    self._handshake_deadline.cancel()
                self.on_handshake_failed(event.error)
        self.sync()

    def output_drained(self) -> None:
        stream = self.stream
        if stream is not None and stream.reading_paused and self.unsent <= self.output_cap // 2:
            stream.resume_reading()
            self._handle_input()            # what was held back in the buffer first

    def eof_received(self) -> None:
        if self.ws is not None:
            self.ws.receive_eof()
        if self.stream is not None:
            self.stream.close()

    def sync(self) -> None:
        """Hand the connection's output to the stream; close TCP when due."""
        ws, stream = self.ws, self.stream
        if ws is None or stream is None or stream.closed:
            return
        stream.writelines(ws.data_to_send())
        if stream.pending_output > self.limits.output_high_water:
            self.lost_reason = "too slow: over %d MiB unsent" % (self.limits.output_high_water >> 20)
            stream.abort()
        elif ws.wants_transport_close:
            stream.close()
        elif ws.state in (State.CLOSING, State.CLOSED) and self._close_deadline is None:
            # Sections 7.1.1 and 7.1.2: do not wait for ever on the peer's part.
            self._close_deadline = self.loop.call_later(self.limits.close_timeout, stream.abort)

    def send_text(self, text: Union[str, bytes]) -> None:
        if self.ws is not None and self.ws.state is State.OPEN:
            self.ws.send_text(text)
            self.sync()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self.opened and self.ws is not None:
            self.ws.close(code, reason)
            self.sync()
        elif self.stream is not None:
            self.stream.abort()

    def _check_alive(self) -> None:
        """Ping a quiet peer; drop it when the pong does not come (keepalive)."""
        ws = self.ws
        if ws is None or self.stream is None or self.stream.closed or ws.state is not State.OPEN:
            return
        now, interval, timeout = self.loop.time(), self.limits.ping_interval, self.limits.ping_timeout
        if self._ping_sent_at is not None and now - self._ping_sent_at >= timeout:
            delivered = self.stream.bytes_delivered
            if delivered <= self._delivered_at_ping:
                self.lost_reason = "no answer to a ping within %gs" % timeout
                self.stream.abort()
                return
            # No pong, but the peer takes what we send: alive, only busy. A page
            # taking in megabytes of history answers the ping only once it has
            # read the frames queued before it (browsers read at the pace of the
            # page's script). Wait on, and ask again.
            self._ping_sent_at, self._delivered_at_ping = now, delivered
        if self._ping_sent_at is None and now - self._last_heard >= interval:
            ws.ping(os.urandom(self.limits.ping_payload_bytes))
            self._ping_sent_at = now
            self.sync()
            self._delivered_at_ping = self.stream.bytes_delivered
        wake = (self._ping_sent_at + timeout) if self._ping_sent_at is not None \
            else self._last_heard + interval
        self._keepalive = self.loop.call_at(max(wake, now + self.limits.timer_slack), self._check_alive)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        for timer in (self._keepalive, self._close_deadline, self._handshake_deadline):
            if timer is not None:
                timer.cancel()
        # A client's next connection uses this endpoint again: every deadline afresh.
        self._keepalive = self._close_deadline = self._handshake_deadline = None
        if exc is not None and self.lost_reason is None:
            self.lost_reason = str(exc)
        ws = self.ws
        if ws is None or not self.opened:
            self.on_closed(CloseCode.ABNORMAL, self.lost_reason or "closed before the handshake completed")
            return
        ws.receive_eof()
        self.on_closed(ws.close_code or CloseCode.ABNORMAL, ws.close_reason or self.lost_reason or "")


# =============================================================================
# Token files: where a local server keeps its token for the same user's clients
# =============================================================================


def token_folders() -> List[str]:
    """Every folder where a local server may keep its token.

    serve writes to $XDG_RUNTIME_DIR, else ~/.cache; a client looks in all of
    these, since a shell whose XDG_RUNTIME_DIR differs from the server's (sudo,
    ssh, a systemd user service) would otherwise not find it.
    """
    folders = []
    if os.environ.get("XDG_RUNTIME_DIR"):
        folders.append(os.environ["XDG_RUNTIME_DIR"])
    if hasattr(os, "getuid"):
        folders.append("/run/user/%d" % os.getuid())
    folders.append(os.path.join(os.path.expanduser("~"), ".cache"))
    unique = []
    for folder in folders:
        path = os.path.join(folder, "claude_stream")
        if path not in unique:
            unique.append(path)
    return unique


def token_path(port: int) -> str:
    """Where serve keeps its token for clients of the same user: a 0600 file per port."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "claude_stream", "token-%d" % port)


def check_token(token: str, source: str) -> str:
    """A token as given: one line of printable characters (it goes into a header)."""
    if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError("the token from %s must be one word of printable characters" % source)
    return token


def write_token_file(port: int, token: str) -> str:
    """Create the token file readable by this user only (mode 0600, folder 0700).

    The folder must be a real folder of ours (not a link another user planted),
    and the file is made new with O_EXCL|O_NOFOLLOW under a random name, then
    renamed into place: nothing already there is ever opened or followed.
    """
    path = token_path(port)
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        raise OSError(errno.EPERM, "%s is not a folder of this user's" % folder)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    temporary = os.path.join(folder, ".token-%d.%s" % (port, os.urandom(8).hex()))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(temporary, path)
    return path


def read_secret_line(path: str, follow: bool = True) -> str:
    """The first line of a small token file, checked; OSError or ValueError if unusable.

    With ``follow`` False (files found, not named by the user) a link is
    refused, and so is a file another user owns.
    """
    with open_regular(path, follow=follow, ours=not follow) as fh:
        data = fh.read(MAX_TOKEN_FILE_BYTES)
    line = data.decode("utf-8", "replace").split("\n", 1)[0].strip()
    return check_token(line, path)


def find_token_file(port: int) -> Optional[Tuple[str, str]]:
    """(token, path) of the newest usable token file a local server wrote for ``port``."""
    found = []
    for folder in token_folders():
        path = os.path.join(folder, "token-%d" % port)
        try:
            mtime = os.lstat(path).st_mtime
            found.append((mtime, read_secret_line(path, follow=False), path))
        except (OSError, ValueError):
            continue
    if not found:
        return None
    _, token, path = max(found)
    return token, path


def read_token_file(port: int) -> Optional[str]:
    found = find_token_file(port)
    return found[0] if found else None


# =============================================================================
# Wire format: the transcript fields we read, every message kind, client messages
# =============================================================================
#
# Server to client, one JSON object per text frame, ``kind`` first:
#   hello       on connecting: server, version, protocol, roots, files, clients, time, filters
#   subscribed  a subscribe message was applied: its filters, how many files are behind
#   entry       a transcript line, byte for byte, with path, offset, next, project, session, agent
#   malformed   a line that is not a JSON object, in its place, with the reason and an excerpt
#   gap         bytes not sent (a line over the size limit, a file that cannot be read)
#   reset       a file was truncated or replaced (or a cursor was stale): it restarts at 0
#   live        the history asked for has been sent; what follows is live
#   error       a client message was refused; the connection stays open
# Client to server: {"kind": "subscribe", "project": [...], "session": [...],
# "type": [...], "exclude_type": [...], "since": WHEN, "cursors": {path: offset}};
# the same filters and ``since`` (and ``hold``, ``token``) as query parameters.
# Every message is built here, once, as a complete frame shared by all clients.

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
EARLIEST_EPOCH = datetime(1, 1, 2, tzinfo=timezone.utc).timestamp()   # datetime's range, with a day's margin


def parse_since(value: Any, now: float) -> Optional[float]:
    """``since`` as epoch seconds: a duration (90s, 10m, 2h, 7d, 1.5w), an ISO time, or "all".

    None means "no history". Raises ValueError with a usable message.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("'since' must be a string such as '10m', '2026-01-02T03:04:05Z' or 'all'")
    if value.strip().lower() == "all":
        return float("-inf")
    match = _DURATION_RE.match(value.lower())
    if match:
        start = now - float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        # Longer ago than datetime can say (or than float can hold) is everything.
        return start if start >= EARLIEST_EPOCH else float("-inf")
    when = parse_timestamp(value)
    if when is None:
        raise ValueError("cannot read %r as a duration (90s, 10m, 2h, 7d), an ISO time or 'all'"
                         % value)
    return when.timestamp()


def iso_now(wall: Callable[[], float]) -> str:
    return datetime.fromtimestamp(wall(), timezone.utc).isoformat().replace("+00:00", "Z")


# --- the transcript fields the server reads (the models read the rest) ---------

_TIMESTAMP_BYTES_RE = re.compile(rb'"timestamp"\s*:\s*"([0-9T:.+\-Z ]+)"')

# Claude Code's bookkeeping: records for itself (request shapes, caches, snapshots,
# the prompt to offer on resume), a third of a 2.1.x session's lines. The readable
# client asks the server to leave them out unless --all (or --type names one); the
# page folds them, with the settings.
BOOKKEEPING_TYPES = ("api-request", "api-request-blob", "api-request-shape", "atis-latch",
                     "tools-used", "cost-state", "attachment", "file-history-snapshot",
                     "last-prompt", "progress")
# Kinds that state a setting again and again (the terminal shows a change only).
SETTING_TYPES = ("mode", "permission-mode", "agent-setting")


def peek_timestamp(line: Optional[bytes]) -> str:
    """The timestamp of a line not parsed yet (read ahead), or ""."""
    match = _TIMESTAMP_BYTES_RE.search(line or b"")
    return match.group(1).decode("ascii", "replace") if match else ""


# --- filters and subscriptions (the client's messages) -------------------------


@dataclass
class MessageMeta:
    """What filters look at, computed once per message, shared by all clients."""
    project: str                    # the project folder, and the entry's cwd if any
    ids: Tuple[str, ...]            # session ids (by path and by entry) and agent id
    type: Optional[str]             # the entry's type; None for other kinds
    host: Optional[str] = None      # the machine


@dataclass
class Filters:
    """A client's subscription. Empty lists match everything.

    ``projects``: case-insensitive substrings of the project folder name or of
    the entry's working directory; ``sessions``: prefixes of a session or
    sub-agent id (short ids work); ``types``: entry types, and
    ``exclude_types`` entry types not wanted; both filter entries only, never
    notices; ``hosts``: the names of machines (a hub's boxes), exactly.
    """
    projects: List[str] = field(default_factory=list)
    sessions: List[str] = field(default_factory=list)
    types: List[str] = field(default_factory=list)
    exclude_types: List[str] = field(default_factory=list)
    hosts: List[str] = field(default_factory=list)

    @classmethod
    def from_lists(cls, projects: List[str], sessions: List[str], types: List[str],
                   limits: Limits = DEFAULT_LIMITS, exclude_types: Iterable[str] = (),
                   hosts: Iterable[str] = ()) -> "Filters":
        """The filters, or ValueError past the limits: every line is matched against them."""
        exclude_types, hosts = list(exclude_types), list(hosts)
        for name, values in (("project", projects), ("session", sessions), ("type", types),
                             ("exclude_type", exclude_types), ("host", hosts)):
            if len(values) > limits.max_filter_values:
                raise ValueError("at most %d '%s' filters" % (limits.max_filter_values, name))
            if any(len(v) > limits.max_filter_chars for v in values):
                raise ValueError("a '%s' filter is longer than %d characters"
                                 % (name, limits.max_filter_chars))
        return cls([p.lower() for p in projects if p], [s for s in sessions if s], [t for t in types if t],
                   [t for t in exclude_types if t], [h for h in hosts if h])

    def as_json(self) -> Dict[str, List[str]]:
        return {"project": self.projects, "session": self.sessions, "type": self.types,
                "exclude_type": self.exclude_types, "host": self.hosts}

    def match(self, meta: MessageMeta) -> bool:
        if self.hosts and meta.host not in self.hosts:
            return False
        if self.projects and not any(p in meta.project.lower() for p in self.projects):
            return False
        if self.sessions and not any(i.startswith(s) for s in self.sessions for i in meta.ids):
            return False
        if meta.type is not None and ((self.types and meta.type not in self.types)
                                      or meta.type in self.exclude_types):
            return False
        return True


def _offsets(value: Any) -> bool:
    """A map of paths to byte offsets (cursors, until)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in value.items())


def _line_count(value: Any) -> Optional[int]:
    """``last``: a number of lines (at least 1), or None for no limit."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("'last' must be a whole number of lines, at least 1")
    return value


@dataclass
class Subscription:
    """What a client asks for: filters, history since a time, cursors to resume from."""
    filters: Filters
    since: Optional[float] = None               # epoch seconds; -inf for "all"
    cursors: Dict[str, int] = field(default_factory=dict)   # path -> next offset
    hold: bool = False                          # send nothing but hello until `subscribe`
    last: Optional[int] = None                  # history: at most each file's last N lines
    until: Dict[str, int] = field(default_factory=dict)    # path -> end of a range sent again

    QUERY_PARAMETERS = frozenset(("project", "session", "type", "exclude_type", "host", "since", "last",
                                  "hold", "token"))

    @classmethod
    def from_query(cls, query: str, now: float, limits: Limits = DEFAULT_LIMITS) -> "Subscription":
        params = parse_qs(query, keep_blank_values=False)
        unknown = set(params) - cls.QUERY_PARAMETERS
        if unknown:
            raise ValueError("unknown query parameter(s): %s" % ", ".join(sorted(unknown)))

        def values(name: str) -> List[str]:
            return [v for raw in params.get(name, []) for v in raw.split(",")]
        since = params.get("since", [None])[-1]
        last = params.get("last", [None])[-1]
        if last is not None:
            last = int(last) if last.isdigit() and last.isascii() else -1
        return cls(Filters.from_lists(values("project"), values("session"), values("type"), limits,
                                      values("exclude_type"), values("host")),
                   parse_since(since, now), hold=params.get("hold", ["0"])[-1] not in ("0", ""),
                   last=_line_count(last))

    @classmethod
    def from_message(cls, obj: Dict[str, Any], now: float, limits: Limits = DEFAULT_LIMITS) -> "Subscription":
        lists = []
        for name in ("project", "session", "type", "exclude_type", "host"):
            value = obj.get(name, [])
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("'%s' must be a string or a list of strings" % name)
            lists.append(value)
        cursors = obj.get("cursors", {})
        if not _offsets(cursors):
            raise ValueError("'cursors' must map paths to byte offsets")
        if any(k.endswith("/") and v != 0 for k, v in cursors.items()):
            raise ValueError("a folder's cursor (a path ending in '/') must be 0")
        until = obj.get("until", {})
        if not _offsets(until) or any(k.endswith("/") for k in until):
            raise ValueError("'until' must map file paths to byte offsets")
        return cls(Filters.from_lists(*lists[:3], limits=limits, exclude_types=lists[3], hosts=lists[4]),
                   parse_since(obj.get("since"), now), dict(cursors), last=_line_count(obj.get("last")),
                   until=dict(until))


def client_message(text: str) -> Dict[str, Any]:
    """A client's message, a ``subscribe``, or ValueError saying what is wrong with it."""
    try:                            # the transcript lines' decoder: one depth limit
        obj = decode_line(text.encode("utf-8"))
    except MalformedLine as exc:
        raise ValueError("a message must be a JSON object (%s)" % exc) from None
    kind = obj.get("kind")
    if kind != "subscribe":
        raise ValueError("unknown message kind %r; expected 'subscribe'" % (kind,))
    return obj


# --- server messages: one builder per kind ------------------------------------


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def text_frame(payload: bytes) -> bytes:
    """A whole unmasked text frame: what the server queues, built once for every client."""
    return encode_frame(Opcode.TEXT, payload)


_JSON_TEXT_CACHE: Dict[Optional[str], bytes] = {}


def _json_text(value: Optional[str]) -> bytes:
    """JSON for a short string (a path, a session id) or null, remembered: few distinct values."""
    cached = _JSON_TEXT_CACHE.get(value)
    if cached is None:
        cached = json.dumps(value).encode("ascii")
        if value is None or len(value) <= JSON_TEXT_CACHE_MAX_CHARS:    # ids, not content
            if len(_JSON_TEXT_CACHE) >= JSON_TEXT_CACHE_SIZE:
                _JSON_TEXT_CACHE.clear()
            _JSON_TEXT_CACHE[value] = cached
    return cached


@dataclass
class LineMessage:
    """One message in a file's order (an entry, malformed or gap), built once for every client."""
    offset: int
    next: int                       # offset of the following line: the client's cursor
    frame: bytes                    # the whole WebSocket frame, built once for every client
    meta: MessageMeta
    malformed: str = ""             # why the line is not an entry, if it is not
    sort_key: str = ""              # the raw timestamp: ISO-8601 UTC sorts as text

    # The parsed entry is not kept: thousands of parsed lines alive per tick
    # made the garbage collector the biggest cost of a burst.

    @property
    def time(self) -> Optional[float]:
        when = parse_timestamp(self.sort_key) if self.sort_key else None
        return when.timestamp() if when is not None else None


def file_notice(kind: str, rec: FileRecord, **extra: Any) -> Tuple[bytes, MessageMeta]:
    """A notice about one file (malformed, gap, reset): its frame and what filters see."""
    fields = {"kind": kind, "path": rec.rel, "project": rec.project, "session": rec.session,
              "agent": rec.agent, "host": rec.host}
    fields.update(extra)
    ids = tuple(i for i in (rec.session, rec.agent) if i)
    return text_frame(_json(fields)), MessageMeta(rec.project, ids, None, rec.host)


def _line_digest_function() -> Callable[[bytes], int]:
    """A 64-bit digest of a line's bytes that nobody without this process's secret can
    collide: SipHash, as ``hash()`` computes for bytes (PEP 456), keyed by the random
    secret Python draws at start (about 1 µs for 3 KB, a tenth of decoding them); with
    PYTHONHASHSEED fixed that key is known, so then BLAKE2b keyed with a secret of ours."""
    if os.environ.get("PYTHONHASHSEED", "random") in ("", "random"):
        return hash
    try:
        from _blake2 import blake2b     # built in: hashlib would load OpenSSL (see above)
    except ImportError:                 # pragma: no cover - a Python built without it
        from hashlib import blake2b
    key = os.urandom(16)
    return lambda data: int.from_bytes(blake2b(data, digest_size=8, key=key).digest(), "little", signed=True)


LINE_DIGEST = _line_digest_function()
_CHECKED_HOLDERS: "collections.OrderedDict[int, FileRecord]" = collections.OrderedDict()   # by id, latest last
_checked_total = [0]            # the lines they hold


class CheckedLines:
    """The lines of one file that were decoded and found valid, in file order: for
    each, its offset, a keyed digest of its bytes (LINE_DIGEST), its envelope's key
    and where its timestamp's text lies in it.

    A history read that finds the same bytes at the same offset (their digest says
    so) makes the line's message from these, without decoding it again: the check's
    result for exactly these bytes, remembered. Anything else there (the file
    rewritten in place, a line torn and finished) is decoded and checked as always.
    Decoding was 60% of a replay's cost; a second client, the page opened again on
    everything or a hub catching up a box now costs reading, hashing and sending.
    At most CHECKED_LINES_MAX lines are held by all files; the files that added
    least recently forget theirs first.
    """

    __slots__ = ("offsets", "digests", "key_of", "stamp_at", "stamp_len", "keys", "key_ids", "cursor")

    def __init__(self) -> None:
        self.offsets = array.array("Q")
        self.digests = array.array("q")
        self.key_of = array.array("H")      # index in ``keys``
        self.stamp_at = array.array("I")    # the timestamp's text: line[at:at + len] (len 0: none)
        self.stamp_len = array.array("B")
        self.keys: List[Tuple[Any, ...]] = []       # (session, agent, type, cwd) of its lines
        self.key_ids: Dict[Tuple[Any, ...], int] = {}
        self.cursor = 0                     # the index after the last found: reads go forward

    def __len__(self) -> int:
        return len(self.offsets)

    def find(self, offset: int, digest: int) -> int:
        """The index of the line checked at ``offset`` with these bytes, or -1."""
        offsets, i = self.offsets, self.cursor
        if i >= len(offsets) or offsets[i] != offset:
            i = bisect.bisect_left(offsets, offset)
            if i >= len(offsets) or offsets[i] != offset:
                return -1
        if self.digests[i] != digest:
            return -1
        self.cursor = i + 1
        return i

    def add(self, offset: int, digest: int, key: Tuple[Any, ...], stamp_at: int, stamp_len: int) -> bool:
        """Remember a line checked at ``offset``, after every line held; False if it is not."""
        if self.offsets and offset <= self.offsets[-1]:
            return False
        key_id = self.key_ids.get(key)
        if key_id is None:
            if len(self.keys) > 0xFFFF:
                return False
            key_id = self.key_ids[key] = len(self.keys)
            self.keys.append(key)
        self.offsets.append(offset)
        self.digests.append(digest)
        self.key_of.append(key_id)
        self.stamp_at.append(stamp_at)
        self.stamp_len.append(stamp_len)
        return True


def remember_checked(rec: FileRecord, offset: int, digest: int, key: Tuple[Any, ...],
                     line: bytes, stamp: str) -> None:
    """Add a line just decoded and found valid to its file's CheckedLines, if its
    timestamp's text is in its bytes as it is (no escapes) and it comes after the rest."""
    if stamp:
        text = stamp.encode("utf-8")
        at = line.find(b'"' + text + b'"') + 1      # the same text, wherever it is: all that is needed
        if not at or len(text) > 0xFF or at > 0xFFFFFFFF:
            return
    else:
        at, text = 0, b""
    checked = rec.checked
    if checked is None:
        checked = rec.checked = CheckedLines()
    if not checked.add(offset, digest, key, at, len(text)):
        return
    holders = _CHECKED_HOLDERS
    holders[id(rec)] = rec
    holders.move_to_end(id(rec))
    _checked_total[0] += 1
    while _checked_total[0] > CHECKED_LINES_MAX and holders:
        forget_checked(next(iter(holders.values())))


def forget_checked(rec: FileRecord) -> None:
    if rec.checked is not None:
        _checked_total[0] -= len(rec.checked)
        rec.checked = None
    _CHECKED_HOLDERS.pop(id(rec), None)


def check_line(rec: FileRecord, offset: int, line: bytes,
               parsed: Optional[Callable[[FileRecord, Dict[str, Any]], None]] = None,
               remember: bool = False) -> Tuple[Tuple[Any, ...], str]:
    """A valid line's envelope key (session, agent, type, cwd) and timestamp text, or
    MalformedLine saying why it is not one.

    ``parsed``, if given, is handed the decoded entry of a line that carries a usage
    (the server's totals), so that no line is decoded twice. With ``remember``
    (history reads), a line its file's CheckedLines holds with these bytes is not
    decoded again (unless ``parsed`` needs it), and one decoded is added to them.
    """
    if remember:
        digest = LINE_DIGEST(line)
        checked = rec.checked
        if checked is not None and parsed is None:
            i = checked.find(offset, digest)
            if i >= 0:
                at = checked.stamp_at[i]
                return checked.keys[checked.key_of[i]], line[at:at + checked.stamp_len[i]].decode("utf-8")
    obj = decode_line(line)
    if parsed is not None:
        message = obj.get("message")
        if type(message) is dict and "usage" in message:
            parsed(rec, obj)
    # What routing, filters and history order need of it: the session is the entry's
    # sessionId, else the file's; the agent the file's sub-agent, else 1.0.x's inline
    # agentId; type "" when absent; the timestamp its raw ISO-8601 text, "" if none
    # (UTC sorts as text). Read here, not in a function of their own: once per line.
    session, kind, cwd, stamp = obj.get("sessionId"), obj.get("type"), obj.get("cwd"), obj.get("timestamp")
    if type(session) is not str:
        session = rec.session
    if type(kind) is not str:
        kind = ""
    if type(cwd) is not str:
        cwd = None
    if type(stamp) is not str:
        stamp = ""
    agent = rec.agent
    if agent is None and obj.get("isSidechain") is True and type(obj.get("agentId")) is str:
        agent = obj["agentId"]      # 1.0.x kept sub-agents inline in the main file
    del obj                         # a long line's decoded copy, gone before its frame is made
    key = (session, agent, kind, cwd)
    if remember:
        remember_checked(rec, offset, digest, key, line, stamp)
    return key, stamp


def line_message(rec: FileRecord, offset: int, line: bytes,
                 parsed: Optional[Callable[[FileRecord, Dict[str, Any]], None]] = None,
                 remember: bool = False) -> Optional[LineMessage]:
    """The ``entry`` envelope around the line's own bytes, or a ``malformed`` notice
    (``parsed`` and ``remember``: see check_line)."""
    if not line.strip():
        return None                 # a blank line carries nothing
    after = offset + len(line) + 1
    try:
        key, stamp = check_line(rec, offset, line, parsed, remember)
    except MalformedLine as exc:
        frame, meta = file_notice("malformed", rec, offset=offset, next=after,
                                  reason=str(exc), excerpt=excerpt(line))
        return LineMessage(offset, after, frame, meta, str(exc))
    # The envelope, keys in this order, around the line's own bytes, and the frame
    # header before it, in one join: json.dumps per line was a third of the cost.
    # What is the same for a file's lines (its path, project, session, agent, host,
    # and what filters see) is made once per file and kind, not per line.
    pieces = rec.envelopes.get(key)
    if pieces is None:
        pieces = envelope_pieces(rec, *key)
    head, middle, fixed, meta = pieces
    numbers = b'%d,"next":%d' % (offset, after)
    size = fixed + len(numbers) + len(line)
    return LineMessage(offset, after, b"".join((frame_header(TEXT_OPCODE, size), head, numbers, middle, line, b"}")),
                       meta, "", stamp)


TEXT_OPCODE = int(Opcode.TEXT)      # a plain int: an IntEnum's arithmetic costs, once per line
ENTRY_ENVELOPE_START = b'{"kind":"entry","path":'  # how every entry message begins
# What a client reads of it (a path without escapes: a JSON string's plain bytes, these):
_ENTRY_HEAD = re.compile(re.escape(ENTRY_ENVELOPE_START) + rb'"([^"\\\x00-\x1f]*)","offset":(\d{1,18}),"next":(\d{1,18}),')
ENVELOPES_PER_FILE = 64     # (session, agent, type, cwd) variants of a file's envelope kept ...
ENVELOPE_FILES = 1024       # ... by this many files at most (a history of 50,000 files kept each: 36 MB)
_ENVELOPE_HOLDERS: "collections.OrderedDict[int, FileRecord]" = collections.OrderedDict()   # by id, latest last


def envelope_pieces(rec: FileRecord, session: Optional[str], agent: Optional[str], kind: str,
                    cwd: Optional[str]) -> Tuple[bytes, bytes, int, MessageMeta]:
    """An entry envelope's bytes before the offsets and between them and the line, their
    length with the closing brace, and its filters' view: the same for most of a file's
    lines, so remembered on its record."""
    head = ENTRY_ENVELOPE_START + _json_text(rec.rel) + b',"offset":'
    middle = b"".join((b',"project":', _json_text(rec.project), b',"session":', _json_text(session),
                       b',"agent":', _json_text(agent), b',"host":', _json_text(rec.host), b',"entry":'))
    meta = MessageMeta(rec.project + "\n" + cwd if cwd is not None else rec.project,
                       tuple(filter(None, (rec.session, session, agent))), kind, rec.host)
    if len(rec.envelopes) >= ENVELOPES_PER_FILE:
        rec.envelopes.clear()
    rec.envelopes[(session, agent, kind, cwd)] = pieces = (head, middle, len(head) + len(middle) + 1, meta)
    holders = _ENVELOPE_HOLDERS
    holders[id(rec)] = rec
    holders.move_to_end(id(rec))
    while len(holders) > ENVELOPE_FILES:        # the files that made one longest ago forget theirs
        holders.popitem(last=False)[1].envelopes.clear()
    return pieces


def oversize_reason(limit: int) -> str:
    return "line longer than %d MiB; skipped" % (limit >> 20)


def gap_message(rec: FileRecord, offset: int, reason: str) -> LineMessage:
    """A ``gap`` notice in its file's order: the bytes from ``offset`` are not sent.

    It travels like a line (live, or from history at the same offset), so each
    client gets it once; ``next`` moves the client's position just past it.
    """
    frame, meta = file_notice("gap", rec, offset=offset, next=None, reason=reason)
    return LineMessage(offset, offset + 1, frame, meta)


def reset_message(rec: FileRecord, reason: str) -> Tuple[bytes, MessageMeta]:
    return file_notice("reset", rec, reason=reason, offset=0)


def hello_message(status: Dict[str, Any], now: str, filters: Filters) -> bytes:
    hello: Dict[str, Any] = {"kind": "hello"}
    hello.update(status)
    hello["time"] = now
    hello["filters"] = filters.as_json()
    return text_frame(_json(hello))


def subscribed_message(filters: Filters, behind: int) -> bytes:
    return text_frame(_json({"kind": "subscribed", "filters": filters.as_json(), "backlog": behind}))


def error_message(error: str) -> bytes:
    return text_frame(_json({"kind": "error", "error": error}))


LIVE_MESSAGE = text_frame(_json({"kind": "live"}))


# =============================================================================
# Usage and cost: token and cost totals of sessions, entry by entry (sans-I/O)
# =============================================================================
#
# The rules are those of ccusage 20.0.24 (the most used tool for this), measured
# on real transcripts; README's "Usage and cost" says where ours differ. One API
# response is written as one line per content block, each repeating its usage,
# and the early lines of 1.x/2.0.x carry streaming placeholders: a message counts
# once, with its line of the largest usage (all four kinds summed; on a tie, the
# first). Its key, ``message.id`` + ``requestId``, holds across files, because
# /fork, --bg and /compact copy history into other files; without a requestId it
# is ``sessionId`` + ``message.id``, and a line without a message id counts alone.
# ``<synthetic>`` messages are Claude Code's own, no API call: skipped.

SYNTHETIC_MODEL = "<synthetic>"


@dataclass(frozen=True)
class Price:
    """USD per million tokens of one model (Anthropic's unit).

    ``*_above`` price the part of one message's count of a kind above
    PRICE_TIER_TOKENS, for the models with a long-context tier; one-hour cache
    writes cost twice the input price (Anthropic's rule, and ccusage's); ``fast``
    multiplies everything in fast mode (``usage.speed == "fast"``).
    """
    input: float
    output: float
    cache_write: float              # five-minute cache writes
    cache_read: float
    input_above: Optional[float] = None
    output_above: Optional[float] = None
    cache_write_above: Optional[float] = None
    cache_read_above: Optional[float] = None
    fast: Optional[float] = None


# The prices ccusage 20.0.24 (published 2026-09-22) uses with --offline: its
# embedded snapshot of LiteLLM's model_prices_and_context_window.json, with the
# fast-mode multipliers of its fast-multiplier-overrides.json. Keys have no date
# suffix: "claude-sonnet-4-20250514" is looked up as "claude-sonnet-4".
_LONG_CONTEXT_SONNET = dict(input_above=6.0, output_above=22.5, cache_write_above=7.5,
                            cache_read_above=0.6)
PRICES_SOURCE = ("ccusage 20.0.24 (2026-09-22) offline snapshot of LiteLLM "
                 "model_prices_and_context_window.json")
BUILTIN_PRICES: Dict[str, Price] = {
    "claude-3-haiku": Price(0.25, 1.25, 0.3, 0.03),
    "claude-3-opus": Price(15.0, 75.0, 18.75, 1.5),
    "claude-3-5-haiku": Price(0.8, 4.0, 1.0, 0.08),
    "claude-3-5-sonnet": Price(3.0, 15.0, 3.75, 0.3),
    "claude-3-7-sonnet": Price(3.0, 15.0, 3.75, 0.3),
    "claude-opus-4": Price(15.0, 75.0, 18.75, 1.5),
    "claude-opus-4-1": Price(15.0, 75.0, 18.75, 1.5),
    "claude-sonnet-4": Price(3.0, 15.0, 3.75, 0.3, **_LONG_CONTEXT_SONNET),
    "claude-sonnet-4-5": Price(3.0, 15.0, 3.75, 0.3, **_LONG_CONTEXT_SONNET),
    "claude-haiku-4-5": Price(1.0, 5.0, 1.25, 0.1),
    "claude-opus-4-5": Price(5.0, 25.0, 6.25, 0.5),
    "claude-opus-4-6": Price(5.0, 25.0, 6.25, 0.5, fast=6.0),
    "claude-opus-4-7": Price(5.0, 25.0, 6.25, 0.5, fast=6.0),
    "claude-opus-4-8": Price(5.0, 25.0, 6.25, 0.5, fast=2.0),
    "claude-sonnet-4-6": Price(3.0, 15.0, 3.75, 0.3),
    "claude-opus-5": Price(5.0, 25.0, 6.25, 0.5, fast=2.0),
    "claude-sonnet-5": Price(2.0, 10.0, 2.5, 0.2),
    "claude-fable-5": Price(10.0, 50.0, 12.5, 1.0),
    "claude-fable-5-1": Price(10.0, 50.0, 12.5, 0.25),
    "claude-mythos-5": Price(10.0, 50.0, 12.5, 1.0),
    "claude-mythos-5-1": Price(10.0, 50.0, 12.5, 0.25),
    "claude-mythos-preview": Price(10.0, 50.0, 12.5, 1.0),
}
_MODEL_DATE_RE = re.compile(r"-\d{8}$")
_PRICE_FIELDS = tuple(f for f in Price.__dataclass_fields__)


def find_price(prices: Dict[str, Price], model: str) -> Optional[Price]:
    """The model's price: by its exact name, else without its date suffix."""
    price = prices.get(model)
    return price if price is not None else prices.get(_MODEL_DATE_RE.sub("", model))


def parse_prices(text: str) -> Dict[str, Price]:
    """A --prices file: ``{"model": {"input": 3, "output": 15, ...}, ...}`` in USD per
    million tokens, the fields of ``Price``; ``input`` and ``output`` are required,
    cache writes default to 1.25 x input and reads to 0.1 x input (Anthropic's
    ratios). Raises ValueError saying what is wrong."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ValueError("not JSON: %s" % exc) from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError("must be a JSON object of models, e.g. "
                         '{"claude-opus-4-7": {"input": 5, "output": 25}}')
    prices = {}
    for model, fields in obj.items():
        if not isinstance(fields, dict):
            raise ValueError("%s: must be an object of prices" % model)
        unknown = sorted(set(fields) - set(_PRICE_FIELDS))
        if unknown:
            raise ValueError("%s: unknown field %s (known: %s)" % (model, unknown[0], ", ".join(_PRICE_FIELDS)))
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                raise ValueError("%s: %s must be a number of USD per million tokens" % (model, name))
        if "input" not in fields or "output" not in fields:
            raise ValueError("%s: needs at least input and output" % model)
        given = {name: float(value) for name, value in fields.items()}
        given.setdefault("cache_write", given["input"] * 1.25)
        given.setdefault("cache_read", given["input"] * 0.1)
        prices[model] = Price(**given)
    return prices


def _count(value: Any) -> int:
    """A token count as counted: not bools, floats, negatives; nor 10**400, whose price overflows a float."""
    return value if type(value) is int and 0 < value <= MAX_TOKEN_COUNT else 0


class MessageUsage(NamedTuple):
    """One API response's usage as counted: its model (``-fast`` added in fast
    mode, priced apart), the token kinds (cache writes by lifetime, as they are
    priced apart) and its cost, None when the model has no price. A tuple: one
    is made per message counted, and a frozen dataclass cost three times as much."""
    model: str
    input: int
    output: int
    write_5m: int
    write_1h: int
    read: int
    cost: Optional[float]

    @property
    def total(self) -> int:
        return self.input + self.output + self.write_5m + self.write_1h + self.read


def _tiered(count: int, base: float, above: Optional[float]) -> float:
    if above is None or count <= PRICE_TIER_TOKENS:
        return count * base
    return PRICE_TIER_TOKENS * base + (count - PRICE_TIER_TOKENS) * above


def message_cost(price: Price, input: int, output: int, write_5m: int, write_1h: int, read: int) -> float:
    """USD for one message; the tier applies to each kind's own count in it."""
    if input <= PRICE_TIER_TOKENS and output <= PRICE_TIER_TOKENS and write_5m <= PRICE_TIER_TOKENS \
            and write_1h <= PRICE_TIER_TOKENS and read <= PRICE_TIER_TOKENS:     # no tier: most messages
        return (input * price.input + output * price.output + write_5m * price.cache_write
                + write_1h * 2 * price.input + read * price.cache_read) / 1e6
    write_1h_above = None if price.input_above is None else 2 * price.input_above
    return (_tiered(input, price.input, price.input_above)
            + _tiered(output, price.output, price.output_above)
            + _tiered(write_5m, price.cache_write, price.cache_write_above)
            + _tiered(write_1h, 2 * price.input, write_1h_above)
            + _tiered(read, price.cache_read, price.cache_read_above)) / 1e6


def usage_counts(entry: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any], Tuple[int, int, int, int, int]]]:
    """(model, usage, its token counts: input, output, 5 min and 1 h cache writes, cache
    reads) of a transcript entry, or None (no usage, or <synthetic>)."""
    message = entry.get("message")
    if type(message) is not dict:       # type, not isinstance: decoded JSON has no subclasses
        return None
    usage = message.get("usage")
    if type(usage) is not dict:
        return None
    model = message.get("model")
    if type(model) is not str:
        model = ""
    elif model == SYNTHETIC_MODEL:
        return None
    get = usage.get
    parts = get("cache_creation")
    if type(parts) is dict:         # split by lifetime since mid-2025; 1 h writes cost more
        write_5m, write_1h = parts.get("ephemeral_5m_input_tokens", 0), parts.get("ephemeral_1h_input_tokens", 0)
    else:
        write_5m, write_1h = get("cache_creation_input_tokens", 0), 0
    input, output, read = get("input_tokens", 0), get("output_tokens", 0), get("cache_read_input_tokens", 0)
    if type(input) is int and type(output) is int and type(write_5m) is int and type(write_1h) is int \
            and type(read) is int and 0 <= input | output | write_5m | write_1h | read <= MAX_TOKEN_COUNT:
        return model, usage, (input, output, write_5m, write_1h, read)      # plain ints in range: most
    # Bools, floats, strings, negatives or too many: each is checked (the | of ints is < 0
    # if one is, and past the limit if one is).
    return model, usage, (_count(input), _count(output), _count(write_5m), _count(write_1h), _count(read))


def message_usage(entry: Dict[str, Any], prices: Dict[str, Price],
                  found: Optional[Tuple[str, Dict[str, Any], Tuple[int, int, int, int, int]]] = None,
                  price_of: Callable[[Dict[str, Price], str], Optional[Price]] = find_price
                  ) -> Optional[MessageUsage]:
    """The usage a transcript entry carries, priced, or None (no usage, or <synthetic>)."""
    found = found or usage_counts(entry)
    if found is None:
        return None
    model, usage, counts = found
    price = price_of(prices, model)
    cost = None if price is None else message_cost(price, *counts)
    if usage.get("speed") == "fast":
        model += "-fast"
        cost = None if cost is None or price is None or price.fast is None else cost * price.fast
    return MessageUsage(model, *counts, cost)


def usage_scope(rel: str, entry: Dict[str, Any]) -> Tuple[str, str]:
    """(project, session) a line of file ``rel`` counts for: the session the file
    belongs to, sub-agents' files with their parent (a 2.0.x ``agent-<id>.jsonl``
    beside the sessions names it only in its lines' ``sessionId``)."""
    project, session, agent = classify_path(rel)
    return project, usage_session(session, agent, entry)


def usage_session(session: Optional[str], agent: Optional[str], entry: Dict[str, Any]) -> str:
    """The session a file's line counts for: the file's own, else (a 2.0.x agent file)
    the one its lines name."""
    if session is not None:
        return session
    session_id = entry.get("sessionId")
    return session_id if isinstance(session_id, str) else "agent-%s" % agent


def utc_day(stamp: str) -> str:
    """The UTC date of an ISO time, "" if it has none."""
    if len(stamp) > 10 and stamp.endswith("Z") and stamp[4] == "-" and stamp[7] == "-":
        return stamp[:10]           # Claude Code's own form: no parsing needed
    when = parse_timestamp(stamp)
    return when.astimezone(timezone.utc).date().isoformat() if when is not None else ""


@dataclass
class Tally:
    """One model's totals in one scope (a session, a file, a day, everything)."""
    messages: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0               # messages whose model has no price


TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class UsageTotals:
    """Totals by model of one scope. Cost is known per model or not at all: a
    model without a price has ``cost_usd`` null, and the scope's ``cost_usd``
    (the priced models' sum) comes with ``unpriced_models`` naming it."""

    def __init__(self) -> None:
        self.models: Dict[str, Tally] = {}
        self.last = ""                  # the latest timestamp counted

    def add(self, usage: MessageUsage, sign: int, stamp: str = "") -> None:
        """Count ``usage`` in its model's tally (``sign`` -1 takes it back)."""
        tally = self.models.get(usage.model)
        if tally is None:
            tally = self.models[usage.model] = Tally()
        _, input, output, write_5m, write_1h, read, cost = usage
        tally.messages += sign
        tally.input_tokens += sign * input
        tally.output_tokens += sign * output
        tally.cache_creation_input_tokens += sign * (write_5m + write_1h)
        tally.cache_read_input_tokens += sign * read
        if cost is None:
            tally.unpriced += sign
        else:
            tally.cost_usd += sign * cost
        if tally.messages <= 0:
            del self.models[usage.model]    # not a residue of float cost
        if stamp > self.last:
            self.last = stamp

    def sum(self, kind: str) -> int:
        return sum(getattr(t, kind) for t in self.models.values())

    @property
    def cost_usd(self) -> float:
        return sum((t.cost_usd for t in self.models.values()), 0.0)

    @property
    def unpriced_models(self) -> List[str]:
        return sorted(m for m, t in self.models.items() if t.unpriced)

    def as_json(self) -> Dict[str, Any]:
        """The shape of the ``usage`` message and of ``usage --json``."""
        out: Dict[str, Any] = {kind: self.sum(kind) for kind in TOKEN_KINDS}
        out["cost_usd"] = round(self.cost_usd, 9)
        out["unpriced_models"] = self.unpriced_models
        out["models"] = {model: dict({kind: getattr(t, kind) for kind in TOKEN_KINDS},
                                     messages=t.messages,
                                     cost_usd=None if t.unpriced else round(t.cost_usd, 9))
                         for model, t in sorted(self.models.items())}
        return out


class SessionUsage:
    """One session's totals, and each of its files' own."""

    def __init__(self, project: str, session: str) -> None:
        self.project, self.session = project, session
        self.totals = UsageTotals()
        self.files: Dict[str, UsageTotals] = {}

    def add(self, usage: MessageUsage, path: Optional[str], sign: int, stamp: str) -> None:
        """Count ``usage`` (``sign`` -1 takes it back) for the session, and for file ``path`` if given."""
        self.totals.add(usage, sign, stamp)
        if path is None:
            return
        totals = self.files.get(path)
        if totals is None:
            totals = self.files[path] = UsageTotals()
        totals.add(usage, sign, stamp)


# Where a message was counted: its usage, session, file and day.
Counted = Tuple[MessageUsage, SessionUsage, str, str]


class KeyHashes:
    """The hashes of up to ``capacity`` keys, for "seen before?", at 8 bytes a slot.

    Two generations, each an open-addressing table (linear probing, at most half
    full, doubled as it fills) of 64-bit hashes in an array: when the current holds
    half the capacity, the previous is forgotten, ``forgotten`` counts its keys, and
    the current becomes the previous. So the latest half of the capacity, at least, is
    always remembered, nothing is ever deleted from a table, and no order is kept.
    The hashes are Python's own (``hash(str)``, 64 bits, salted per process: fine
    for memory that lives as long as the process); two keys alike by hash are one.
    One call looks and remembers (every new message of a live stream passes here).
    """

    FIRST_SLOTS = 1024

    def __init__(self, capacity: int) -> None:
        self.generation = capacity // 2     # keys per table; 0: nothing is remembered
        self.forgotten = 0
        self._current_count = self._previous_count = 0
        self._use((array.array("q", [0]) * self.FIRST_SLOTS,))

    def _use(self, tables: Tuple["array.array[int]", ...]) -> None:
        """Look in ``tables``, the current first (then the previous generation, once there
        is one), and add to the current while it has room: at most half full."""
        self._tables, self._current = tables, tables[0]
        self._room = min(self.generation, len(tables[0]) // 2)

    @property
    def count(self) -> int:
        """Keys held, in both tables."""
        return self._current_count + self._previous_count

    def seen_or_add(self, value: int) -> bool:
        """Whether ``value`` was seen; if not, it is now (when there is room at all)."""
        value = value or 1                  # 0 marks an empty slot
        slot = -1
        for table in self._tables:          # the current, then the previous if there is one
            mask = len(table) - 1
            i = value & mask
            found = table[i]
            while found:
                if found == value:
                    return True
                i = (i + 1) & mask
                found = table[i]
            if slot < 0:
                slot = i                    # where it goes in the current
        table = self._current
        i = slot
        if self._current_count >= self._room:
            if not self.generation:
                self.forgotten += 1
                return False
            table = self._make_room()
            mask = len(table) - 1
            i = value & mask
            while table[i]:
                i = (i + 1) & mask
        table[i] = value
        self._current_count += 1
        return False

    def _make_room(self) -> "array.array[int]":
        """A new generation, or the current table twice as large; the table to add to."""
        if self._current_count >= self.generation:
            self.forgotten += self._previous_count
            self._previous_count, self._current_count = self._current_count, 0
            self._use((array.array("q", [0]) * self.FIRST_SLOTS, self._current))
            return self._current
        old, table = self._current, array.array("q", [0]) * (2 * len(self._current))
        mask = len(table) - 1
        for kept in old:
            if kept:
                i = kept & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = kept
        self._use((table,) + self._tables[1:])
        return table


class UsageBook:
    """Token and cost totals of sessions, fed one parsed transcript entry at a time.

    Sans-I/O: ``usage`` reads files into it, and a server can feed it the lines
    it tails. ``add`` says which sessions' totals changed. Each message counted
    is remembered under its key: the latest ``limits.usage_recent_messages``
    with what they counted, so that a later line of a message with a larger
    usage replaces its count, wherever that was (a message's lines come within
    seconds of each other); older ones by a hash of the key alone (KeyHashes),
    so that a copy of one (a fork, a resume) is not counted again. Up to
    ``limits.usage_max_messages`` in all; past that the oldest half of those
    known by hash is forgotten, counted in ``forgotten``.
    """

    def __init__(self, prices: Optional[Dict[str, Price]] = None, limits: Limits = DEFAULT_LIMITS,
                 by_day: bool = True, by_file: bool = True):
        self.prices = BUILTIN_PRICES if prices is None else prices
        self.by_day = by_day            # also per day and in all: the command's tables; the server's not
        self.by_file = by_file          # each file's own totals too: the command's; the server's not
        self._prices_found: Dict[str, Optional[Price]] = {}     # by model name: a few models, many lines
        self.max_messages = limits.usage_max_messages
        self.recent_messages = min(limits.usage_recent_messages, limits.usage_max_messages)
        self.sessions: Dict[Tuple[str, str], SessionUsage] = {}
        self.days: Dict[str, UsageTotals] = {}
        self.totals = UsageTotals()
        self._counted: Dict[int, Counted] = {}     # the recent, by key ...
        self._recent: Deque[int] = collections.deque()  # ... and their keys, oldest first
        self._older = KeyHashes(self.max_messages)  # every key counted, by hash: also those past the recent
        self._day_names: Dict[str, str] = {}    # one string per day, not one per message

    @property
    def forgotten(self) -> int:
        """Messages no longer remembered: a copy of one made now would be counted again."""
        return self._older.forgotten

    def session(self, project: str, session: str) -> SessionUsage:
        found = self.sessions.get((project, session))
        if found is None:
            found = self.sessions[(project, session)] = SessionUsage(project, session)
        return found

    def add(self, entry: Dict[str, Any], project: str, session: str, path: str) -> List[SessionUsage]:
        """Count one line of file ``path`` for ``session``; the sessions it changed."""
        found = usage_counts(entry)
        if found is None:
            return []
        # What makes two lines the same message (the section's head), by its hash: the key is
        # only ever compared, and two messages alike by a 64-bit hash are one.
        message_id = entry["message"].get("id")    # usage_counts found the message a dict
        if type(message_id) is not str:
            key = old = None            # nothing can be the same message
        else:
            request_id = entry.get("requestId")
            if type(request_id) is str:
                key = hash(("r", message_id, request_id))
            else:
                session_id = entry.get("sessionId")
                key = hash(("s", session_id if type(session_id) is str else session, message_id))
            old = self._counted.get(key)
            if old is not None:
                if sum(found[2]) <= old[0].total:
                    return []           # a message's later line, no larger: most lines, so not priced
            elif self._older.seen_or_add(key):
                return []               # a copy of a message counted long ago
        usage = message_usage(entry, self.prices, found, self._price)
        assert usage is not None
        stamp = entry.get("timestamp")
        if type(stamp) is not str:
            stamp = ""
        day = self._day_names.setdefault(utc_day(stamp), utc_day(stamp)) if self.by_day else ""
        counted = (usage, self.sessions.get((project, session)) or self.session(project, session), path, day)
        if key is None:
            self._count(counted, 1, stamp)
            return [counted[1]]
        changed = [counted[1]]
        if old is not None:
            self._count(old, -1)
            if old[1] is not counted[1]:
                changed.append(old[1])
        self._counted[key] = counted
        if old is None:
            recent = self._recent
            recent.append(key)
            if len(recent) > self.recent_messages:
                del self._counted[recent.popleft()]     # its key's hash stays, in _older
        self._count(counted, 1, stamp)
        return changed

    def _price(self, prices: Dict[str, Price], model: str) -> Optional[Price]:
        """find_price, remembered per model (a model name without its own price costs a regex)."""
        try:
            return self._prices_found[model]
        except KeyError:
            if len(self._prices_found) >= PRICE_MEMORY:
                self._prices_found.clear()
            found = self._prices_found[model] = find_price(prices, model)
            return found

    def _count(self, counted: Counted, sign: int, stamp: str = "") -> None:
        usage, session, path, day = counted
        if self.by_file:
            session.add(usage, path, sign, stamp)
        else:                           # the server's: a call less per message
            session.totals.add(usage, sign, stamp)
        if not self.by_day:
            return
        totals = self.days.get(day)
        if totals is None:
            totals = self.days[day] = UsageTotals()
        totals.add(usage, sign, stamp)
        self.totals.add(usage, sign, stamp)


# --- reading the files on disk: ``usage`` -------------------------------------


class _WholeFile:
    """split_lines' state for reading one file from its start."""

    def __init__(self) -> None:
        self.read_pos = self.line_start = 0
        self.pending = bytearray()
        self.skipping = False


@dataclass
class UsageReport:
    """What ``usage`` read: the totals, and what it had to skip."""
    book: UsageBook
    roots: List[str] = field(default_factory=list)
    files: int = 0
    malformed: int = 0              # lines that are not a JSON object, or too long
    unreadable: int = 0             # files that could not be read


def read_usage(roots: Iterable[str], since: Optional[float], book: UsageBook, log: Log,
               limits: Limits = DEFAULT_LIMITS) -> UsageReport:
    """Every transcript under ``roots`` into ``book``, found as the tailer finds them
    (regular files only, never through a link), in full-path order: on a tie of
    two copies of a message, the first file keeps it, as in ccusage."""
    discovery = Discovery(roots, DEFAULT_POLL_INTERVAL, log, limits, wakeups=False, wall=time.time)
    found, _ = discovery.check(time.monotonic(), full=True)
    report = UsageReport(book, [r.path for r in discovery.roots])
    for root in discovery.roots:
        if not root.present:
            log.warn("%s does not exist (yet): nothing read there" % root.path)
    for root, path in sorted(found, key=lambda item: item[1]):
        rel = os.path.relpath(path, root.path).replace(os.sep, "/")
        read_usage_file(report, path, rel, since, log, limits)
    return report


def read_usage_file(report: UsageReport, path: str, rel: str, since: Optional[float], log: Log,
                    limits: Limits = DEFAULT_LIMITS) -> None:
    state = _WholeFile()
    try:
        with open_regular(path) as fh:
            while True:
                chunk = fh.read(limits.read_block)
                if not chunk:
                    break
                for offset, line in split_lines(state, chunk, limits.max_line_bytes):
                    _usage_line(report, rel, offset, line, since, log, limits)
    except OSError as exc:
        report.unreadable += 1
        log.warn("cannot read %s: %s" % (path, exc.strerror or exc), key="usage-read")
        return
    report.files += 1
    if state.pending:               # no newline yet: counted if whole, else it is being written
        try:
            decode_line(bytes(state.pending))
        except MalformedLine:
            return
        _usage_line(report, rel, state.line_start, bytes(state.pending), since, log, limits)


def _usage_line(report: UsageReport, rel: str, offset: int, line: Optional[bytes],
                since: Optional[float], log: Log, limits: Limits) -> None:
    if line is None:
        report.malformed += 1
        log.warn("%s at byte %d: a line over %d bytes, skipped" % (rel, offset, limits.max_line_bytes),
                 key="usage-malformed")
        return
    if not line.strip():
        return
    try:
        obj = decode_line(line)
    except MalformedLine as exc:
        report.malformed += 1
        log.warn("%s at byte %d: %s, skipped" % (rel, offset, exc), key="usage-malformed")
        return
    if since is not None:
        when = parse_timestamp(obj.get("timestamp"))
        if when is None or when.timestamp() < since:
            return
    project, session = usage_scope(rel, obj)
    report.book.add(obj, project, session, rel)


# =============================================================================
# Claude Code's session registry: which session is working, waiting or gone
# =============================================================================
#
# Claude Code 2.1.139 and later keeps <config>/sessions/<pid>.json for every live
# process (config: $CLAUDE_CONFIG_DIR or ~/.claude, the parent of the projects
# folder), rewritten in place on every change of its status and deleted on a
# clean exit; a kill -9 leaves it frozen, and a pid can be reused. The state is
# read from there, never guessed from transcripts: nothing is written to them
# while Claude thinks, waits at a prompt or compacts. What was observed is in
# ../shared/realclaude/REGISTRY.md; the rules below follow it.

REGISTRY_NAME = re.compile(r"^[1-9][0-9]{0,9}\.json$")    # what Claude Code itself reads there (0123.json: no)
STATUS_STATES = {"busy": "working", "waiting": "waiting", "idle": "idle", "shell": "shell"}
JOB_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")          # a folder name under <config>/jobs/, nothing else


def registry_folder(root: str) -> Optional[str]:
    """The registry beside a projects folder, or None for a root not named so."""
    root = os.path.normpath(root)
    return os.path.join(os.path.dirname(root), "sessions") if os.path.basename(root) == "projects" else None


@dataclass
class RegistryRecord:
    """The fields of one <pid>.json that say who and what (the rest is peer messaging)."""
    pid: int
    session: str
    cwd: Optional[str] = None
    status: Optional[str] = None            # busy, idle, waiting, shell; absent in the first write
    waiting_for: Optional[str] = None
    proc_start: Optional[str] = None        # field 22 of /proc/<pid>/stat, as text
    pid_domain: Optional[str] = None        # which machine and pid namespace the pid means something in
    kind: Optional[str] = None              # interactive (the UI and -p), bg
    entrypoint: Optional[str] = None        # cli, sdk-cli (-p)
    name: Optional[str] = None
    status_at: Optional[float] = None       # statusUpdatedAt, epoch seconds
    job: Optional[str] = None               # claude --bg: its jobs/<job>/ folder

    @classmethod
    def parse(cls, data: bytes, pid: int) -> "RegistryRecord":
        """The record, or ValueError for what is not one (a torn read among them)."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            raise ValueError("not JSON (read while being rewritten?)") from None
        if not isinstance(obj, dict) or obj.get("pid") != pid or not isinstance(obj.get("sessionId"), str):
            raise ValueError("not a session record for pid %d" % pid)

        def text(name: str) -> Optional[str]:
            value = obj.get(name)
            return value if isinstance(value, str) else None
        at = obj.get("statusUpdatedAt")     # ms; NaN, inf or 1e300 would break every status after it
        if not (isinstance(at, (int, float)) and not isinstance(at, bool) and 0 < at < REGISTRY_MAX_EPOCH_MS):
            at = None
        job = text("jobId")
        return cls(pid, obj["sessionId"], text("cwd"), text("status"), text("waitingFor"), text("procStart"),
                   text("pidDomain"), text("kind"), text("entrypoint"), text("name"),
                   at / 1000.0 if at is not None else None, job if job and JOB_ID.match(job) else None)

    @property
    def process(self) -> Tuple[int, Optional[str]]:
        """One process: a pid is reused, a session id changes on /clear."""
        return (self.pid, self.proc_start)


class ProcessProbe:
    """Is the process of a record still the one that wrote it? Linux's /proc says."""

    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self.domain = self._own_domain()

    def _own_domain(self) -> Optional[str]:
        """linux:<machine id>:pid:[<pid namespace inode>], as Claude Code writes it."""
        try:
            with open("/etc/machine-id", "rb") as fh:
                machine = fh.read(256).decode("ascii").strip()
            namespace = os.stat(os.path.join(self.proc, "self", "ns", "pid")).st_ino
        except (OSError, UnicodeDecodeError):
            return None
        return "linux:%s:pid:[%d]" % (machine, namespace)

    def checkable(self, record: RegistryRecord) -> bool:
        """A record from another machine or pid namespace names a pid that means nothing
        here; one without its start time cannot tell its process from a later one."""
        if self.domain is None or record.proc_start is None:
            return False
        return record.pid_domain == self.domain if record.pid_domain else sys.platform.startswith("linux")

    def alive(self, record: RegistryRecord) -> bool:
        """The pid runs (a zombie does not: killed, not yet reaped), and started when the
        record says (a reused pid did not)."""
        try:
            with open(os.path.join(self.proc, str(record.pid), "stat"), "rb") as fh:
                stat_line = fh.read(4096)
        except OSError:
            return False
        fields = stat_line[stat_line.rfind(b")") + 2:].split()     # the name may hold spaces and ')'
        if len(fields) <= 19 or fields[0] in (b"Z", b"X"):
            return False
        return fields[19].decode("ascii", "replace") == record.proc_start


@dataclass
class SessionStatus:
    """What a ``status`` message says of one session."""
    folder: str                     # the registry folder it came from
    session: str
    state: str                      # working, waiting, idle, shell, ended
    since: float                    # epoch seconds the state began
    pid: int
    waiting_for: Optional[str] = None
    name: Optional[str] = None
    cwd: Optional[str] = None
    entrypoint: Optional[str] = None
    mode: Optional[str] = None      # interactive, bg
    checked: bool = True            # False: another pid namespace's record, taken as it is
    needs: Optional[str] = None     # claude --bg, blocked: what it needs ("approve Bash: ...")

    def same(self, other: Optional["SessionStatus"]) -> bool:
        return other is not None and (self.session, self.state, self.waiting_for, self.name, self.cwd,
                                      self.needs) == (other.session, other.state, other.waiting_for,
                                                      other.name, other.cwd, other.needs)


@dataclass
class _Followed:
    """One registry file, as last read and as last said."""
    signature: Tuple[int, int, int]         # inode, size, mtime: unchanged, not read again
    record: Optional[RegistryRecord] = None
    said: Optional[SessionStatus] = None    # what clients were last told
    due: Optional[SessionStatus] = None     # an idle waiting out its debounce
    due_at: float = 0.0
    dead: bool = False                      # its process is gone: the frozen file says nothing more
    tries: int = 0                          # torn reads of this version
    job_signature: Optional[Tuple[int, int, int]] = None    # of a --bg session's jobs/<id>/state.json


class Registry:
    """Every registry folder's records, and the status changes they make.

    ``scan`` lists the folders and reads the files that changed (a torn read is
    read again after ``registry_retry_delay``); ``check`` asks /proc whether each
    record's process still runs. Both return the changes to send, in the order
    they happened. An idle is said only once it lasted ``registry_idle_debounce``.
    """

    def __init__(self, folders: List[str], log: Log, limits: Limits = DEFAULT_LIMITS,
                 probe: Optional[ProcessProbe] = None, wall: Callable[[], float] = time.time):
        self.folders = folders
        self.log = log
        self.limits = limits
        self.probe = probe or ProcessProbe()
        self.wall = wall
        self.followed: Dict[str, _Followed] = {}    # path -> what we know of it
        self.retry_at: Optional[float] = None

    def live(self) -> List[SessionStatus]:
        """The sessions whose process runs, as last said: a new client's snapshot."""
        return [f.said for f in self.followed.values() if f.said is not None and f.said.state != "ended"]

    def next_due(self, now: float) -> float:
        due = [f.due_at for f in self.followed.values() if f.due is not None]
        if self.retry_at is not None:
            due.append(self.retry_at)
        return min(due, default=now + self.limits.registry_poll_interval)

    def scan(self, now: float) -> List[SessionStatus]:
        """List every folder; read what changed; what that changes for clients."""
        changes: List[SessionStatus] = []
        seen: Set[str] = set()
        self.retry_at = None
        for folder in self.folders:
            try:
                names = [n for n in os.listdir(folder) if REGISTRY_NAME.match(n)]
            except OSError:
                names = []                  # not there yet (no session ever ran), or unreadable
            for name in sorted(names)[:self.limits.registry_max_records]:
                path = os.path.join(folder, name)
                seen.add(path)
                self._look(folder, path, int(name[:-5]), now, changes)
        for path in [p for p in self.followed if p not in seen]:
            gone = self.followed.pop(path)      # deleted: a clean exit, or a sweep
            if gone.said is not None and gone.said.state != "ended":
                changes.append(self._ended(gone.said))
        changes += self.settled(now)
        return changes

    def check(self, now: float) -> List[SessionStatus]:
        """The records whose process is gone (kill -9, a crash) or reused, as ended."""
        changes = []
        for followed in self.followed.values():
            record = followed.record
            if record is None or followed.dead or not self.probe.checkable(record):
                continue
            if not self.probe.alive(record):
                followed.dead, followed.due = True, None
                if followed.said is not None and followed.said.state != "ended":
                    changes.append(self._ended(followed.said))
                    followed.said = changes[-1]
        return changes + self.settled(now)

    def _look(self, folder: str, path: str, pid: int, now: float, changes: List[SessionStatus]) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return                          # a link or a FIFO is not Claude Code's
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        followed = self.followed.get(path)
        # busy -> idle is a rewrite in place of the same size: within a coarse mtime's tick
        # (a network or FUSE mount: 1-2 s) it looks unchanged, so a recent one is read again.
        recent = self.wall() - st.st_mtime < self.limits.registry_fresh_window
        if followed is not None and followed.signature == signature and not followed.tries and not recent:
            if followed.record is not None and followed.record.job and self._job_changed(folder, followed):
                self._update(folder, followed, followed.record, now, changes)    # its needs changed
            return
        if followed is None or followed.signature != signature:
            followed = self.followed.setdefault(path, _Followed(signature))
            followed.signature, followed.tries = signature, 0
        try:
            record = RegistryRecord.parse(self._read(path, (st.st_dev, st.st_ino)), pid)
        except (OSError, ValueError) as exc:
            followed.tries += 1
            if followed.tries <= self.limits.registry_retries:
                self.retry_at = now + self.limits.registry_retry_delay
            else:
                followed.tries = 0          # this version is skipped; the next one is read
                self.log.warn("%s: %s" % (path, exc), key="registry")
            return
        followed.tries = 0
        self._update(folder, followed, record, now, changes)

    def _job_path(self, folder: str, job: str) -> str:
        return os.path.join(os.path.dirname(folder), "jobs", job, "state.json")

    def _job_changed(self, folder: str, followed: _Followed) -> bool:
        assert followed.record is not None and followed.record.job is not None
        try:
            st = os.lstat(self._job_path(folder, followed.record.job))
            signature: Optional[Tuple[int, int, int]] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            signature = None
        changed, followed.job_signature = signature != followed.job_signature, signature
        return changed

    def _needs(self, folder: str, record: RegistryRecord) -> Optional[str]:
        """What a blocked --bg session needs, from jobs/<id>/state.json (written by a rename:
        one read is whole), or None."""
        if record.job is None:
            return None
        try:
            obj = json.loads(self._read(self._job_path(folder, record.job), None))
        except (OSError, ValueError, RecursionError):
            return None
        needs = obj.get("needs") if isinstance(obj, dict) else None
        return needs if isinstance(needs, str) else None

    def _read(self, path: str, identity: Optional[Tuple[int, int]]) -> bytes:
        with open_regular(path, identity) as fh:
            data = fh.read(self.limits.registry_max_record_bytes + 1)
        if len(data) > self.limits.registry_max_record_bytes:
            raise ValueError("larger than %d bytes" % self.limits.registry_max_record_bytes)
        return data

    def _update(self, folder: str, followed: _Followed, record: RegistryRecord, now: float,
                changes: List[SessionStatus]) -> None:
        old, said = followed.record, followed.said
        other_process = old is None or old.process != record.process
        if other_process:
            followed.dead = False           # the pid's file now belongs to another process
        if followed.dead:
            return                          # rewritten by nobody: a frozen record says nothing
        if said is not None and said.state != "ended" and (other_process or said.session != record.session):
            changes.append(self._ended(said))       # /clear, or a reused pid: that session is over
            said = followed.said = changes[-1]
        followed.record = record
        checked = self.probe.checkable(record)
        if other_process and checked and not self.probe.alive(record):
            followed.dead = True            # left by a kill -9 (before we started, or a copy): not live
            return
        state = STATUS_STATES.get(record.status or "idle", "idle")
        since = record.status_at if record.status_at is not None else self.wall()
        status = SessionStatus(folder, record.session, state, since, record.pid,
                               record.waiting_for if state == "waiting" else None, record.name, record.cwd,
                               record.entrypoint, record.kind, checked, self._needs(folder, record))
        if status.same(followed.due):
            return                          # an idle still waiting out its debounce
        followed.due = None
        if status.same(said):
            return                          # back to what was said: an idle blip, never told
        if state == "idle" and said is not None and said.state in ("working", "shell"):
            followed.due, followed.due_at = status, now + self.limits.registry_idle_debounce
            return
        followed.said = status
        changes.append(status)

    def settled(self, now: float) -> List[SessionStatus]:
        """Idles that lasted their debounce."""
        out = []
        for followed in self.followed.values():
            if followed.due is not None and followed.due_at <= now:
                followed.said, followed.due = followed.due, None
                out.append(followed.said)
        return out

    def _ended(self, said: SessionStatus) -> SessionStatus:
        return replace_fields(said, state="ended", since=self.wall(), waiting_for=None, needs=None)


def status_message(status: SessionStatus, project: Optional[str], path: Optional[str],
                   host: Optional[str] = None) -> Tuple[bytes, MessageMeta]:
    """A ``status`` frame, and what filters see (its project folder and cwd, its session)."""
    fields = {"kind": "status", "host": host, "session": status.session, "project": project, "path": path,
              "state": status.state, "waiting_for": status.waiting_for,
              "since": datetime.fromtimestamp(status.since, timezone.utc).isoformat(timespec="milliseconds")
                       .replace("+00:00", "Z"),
              "pid": status.pid, "name": status.name, "cwd": status.cwd, "entrypoint": status.entrypoint,
              "mode": status.mode, "checked": status.checked, "needs": status.needs}
    where = "\n".join(filter(None, (project, status.cwd)))
    return text_frame(_json(fields)), MessageMeta(where, (status.session,), None, host)


# =============================================================================
# Request policy: who may connect, and what each request gets (sans-I/O)
# =============================================================================


def request_target(target: str) -> Tuple[str, str]:
    """(path, query) of a request target, or 400: origin-form split by hand.

    urlsplit reads "//x" as a host and raises on "//[" (differently on each
    Python); a request's path is everything up to "?" (RFC 9112 section 3.2.1).
    Absolute-form (for proxies) is read with urlsplit, its errors a 400.
    """
    if target.startswith("/"):
        path, _, query = target.split("#", 1)[0].partition("?")
        return path, query
    try:
        url = urlsplit(target)
    except ValueError:
        raise HandshakeError(400, "malformed request target") from None
    if url.scheme not in ("http", "https", "ws", "wss"):
        raise HandshakeError(400, "malformed request target")
    return url.path or "/", url.query


def request_token(request: HttpHead, query: str) -> Optional[str]:
    """The token a request carries: ``Authorization: Bearer`` (programs) or ``?token=`` (browsers)."""
    header = request.get("Authorization") or ""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    values = parse_qs(query).get("token")
    return values[-1] if values else None


@dataclass
class Upgrade:
    """The request becomes a WebSocket client with this subscription, or, on the push
    path, a box that serves its stream to this hub over it."""
    key: str
    subscription: Optional[Subscription]
    push: bool = False


@dataclass
class Answer:
    """The request gets this HTTP response, and the connection closes."""
    response: bytes


# What GET / serves to a browser: (headers, body) for the request's Host, or None.
PageSource = Callable[[Optional[str], bool], Optional[Tuple[List[Tuple[str, str]], bytes]]]


class RequestPolicy:
    """Every rule a request meets before it is served, in the order they apply.

    1. Host and Origin (browsers' rules: DNS rebinding, cross-site hijacking): 403.
    2. The token: 401, so nothing below is reachable without it.
    3. Routes: the WebSocket endpoint and the page at ``/``, ``/status``; 404, 405.
    4. Capacity and the subscription in the query: 503, 400.
    Errors are HandshakeErrors; ``build_error_response`` turns each into its status.
    """

    def __init__(self, host: str, token: Optional[str], allowed_origins: Iterable[str] = (),
                 secure: bool = False, page: Optional[PageSource] = None,
                 limits: Limits = DEFAULT_LIMITS, push_token: Optional[str] = None):
        self.host = host
        self.port = 0                   # set once listening (--port 0 picks one)
        self.token = token              # None: --no-auth
        self.push_token = push_token    # a hub's, for boxes that push: it reads nothing, and no read token pushes
        self.allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins if o != "null")
        self.secure = secure
        self.page = page
        self.limits = limits

    def admit(self, request: HttpHead) -> Tuple[str, str]:
        """Rules 1 and 2: (path, query) of a request that may be served; HandshakeError if not."""
        path, query = request_target(request.start[1])
        self.check_browser_rules(request, is_upgrade_request(request))
        if path == PUSH_PATH and self.push_token is not None:
            self.check_token(request, "", self.push_token)      # in its header alone: no page pushes
        else:
            self.check_token(request, query, self.token)
        return path, query

    def route(self, request: HttpHead, path: str, query: str, clients: int,
              status: Callable[[], Dict[str, Any]], now: float, pushes: int = 0) -> Union[Upgrade, Answer]:
        """Rules 3 and 4, for an admitted request: what it gets; HandshakeError for a refusal.
        Boxes pushing and clients reading have caps of their own: a push token cannot
        take the places of the readers."""
        method = request.start[0]
        if is_upgrade_request(request):
            key = check_upgrade_request(request)
            if path == PUSH_PATH and self.push_token is not None:
                if pushes >= self.limits.max_pushes:
                    raise self.busy("too many boxes pushing (%d)" % self.limits.max_pushes)
                return Upgrade(key, None, push=True)
            if path != "/":
                raise HandshakeError(404, "the WebSocket endpoint is /")
            if clients >= self.limits.max_connections:
                raise self.busy("too many clients (%d)" % self.limits.max_connections)
            try:
                return Upgrade(key, Subscription.from_query(query, now, self.limits))
            except ValueError as exc:
                raise HandshakeError(400, str(exc)) from None
        if method not in ("GET", "HEAD"):
            raise HandshakeError(405, "only GET is served here", [("Allow", "GET, HEAD")])
        page = self.page(request.get("Host"), self.secure) if path == "/" and self.page else None
        if page is not None:
            headers, body = page
            ctype = "text/html; charset=utf-8"
        elif path == "/status":
            headers, body, ctype = [], _json(status()) + b"\n", "application/json"
        else:
            raise HandshakeError(404, "nothing here; the page and the WebSocket endpoint are at /")
        response = build_response(200, headers, body, ctype)
        return Answer(response[:len(response) - len(body)] if method == "HEAD" else response)

    def busy(self, why: str) -> HandshakeError:
        return HandshakeError(503, why, [("Retry-After", str(self.limits.retry_after))])

    def check_browser_rules(self, request: HttpHead, upgrade: bool) -> None:
        """DNS rebinding and cross-site WebSocket hijacking, refused with 403.

        Bound to loopback, the Host must name loopback (an attacker's domain that
        resolves to 127.0.0.1 cannot). A WebSocket request from a browser must
        come from our own page: its Origin must be http://<that Host>; any
        other page, and "null", is refused. Programs send no Origin.
        """
        host = request.get("Host") or ""
        if not host:
            raise HandshakeError(400, "a Host header is required")
        if self.host in LOOPBACK_HOSTS:
            # The name must be loopback's own; any port, as through an SSH tunnel or a relay
            # on another local port (a rebinding attacker's page cannot name loopback).
            match = _HOST_RE.match(host)
            if match is None or match.group(1).lower() not in LOOPBACK_HOSTS:
                raise HandshakeError(403, "Host %r is not this machine (DNS rebinding protection)"
                                     % host[:100])
        origin = request.get("Origin")
        scheme = "https" if self.secure else "http"
        if upgrade and origin is not None and origin != scheme + "://" + host \
                and origin not in self.allowed_origins:
            raise HandshakeError(403, "Origin %r may not connect (only this server's own page may)"
                                 % origin[:100])

    def check_token(self, request: HttpHead, query: str, token: Optional[str]) -> None:
        """401 before any upgrade unless the request carries ``token``.

        Compared with compare_digest (hmac's): constant time, so the answer's timing
        says nothing about how much of a guess was right.
        """
        if token is None:
            return
        given = request_token(request, query)
        if given is None or not compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
            raise HandshakeError(401, "a valid token is required (Authorization: Bearer TOKEN, "
                                      "or ?token=TOKEN in a browser)",
                                 [("WWW-Authenticate", 'Bearer realm="claude_stream"')])


# =============================================================================
# Per-client feed: one client's cursors, filters, backlog and phase (sans-I/O)
# =============================================================================
#
# A client is a cursor per file. Live delivery is the case where that cursor is
# at the end of what the tailer has read; history, resume and the catch-up of a
# slow client are the cases where it is behind, and the file is read from disk
# until the cursor reaches the end. The Feed is that rule, with no socket and no
# clock: the server offers it lines and says how much is unsent; it answers
# with the frames to send.


def cursor_valid(rec: FileRecord, offset: int) -> bool:
    """A cursor must point at a line start within what was read (not past a truncation)."""
    if offset == 0:
        return True
    if offset > rec.line_start:
        return False
    try:
        return read_regular(rec.abspath, (rec.dev, rec.ino), offset - 1, 1) == b"\n"
    except OSError:
        return False


class LastLines:
    """Where the last ``count`` lines before ``end`` start, found reading backwards
    a block per ``step`` (never before ``floor``): a viewer asks for a session's
    end first, and a 775 MB file is not read from its start for that."""

    def __init__(self, rec: FileRecord, floor: int, end: int, count: int, block: int):
        self.abspath, self.identity = rec.abspath, (rec.dev, rec.ino)
        self.floor, self.pos, self.block = floor, end, block
        self.newlines = count + 1       # the one ending the line before them is the last to find
        self.start: Optional[int] = None if end > floor else floor

    def step(self) -> int:
        """Read one block backwards; return its size. ``start`` is set when found."""
        low = max(self.floor, self.pos - self.block)
        try:
            chunk = read_regular(self.abspath, self.identity, low, self.pos - low)
        except (FileChanged, FileNotFoundError):
            chunk = b""                 # replaced meanwhile: the tailer reports a reset
        if len(chunk) != self.pos - low:
            self.start = self.floor
            return len(chunk)
        found = chunk.count(b"\n")
        if found < self.newlines:
            self.newlines -= found
            self.pos = low
            if low == self.floor:
                self.start = self.floor
            return len(chunk)
        at = len(chunk)
        for _ in range(self.newlines):
            at = chunk.rfind(b"\n", 0, at)
        self.start = low + at + 1
        return len(chunk)


class Backlog:
    """One file a client is behind in, read from disk up to what the tailer delivered.

    With ``since`` set, lines before the first entry of that time or later are
    skipped (with the untimed lines right before it, e.g. a snapshot, kept).
    With ``last``, it starts no earlier than the last ``last`` lines before its
    end. With ``until``, it is a range the client fetches again: the lines up to
    that offset; then the file goes on from ``resume`` (where the client already
    was in it), or with ``then``. ``ready`` holds the messages due next, in file order.
    """

    def __init__(self, rec: FileRecord, offset: int, limits: Limits, since: Optional[float] = None,
                 last: Optional[int] = None, until: Optional[int] = None, resume: int = 0):
        self.rec = rec
        self.reader = LineReader(rec, offset, limits.max_line_bytes)
        self.limits = limits
        self.since = since
        self.until, self.resume = until, resume
        self.then: Optional[Backlog] = None     # after a range: the backlog it interrupted
        self.seek = None if last is None else LastLines(
            rec, offset, rec.line_start if until is None else until, last, limits.catchup_block)
        self.held: Deque[LineMessage] = collections.deque()     # untimed lines, fate pending ...
        self.held_bytes = 0                     # ... their size, within max_held_bytes but the latest
        self.older = False                      # a timed line before the window was seen
        self.ready: Deque[LineMessage] = collections.deque()
        self.last_key = ""                      # for merging files in time order
        self.taken = 0                          # messages merged so far (ties take turns)

    def prepare(self, log: Log, block: int) -> Tuple[int, bool]:
        """Ready the next message(s), applying ``since``, reading blocks of ``block`` bytes
        (the file's share of the feed's read-ahead), at most ``catchup_block`` a call.
        A line longer than a block is read in blocks as long as what is held of it, so
        a 12 MB line takes a dozen reads, not three thousand.

        Returns the bytes read and whether the file is read up to the live edge.
        A file that cannot be read becomes one ``gap`` in its place in the
        history, and the rest of the history goes on.
        """
        if self.seek is not None:
            return self._seek(log), False
        reader, limits = self.reader, self.limits
        read = 0
        while not self.ready:
            if not reader.lines:
                if read >= limits.catchup_block:
                    return read, False      # enough for one call: the tick stays short
                limit = self.rec.delivered_end if self.until is None else self.until
                size = max(block if reader.blocks else min(block, limits.catchup_first_block), len(reader.pending))
                try:
                    got = reader.fill(limit, size)
                except OSError as exc:
                    self._unreadable(log, exc, limit)
                    return 0, False
                if not got:
                    if read:
                        return read, False
                    # Untimed lines at the end: in the window if the file has no time of its own
                    # but its mtime (a copied file's is new); after older timed lines, not.
                    if self.held and not self.older and self.rec.mtime >= (self.since or 0):
                        self.ready.extend(self.held)
                    self._drop_held()
                    return 0, not self.ready
                read += got
                continue
            # Every line read becomes its message now, not one per call: the merge
            # then takes a file's messages without a call per line to get each ready.
            rec, window = self.rec, self._window
            while reader.lines:
                offset, line = reader.lines.popleft()
                # A file the start-up pass has checked (UsageRelay) is read with what it
                # remembers, and adds to it; one it has not reached yet costs no digests.
                message = line_message(rec, offset, line, remember=rec.checked is not None) if line is not None \
                    else gap_message(rec, offset, oversize_reason(limits.max_line_bytes))
                if message is not None:
                    window(message)
        return read, False

    def _seek(self, log: Log) -> int:
        """One block of the search for the last lines; the reader starts where they do."""
        seek = self.seek
        try:
            read = seek.step()
        except OSError as exc:
            self.seek = None
            self._unreadable(log, exc, self.rec.delivered_end if self.until is None else self.until)
            return 0
        if seek.start is not None:
            self.seek = None
            self.reader = LineReader(self.rec, seek.start, self.limits.max_line_bytes)
        return read

    def _unreadable(self, log: Log, exc: OSError, limit: int) -> None:
        log.warn("cannot read %s for a client's history: %s"
                 % (self.rec.rel, exc.strerror or exc), key="files")
        self.ready.append(gap_message(self.rec, self.reader.line_start,
                                      "cannot read: %s" % (exc.strerror or exc)))
        self.reader.give_up(limit)

    @property
    def buffered(self) -> int:
        """Bytes read ahead and not merged yet (as lines, or as messages ready or held)."""
        reader = self.reader
        first = reader.lines[0][0] if reader.lines else reader.line_start
        if self.ready:
            first = min(first, self.ready[0].offset)
        if self.held:
            first = min(first, self.held[0].offset)
        return reader.read_pos - first

    @property
    def next_offset(self) -> int:
        """Where this file goes on for the client once the backlog is done."""
        return self.reader.line_start if self.until is None else self.resume

    def _window(self, message: LineMessage) -> None:
        """Apply ``since``: hold untimed lines until a timed one says whether they are in."""
        if self.since is None:
            self.ready.append(message)
            return
        when = message.time
        if when is None:                # the latest are kept: those right before the window
            held, limits = self.held, self.limits
            held.append(message)
            self.held_bytes += message.next - message.offset
            while len(held) > limits.max_held_lines or (self.held_bytes > limits.max_held_bytes and len(held) > 1):
                first = held.popleft()
                self.held_bytes -= first.next - first.offset
        elif when < self.since:
            self._drop_held()
            self.older = True
        else:
            self.since = None           # the window starts here; all that follows is sent
            self.ready.extend(self.held)
            self.ready.append(message)
            self._drop_held()

    def _drop_held(self) -> None:
        self.held.clear()
        self.held_bytes = 0

    def sort_key(self) -> str:
        """The time the next message sorts by across files.

        An untimed line (a mode, a title, a snapshot) sorts with its predecessor,
        or, first in its file, with the next line that has a time.
        """
        key = self.ready[0].sort_key or self.last_key
        if not key:
            key = next((m.sort_key for m in self.ready if m.sort_key), "")
        if not key:
            ahead = itertools.islice(self.reader.lines, 0, self.limits.timestamp_lookahead)
            key = next(filter(None, (peek_timestamp(line) for _, line in ahead)), "")
        self.last_key = key
        return key


class Phase(enum.Enum):
    """Where a client is. Every transition is in Feed:

    LIVE -> CATCHING_UP   a subscription asks for history, or live output overflows
    CATCHING_UP -> LIVE   the backlog is empty and the output low (a ``live`` message)
    any -> HELD           the request said hold=1; HELD -> CATCHING_UP on its subscribe
    """
    LIVE = "live"                   # matching lines are sent as the tailer reads them
    CATCHING_UP = "catching up"     # files behind come from disk; their live lines wait there
    HELD = "held"                   # nothing but notices until the client's subscribe


def folder_cursor(folders: Set[str], rel: str) -> Optional[int]:
    """0 if a folder above ``rel`` has a cursor (a key ending in '/'), else None: its
    folders looked up, not the cursors tried in turn (files times keys: a subscribe of
    280,000 folder keys over 1,000 files held the loop for 15 s)."""
    at = rel.find("/")
    while at >= 0:
        if rel[:at + 1] in folders:
            return 0
        at = rel.find("/", at + 1)
    return None


class Feed:
    """One client's part of the stream, and the exactly-once rule.

    ``position`` holds, per file, the offset after the last line sent; a line
    below it is never sent again. A file in ``backlog`` is served from disk,
    never live, until its reader reaches what the tailer has delivered; then
    live delivery takes over at exactly that offset. A new feed is live with
    no filters: nothing is behind until a subscription asks for history.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, log: Optional[Log] = None):
        self.limits = limits
        self.log = log or Log()
        self.filters = Filters()
        self.phase = Phase.LIVE
        self.position: Dict[str, int] = {}
        self.backlog: Dict[str, Backlog] = {}
        self._held = 0                          # bytes the files read ahead: see step
        self._floor = limits.catchup_min_block  # the least a file reads at once: see step
        # The merge across files, kept from step to step (rebuilt when the backlog
        # changes otherwise): a heap of the files whose next message is ready, and
        # the files still to ready theirs. Rebuilt every step, it cost a call per
        # file behind per step: 800 files, 350,000 calls in a replay.
        self._merge_valid = False
        self._heads: List[Tuple[str, int, int, str]] = []   # (time key, lines taken, rank, path)
        self._unready: Dict[str, None] = {}
        self._rank: Dict[str, int] = {}         # each file's place in the backlog's order

    @property
    def wants_steps(self) -> bool:
        """Files to read from disk, and leave to do so (``step`` is due soon)."""
        return bool(self.backlog) and self.phase is not Phase.HELD

    def subscribe(self, sub: Subscription, files: Iterable[FileRecord], acknowledge: bool) -> List[bytes]:
        """Apply filters, cursors and history; files behind go to the backlog."""
        self.filters = sub.filters
        self._merge_valid = False           # the backlog changes: the merge starts again
        if sub.hold:
            self.phase = Phase.HELD
            return []
        out: List[bytes] = []
        folders = {k for k in sub.cursors if k.endswith("/")}     # their cursors are all 0
        for rec in files:                   # filters apply per line (cwd included)
            rel = rec.rel
            start = sub.cursors.get(rel)
            if start is None and folders:   # a folder's cursor: every file below without its own
                start = folder_cursor(folders, rel)
            ranged = rel in sub.until
            until = sub.until.get(rel)
            if until is not None and not (until <= rec.line_start and (start or 0) < until
                                          and cursor_valid(rec, until) and cursor_valid(rec, start or 0)):
                until = None                # not a range of line starts we sent: from the cursor on
            if until is not None:
                self._refetch(rec, start or 0, until, sub)
            elif start is not None:
                if not cursor_valid(rec, start):
                    out.append(reset_message(rec, "cursor")[0])
                    start = 0
                self.backlog.pop(rel, None)
                self.position[rel] = start
                if start < rec.line_start:      # a range asked for stays within its since and last
                    self.backlog[rel] = Backlog(rec, start, self.limits, since=sub.since if ranged else None,
                                                last=sub.last if ranged else None)
            elif sub.since is not None and rec.mtime >= sub.since:
                # History replaces any backlog already open for this file (one opened
                # by a live line that came while the client was held, say): it reads
                # from what was last sent, so it covers that backlog's lines too.
                start = self.position.get(rel, 0)
                if start < rec.line_start:      # `last` leaves out nothing already begun here
                    last = None if rel in self.position else sub.last
                    self.backlog[rel] = Backlog(rec, start, self.limits, since=sub.since, last=last)
        if self.phase is not Phase.LIVE or self.backlog:
            self.phase = Phase.CATCHING_UP      # even with nothing behind: it ends with `live`
        if acknowledge:
            out.append(subscribed_message(sub.filters, len(self.backlog)))
        return out

    def _refetch(self, rec: FileRecord, start: int, until: int, sub: Subscription) -> None:
        """A range of a file sent again (a viewer's lines it dropped), within ``since``
        and ``last``; then the file goes on from where this client was in it, or,
        for a file it never followed, from the live edge of now."""
        rel = rec.rel
        held = self.backlog.pop(rel, None)
        resume = self.position.get(rel, rec.line_start)
        if held is not None and held.until is not None:     # a range asked before: this one replaces it
            resume, held = held.resume, held.then
        resume = until if held is not None else max(until, resume)
        self.backlog[rel] = Backlog(rec, start, self.limits, since=sub.since, last=sub.last,
                                    until=until, resume=resume)
        self.backlog[rel].then = held

    def offer(self, lines: List[Tuple[FileRecord, LineMessage]], unsent: int) -> List[bytes]:
        """Live lines: the frames to send now; the rest are sent already, filtered out,
        or left on disk for the backlog.

        One call per batch of lines read in a tick, so the per-line work for
        each client is a few dictionary lookups, and the frames go out together.
        """
        match, position, backlog = self.filters.match, self.position, self.backlog
        room = self.limits.live_output_cap - unsent
        frames = []
        seen_meta, matched = None, False    # a file's lines share their envelope's meta: matched once
        for rec, message in lines:
            rel = rec.rel
            if rel in backlog or message.offset < position.get(rel, 0):
                continue
            if message.meta is not seen_meta:
                seen_meta = message.meta
                matched = match(seen_meta)
            if not matched:
                continue
            if self.phase is not Phase.LIVE or room < 0:
                # Too much unsent (or history still replaying): stop queueing live
                # entries; this file is caught up from disk later, from this line on.
                if self.phase is Phase.LIVE:
                    self.log.debug("a client has %d KiB unsent; catching it up from disk"
                                   % ((self.limits.live_output_cap - room) >> 10))
                    self.phase = Phase.CATCHING_UP
                backlog[rel] = Backlog(rec, message.offset, self.limits)
                self._merge_valid = False
                continue
            frames.append(message.frame)
            room -= len(message.frame)
            position[rel] = message.next
        return frames

    def file_reset(self, rec: FileRecord, notice: Tuple[bytes, MessageMeta]) -> List[bytes]:
        """The file restarts at 0: forget the cursor, restart its backlog, pass the notice on."""
        rel = rec.rel
        self.position.pop(rel, None)
        if rel in self.backlog:
            self.backlog[rel] = Backlog(rec, 0, self.limits)
            self._merge_valid = False
        return [notice[0]] if self.filters.match(notice[1]) else []

    def file_removed(self, rec: FileRecord) -> None:
        self.position.pop(rec.rel, None)
        if self.backlog.pop(rec.rel, None) is not None:
            self._merge_valid = False

    def step(self, budget: int, unsent: int) -> Tuple[List[bytes], int]:
        """Catch up: (frames, bytes read and sent), the oldest line first across files.

        Every file behind gets its next line ready before any line is sent, so
        the merge is in time order across files; readying, like sending, is
        bounded by ``budget`` (a file still scanning for its --since window
        holds the merge until a later step). Sends while ``unsent`` is below the
        low-water mark; at the end of the backlog, ``live``.
        """
        if self.phase is not Phase.CATCHING_UP:
            return [], 0
        frames: List[bytes] = []
        used = 0
        if not self._merge_valid:
            self._heads, self._unready = [], dict.fromkeys(self.backlog)
            self._rank = {rel: rank for rank, rel in enumerate(self.backlog)}
            # What the files read ahead, together, stays within the feed's read-ahead:
            # a file reads what is left of it, so 800 files behind hold a few MiB between
            # them, not a block each, while the one being sent reads big blocks. Counted
            # here, then what reads add and sends take. A file's first read, and the
            # least any read takes, is catchup_min_block, less when so many files are
            # behind that those would take over half the read-ahead (50,000 files:
            # 512 bytes, a line read in a few), so the file being sent reads big blocks.
            self._held = sum(backlog.buffered for backlog in self.backlog.values())
            self._floor = max(self.limits.catchup_least_block, min(self.limits.catchup_min_block,
                                                       self.limits.catchup_readahead // max(1, 2 * len(self.backlog))))
            self._merge_valid = True
        heads, unready = self._heads, self._unready
        complete = True
        for rel in list(unready):           # files whose next message is not ready yet
            if used >= budget:
                complete = False
                break
            read, scanning = self._refill(rel, self.backlog[rel], heads)
            used += read
            complete = complete and not scanning
        low_water = self.limits.catchup_low_water
        match, position = self.filters.match, self.position
        seen_meta, matched = None, False    # a file's lines share their envelope's meta: matched once
        while complete and heads and used < budget and unsent < low_water:
            rel = heapq.heappop(heads)[-1]
            backlog, rank = self.backlog[rel], self._rank[rel]
            ready, ranged = backlog.ready, backlog.until is not None
            # The next file's head, which this file's messages go before while theirs is
            # earlier: its time compared first, the whole tuple only on a tie.
            top = heads[0] if heads else None
            while True:                     # this file's messages while they come first
                message = ready.popleft()
                backlog.taken += 1
                self._held -= message.next - message.offset
                if not ranged:              # a range sent again leaves the position where it was
                    position[rel] = message.next
                if message.meta is not seen_meta:
                    seen_meta = message.meta
                    matched = match(seen_meta)
                if matched:
                    frames.append(message.frame)
                    used += len(message.frame)
                    unsent += len(message.frame)
                if not ready:               # read on (or done): as any file's next
                    read, scanning = self._refill(rel, backlog, heads)
                    used += read
                    complete = not scanning
                    break
                key = backlog.sort_key()
                if used >= budget or unsent >= low_water or (top is not None and (
                        top[0] < key or (top[0] == key and top < (key, backlog.taken, rank, rel)))):
                    heapq.heappush(heads, (key, backlog.taken, rank, rel))
                    break
        if not self.backlog and unsent < low_water:
            self.phase = Phase.LIVE
            frames.append(LIVE_MESSAGE)
        return frames, used

    def _refill(self, rel: str, backlog: Backlog, heads: List[Tuple[str, int, int, str]]) -> Tuple[int, bool]:
        """Ready the backlog's next line and push it on the merge heap; drop it when done.

        Returns the bytes read and whether the file is still scanning for its window.
        """
        if backlog.ready:
            read, exhausted = 0, False      # messages made from what was read already
        else:
            limits = self.limits    # a file's first read is the least (it needs one line for the merge):
            block = self._floor if not backlog.reader.blocks else \
                max(self._floor, min(limits.catchup_block, limits.catchup_readahead - self._held))
            read, exhausted = backlog.prepare(self.log, block)
            self._held += read
        if backlog.ready:
            # Ties (lines of the same time in several files) go a line from each file in
            # turn, the files in the backlog's order, whatever the steps' boundaries.
            heapq.heappush(heads, (backlog.sort_key(), backlog.taken, self._rank[rel], rel))
            self._unready.pop(rel, None)
            return read, False
        rec = backlog.rec
        if exhausted or rec.gone:
            del self.backlog[rel]           # caught up: live delivery takes over
            self._unready.pop(rel, None)
            after = backlog.then
            if after is None:
                at = self.position[rel] = max(self.position.get(rel, 0), backlog.next_offset)
                if backlog.until is not None and at < rec.line_start:
                    after = Backlog(rec, at, self.limits)
            if after is None or rec.gone:
                return read, False
            self.backlog[rel] = after       # a range is sent: what the file gained meanwhile
            more, scanning = self._refill(rel, after, heads)
            return read + more, scanning
        self._unready[rel] = None           # still looking for its next message
        return read, True


# =============================================================================
# Broadcast: each message encoded once, offered to every client, with backpressure
# =============================================================================


class Backpressure:
    """Whether the tailer may read on, given what live clients have unsent.

    The lines stay on disk, so waiting loses nothing, while moving a client
    to catch-up costs it a second, per-client pass over the same bytes. So
    while live clients are more than half full the tailer waits. After
    ``congestion_grace`` it reads on (tripping the laggards into catch-up) if
    the congestion is theirs alone: some live client kept up, or one of them
    barely moved. If every client is behind and all are moving, the
    bottleneck is shared and the wait goes on.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self.congested_since: Optional[float] = None
        self._marks: Dict[Any, int] = {}        # client -> bytes sent when the wait began

    def may_read(self, now: float, live: List[Tuple[Any, int, int]]) -> bool:
        """``live``: (client, unsent bytes, bytes sent so far) for each live client."""
        congested = [(c, sent) for c, unsent, sent in live if unsent > self.limits.live_output_cap // 2]
        if not congested:
            self.congested_since = None
            return True
        if self.congested_since is None:
            self._wait(now, congested)
            return False
        if now - self.congested_since < self.limits.congestion_grace:
            return False
        moved = [sent - self._marks.get(c, 0) for c, sent in congested]
        if len(congested) < len(live) or min(moved) < self.limits.catchup_low_water:
            self.congested_since = None
            return True
        self._wait(now, congested)              # everyone behind, everyone moving: keep waiting
        return False

    def _wait(self, now: float, congested: List[Tuple[Any, int]]) -> None:
        self.congested_since = now
        self._marks = dict(congested)


class Broadcast:
    """Tail events to clients: envelope and frame each once, offer the same bytes to each feed.

    A client is anything with a ``feed``, ``open``, its ``unsent`` byte count,
    ``send_frames`` and ``sync`` (a ServerSession; FeedClient in the tests).
    """

    def __init__(self, log: Log, limits: Limits = DEFAULT_LIMITS):
        self.log, self.limits = log, limits
        self.malformed_count = 0
        # Handed each live entry that carries a usage (the server's totals), decoded once.
        self.parsed: Optional[Callable[[FileRecord, Dict[str, Any]], None]] = None

    def publish(self, events: List[TailEvent], clients: Iterable[Any]) -> None:
        clients = list(clients)
        touched: Dict[Any, None] = {}
        lines: List[Tuple[FileRecord, LineMessage]] = []
        for event in events:
            if isinstance(event, LinesEvent):
                self._messages(event, lines)
                continue
            if lines:                       # lines before a notice go out before it
                self._offer(lines, clients, touched)
                lines = []
            self._file_changed(event, clients, touched)
        if lines:
            self._offer(lines, clients, touched)
        for client in touched:
            client.sync()

    def _messages(self, event: LinesEvent, out: List[Tuple[FileRecord, LineMessage]]) -> None:
        """The messages of a read's lines, added to ``out``: the loop every live line goes through."""
        rec, parsed = event.file, self.parsed
        for offset, line in event.lines:
            if line is None:            # in the file's order, to whom the file's lines go
                self.log.warn("skipped a line over %d MiB in %s at byte %d"
                              % (self.limits.max_line_bytes >> 20, rec.rel, offset), key="files")
                out.append((rec, gap_message(rec, offset, oversize_reason(self.limits.max_line_bytes))))
                continue
            message = line_message(rec, offset, line, parsed)
            if message is None:
                continue
            if message.malformed:
                self.malformed_count += 1
                self.log.warn("malformed line in %s at byte %d: %s (%d so far)"
                              % (rec.rel, offset, message.malformed, self.malformed_count),
                              key="malformed")
            out.append((rec, message))

    @staticmethod
    def _offer(lines: List[Tuple[FileRecord, LineMessage]], clients: List[Any],
               touched: Dict[Any, None]) -> None:
        for client in clients:
            if not client.open:         # closing: nothing more for it, not even its cursors
                continue
            frames = client.feed.offer(lines, client.unsent)
            if frames:
                client.send_frames(frames)
                touched[client] = None

    def _file_changed(self, event: TailEvent, clients: List[Any], touched: Dict[Any, None]) -> None:
        """A reset or removal: keep every client's cursors true, and tell those it concerns."""
        rec = event.file
        if isinstance(event, ResetEvent):
            self.log.info("%s was %s; reading it again from the start" % (rec.rel, event.reason),
                          key="files")
            notice = reset_message(rec, event.reason)
            for client in clients:
                frames = client.feed.file_reset(rec, notice)
                if frames:
                    client.send_frames(frames)
                    touched[client] = None
        else:
            self.log.debug("%s is gone" % rec.rel)
            for client in clients:
                client.feed.file_removed(rec)


# =============================================================================
# Server: the policy, the feeds and the broadcast wired to the loop
# =============================================================================


class ServerSession(WebSocketEndpoint):
    """One accepted connection: an HTTP request, then maybe a WebSocket client and its Feed."""

    side = Side.SERVER

    def __init__(self, server: "StreamServer"):
        super().__init__(server.loop, server.limits)
        self.server = server
        self.feed = Feed(server.limits, server.log)
        # (bytes sent, when) for the slow-client deadline: its clock starts now,
        # so a client that has not yet read its first byte is not "too slow".
        self.progress = (0, server.loop.time())
        # each subscribe goes over the cursors of every file: a client gets a few a second
        self.subscribes = RateLimit(server.limits.subscribe_burst, server.limits.subscribe_rate,
                                    server.loop.time())

    def on_request(self, request: HttpHead) -> None:
        try:
            self.server.route(self, request)
        except HandshakeError as exc:
            self.reject(exc)

    @property
    def open(self) -> bool:
        return self.ws is not None and self.ws.state is State.OPEN and self.stream is not None \
            and not self.stream.closed

    def send_frames(self, frames: List[bytes]) -> None:
        if self.open and frames:
            assert self.ws is not None
            self.ws.send_prebuilt_frames(frames)

    def output_drained(self) -> None:
        super().output_drained()
        if self.feed.phase is Phase.CATCHING_UP and self.unsent < self.limits.catchup_low_water:
            self.server.step_soon()     # room for more history: now, not at the next tick

    def on_message(self, message: Union[TextMessage, BinaryMessage]) -> None:
        try:
            self.server.client_message(self, message)
        except Exception as exc:        # noqa: BLE001 - a bug costs this client, with a Close
            self.server.log.internal_error(exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def on_closed(self, code: int, reason: str) -> None:
        self.server.session_closed(self, code, reason)


def send_notice(subscribers: Dict["ServerSession", None], frame: bytes, meta: MessageMeta) -> None:
    """A message about a session (status, usage), not in a file's order: to every
    subscribed client whose filters match, at once, whatever its phase."""
    for session in list(subscribers):
        if session.feed.phase is not Phase.HELD and session.feed.filters.match(meta):
            session.send_frames([frame])
            session.sync()


class StatusRelay:
    """The registry in the server's loop: an inotify watch on each registry folder
    (and on its parent, for a folder made later) wakes a scan at once; the listing
    every ``registry_poll_interval`` (times ``registry_poll_factor`` with wake-ups)
    stays the truth, and /proc is asked every ``registry_liveness_interval``
    whether each record's process runs. Changes go to every client whose filters
    match; a new subscription gets the live sessions first."""

    def __init__(self, loop: EventLoop, registry: Registry, tailer: Tailer,
                 subscribers: Dict["ServerSession", None], log: Log, wakeups: bool = True,
                 before_idle: Callable[[str], None] = lambda session: None):
        self.loop, self.registry, self.tailer, self.subscribers, self.log = loop, registry, tailer, subscribers, log
        self.before_idle = before_idle      # the turn's own usage first, then "your turn"
        self.limits = registry.limits
        self.notify = Inotify.create(log, self.limits.wakeup_read_bytes) if wakeups else None
        self._timer: Optional[Timer] = None
        self._next_scan = self._next_check = 0.0
        self._by_session: Dict[str, FileRecord] = {}    # main transcripts by session id ...
        self._indexed_files = -1                        # ... as of this many files

    def start(self) -> None:
        if self.notify is not None:
            self.loop.register(self.notify, selectors.EVENT_READ, lambda mask: self._woken())
        self._tick()

    def close(self) -> None:
        if self.notify is not None:
            self.loop.unregister(self.notify)
            self.notify.close()

    def snapshot(self, filters: Filters) -> List[bytes]:
        """The live sessions that match, as status frames: what a new subscription is told first
        (at most ``registry_max_records`` a folder, each a few hundred bytes)."""
        frames = [self._message(status) for status in self.registry.live()]
        return [frame for frame, meta in frames if filters.match(meta)]

    def _woken(self) -> None:
        assert self.notify is not None
        self.notify.read()              # which file does not matter: the listing says
        self._next_scan = 0.0
        self._tick()

    def _tick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        now = self.loop.time()
        try:
            self._step(now)
        finally:                        # whatever happened, the registry is looked at again
            due = min(self._next_scan, self._next_check, self.registry.next_due(now))
            self._timer = self.loop.call_at(max(due, now + self.limits.timer_slack), self._tick)

    def _step(self, now: float) -> None:
        changes: List[SessionStatus] = []
        if now >= self._next_scan or (self.registry.retry_at is not None and now >= self.registry.retry_at):
            self._watch()
            changes += self.registry.scan(now)
            factor = self.limits.registry_poll_factor if self.notify is not None else 1
            self._next_scan = now + self.limits.registry_poll_interval * factor
        if now >= self._next_check:
            changes += self.registry.check(now)
            self._next_check = now + self.limits.registry_liveness_interval
        else:
            changes += self.registry.settled(now)
        for status in changes:
            if status.state == "idle":
                self.before_idle(status.session)
            self._send(*self._message(status))

    def _watch(self) -> None:
        """Watch each registry folder, or its parent until it exists (a watch is kept once made)."""
        if self.notify is None:
            return
        for folder in self.registry.folders:
            for path in (folder, os.path.dirname(folder)):
                if os.path.isdir(path) and self.notify.watch(path) == 0:
                    break

    def _send(self, frame: bytes, meta: MessageMeta) -> None:
        send_notice(self.subscribers, frame, meta)

    def _message(self, status: SessionStatus) -> Tuple[bytes, MessageMeta]:
        rec = self._transcript(status)
        return status_message(status, rec.project if rec else None, rec.rel if rec else None, self.tailer.host)

    def _transcript(self, status: SessionStatus) -> Optional[FileRecord]:
        """The session's main transcript: where Claude Code puts it for its cwd, else any match."""
        config = os.path.dirname(status.folder)
        if status.cwd:
            slug = re.sub(r"[^A-Za-z0-9]", "-", status.cwd)
            for root in self.tailer.discovery.roots:
                if os.path.dirname(os.path.normpath(root.path)) == config:
                    rec = self.tailer.files.get(os.path.join(root.path, slug, status.session + TRANSCRIPT_SUFFIX))
                    if rec is not None:
                        return rec
        # Elsewhere (a slug Claude Code made otherwise, a cwd changed): by session id, from an
        # index made again only when the files changed, not a walk of them all per record.
        if self._indexed_files != len(self.tailer.files):
            self._by_session = {r.session: r for r in self.tailer.files.values()
                                if r.session is not None and r.agent is None}
            self._indexed_files = len(self.tailer.files)
        rec = self._by_session.get(status.session)
        return rec if rec is not None and not rec.gone else None


class UsageRelay:
    """Session totals, counted once on the server (``UsageBook``) and sent as
    ``usage`` messages, at most once per ``usage_interval`` for a session.

    Live lines are counted as the tailer reads them (only lines that mention
    "usage" are parsed again). Files followed from their end at start-up are
    counted from their first byte in the background, one ``catchup_block`` per
    ``catchup_interval``, after everything else: start-up and live delivery
    never wait for it; ``complete`` is false until it is done. That pass checks
    every line and remembers it (CheckedLines): a client's history after it is
    not decoded again.
    """

    def __init__(self, loop: EventLoop, tailer: Tailer, subscribers: Dict["ServerSession", None],
                 log: Log, prices: Dict[str, Price], limits: Limits):
        self.loop, self.tailer, self.subscribers, self.log, self.limits = loop, tailer, subscribers, log, limits
        self.book = UsageBook(prices, limits, by_day=False, by_file=False)
        self.history: Deque[Tuple[FileRecord, int]] = collections.deque()   # files, and where to stop
        self.reader: Optional[LineReader] = None    # the first one's, made when it is its turn
        self.dirty: Dict[SessionUsage, None] = {}
        self.hosts: Dict[SessionUsage, Optional[str]] = {}     # the machine of each session
        self._flush_timer: Optional[Timer] = None
        self._yielded = 0               # history steps left out for clients catching up

    @property
    def complete(self) -> bool:
        return not self.history

    def start(self) -> None:
        """Queue the history of every file found at start-up (their lines before the end)."""
        # Oldest first: past CHECKED_LINES_MAX, the files that remember are the newest.
        for rec in sorted(self.tailer.files.values(), key=lambda r: (r.mtime, r.abspath)):
            if rec.line_start > 0:
                self.history.append((rec, rec.line_start))
        if self.history:
            self.loop.call_later(self.limits.catchup_interval, self._history_step)

    def count(self, rec: FileRecord, entry: Dict[str, Any]) -> None:
        """A line that carries a usage, decoded already (a live one, by the broadcast).

        Called from inside the broadcast: whatever goes wrong in the totals stays there.
        """
        try:                            # the record's session: a hub's paths have a host first
            changed = self.book.add(entry, rec.project, usage_session(rec.session, rec.agent, entry), rec.rel)
            for usage in changed:
                self.dirty[usage] = None
                self.hosts.setdefault(usage, rec.host)
            if self.dirty and self._flush_timer is None:
                self._flush_timer = self.loop.call_later(self.limits.usage_interval, self._flush)
        except Exception as exc:        # noqa: BLE001 - a bug in the totals costs a line's usage only
            self.log.internal_error(exc)

    def snapshot(self, filters: Filters, since: Optional[float]) -> List[bytes]:
        """The totals of the sessions active since ``since`` that match, the latest
        ``usage_snapshot_max`` of them: a new subscription's (a subscribe each, so bounded)."""
        if since is None:
            return []
        active = []
        for usage in self.book.sessions.values():
            last = parse_timestamp(usage.totals.last)
            if last is not None and last.timestamp() >= since:
                active.append((usage.totals.last, usage))
        frames = []
        for _, usage in sorted(active, key=lambda item: item[0], reverse=True):
            frame, meta = self._message(usage)
            if filters.match(meta):
                frames.append(frame)
                if len(frames) >= self.limits.usage_snapshot_max:
                    break
        return frames[::-1]

    def _history_step(self) -> None:
        try:
            if not any(s.feed.phase is Phase.CATCHING_UP for s in self.subscribers):
                self._read_history()
                self._yielded = 0
            elif self._yielded >= USAGE_YIELD_STEPS:
                self._read_history()        # a client behind for long: the totals go on, slowly
                self._yielded = 0
            else:
                self._yielded += 1          # a client waits for its history: it goes first
        finally:
            if self.history:
                self.loop.call_later(self.limits.catchup_interval, self._history_step)

    def _read_history(self) -> None:
        """Up to ``catchup_block`` bytes of history, a file after another (most are small)."""
        budget = self.limits.catchup_block
        while self.history and budget > 0:
            rec, end = self.history[0]
            reader = self.reader = self.reader or LineReader(rec, 0, self.limits.max_line_bytes)
            try:
                read = 0 if rec.gone else reader.fill(end, budget)
            except OSError:
                read = 0
            # Every line is checked here, once, and remembered (CheckedLines), so that
            # a client's history later need not decode it; those with a usage counted.
            while reader.lines:
                offset, line = reader.lines.popleft()
                if line is not None and not rec.gone and line.strip():     # (a blank line carries nothing)
                    try:                                # find, not "in": see _entry_as_is
                        check_line(rec, offset, line, self.count if line.find(b'"usage"') >= 0 else None, True)
                    except MalformedLine:
                        pass                            # reported where it is delivered
            budget -= max(read, 1)          # an empty read counts: a file's open costs too
            if not read:
                self.history.popleft()
                self.reader = None
        if not self.history:                # every session's totals are whole now: say so
            release_free_memory()           # what the pass freed (its reads, decoded lines), back
            self.dirty.update(dict.fromkeys(self.book.sessions.values()))
            if self._flush_timer is None:
                self._flush_timer = self.loop.call_later(self.limits.usage_interval, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        dirty, self.dirty = self.dirty, {}
        for usage in dirty:
            send_notice(self.subscribers, *self._message(usage))

    def flush_session(self, session: str) -> None:
        """A session's totals now, if they changed: its turn is over, its usage is said with it."""
        for usage in [u for u in self.dirty if u.session == session]:
            del self.dirty[usage]
            send_notice(self.subscribers, *self._message(usage))

    def _message(self, usage: SessionUsage) -> Tuple[bytes, MessageMeta]:
        host = self.hosts.get(usage)
        fields: Dict[str, Any] = {"kind": "usage", "host": host, "session": usage.session, "project": usage.project}
        fields.update(usage.totals.as_json())
        fields["complete"] = self.complete
        return text_frame(_json(fields)), MessageMeta(usage.project, (usage.session,), None, host)


def _has_input(session: "ServerSession") -> bool:
    """Bytes from the peer wait in the kernel, unread (a request on its way to us)."""
    stream = session.stream
    if stream is None or stream.closed:
        return False
    try:
        return bool(stream.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:                 # nothing yet (EAGAIN), or the peer is gone
        return False


BOX_STATUS_TEXT_MAX = 256           # a box's status field (a name, a cwd, ...) is cut to this ...
BOX_STATUS_NEEDS_MAX = 1024         # ... what a session needs (a command to approve) to this
BOX_STATUS_BYTES = 4 << 20          # the live statuses of all boxes, as messages, at most
BOXES_MAX = 1024                    # boxes a hub lists: the connected ones, and those gone latest


def box_status_fields(msg: Dict[str, Any], host: str) -> Dict[str, Any]:
    """A box's ``status`` as the hub relays it: a status's fields (status_message's), of
    their types, each text cut to its limit, whatever else a box sends."""
    def text(key: str, limit: int = BOX_STATUS_TEXT_MAX) -> Optional[str]:
        value = msg.get(key)
        return (value if len(value) <= limit else value[:limit - 1] + "\u2026") if isinstance(value, str) else None
    pid = msg.get("pid")
    return {"kind": "status", "host": host, "session": msg.get("session"), "project": text("project"),
            "path": text("path"), "state": text("state"), "waiting_for": text("waiting_for"),
            "since": text("since"), "pid": pid if type(pid) is int and abs(pid) < 1 << 62 else None,
            "name": text("name"), "cwd": text("cwd"), "entrypoint": text("entrypoint"), "mode": text("mode"),
            "checked": msg.get("checked") is not False, "needs": text("needs", BOX_STATUS_NEEDS_MAX)}


class BoxStatus:
    """A hub's view of its boxes: the live sessions each said, relayed with its host
    (the registry lives on the box; the hub never checks a pid of another machine),
    and whether each box is connected. After a reconnection a box says its live
    sessions again; one it does not say again ended while the link was down."""

    def __init__(self, subscribers: Dict["ServerSession", None], wall: Callable[[], float],
                 limits: Limits):
        self.subscribers, self.wall, self.limits = subscribers, wall, limits
        self.live: Dict[Tuple[str, str], Tuple[Dict[str, Any], bytes, MessageMeta]] = {}
        self.live_bytes = 0                         # their frames' sizes, within BOX_STATUS_BYTES
        self.said: Dict[str, Set[str]] = {}         # host -> sessions said since it connected
        self.boxes: Dict[str, Dict[str, Any]] = {}  # host -> {"connected": bool, "since": ISO time}
        self.hub = False                            # this server mirrors boxes

    def status(self, host: str, msg: Dict[str, Any]) -> None:
        session = msg.get("session")
        if not isinstance(session, str) or len(session) > BOX_STATUS_TEXT_MAX:
            return
        msg = box_status_fields(msg, host)
        msg["path"] = host + "/" + msg["path"] if mirror_parts(msg.get("path")) else None
        where = "\n".join(v for v in (msg.get("project"), msg.get("cwd")) if isinstance(v, str))
        frame, meta = text_frame(_json(msg)), MessageMeta(where, (session,), None, host)
        self.said.setdefault(host, set()).add(session)
        held = self.live.pop((host, session), None)
        if held is not None:
            self.live_bytes -= len(held[1])
        if msg.get("state") != "ended" and len(self.live) < self.limits.registry_max_records \
                and self.live_bytes + len(frame) <= BOX_STATUS_BYTES:
            self.live[(host, session)] = (msg, frame, meta)
            self.live_bytes += len(frame)
        send_notice(self.subscribers, frame, meta)

    def link(self, host: str, up: bool) -> None:
        """A box's link is live (its snapshot is in) or down. Of the boxes gone, the ones
        gone longest are forgotten beyond ``BOXES_MAX``: every hello lists them."""
        self.boxes.pop(host, None)          # latest last
        self.boxes[host] = {"connected": up, "since": iso_now(self.wall)}
        if len(self.boxes) > BOXES_MAX:
            for gone in [h for h, box in self.boxes.items() if not box["connected"]][:len(self.boxes) - BOXES_MAX]:
                del self.boxes[gone]
        send_notice(self.subscribers, text_frame(_json(dict({"kind": "box", "host": host}, **self.boxes[host]))),
                    MessageMeta("", (), None, host))
        if not up:
            self.said[host] = set()
            return
        said = self.said.pop(host, set())
        for (box, session), (msg, _, _) in list(self.live.items()):
            if box == host and session not in said:
                self.status(host, dict(msg, state="ended", waiting_for=None, since=iso_now(self.wall),
                                       path=msg["path"][len(host) + 1:] if msg.get("path") else None))

    def snapshot(self, filters: Filters) -> List[bytes]:
        return [frame for _, frame, meta in self.live.values() if filters.match(meta)]


class StreamServer:
    """Listens, accepts, polls the tailer and drives the broadcast and the feeds."""

    def __init__(self, loop: EventLoop, tailer: Tailer, host: str, port: int, log: Log,
                 token: Optional[str] = None, allowed_origins: Iterable[str] = (),
                 tls: Optional["ssl.SSLContext"] = None, also_ipv6_loopback: bool = False,
                 limits: Optional[Limits] = None, page: Optional[PageSource] = None,
                 wall: Callable[[], float] = time.time, registry: Optional[Registry] = None,
                 prices: Optional[Dict[str, Price]] = None, push_token: Optional[str] = None):
        self.loop, self.tailer, self.host, self.port, self.log = loop, tailer, host, port, log
        # One Limits for the tailer and the feeds: live reads and history must agree
        # on which lines are too long, or a line could be sent twice or never.
        if limits is not None and limits.max_line_bytes != tailer.limits.max_line_bytes:
            raise ValueError("the server's and the tailer's max_line_bytes differ")
        limits = limits or tailer.limits
        self.limits, self.tls, self.wall = limits, tls, wall
        self.policy = RequestPolicy(host, token, allowed_origins, tls is not None, page, limits, push_token)
        self.pushes: Dict[ServerSession, None] = {}         # ... boxes that dialed this hub
        self.push_handler: Optional[Any] = None             # the MirrorApp that takes them
        self.broadcast = Broadcast(log, limits)
        self.backpressure = Backpressure(limits)
        self.requested_port = port
        self.also_ipv6_loopback = also_ipv6_loopback
        self.listeners: List[socket.socket] = []
        self.sessions: Dict[ServerSession, None] = {}       # every open connection
        self.pending: Dict[ServerSession, None] = {}        # ... not yet authenticated, oldest first
        self.subscribers: Dict[ServerSession, None] = {}    # ... WebSocket clients
        self._poll_timer: Optional[Timer] = None
        self.shutting_down = False
        self.usage = None if prices is None else UsageRelay(loop, tailer, self.subscribers, log, prices, limits)
        self._catchup_busy = False      # the last catch-up tick used its whole budget: the next comes at once
        self.caught_up = False          # a client's catch-up ended since memory was last released
        self._released_at = 0.0
        if self.usage is not None:
            self.broadcast.parsed = self.usage.count     # live lines' totals, decoded once
        self.box_status = BoxStatus(self.subscribers, wall, limits)    # a hub's boxes, if it has any
        self.relay = None if registry is None else StatusRelay(
            loop, registry, tailer, self.subscribers, log, tailer.discovery.notify is not None,
            before_idle=self.usage.flush_session if self.usage is not None else lambda session: None)

    @property
    def url(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d/" % ("wss" if self.tls is not None else "ws", host, self.port)

    def listen(self) -> None:
        """Listen on --host; by default on both loopback addresses, 127.0.0.1 and ::1.

        ``localhost`` resolves to ::1 first on many systems, so IPv4 alone
        refused it. ::1 is a best effort (a machine may have no IPv6); with
        port 0 both get the same port, chosen again if ::1 has it taken.
        """
        for attempt in range(self.limits.listen_attempts):
            self.listeners = [listen_socket(self.host, self.port, self.limits.listen_backlog)]
            self.port = self.policy.port = self.listeners[0].getsockname()[1]
            if not self.also_ipv6_loopback:
                break
            try:
                self.listeners.append(listen_socket("::1", self.port, self.limits.listen_backlog,
                                                    fatal=False))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    self.log.debug("IPv4 only: %s" % (exc.strerror or exc))
                    break
                if self.requested_port == 0 and attempt + 1 < self.limits.listen_attempts:
                    self.listeners[0].close()
                    self.port = 0
                    continue
                self.log.warn("port %d on ::1 is taken by another program: 'localhost' may "
                              "reach it instead of this server; use 127.0.0.1" % self.port)
                break
        for listener in self.listeners:
            self._listen_again(listener)

    def start(self) -> None:
        self.tailer.start()
        if self.tailer.discovery.notify is not None:      # a change wakes the poller at once
            self.loop.register(self.tailer.discovery.notify, selectors.EVENT_READ, lambda mask: self._poll())
        self._schedule_poll()
        self.loop.call_later(self.limits.housekeeping_interval, self._check_slow_clients)
        if self.relay is not None:
            self.relay.start()
        if self.usage is not None:
            self.usage.start()

    # --- connections ------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self.limits.accepts_per_tick):   # bounded: the loop has other work too
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the connection stays in the kernel's queue and
                    # the listener stays readable, so asking again at once would spin.
                    # Rest a moment (as nginx does) and keep serving who we have.
                    self.log.warn("cannot accept connections: %s; pausing %gs"
                                  % (exc.strerror or exc, self.limits.accept_pause), key="accept")
                    self.loop.unregister(listener)
                    self.loop.call_later(self.limits.accept_pause, lambda: self._listen_again(listener))
                return                  # others (a peer that already reset): next time
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = ServerSession(self)
            if self.tls is None:
                Stream(self.loop, sock, session, self.limits)
            else:               # a failed TLS handshake is that connection's problem only
                TLSStream(self.loop, sock, session, self.tls, server_side=True, limits=self.limits)
            if self.shutting_down:
                session.reject(self.policy.busy("shutting down"))
                continue
            self._add_pending(session)

    def _add_pending(self, session: ServerSession) -> None:
        if len(self.pending) >= self.limits.max_pending_connections:
            # Room for those who can authenticate: the oldest connection that has not
            # yet done so makes way, rather than every newcomer being refused; but not
            # one whose request is waiting to be read (a flood could push it out first).
            oldest = next((s for s in itertools.islice(self.pending, PENDING_PEEKS) if not _has_input(s)),
                          next(iter(self.pending)))
            del self.pending[oldest]
            if oldest.stream is not None:
                oldest.lost_reason = "pushed out by newer connections before authenticating"
                oldest.stream.abort()
        self.sessions[session] = None
        self.pending[session] = None

    def _listen_again(self, listener: socket.socket) -> None:
        if listener in self.listeners:
            self.loop.register(listener, selectors.EVENT_READ, lambda mask: self._accept(listener))

    def route(self, session: ServerSession, request: HttpHead) -> None:
        path, query = self.policy.admit(request)
        self.pending.pop(session, None)     # authenticated: no longer among those pushed out
        decision = self.policy.route(request, path, query, len(self.subscribers), self.status, self.wall(),
                                     len(self.pushes))
        if isinstance(decision, Answer):
            session.respond(decision.response)
            return
        session.accept(decision.key)
        if decision.push:               # a box dialed us: it speaks first (hello), the mirror answers
            if self.push_handler is None:
                session.close(CloseCode.POLICY_VIOLATION, "this server mirrors nothing")
                return
            peer = session.stream.sock.getpeername() if session.stream is not None else "?"
            session.url = "a box pushing from %s" % (peer,)
            session.failures = 0
            if session.ws is not None:      # its lines, as long as a pulled box's
                session.ws.allow_messages(self.limits.max_server_message)
            self.pushes[session] = None
            return
        assert decision.subscription is not None
        self.adopt(session, decision.subscription)

    def adopt(self, session: Any, subscription: Subscription) -> None:
        """A WebSocket that reads the stream: a client here, or the hub this box pushes to."""
        self.subscribers[session] = None
        session.send_frames([hello_message(self.status(), iso_now(self.wall), subscription.filters)])
        self.subscribe(session, subscription, acknowledge=False)
        self.log.debug("client connected (%d now)" % len(self.subscribers))

    def status(self) -> Dict[str, Any]:
        return {"server": PROG, "version": __version__, "protocol": PROTOCOL_VERSION, "host": self.tailer.host,
                "watching": [r.path for r in self.tailer.discovery.roots if r.present],
                "waiting": [r.path for r in self.tailer.discovery.roots if not r.present],
                "files": len(self.tailer.files), "clients": len(self.subscribers),
                "registry": [] if self.relay is None else self.relay.registry.folders,
                "boxes": self.box_status.boxes if self.box_status.hub else None,
                "malformed": self.broadcast.malformed_count}

    def client_message(self, session: ServerSession, message: Union[TextMessage, BinaryMessage]) -> None:
        if session in self.pushes and self.push_handler is not None:
            self.push_handler.on_message(session, message)      # a box's stream, for the mirror
            return
        if isinstance(message, BinaryMessage):
            session.close(CloseCode.UNSUPPORTED_DATA, "binary messages are not understood")
            return
        try:
            obj = client_message(message.text)
            if not session.subscribes.allow(self.loop.time()):
                raise ValueError("too many subscribe messages: at most %d at once, then %g a second"
                                 % (self.limits.subscribe_burst, self.limits.subscribe_rate))
            subscription = Subscription.from_message(obj, self.wall(), self.limits)
        except ValueError as exc:
            session.send_frames([error_message(str(exc))])
            session.sync()
            return
        self.subscribe(session, subscription)

    def subscribe(self, session: ServerSession, sub: Subscription, acknowledge: bool = True) -> None:
        session.send_frames(session.feed.subscribe(sub, list(self.tailer.files.values()), acknowledge))
        # Who is working, waiting, idle now, and the totals of the sessions in the window;
        # not to a client with a full output already (its subscribes could pile them up).
        if not sub.hold and session.unsent < self.limits.live_output_cap:
            if self.relay is not None:
                session.send_frames(self.relay.snapshot(sub.filters))
            session.send_frames(self.box_status.snapshot(sub.filters))
            if self.usage is not None:
                session.send_frames(self.usage.snapshot(sub.filters, sub.since))
        session.sync()
        if session.feed.phase is Phase.CATCHING_UP:
            self.catch_up()
            timer = self._poll_timer        # the next step is due soon, not at the next stat
            if session.feed.wants_steps and timer is not None and \
                    timer.when > self.loop.time() + self.limits.catchup_interval:
                timer.cancel()
                self._schedule_poll()

    def session_closed(self, session: ServerSession, code: int, reason: str) -> None:
        self.sessions.pop(session, None)
        self.pending.pop(session, None)
        if session in self.pushes:
            del self.pushes[session]
            if self.push_handler is not None:
                self.push_handler.gone(session)     # the box dials again
        if session in self.subscribers:
            del self.subscribers[session]
            self.log.debug("client gone: %d %s (%d left)" % (code, session.lost_reason or reason,
                                                             len(self.subscribers)))
        if self.shutting_down and not self.sessions:
            self.loop.stop()

    def _check_slow_clients(self) -> None:
        """Close a client whose unsent output has not moved for ``slow_client_timeout``."""
        now, timeout = self.loop.time(), self.limits.slow_client_timeout
        for session in list(self.subscribers):
            stream = session.stream
            if stream is None or not session.open:
                continue
            if session.unsent == 0 or stream.bytes_sent != session.progress[0]:
                session.progress = (stream.bytes_sent, now)
            elif now - session.progress[1] >= timeout:
                self.log.info("closing a client that read nothing for %gs" % timeout, key="clients")
                session.close(CLOSE_TOO_SLOW, "too slow: reconnect and resume from your cursors")
        if self.caught_up and now - self._released_at >= MEMORY_RELEASE_INTERVAL:
            self.caught_up, self._released_at = False, now
            release_free_memory()           # what the history's buffers held, back to the system
        self.loop.call_later(self.limits.housekeeping_interval, self._check_slow_clients)

    # --- the stream -------------------------------------------------------------

    def _schedule_poll(self) -> None:
        now = self.loop.time()
        due = self.tailer.next_due()
        if self.backpressure.congested_since is not None:
            due = now + self.limits.catchup_interval    # waiting for clients to drain, not for files
        elif self._catchup_busy:
            due = now
        elif any(s.feed.wants_steps for s in self.subscribers):
            due = min(due, now + self.limits.catchup_interval)
        self._poll_timer = self.loop.call_at(due, self._poll)

    def step_soon(self) -> None:
        """The next poll and catch-up step now (after the loop's I/O), if it was due later."""
        timer = self._poll_timer
        now = self.loop.time()
        if timer is not None and timer.when > now:
            timer.cancel()
            self._poll_timer = self.loop.call_at(now, self._poll)

    def _poll(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.cancel()       # called early by a wake-up: one schedule at a time
        try:
            now = self.loop.time()
            # Wake-ups are taken even while reads wait for slow clients: left
            # unread, the inotify descriptor would keep the loop spinning.
            events: List[TailEvent] = []
            self.tailer.take_wakeups(now, events)
            if self._may_read(now):
                events += self.tailer.poll(now)
            if events:
                self.broadcast.publish(events, self.subscribers)
            self.catch_up()
        finally:
            self._schedule_poll()

    def _may_read(self, now: float) -> bool:
        live = [(s, s.unsent, s.stream.bytes_sent) for s in self.subscribers
                if s.feed.phase is Phase.LIVE and s.stream is not None]
        return self.backpressure.may_read(now, live)

    def catch_up(self) -> None:
        """Step every client that is behind, a bounded amount per tick in all.

        A tick that used its whole budget is followed by the next at once (after the
        loop's I/O), not after ``catchup_interval``: a replay runs at the speed of
        reading and sending, and live lines and other clients still come between."""
        budget = self.limits.catchup_tick_budget
        self._catchup_busy = False
        for session in list(self.subscribers):
            if session.feed.phase is not Phase.CATCHING_UP or not session.open:
                continue
            frames, used = session.feed.step(budget, session.unsent)
            session.send_frames(frames)
            session.sync()
            if session.feed.phase is Phase.LIVE:
                self.caught_up = True
            budget -= used
            if budget <= 0:
                self._catchup_busy = True
                break

    def shutdown(self) -> None:
        """Close 1001 to every client, then stop (at the latest after ``shutdown_grace``)."""
        if self.shutting_down:
            self.loop.stop()        # a second Ctrl-C: stop now
            return
        self.shutting_down = True
        for listener in self.listeners:
            self.loop.unregister(listener)
            listener.close()
        self.listeners = []
        for session in list(self.sessions):
            if session.opened:
                session.close(CloseCode.GOING_AWAY, "server shutting down")
            elif session.stream is not None:
                session.stream.abort()
        if not self.sessions:
            self.loop.stop()
        self.loop.call_later(self.limits.shutdown_grace, self.loop.stop)


# =============================================================================
# The live page (GET /)
# =============================================================================
# One self-contained page: no external asset, nothing to build. Transcript text
# only ever reaches the DOM through textContent, and the Content-Security-Policy
# allows exactly this script and this style (by hash), connections back here, and
# images from data: URLs alone (a transcript's own screenshots; nothing fetched).

# Lines of one session the page holds. Past it the oldest go (the newest, while
# reading earlier ones) and come back from the server when scrolled to, by the
# cursors of "Load earlier": the page's memory is bounded by the number of
# sessions times this many lines, whatever their files' length.
PAGE_ENTRIES_KEPT = 5000

# A fresh page asks first for each file's last lines, this many (subscribe's
# ``last``), so that the end of a long session is drawn in a moment; what came
# before them follows on a second socket while the page is already usable.
PAGE_FIRST_LINES = 300

# What the page must agree on with the server and the Python client, taken from
# their constants so there is one of each: the reconnect backoff, the close
# codes it explains, and parse_since's grammar for ?since= (its patterns, which
# mean the same in JavaScript, its units, and datetime's range). Times are in
# milliseconds, as the page's clock counts.
PAGE_CONSTANTS = {
    "PAGE_ENTRIES_KEPT": PAGE_ENTRIES_KEPT,
    "PAGE_FIRST_LINES": PAGE_FIRST_LINES,
    "RECONNECT_MIN": round(RECONNECT_MIN * 1000),
    "RECONNECT_MAX": round(RECONNECT_MAX * 1000),
    "CLOSE_GOING_AWAY": int(CloseCode.GOING_AWAY),
    "CLOSE_ABNORMAL": int(CloseCode.ABNORMAL),
    "CLOSE_TOO_SLOW": CLOSE_TOO_SLOW,
    "DURATION_PATTERN": _DURATION_RE.pattern,
    "DURATION_UNITS": {unit: seconds * 1000 for unit, seconds in _DURATION_UNITS.items()},
    "TIMESTAMP_PATTERN": _TIMESTAMP_RE.pattern,
    "EARLIEST_TIME": EARLIEST_EPOCH * 1000,
    "YEARS": [datetime.min.year, datetime.max.year],
    "NOISE_TYPES": list(BOOKKEEPING_TYPES) + ["mode", "permission-mode", "queue-operation"],
}

PAGE_LIB = ('"use strict";\n'
            # one line of JSON, so the script (and so its CSP hash) is fixed at import
            "const {%s} = %s;\n" % (", ".join(PAGE_CONSTANTS), json.dumps(PAGE_CONSTANTS)) + r'''
// The page's pure part: functions of their arguments and the constants above,
// with no DOM, socket or page state, so that node can require this part alone
// and test it (PageScriptTests). In the browser it starts the page's script.
const DURATION = new RegExp(DURATION_PATTERN), TIMESTAMP = new RegExp(TIMESTAMP_PATTERN), TEXT_LIMIT = 20000;

// --- reconnecting -------------------------------------------------------------

function reconnectDelay(failures, jitter) {  // ms; jitter in [0, 1) spreads out pages a restart dropped together
  // The client's backoff. Any number of failures is safe: 2 ** 1100 is Infinity, capped.
  return Math.min(RECONNECT_MAX, RECONNECT_MIN * 2 ** failures) * (0.5 + jitter / 2);
}

function closeReason(code) {
  return code === CLOSE_GOING_AWAY ? "server restarting" : code === CLOSE_TOO_SLOW ? "too slow" :
    code === CLOSE_ABNORMAL ? "connection lost" : "closed " + code;
}

// --- the history window -------------------------------------------------------

function parseDuration(text) {      // parse_since's durations (90s, 1.5h, 2W) in ms, else null
  const m = DURATION.exec(text.toLowerCase());
  return m ? Number(m[1]) * DURATION_UNITS[m[2]] : null;
}

function parseTime(text) {          // parse_timestamp's ISO times as epoch ms, else null
  const m = TIMESTAMP.exec(text);
  if (!m) return null;
  const [year, month, day, hour, minute, second] = m.slice(1, 7).map((v) => Number(v || 0));
  const zone = m[8];
  let offset = 0;                   // minutes east of UTC
  if (zone && zone !== "Z" && zone !== "z") {
    const digits = zone.slice(1).replace(":", "");
    offset = (Number(digits.slice(0, 2)) * 60 + Number(digits.slice(2, 4) || 0)) * (zone[0] === "+" ? 1 : -1);
  }
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);      // Date.UTC would read years below 100 as 19xx
  date.setUTCHours(hour, minute, second);
  // What Python's datetime refuses: a 13th month, 30 February, 24 h, 60 s, an offset of a day ...
  if (year < YEARS[0] || date.getUTCMonth() !== month - 1 || date.getUTCDate() !== day || hour > 23 ||
      minute > 59 || second > 59 || Math.abs(offset) >= 1440) return null;
  const time = date.getTime() - offset * 6e4 + Number((m[7] || "").slice(0, 6).padEnd(6, "0")) / 1000;
  const utcYear = new Date(Math.floor(time)).getUTCFullYear();
  return utcYear >= YEARS[0] && utcYear <= YEARS[1] ? time : null;    // ... and a time outside its years in UTC
}

function absoluteSince(win, serverTime) {   // the subscribe's since, by the server's clock; null: none
  if (!win || win === "live") return null;
  if (win.trim().toLowerCase() === "all") return "all";
  if (parseTime(win) !== null) return win;  // the server reads it with the same grammar
  const back = parseDuration(win);
  const base = Date.parse(serverTime);
  if (back === null || isNaN(base)) return null;
  // Longer ago than datetime can say is everything, as for parse_since.
  return base - back >= EARLIEST_TIME ? new Date(base - back).toISOString() : "all";
}

// --- cursors ------------------------------------------------------------------
// What the page knows of each file, in any object with these three (the page's
// state is one): seen, "path\noffset" of every line shown, so nothing is shown
// twice; next, path -> offset after the last line received (the cursor, sent
// back on a resume); first, path -> lowest offset received (is there anything
// earlier to load?).

function newCursors() {
  return {seen: new Set(), next: new Map(), first: new Map()};
}

function trackLine(cursors, msg) {  // an entry, malformed line or gap: false if had already
  const key = msg.path + "\n" + msg.offset;
  if (cursors.seen.has(key)) return false;
  cursors.seen.add(key);
  // A gap's next is null (where the skipped bytes end is not known): the cursor stays.
  if (typeof msg.next === "number" && msg.next > (cursors.next.get(msg.path) || 0)) cursors.next.set(msg.path, msg.next);
  if (!cursors.first.has(msg.path) || msg.offset < cursors.first.get(msg.path)) cursors.first.set(msg.path, msg.offset);
  return true;
}

function forgetFile(cursors, path) {  // a reset: the file's lines start again from offset 0
  cursors.next.set(path, 0);
  cursors.first.delete(path);
  for (const key of [...cursors.seen]) if (key.startsWith(path + "\n")) cursors.seen.delete(key);
}

function resumeCursors(cursors) {
  const out = {};
  for (const [path, offset] of cursors.next) out[path] = offset;
  return out;
}

function earlierCursors(paths) {    // "load earlier": these files from their first byte
  // The same cursors as a resume. The server sends them again from disk; lines
  // already shown are skipped by (path, offset).
  const cursors = {};
  for (const p of paths) cursors[p] = 0;
  // 2.1.x keeps a session's sub-agents in <project>/<session>/: a folder cursor
  // brings those the page has not heard from yet.
  for (const p of paths) {
    const m = /^([^/]+)\/([^/]+)\.jsonl$/.exec(p);
    if (m) cursors[m[1] + "/" + m[2] + "/"] = 0;
  }
  return cursors;
}

function hasEarlier(cursors, paths) {
  return [...paths].some((p) => (cursors.first.get(p) || 0) > 0);
}

// --- tokens -------------------------------------------------------------------

function countTokens(counted, e, msg) {   // what this line adds to its session's {in, out}
  if (!(e.type === "assistant" && e.message && e.message.usage && typeof e.message.usage === "object")) return {in: 0, out: 0};
  // Streaming writes one line per content block, each with the message's usage so
  // far: a message counts once (by message id and request id), at its largest,
  // which counted holds.
  const id = e.message.id || e.requestId ? (e.message.id || "") + "|" + (e.requestId || "") : msg.path + "\n" + msg.offset;
  const u = e.message.usage;
  const now = {in: (u.input_tokens || 0) + (u.cache_creation_input_tokens || 0) + (u.cache_read_input_tokens || 0),
               out: u.output_tokens || 0};
  const was = counted.get(id) || {in: 0, out: 0};
  const best = {in: Math.max(was.in, now.in), out: Math.max(was.out, now.out)};
  counted.set(id, best);
  return {in: best.in - was.in, out: best.out - was.out};
}

// --- live status and the server's usage ----------------------------------------
// A status message is Claude Code's own registry record of a session (never a
// guess from its transcript); a usage message, the server's totals for it.

const DIALOG_OPEN = "dialog open";  // waiting on the user's own slash-command dialog, not Claude asking

function needsYou(st) {             // Claude waits for the user: a permission prompt, a question, ...
  return Boolean(st) && st.state === "waiting" && st.waiting_for !== DIALOG_OPEN;
}

function statusBadge(st) {          // {cls, text, title} of a session's state; null without one
  if (!st || typeof st.state !== "string") return null;
  const what = typeof st.waiting_for === "string" && st.waiting_for ? st.waiting_for : "";
  let badge;
  if (st.state === "working") badge = {cls: "working", text: "working", title: "Claude is working"};
  else if (st.state === "shell") {
    badge = {cls: "working", text: "working · shell", title: "a background shell runs; Claude goes on when it ends"};
  } else if (needsYou(st)) {
    badge = {cls: "needs", text: "needs you" + (what ? " · " + (what.length > 40 ? what.slice(0, 39) + "…" : what) : ""),
             title: "Claude is waiting for you" + (what ? ": " + what : "")};
  } else if (st.state === "waiting") {
    badge = {cls: "dialog", text: "in a dialog", title: "you have a dialog open in Claude Code (a slash command)"};
  } else if (st.state === "idle") badge = {cls: "idle", text: "your turn", title: "Claude is done: your turn"};
  else if (st.state === "ended") badge = {cls: "ended", text: "ended", title: "the session's process is gone"};
  else badge = {cls: "other", text: st.state.slice(0, 40), title: st.state};
  const since = typeof st.since === "string" ? Date.parse(st.since) : NaN;
  if (!isNaN(since)) badge.title += ", since " + new Date(since).toLocaleTimeString();
  if (st.checked === false) {       // another pid namespace: its process could not be looked at
    badge.cls += " unchecked";
    badge.title += " (from another pid namespace: not verified)";
  }
  return badge;
}

function needCount(statuses) {      // how many sessions need the user
  let n = 0;
  for (const st of statuses) if (needsYou(st)) n += 1;
  return n;
}

function pageTitle(count, base) {   // "(2) claude_stream"
  return count > 0 ? "(" + count + ") " + base : base;
}

function shouldNotify(was, now, live) {
  // Once per time a session starts waiting for the user: a waiting that began at
  // another time is a new one; the same (a snapshot after a reconnect) is not. A
  // session never seen before is told of only live, not in the first snapshot.
  if (!needsYou(now)) return false;
  if (!was) return live;
  return !needsYou(was) || was.since !== now.since;
}

const TOKEN_KINDS = [["input_tokens", "input"], ["output_tokens", "output"],
  ["cache_creation_input_tokens", "cache write"], ["cache_read_input_tokens", "cache read"]];

function tokenCount(v) {                 // a token count as given, or 0
  return typeof v === "number" && isFinite(v) && v > 0 ? v : 0;
}

function money(usd) {               // "$1.23"; below a cent, "<$0.01"
  if (typeof usd !== "number" || !isFinite(usd)) return "";
  return usd > 0 && usd < 0.005 ? "<$0.01" : "$" + usd.toFixed(2);
}

function usageIn(u) {               // input as the page counts it: fresh, cache writes and cache reads
  return tokenCount(u.input_tokens) + tokenCount(u.cache_creation_input_tokens) + tokenCount(u.cache_read_input_tokens);
}

function usageText(u) {             // {cost, tokens, title}: a usage message as the list shows it
  const unpriced = Array.isArray(u.unpriced_models) ? u.unpriced_models.filter((m) => typeof m === "string") : [];
  const partial = u.complete === false;
  let cost = money(u.cost_usd);
  if (unpriced.length) cost = cost && u.cost_usd > 0 ? cost + " + unpriced" : "unpriced";
  const lines = [];
  if (partial) lines.push("still counting this session's history: so far");
  lines.push("total: " + TOKEN_KINDS.map(([k, name]) => tokenCount(u[k]).toLocaleString("en-US") + " " + name).join(", ") +
             (money(u.cost_usd) ? " · " + money(u.cost_usd) : ""));
  const models = u.models && typeof u.models === "object" ? u.models : {};
  for (const model of Object.keys(models).sort()) {
    const m = models[model] && typeof models[model] === "object" ? models[model] : {};
    const price = typeof m.cost_usd === "number" ? money(m.cost_usd) : "no price";
    const messages = typeof m.messages === "number" ? " (" + m.messages + (m.messages === 1 ? " message)" : " messages)") : "";
    lines.push(model + messages + ": " +
               TOKEN_KINDS.map(([k, name]) => tokenCount(m[k]).toLocaleString("en-US") + " " + name).join(", ") + " · " + price);
  }
  if (unpriced.length) lines.push("no price known for " + unpriced.join(", ") + ": not in the cost");
  return {cost: cost + (partial ? "…" : ""), tokens: compact(usageIn(u)) + " in · " + compact(tokenCount(u.output_tokens)) + " out",
          title: lines.join("\n"), partial};
}

// --- rendering ----------------------------------------------------------------

function before(a, b) {       // a file's own lines keep file order; files interleave by time
  return a.path === b.path ? a.offset < b.offset : a.t < b.t;
}

function projectName(s) {
  if (s.cwd) return s.cwd.split(/[\\/]/).filter(Boolean).pop() || s.cwd;
  return s.project;
}

function compact(n) {
  return n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : n >= 1e3 ? (n / 1e3).toFixed(1) + "k" : String(n);
}

function size(n) {
  return n >= 1048576 ? (n / 1048576).toFixed(1) + " MB" : n >= 1024 ? (n / 1024).toFixed(1) + " KB" : n + " B";
}

function ago(t, now) {
  if (!t) return "";
  const s = Math.max(0, (now - t) / 1000);
  return s < 60 ? "just now" : s < 3600 ? Math.floor(s / 60) + " min ago" :
    s < 86400 ? Math.floor(s / 3600) + " h ago" : new Date(t).toLocaleDateString();
}

function clip(text) {
  text = String(text);
  return text.length > TEXT_LIMIT ? text.slice(0, TEXT_LIMIT) + "\n… (" + (text.length - TEXT_LIMIT) + " more characters)" : text;
}

function plain(content) {
  if (typeof content === "string") return stripAnsi(content);
  if (!Array.isArray(content)) return "";
  return stripAnsi(content.map((b) => b && b.type === "text" && typeof b.text === "string" ? b.text : "").join("\n"));
}

function promptText(e) {
  const text = plain(e.message && e.message.content).trim();
  if (!text || text.startsWith("<command-") || text.startsWith("<local-command") || text.startsWith("Caveat:")) return "";
  return text.slice(0, 200);
}

function commandOf(content) {     // a slash command or its output, as Claude Code records them
  const text = plain(content);
  const name = /<command-name>([^<]*)<\/command-name>/.exec(text);
  if (name) {
    const args = /<command-args>([^<]*)<\/command-args>/.exec(text);
    return name[1] + (args && args[1] ? " " + args[1] : "");
  }
  const out = /^<local-command-(?:stdout|stderr)>([\s\S]*?)<\/local-command-(?:stdout|stderr)>$/.exec(text.trim());
  return out ? clip(out[1].trim() || "(no output)") : null;
}

function systemText(e) {
  const sub = typeof e.subtype === "string" ? e.subtype : "";
  if (sub === "turn_duration" && typeof e.durationMs === "number") return "turn took " + (e.durationMs / 1000).toFixed(1) + " s";
  if (sub === "stop_hook_summary") return "stop hooks ran: " + (e.hookCount || (e.hookInfos || []).length || 0);
  if (sub === "compact_boundary") return "conversation compacted";
  const text = typeof e.content === "string" ? stripAnsi(e.content) : e.content ? JSON.stringify(e.content) : "";
  return (sub ? sub.replace(/_/g, " ") + ": " : "") + clip(text || e.level || "");
}

function isToolResults(content) {
  return Array.isArray(content) && content.length > 0 && content.every((b) => b && b.type === "tool_result");
}

function resultText(b) {            // a tool result's text, images named
  if (typeof b.content === "string") return stripAnsi(b.content);
  if (!Array.isArray(b.content)) return "";
  return stripAnsi(b.content.map((c) => c && c.type === "text" ? c.text : c && c.type === "image" ? "[image]" : "").join("\n"));
}

// CSI sequences (colours, cursor moves), OSC ones (titles, links) and lone escapes.
const ANSI = /\x1b\[[0-?]*[ -\/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?/g;

function stripAnsi(text) {          // hook and tool output: its colours and cursor moves as plain text
  return String(text).replace(ANSI, "");
}

// --- Markdown -----------------------------------------------------------------
// Claude's text as a small tree of plain objects ({tag, children}) and strings.
// The tags are MD_TAGS; the only attributes are an <a>'s href, always http(s),
// an <ol>'s start, a number, and a table cell's align (left, center, right: a class). The page builds nodes from it with
// createElement and textContent, so nothing in a transcript is ever HTML.

const MD_TAGS = ["p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "pre", "code", "strong", "em", "a", "hr",
  "blockquote", "table", "thead", "tbody", "tr", "th", "td"];
const MD_QUOTE_DEPTH = 3;           // "> > >" nests this deep; deeper quotes stay in the innermost
const MD_TABLE_RULE = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
const MD_DEPTH = 3;                 // emphasis in a link in emphasis: deeper stays text
// Code spans, links, **strong**/__strong__, *em*/_em_; every repeat is bounded,
// so a line of unmatched markers costs a bounded scan from each, not the rest of the text.
const MD_INLINE = /(`{1,16})([^`][\s\S]{0,2000}?)\1(?!`)|\[([^\[\]\n]{1,500})\]\(\s*<?([^\s()<>]{1,2000})>?(?:\s+"[^"\n]{0,200}")?\s*\)|\*\*(?=\S)([^\n]{0,1000}?\S)\*\*|(?<!\w)__(?=\S)([^\n]{0,1000}?\S)__(?!\w)|\*(?=[^\s*])([^\n*]{0,1000}?[^\s*])\*|(?<!\w)_(?=[^\s_])([^\n_]{0,1000}?[^\s_])_(?!\w)/g;
const MD_FENCE = /^(\s*)(`{3,}(?=[^`]*$)|~{3,})/, MD_HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const MD_ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/, MD_RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;

function mdCells(line) {            // a table row's cells: split on "|", not on "\|" nor inside `code`
  const cells = [];
  let cell = "", code = false;
  const text = line.trim().replace(/^\|/, "").replace(/\|$/, "");
  for (let k = 0; k < text.length; k++) {
    const ch = text[k];
    if (ch === "\\" && text[k + 1] === "|") { cell += "|"; k++; continue; }
    if (ch === "`") code = !code;
    if (ch === "|" && !code) { cells.push(cell.trim()); cell = ""; continue; }
    cell += ch;
  }
  cells.push(cell.trim());
  return cells;
}

function mdAlign(rule) {            // a column's alignment from its rule cell: ":--" left, ":-:" center, "--:" right
  const left = rule.startsWith(":"), right = rule.endsWith(":");
  return left && right ? "center" : right ? "right" : left ? "left" : null;
}

function mdTable(lines, i) {        // [node, index of its last line] of a table whose head is lines[i]
  const head = mdCells(lines[i]), aligns = mdCells(lines[i + 1]).map(mdAlign);
  const cell = (tag, text, k) => Object.assign({tag, children: mdInline(text || "", 0)}, aligns[k] ? {align: aligns[k]} : {});
  const row = (cells, tag) => ({tag: "tr", children: head.map((_, k) => cell(tag, cells[k], k))});
  const body = [];
  let j = i + 2;
  while (j < lines.length && lines[j].includes("|") && lines[j].trim()) body.push(row(mdCells(lines[j++]), "td"));
  return [{tag: "table", children: [{tag: "thead", children: [row(head, "th")]},
                                    {tag: "tbody", children: body}]}, j - 1];
}

function markdown(text, depth) {    // block structure: fences, headings, rules, quotes, tables, lists, paragraphs
  depth = depth || 0;
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let para = null, list = null, blank = false;   // the open paragraph's lines; the open list
  const closePara = () => { if (para) out.push({tag: "p", children: mdInline(para.join("\n"), 0)}); para = null; };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = MD_FENCE.exec(line))) {
      closePara(); list = null;
      const mark = m[2], body = [];
      const closing = new RegExp("^\\s*" + mark[0] + "{" + mark.length + ",}\\s*$");
      while (++i < lines.length && !closing.test(lines[i])) {
        body.push(lines[i].startsWith(m[1]) ? lines[i].slice(m[1].length) : lines[i].trimStart());
      }
      out.push({tag: "pre", children: [{tag: "code", children: [body.join("\n")]}]});
    } else if (!line.trim()) {
      closePara();                  // a list goes on after a blank line: "1." and "2." apart are one list
      blank = true;
      continue;
    } else if ((m = MD_HEADING.exec(line))) {
      closePara(); list = null;
      out.push({tag: "h" + m[1].length, children: mdInline(m[2] || "", 0)});
    } else if (MD_RULE.test(line)) {
      closePara(); list = null;
      out.push({tag: "hr", children: []});
    } else if (/^ {0,3}>/.test(line) && depth < MD_QUOTE_DEPTH) {
      closePara(); list = null;
      const quoted = [];
      for (; i < lines.length && /^ {0,3}>/.test(lines[i]); i++) quoted.push(lines[i].replace(/^ {0,3}> ?/, ""));
      i -= 1;
      out.push({tag: "blockquote", children: markdown(quoted.join("\n"), depth + 1)});
    } else if (line.includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") &&
               MD_TABLE_RULE.test(lines[i + 1]) && mdCells(lines[i]).length > 1) {
      closePara(); list = null;
      const [table, last] = mdTable(lines, i);
      out.push(table);
      i = last;
    } else if ((m = MD_ITEM.exec(line))) {
      closePara();
      const ordered = /\d/.test(m[2]), item = {tag: "li", children: mdInline(m[3], 0)};
      if (list && m[1].length >= 2 && list.last) {          // nested: under the list's last item
        if (!list.sub || list.sub.ordered !== ordered) {
          list.sub = {ordered, node: mdList(ordered, m[2])};
          list.last.children.push(list.sub.node);
        }
        list.sub.node.children.push(item);
      } else {
        if (!list || list.ordered !== ordered) { list = {ordered, node: mdList(ordered, m[2])}; out.push(list.node); }
        list.node.children.push(item);
        list.last = item;
        list.sub = null;
      }
      list.tail = item;
    } else if (list && (!blank || /^\s{2}/.test(line))) {   // more of the last item's text
      list.tail.children.push("\n", ...mdInline(line.trim(), 0));
    } else {
      list = null;
      (para = para || []).push(line);
    }
    blank = false;
  }
  closePara();
  return out;
}

function mdList(ordered, marker) {
  const start = parseInt(marker, 10);
  return ordered && start !== 1 ? {tag: "ol", start, children: []} : {tag: ordered ? "ol" : "ul", children: []};
}

function mdInline(text, depth) {    // inline spans: code, links, strong, em; the rest as strings
  const out = [];
  const push = (part) => { if (typeof part === "string" && typeof out[out.length - 1] === "string") out[out.length - 1] += part; else out.push(part); };
  const re = new RegExp(MD_INLINE.source, "g");       // its own lastIndex: this recurses
  let at = 0, m;
  while ((m = re.exec(text)) !== null) {
    push(text.slice(at, m.index));
    at = re.lastIndex;
    if (m[1]) {
      const code = m[2];
      push({tag: "code", children: [/^ .*[^ ].* $/.test(code) ? code.slice(1, -1) : code]});
    } else if (depth >= MD_DEPTH) push(m[0]);
    else if (m[3] !== undefined) {
      const children = mdInline(m[3], depth + 1);
      // Only the web's own schemes are links; javascript:, data:, file: and the rest are text.
      if (/^https?:\/\/[^\s]+$/i.test(m[4])) push({tag: "a", href: m[4], children});
      else { children.forEach(push); push(" (" + m[4] + ")"); }
    } else if (m[5] !== undefined || m[6] !== undefined) push({tag: "strong", children: mdInline(m[5] || m[6], depth + 1)});
    else push({tag: "em", children: mdInline(m[7] || m[8], depth + 1)});
  }
  push(text.slice(at));
  return out.filter((part) => part !== "");
}

// --- line diffs -----------------------------------------------------------------

const DIFF_CELLS = 4e6, DIFF_CONTEXT = 3;

function lineDiff(before, after, context = DIFF_CONTEXT) {
  // {hunks: [{oldStart, oldLines, newStart, newLines, lines: [[op, text]]}], note}, op " ", "-" or "+".
  // The common head and tail are matched first, so a small edit to a big text stays cheap.
  const a = before === "" ? [] : String(before).split("\n"), b = after === "" ? [] : String(after).split("\n");
  let head = 0, tail = 0;
  while (head < a.length && head < b.length && a[head] === b[head]) head++;
  while (tail < a.length - head && tail < b.length - head && a[a.length - 1 - tail] === b[b.length - 1 - tail]) tail++;
  const x = a.slice(head, a.length - tail), y = b.slice(head, b.length - tail);
  const ops = [];
  for (let k = 0; k < head; k++) ops.push([" ", a[k]]);
  let note = "";
  if (x.length * y.length > DIFF_CELLS) {
    // The table would take seconds and tens of MB: what went and what came, as such.
    note = "too large to compare line by line: " + x.length + " lines removed, " + y.length + " added";
    for (const l of x) ops.push(["-", l]);
    for (const l of y) ops.push(["+", l]);
  } else for (const op of lcsOps(x, y)) ops.push(op);
  for (let k = a.length - tail; k < a.length; k++) ops.push([" ", a[k]]);
  return {hunks: diffHunks(ops, context), note};
}

function lcsOps(x, y) {             // a longest common subsequence of lines, from a table of suffix lengths
  const n = x.length, m = y.length, w = m + 1;
  // n * m <= DIFF_CELLS, so min(n, m) <= 2000: 16 bits hold any length.
  const table = new Uint16Array((n + 1) * w);
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      table[i * w + j] = x[i] === y[j] ? table[(i + 1) * w + j + 1] + 1 : Math.max(table[(i + 1) * w + j], table[i * w + j + 1]);
    }
  }
  const ops = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { ops.push([" ", x[i]]); i++; j++; }
    else if (table[(i + 1) * w + j] >= table[i * w + j + 1]) ops.push(["-", x[i++]]);
    else ops.push(["+", y[j++]]);
  }
  while (i < n) ops.push(["-", x[i++]]);
  while (j < m) ops.push(["+", y[j++]]);
  return ops;
}

function diffHunks(ops, context) {  // changes with `context` unchanged lines around them, as unified diff's hunks
  const next = new Array(ops.length);
  for (let k = ops.length - 1, at = Infinity; k >= 0; k--) { if (ops[k][0] !== " ") at = k; next[k] = at; }
  const hunks = [];
  let prev = -Infinity, oldLine = 1, newLine = 1, hunk = null;
  for (let k = 0; k < ops.length; k++) {
    const op = ops[k][0];
    if (op !== " ") prev = k;
    if (k - prev <= context || next[k] - k <= context) {
      if (!hunk) hunks.push(hunk = {oldStart: oldLine, oldLines: 0, newStart: newLine, newLines: 0, lines: []});
      hunk.lines.push(ops[k]);
      if (op !== "+") hunk.oldLines++;
      if (op !== "-") hunk.newLines++;
    } else hunk = null;
    if (op !== "+") oldLine++;
    if (op !== "-") newLine++;
  }
  return hunks;
}

// --- tool results and images ------------------------------------------------------

function duration(ms) {
  return ms < 1000 ? Math.round(ms) + " ms" : ms < 60000 ? (ms / 1000).toFixed(1) + " s" :
    Math.floor(ms / 60000) + " min " + Math.floor(ms % 60000 / 1000) + " s";
}

function resultSummary(b, text, callTime, resultTime) {   // ok or error, size, time taken when known, its first line
  const first = /\S[^\n]*/.exec(text);
  const line = first ? first[0].trim() : "";
  const took = callTime && resultTime && resultTime >= callTime ? duration(resultTime - callTime) : "";
  return [b.is_error ? "error" : "ok", size(text.length), took, line.length > 80 ? line.slice(0, 79) + "…" : line]
    .filter(Boolean).join(" · ");
}

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"], IMAGE_MAX = 5 * 1048576;

function imageSource(b) {           // {src, bytes}: an image block as a data: URL; else {note}: why not shown
  const s = b && b.source && typeof b.source === "object" ? b.source : {};
  const type = typeof s.media_type === "string" ? s.media_type.toLowerCase() : "";
  if (s.type !== "base64" || typeof s.data !== "string") return {note: "[image: no inline data]"};
  // A fixed media type and base64 alone: nothing else can reach the URL (SVG, which can hold script, is not one).
  if (!IMAGE_TYPES.includes(type)) return {note: "[image: " + (type || "no type") + ", not shown]"};
  const bytes = Math.floor(s.data.length * 3 / 4);
  if (bytes > IMAGE_MAX) return {note: "[image: " + size(bytes) + ", over " + size(IMAGE_MAX) + ", not shown]"};
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s.data)) return {note: "[image: not base64]"};
  return {src: "data:" + type + ";base64," + s.data, bytes};
}

// --- bookkeeping ------------------------------------------------------------------

// NOISE_TYPES: the readable client's BOOKKEEPING_TYPES, the modes written again every
// turn, and queued prompts (the prompt itself follows as a user entry).
const NOISE = new Set(NOISE_TYPES);

function isNoise(e) {
  return Boolean(e) && NOISE.has(e.type);
}

function noiseRuns(flags) {         // [start, length] of each run of consecutive true flags
  const runs = [];
  for (let k = 0; k < flags.length; k++) {
    if (!flags[k]) continue;
    if (k > 0 && flags[k - 1]) runs[runs.length - 1][1] += 1;
    else runs.push([k, 1]);
  }
  return runs;
}

// --- sub-agents and titles ----------------------------------------------------------

function isSidechain(e, msg) {      // sub-agent work: a 2.1.x agent file, or 1.0.x's isSidechain lines in the main file
  return Boolean(msg && msg.agent) || Boolean(e && e.isSidechain === true);
}

function agentName(task, id, prompt) {
  // A sub-agent by its Task (or Agent) call's input, else by the task it was given
  // (its first prompt: the call may be in a part of the session not held), else by its id.
  const parts = task ? [task.description, task.subagent_type].filter((v) => typeof v === "string" && v.trim()) : [];
  if (parts.length) return parts.join(" · ");
  if (typeof id === "string" && id.startsWith("acompact")) return "compaction";
  const asked = typeof prompt === "string" ? prompt.replace(/\s+/g, " ").trim() : "";
  if (asked) return asked.length > 48 ? asked.slice(0, 47) + "…" : asked;
  return id ? "agent " + id : "sub-agent";
}

function titleText(e, msg) {        // what may title a session: a prompt the user wrote, not a sub-agent's task
  if (!e || e.type !== "user" || e.isMeta || isSidechain(e, msg)) return "";
  return promptText(e);
}

function widerWindow(win) {         // the next history window when one held no session at all
  const steps = ["live", "10m", "1h", "1d", "7d", "all"];
  const i = steps.indexOf(win);
  return i >= 0 && i < steps.length - 1 ? steps[i + 1] : null;
}

// --- the window: which entries of a long list are in the DOM -------------------

function windowRange(heights, top, viewport, least) {   // indexes [lo, hi) to draw
  // The entries that meet a viewport's height above the visible part (at scroll
  // position top), the visible part and a viewport below, and at least `least`
  // of them (around the visible ones) so that short lists are drawn whole.
  const n = heights.length;
  let lo = 0, y = 0;
  while (lo < n && y + heights[lo] <= top - viewport) y += heights[lo++];
  let hi = lo;
  while (hi < n && y < top + 2 * viewport) y += heights[hi++];
  while (hi - lo < least && (lo > 0 || hi < n)) {
    if (lo > 0) lo -= 1;
    if (hi < n && hi - lo < least) hi += 1;
  }
  return {lo, hi};
}

if (typeof module !== "undefined") {
  module.exports = {reconnectDelay, closeReason, parseDuration, parseTime,
    absoluteSince, newCursors, trackLine, forgetFile, resumeCursors, earlierCursors, hasEarlier, countTokens,
    before, projectName, compact, size, ago, clip, plain, promptText, commandOf, systemText, isToolResults,
    resultText, stripAnsi, markdown, MD_TAGS, lineDiff, duration, resultSummary, imageSource, isNoise, noiseRuns,
    isSidechain, agentName, titleText, widerWindow, windowRange, needsYou, statusBadge, needCount, pageTitle,
    shouldNotify, money, usageIn, usageText, DIALOG_OPEN};
}
''')

PAGE_STYLE = r'''
:root{--bg:#fbfbfa;--fg:#1d1d1f;--muted:#6e6e73;--line:#e3e3e0;--panel:#fff;--accent:#b4532a;
--you:#eef4ff;--tool:#f5f3ee;--err:#c62828;--ok:#2e7d32;--add:#e6f4ea;--del:#fdecea;--sel:#f3e9e2;
color-scheme:light dark;font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif}
@media (prefers-color-scheme:dark){:root{--bg:#161617;--fg:#e8e8e6;--muted:#9a9a9f;--line:#2e2e31;
--panel:#1e1e20;--accent:#e08a5f;--you:#1f2a3d;--tool:#242426;--err:#ef6b6b;--ok:#6fcf7b;
--add:#1d3324;--del:#3d2020;--sel:#33261f}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);height:100vh;display:flex;flex-direction:column}
header{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;padding:.5em .8em;border-bottom:1px solid var(--line);background:var(--panel)}
header h1{font-size:1em;margin:0 .5em 0 0;color:var(--accent)}
header input,header select{font:inherit;padding:.25em .4em;border:1px solid var(--line);border-radius:6px;background:var(--bg);color:var(--fg);min-width:0}
header input{flex:1 1 12em}
#state{font-size:.85em;padding:.15em .6em;border-radius:99px;border:1px solid var(--line);white-space:nowrap}
#state[data-state=live]{color:var(--ok)}#state[data-state=down]{color:var(--err)}
#notify[aria-pressed=true]{color:var(--ok);border-color:var(--ok)}
.badge{font-size:.9em;padding:0 .5em;border-radius:99px;border:1px solid var(--line);white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:100%}
.badge.working{color:var(--ok);border-color:var(--ok)}
.badge.needs{background:var(--accent);border-color:var(--accent);color:var(--panel);font-weight:600}
.badge.dialog,.badge.ended{color:var(--muted)}.badge.ended{border-style:dotted}.badge.unchecked{border-style:dashed}
#convo-head .badge{font-size:.8em;flex:0 1 auto;min-width:0;max-width:50%}
.session.needs{box-shadow:inset 3px 0 var(--accent)}
.tokens.counting{font-style:italic}
main{flex:1;display:flex;min-height:0}
nav{width:22em;flex:none;overflow:auto;border-right:1px solid var(--line);background:var(--panel)}
nav ul{list-style:none;margin:0;padding:0}
.session{padding:.5em .8em;border-bottom:1px solid var(--line);cursor:pointer}
.session[aria-selected=true]{background:var(--sel)}
.session .title{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.session .sub{font-size:.8em;color:var(--muted);display:flex;gap:.6em;flex-wrap:wrap}
.session .host{font-weight:600}
#boxes{font-size:.8em;display:flex;gap:.6em;flex-wrap:wrap}#boxes .up{color:var(--ok)}#boxes .down{color:var(--muted)}
.agents{margin:.3em 0 0 .8em;font-size:.85em}
.agents li{padding:.1em .4em;border-left:2px solid var(--line);color:var(--muted);cursor:pointer}
.agents li[aria-selected=true]{border-color:var(--accent);color:var(--fg)}
section{flex:1;display:flex;flex-direction:column;min-width:0;min-height:0;position:relative}
#convo-head{display:flex;gap:.6em;align-items:center;padding:.4em .8em;border-bottom:1px solid var(--line)}
#convo-head h2{font-size:1em;margin:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;flex:1}
button{font:inherit;font-size:.85em;padding:.2em .6em;border:1px solid var(--line);border-radius:6px;background:var(--panel);color:var(--fg);cursor:pointer}
#entries{list-style:none;margin:0;padding:.6em .8em 3em;overflow:auto;flex:1;position:relative;overflow-anchor:none}
#entries .spacer{margin:0;padding:0}
button.more{margin-left:.5em;font-size:.8em}
.empty{color:var(--muted);padding:2em;text-align:center}
.entry{margin:0 0 .7em;max-width:60em}
.entry.agent{margin-left:1.2em;padding-left:.7em;border-left:3px solid var(--line)}
.meta{font-size:.78em;color:var(--muted);display:flex;gap:.6em}
.meta .who{font-weight:600;color:var(--fg)}
.text{white-space:pre-wrap;overflow-wrap:anywhere}
.entry.user .text{background:var(--you);padding:.4em .6em;border-radius:8px;display:inline-block}
.tool{background:var(--tool);border:1px solid var(--line);border-radius:8px;padding:.35em .6em;margin:.25em 0}
.tool .name{font-weight:600;font-size:.85em;color:var(--accent)}
.tool .desc{font-size:.85em;color:var(--muted)}
.tool .arg{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;overflow-wrap:anywhere;white-space:pre-wrap}
pre{font:.82em/1.4 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;overflow-wrap:anywhere;margin:.3em 0;max-height:30em;overflow:auto}
details{margin:.25em 0}summary{cursor:pointer;color:var(--muted);font-size:.85em}
details.result.error summary{color:var(--err)}
.todos{margin:.2em 0;padding-left:1.2em;list-style:none;font-size:.9em}
.plan{font-size:.9em;margin:.3em 0}
.diff .add{background:var(--add);display:block}.diff .del{background:var(--del);display:block}
.diff .ctx{display:block}.diff .gap,.diff .note{display:block;color:var(--muted)}
.md>:first-child{margin-top:0}.md>:last-child{margin-bottom:0}
.md p,.md ul,.md ol,.md h1,.md h2,.md h3,.md h4,.md h5,.md h6{margin:.35em 0}.md ul,.md ol{padding-left:1.4em}
.md h1{font-size:1.25em}.md h2{font-size:1.12em}.md h3,.md h4,.md h5,.md h6{font-size:1em}
.md code{font:.88em ui-monospace,Menlo,Consolas,monospace;background:var(--tool);padding:0 .2em;border-radius:4px}
.md pre{background:var(--tool);padding:.4em .6em;border-radius:6px}.md pre code{background:none;padding:0}
.md hr{border:0;border-top:1px solid var(--line)}
.md blockquote{margin:.35em 0;padding-left:.7em;border-left:3px solid var(--line);color:var(--muted)}
.md table{border-collapse:collapse;margin:.35em 0;display:block;overflow-x:auto}
.md th,.md td{border:1px solid var(--line);padding:.15em .5em;text-align:left;vertical-align:top}
.md .align-center{text-align:center}.md .align-right{text-align:right}
.tool>details.result{border-top:1px solid var(--line);padding-top:.2em}
.entry.attached{display:none}
img.thumb{display:block;max-width:12em;max-height:8em;margin:.25em 0;border:1px solid var(--line);border-radius:6px;cursor:zoom-in}
img.thumb.big{max-width:100%;max-height:none;cursor:zoom-out}
body:not(.noise-shown) .entry.noise:not(.fold){display:none}
body:not(.noise-shown) .entry.noise.fold>*{display:none}
body:not(.noise-shown) .entry.noise.fold::before{content:attr(data-run)}
.entry.system,.entry.other,.entry.notice{color:var(--muted);font-size:.85em}
.entry.notice{color:var(--err)}
#jump{position:absolute;right:1.2em;bottom:1em;box-shadow:0 2px 8px rgba(0,0,0,.2)}
@media (max-width:700px){main{flex-direction:column}nav{width:auto;max-height:34vh;border-right:0;border-bottom:1px solid var(--line)}
header input{flex-basis:100%}.entry.agent{margin-left:.4em}}
'''

PAGE_BODY = r'''
<header>
<h1>claude_stream</h1>
<span id="state" data-state="connecting">connecting…</span>
<span id="boxes" hidden></span>
<button id="notify" hidden aria-pressed="false">notify me</button>
<input id="search" type="search" placeholder="Search sessions and entries" aria-label="Search">
<select id="machine" aria-label="Machine" hidden><option value="">All machines</option></select>
<select id="project" aria-label="Project"><option value="">All projects</option></select>
<select id="type" aria-label="Entry type"><option value="">All entries</option></select>
<select id="window" aria-label="History"><option value="live">From now on</option><option value="10m">Last 10 min</option><option value="1h">Last hour</option><option value="1d">Last day</option><option value="7d">Last week</option><option value="all">Everything</option></select>
</header>
<main>
<nav aria-label="Sessions"><ul id="session-list"></ul></nav>
<section aria-label="Conversation">
<div id="convo-head"><h2 id="convo-title">Waiting for sessions…</h2><span id="convo-state" hidden></span><button id="noise" hidden></button><button id="earlier" hidden>Load earlier</button></div>
<ol id="entries"></ol>
<button id="jump" hidden>↓ new entries</button>
</section>
</main>
'''

PAGE_SCRIPT = PAGE_LIB + r'''
// claude_stream live page. Everything from a transcript is shown with
// textContent, never parsed as HTML; the Content-Security-Policy allows this
// script alone (by hash), and connections to this server alone.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
const DIFF_LINES = 400, TICK = 5000, WAKE_GAP = 30000;

const state = {
  ws: null, retry: null, epoch: null, since: null, resuming: false, failures: 0,
  window: params.get("since") || "1h",
  ...newCursors(),            // seen, next, first: what is known of each file
  lastTime: new Map(),        // path -> time of its latest timed entry (for untimed ones)
  sessions: new Map(),        // session id -> session record
  calls: new Map(),           // tool_use id -> {name, t, box}: box, its card once drawn, gets its result
  results: new Map(),         // tool_use id -> {b, t, standalone}: a result, for a card drawn after it came
  tasks: new Map(),           // a Task (or Agent) call's prompt -> its input, to name the sub-agent given it
  widen: !params.has("since"),  // no window asked for: wider ones until there is a session to show
  types: new Set(),           // entry types seen, for the type filter
  selected: null, agent: null, duplicates: 0, lastEpoch: null,
  connections: 0,             // sockets opened: more than one, the server dropped the page (or restarted)
  fetching: false,            // a range is on its way on the second socket, until it says live
  side: null,                 // that socket: earlier (or later) lines, never in the way of live ones
  isLive: false,              // the first socket has caught up
  fill: null,                 // the history window, while what came before the first look is due
  chosen: false,              // a session was clicked
  settled: false,             // the first history is in: the selection stays where it is
  registry: false,            // the server follows Claude Code's registry (hello's registry): states are known
  statuses: new Map(),        // session id -> its latest status message (and gen, the connection it came on)
  hub: false,                 // the server mirrors boxes: hosts are shown, and which boxes are connected
  boxes: new Map(),           // host -> {connected, since}
  served: new Map(),          // session id -> its latest usage message: the server's totals
  notify: false,              // browser notifications, turned on by a click
};
window.claudeStream = state;  // for tests and the curious: read-only by convention

// --- connection -------------------------------------------------------------

function setState(kind, text) {
  const el = $("state");
  el.dataset.state = kind;
  el.textContent = text;
}

function connect() {
  clearTimeout(state.retry);
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/?hold=1&token=" + encodeURIComponent(token));
  state.ws = ws;
  state.isLive = false;
  state.connections += 1;
  setState("connecting", state.resuming || state.epoch ? "reconnecting…" : "connecting…");
  let opened = false;
  ws.onopen = () => { opened = true; };
  ws.onmessage = (ev) => { if (ws === state.ws) receive(JSON.parse(ev.data)); };
  ws.onclose = (ev) => {
    if (ws !== state.ws) return;
    state.ws = null;
    state.failures += 1;
    const delay = reconnectDelay(state.failures, Math.random());
    setState("down", closeReason(ev.code) + "; retrying in " + Math.round(delay / 1000) + " s");
    state.retry = setTimeout(connect, delay);
    if (!opened) explainRefusal(delay);
  };
}

function explainRefusal(delay) {
  // A browser does not tell a page why a WebSocket handshake failed. Ask the
  // server the plain way: a 401 means the token in this page's URL is not the
  // server's (a server started again without --token makes a new one).
  fetch("/status?token=" + encodeURIComponent(token), {cache: "no-store"}).then((r) => {
    if (r.status === 401 && !state.ws) {
      setState("down", "the server refused this page's token (it makes a new one at each start " +
        "unless given --token): open the page URL it printed; retrying in " + Math.round(delay / 1000) + " s");
    }
  }).catch(() => {});
}

function reconnectNow() {
  // After a sleep or a network change the socket may be dead without knowing it
  // (no FIN ever came): start a new one; it resumes from the cursors.
  const old = state.ws;
  state.ws = null;
  if (old) old.close();
  connect();
}

let lastTick = Date.now();
setInterval(() => {
  const now = Date.now();
  if (now - lastTick > WAKE_GAP) reconnectNow();      // timers stopped: the machine slept
  lastTick = now;
}, TICK);
window.addEventListener("online", reconnectNow);

function subscribe(extra) {
  const msg = Object.assign({kind: "subscribe", cursors: {}}, extra || {});
  state.ws.send(JSON.stringify(msg));
}

function receive(msg) {
  switch (msg.kind) {
    case "hello":
      registry(msg);
      if (state.epoch === null) {         // a fresh subscription: the history window
        state.epoch = msg.time;
        state.since = absoluteSince(state.window, msg.time);
        state.resuming = false;
        // A new window after an earlier one: at least everything since that began,
        // so nothing written while switching is missed (lines shown stay once).
        // Each file's last lines first; what came before them follows (fill).
        state.fill = state.since || state.lastEpoch;
        subscribe({since: state.fill, last: PAGE_FIRST_LINES});
      } else {
        // Resuming: files we hold a cursor for go on from it; files we never heard
        // of are asked for since our window began (or since we first connected).
        state.resuming = true;
        subscribe({since: state.since || state.epoch, cursors: resumeCursors(state)});
      }
      setState("catching", "catching up…");
      return;
    case "subscribed":
      if (!msg.backlog) live();
      return;
    case "live":
      confirm();
      live();
      return;
    case "status":
      return status(msg);
    case "box":                 // a hub's link to a box came up or went down
      if (typeof msg.host === "string") state.boxes.set(msg.host, {connected: msg.connected === true, since: msg.since});
      return drawBoxes();
    case "usage":
      return usage(msg);
    case "entry": case "malformed": case "gap":
      return line(msg);
    case "reset":               // the file was truncated or replaced: what we showed of it is gone
      forget(msg.path);
      return notice(msg, msg.path + " was " + (msg.reason || "reset") + "; reading it again from the start");
    case "error":
      return notice(msg, "server: " + msg.error);
  }
}

function forget(path) {
  forgetFile(state, path);
  for (const s of state.sessions.values()) {
    if (!s.paths.has(path)) continue;
    for (const item of s.entries) {
      if (item.path !== path) continue;
      const a = item.agent && s.agents.get(item.agent);
      if (a) a.count -= 1;
    }
    s.entries = s.entries.filter((item) => item.path !== path);
    s.laterFrom.delete(path);
    if (s.id === state.selected) changed();
  }
}

function live() {
  state.failures = 0;
  state.isLive = true;
  if (!state.settled) { drawList(); state.settled = true; }   // its choice, with each file's end in
  if (!state.side) setState("live", "● live");
  if (state.fill) fill();
  // The default window held no session: a wider one, so that the first look shows the latest sessions.
  // (A live session with no line yet, known from the registry alone, is not one to show.)
  const held = [...state.sessions.values()].some((s) => s.paths.size > 0);
  if (state.widen && !held && widerWindow(state.window)) setWindow(widerWindow(state.window));
  scheduleView();                 // still at the top of what is held: the next part of a long session
}

// --- live status, usage, notifications -----------------------------------------

function drawBoxes() {          // a hub: its boxes, which are connected, and since when
  const box = $("boxes");
  box.hidden = !state.hub;
  box.textContent = "";
  for (const [host, b] of [...state.boxes].sort()) {
    const item = el("span", "box" + (b.connected ? " up" : " down"), (b.connected ? "● " : "○ ") + host);
    item.title = (b.connected ? "connected since " : "not connected since ") + new Date(b.since).toLocaleString();
    box.append(item);
  }
  if (!state.boxes.size) box.append(el("span", "box down", "no box connected yet"));
}

function registry(msg) {
  // No registry (older Claude Code, a copied folder): no state at all, not a guess.
  // A hub has its boxes' registries: their states come relayed, with their host.
  state.hub = msg.boxes !== null && typeof msg.boxes === "object";
  if (state.hub) { state.boxes = new Map(Object.entries(msg.boxes)); drawBoxes(); }
  state.registry = (Array.isArray(msg.registry) && msg.registry.length > 0) || state.hub;
  if (state.registry) return;
  state.statuses.clear();
  for (const s of state.sessions.values()) s.status = null;
  needTitle();
  scheduleList();
}

function status(msg) {
  if (!state.registry || typeof msg.session !== "string" || typeof msg.state !== "string") return;
  const was = state.statuses.get(msg.session);
  if (!was && msg.state === "ended" && !state.sessions.has(msg.session)) return;  // never seen alive
  const st = Object.assign({}, msg, {gen: state.connections});
  state.statuses.set(msg.session, st);
  const s = sessionFor(msg);      // a fresh session with no line yet is listed too, by its name and cwd
  s.status = st;
  if (!s.cwd && typeof msg.cwd === "string") s.cwd = msg.cwd;
  const since = typeof msg.since === "string" ? Date.parse(msg.since) : NaN;
  if (!isNaN(since)) s.statusTime = since;
  if (state.notify && shouldNotify(was, st, state.isLive)) notify(s, st);
  needTitle();
  scheduleList();
}

function confirm() {
  // The snapshot that follows each subscribe is in once `live` comes: a session
  // it did not name is no longer running (it ended while this page was away).
  let gone = false;
  for (const [id, st] of state.statuses) {
    if (st.gen === state.connections || st.state === "ended") continue;
    const ended = Object.assign({}, st, {state: "ended", waiting_for: null, gen: state.connections});
    state.statuses.set(id, ended);
    const s = state.sessions.get(id);
    if (s) s.status = ended;
    gone = true;
  }
  if (gone) { needTitle(); scheduleList(); }
}

function usage(msg) {
  if (typeof msg.session !== "string") return;
  state.served.set(msg.session, msg);     // kept for a session not listed yet: it may come into the window
  const s = state.sessions.get(msg.session);
  if (s) { s.served = msg; scheduleList(); }
}

function needTitle() {
  document.title = pageTitle(needCount(state.statuses.values()), "claude_stream");
}

function badge(st, id) {            // a state's badge, or nothing
  const b = statusBadge(st);
  if (!b) return null;
  const node = el("span", "badge " + b.cls, b.text);
  if (id) node.id = id;
  node.title = b.title;
  return node;
}

const NOTIFY_KEY = "claude_stream.notify";

function stored(value) {            // localStorage, which a private window may refuse
  try {
    if (value === undefined) return localStorage.getItem(NOTIFY_KEY);
    localStorage.setItem(NOTIFY_KEY, value);
  } catch (err) { /* the choice lasts this page only */ }
  return value;
}

function notifyButton() {
  const b = $("notify");
  if (typeof Notification === "undefined") { b.hidden = true; return; }
  b.hidden = false;
  const blocked = Notification.permission === "denied";
  b.textContent = state.notify ? "notifications on" : blocked ? "notifications blocked" : "notify me";
  b.setAttribute("aria-pressed", String(state.notify));
  b.title = state.notify ? "a notification when a session starts waiting for you; click to turn off" :
    blocked ? "this browser blocks notifications for this page: allow them in its site settings" :
    "a browser notification when a session starts waiting for you";
}

function toggleNotify() {
  if (state.notify) {
    state.notify = false;
    stored("off");
    notifyButton();
    return;
  }
  // A click is the user gesture browsers require for asking.
  Promise.resolve(Notification.requestPermission()).then((answer) => {
    state.notify = answer === "granted";
    stored(state.notify ? "on" : "off");
    notifyButton();
  }, () => notifyButton());
}

function notify(s, st) {
  const title = s.title || s.prompt || st.name || projectName(s) || s.id;
  try {                 // text only; no icon (nothing is fetched under the page's policy)
    const n = new Notification("Claude needs you: " + String(title).slice(0, 80), {
      body: [st.waiting_for, s.cwd].filter((v) => typeof v === "string" && v).join(" · "),
      tag: "claude_stream " + s.id});
    n.onclick = () => {
      window.focus();
      state.chosen = true;
      if (state.sessions.has(s.id)) select(s.id, null);
      n.close();
    };
  } catch (err) { /* a browser that shows notifications only from a service worker */ }
}

// --- the model --------------------------------------------------------------

function sessionFor(msg) {
  const id = msg.session || msg.path;
  let s = state.sessions.get(id);
  if (!s) {
    s = {id, project: msg.project || "", host: typeof msg.host === "string" ? msg.host : "",
         cwd: "", title: "", prompt: "", last: 0, entries: [],
         paths: new Set(), agents: new Map(), tokensIn: 0, tokensOut: 0, usage: new Map(),
         promptTime: Infinity,
         status: state.statuses.get(id) || null,    // its state, from the registry
         statusTime: 0,                           // when that state began
         served: state.served.get(id) || null,      // the server's usage totals
         trimmed: false,        // lines were dropped from its start: scrolling up fetches them again
         laterFrom: new Map()}; // path -> offset of its first line dropped from the end
    state.sessions.set(id, s);
  }
  return s;
}

function line(msg) {
  if (!trackLine(state, msg)) { state.duplicates += 1; return; }
  const s = sessionFor(msg);
  s.paths.add(msg.path);
  const e = msg.entry && typeof msg.entry === "object" ? msg.entry : null;
  let t = e && typeof e.timestamp === "string" ? Date.parse(e.timestamp) : NaN;
  const own = !isNaN(t);          // untimed lines sort with their file's last time, shown without one
  if (!own) t = state.lastTime.get(msg.path) || 0; else state.lastTime.set(msg.path, t);
  const item = {msg, e, t, own, path: msg.path, offset: msg.offset, agent: msg.agent || null, el: null, hay: null};
  const type = e ? (typeof e.type === "string" ? e.type : "?") : msg.kind;
  if (!state.types.has(type)) { state.types.add(type); typeOptions(); }
  if (e) learn(s, e, msg, t);
  if (item.agent) {
    const a = s.agents.get(item.agent) || {count: 0, last: 0, first: null};
    a.count += 1; a.last = Math.max(a.last, t);
    // its task, by place: the line may be dropped and fetched again as another item
    if (e && e.type === "user" && (!a.first || item.t < a.first.t)) {
      // Its first prompt, kept as text: the item itself may go (the page keeps a bounded number).
      a.first = {t: item.t, path: item.path, offset: item.offset,
                 prompt: e.message ? plain(e.message.content).trim() : ""};
    }
    s.agents.set(item.agent, a);
  }
  s.last = Math.max(s.last, t);
  scheduleList();
  // Insert in time order (file order within a file): appends are the common case.
  let i = s.entries.length;
  while (i > 0 && before(item, s.entries[i - 1])) i -= 1;
  const selected = state.selected === s.id;
  if (i === s.entries.length && s.laterFrom.size) {   // after a gap in what is held: fetched with the gap
    drop(s, item, false);
    return;
  }
  s.entries.splice(i, 0, item);
  const oldest = s.entries[0];
  bound(s);
  if (!selected) return;
  if (view.stale || item !== s.entries[s.entries.length - 1]) changed();
  else if (passes(item, filters())) {        // an append: the common case, no need to filter all again
    if (oldest !== s.entries[0] && view.items[0] === oldest) view.items.shift();
    else if (oldest !== s.entries[0]) view.stale = true;
    view.items.push(item);
    scheduleView();
  } else if (oldest !== s.entries[0]) changed();
}

function bound(s) {               // at most PAGE_ENTRIES_KEPT lines of a session: the oldest go
  while (s.entries.length > PAGE_ENTRIES_KEPT) drop(s, s.entries.shift(), true);
}

function drop(s, item, earlier) {
  // Its cursor stays; it is no longer seen, so the server's next copy of it is
  // taken: from 0 with "load earlier", from its offset for the end.
  state.seen.delete(item.path + "\n" + item.offset);
  const a = item.agent && s.agents.get(item.agent);
  if (a) a.count -= 1;
  if (!earlier) s.laterFrom.set(item.path, Math.min(item.offset, s.laterFrom.has(item.path) ? s.laterFrom.get(item.path) : Infinity));
  if (!earlier) return;
  s.trimmed = true;
  // What is held of its file now starts later: hasEarlier must say so.
  const kept = s.entries.find((x) => x.path === item.path);
  // A line start, as a range's end must be: the next line's (a gap's is not known).
  state.first.set(item.path, kept ? kept.offset : typeof item.msg.next === "number" ? item.msg.next : item.offset + 1);
}

function learn(s, e, msg, t) {
  if (typeof e.cwd === "string" && !s.cwd) s.cwd = e.cwd;
  if (e.type === "custom-title" && typeof e.customTitle === "string") s.title = e.customTitle, s.titleRank = 3;
  else if (e.type === "ai-title" && typeof e.aiTitle === "string" && (s.titleRank || 0) <= 2) s.title = e.aiTitle, s.titleRank = 2;
  else if (e.type === "summary" && typeof e.summary === "string" && (s.titleRank || 0) <= 1) s.title = e.summary, s.titleRank = 1;
  const text = titleText(e, msg);   // the first prompt in time, whatever order lines came in
  if (text && (!s.prompt || t < s.promptTime)) { s.prompt = text; s.promptTime = t; }
  const content = e.message && e.message.content;
  if (Array.isArray(content)) {
    for (const b of content) {
      if (b && b.type === "tool_use" && typeof b.id === "string") state.calls.set(b.id, {name: b.name, t, box: null});
      if (b && b.type === "tool_result" && typeof b.tool_use_id === "string") state.results.set(b.tool_use_id, {b, t});
      if (b && (b.name === "Task" || b.name === "Agent") && b.input && typeof b.input.prompt === "string") {
        state.tasks.set(b.input.prompt.trim(), b.input);
      }
    }
  }
  const added = countTokens(s.usage, e, msg);
  s.tokensIn += added.in;
  s.tokensOut += added.out;
}

// --- the session list -------------------------------------------------------

let listPending = false;
function scheduleList() {
  if (!listPending) { listPending = true; requestAnimationFrame(() => { listPending = false; drawList(); }); }
}

let drawing = null;                // the item render() is drawing, for its "show all" buttons

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text === undefined || text === null) return node;
  text = String(text);
  if (text.length <= TEXT_LIMIT || (drawing && drawing.full)) {
    node.textContent = text;
    return node;
  }
  // A 12 MB image or a 1 MB result in a line: its start, and the rest on demand.
  const item = drawing, more = el("button", "more", (text.length - TEXT_LIMIT) + " characters more, show all");
  node.append(text.slice(0, TEXT_LIMIT) + "…", more);
  more.addEventListener("click", () => {
    node.textContent = text;
    if (item) { item.full = true; scheduleView(); }     // drawn whole from now on; measured again
  });
  return node;
}

function collapsed(cls, title, text) {     // a <details>, closed unless opened before: a title, then the text
  const d = el("details", cls);
  d.append(el("summary", null, title), el("pre", null, text));
  const item = drawing;
  if (item) {                     // the window draws an entry again when it comes back into view
    const k = item.folds++;
    if (item.opened && item.opened.has(k)) d.open = true;
    d.addEventListener("toggle", () => {
      item.opened = item.opened || new Set();
      if (d.open) item.opened.add(k); else item.opened.delete(k);
    });
  }
  return d;
}

function drawList() {
  const list = $("session-list");
  const project = $("project").value, machine = $("machine").value;
  const query = $("search").value.trim().toLowerCase();
  const projects = new Set(), machines = new Set();
  // Those that need you first, then the most recent.
  const sessions = [...state.sessions.values()].sort((a, b) =>
    needsYou(b.status) - needsYou(a.status) || activity(b) - activity(a));
  list.textContent = "";
  for (const s of sessions) {
    const name = projectName(s);
    projects.add(name);
    if (s.host) machines.add(s.host);
    if (project && name !== project) continue;
    if (machine && s.host !== machine) continue;     // a hub: one box's sessions
    const title = s.title || s.prompt || (s.status && s.status.name) || "(no prompt yet)";
    if (query && !(title + " " + name + " " + s.id).toLowerCase().includes(query) &&
        !s.entries.some((item) => haystack(item).includes(query))) continue;
    const li = el("li", "session" + (needsYou(s.status) ? " needs" : ""));
    li.dataset.session = s.id;
    const served = s.served ? usageText(s.served) : null;
    li.dataset.tokensIn = served ? usageIn(s.served) : s.tokensIn;
    li.dataset.tokensOut = served ? s.served.output_tokens || 0 : s.tokensOut;
    li.setAttribute("aria-selected", String(state.selected === s.id));
    li.append(el("div", "title", title));
    const sub = el("div", "sub"), mark = badge(s.status);
    if (mark) sub.append(mark);
    if (state.hub && s.host) sub.append(el("span", "host", s.host));     // which box it runs on
    sub.append(el("span", "project", name), el("span", "when", ago(activity(s), Date.now())));
    if (served) {                   // the server's count, by model and kind on hover
      const tokens = el("span", "tokens" + (served.partial ? " counting" : ""), served.cost + " · " + served.tokens);
      tokens.title = served.title;
      sub.append(tokens);
    } else sub.append(el("span", "tokens", compact(s.tokensIn) + " in · " + compact(s.tokensOut) + " out"));
    li.append(sub);
    if (s.agents.size) {
      const agents = el("ul", "agents");
      for (const [id, a] of s.agents) {
        const ai = el("li", "agent", "↳ " + agentLabel(s, id) + " · " + a.count);
        ai.dataset.agent = id;
        ai.setAttribute("aria-selected", String(state.selected === s.id && state.agent === id));
        ai.addEventListener("click", (ev) => { ev.stopPropagation(); state.chosen = true; select(s.id, id); });
        agents.append(ai);
      }
      li.append(agents);
    }
    li.addEventListener("click", () => { state.chosen = true; select(s.id, null); });
    list.append(li);
  }
  fillOptions($("project"), projects);
  $("machine").hidden = !state.hub;
  if (state.hub) fillOptions($("machine"), machines);
  const current = state.sessions.get(state.selected);
  if (current) $("convo-title").textContent = heading(current);
  headState(current);
  foldNoise(current);
  // Until a session is clicked, the first history decides: the most recent session,
  // whichever file the server happened to send first.
  if (!state.chosen && !state.settled && sessions.length && sessions[0].id !== state.selected) select(sessions[0].id, null);
  else if (state.selected === null && sessions.length) select(sessions[0].id, null);
}

function fillOptions(box, values) {
  const sorted = [...values].sort();
  const have = [...box.options].slice(1).map((o) => o.value);
  if (have.join("\n") === sorted.join("\n")) return;
  const keep = box.value;
  box.length = 1;
  for (const v of sorted) box.append(new Option(v, v));
  box.value = sorted.includes(keep) ? keep : "";
}

function typeOptions() {
  fillOptions($("type"), state.types);
}

function haystack(item) {         // what a search looks in: the whole line, lower case, made once
  // At the first search, not on arrival: most lines are never searched, and a
  // copy of each would double what the page holds.
  if (item.hay === null) item.hay = JSON.stringify(item.e || item.msg).toLowerCase();
  return item.hay;
}

function activity(s) {             // its last line, or when its state last changed
  return Math.max(s.last, s.statusTime);
}

function headState(s) {             // the selected session's state, in the conversation's header
  const old = $("convo-state"), mark = badge(s && s.status, "convo-state");
  if (mark) old.replaceWith(mark);
  else if (!old.hidden) { old.hidden = true; old.textContent = ""; }
}

function heading(s) {
  return (s.title || s.prompt || (s.status && s.status.name) || s.id) + (state.agent ? " — " + agentLabel(s, state.agent) : "");
}

function foldNoise(s) {             // each run of bookkeeping drawn as one quiet line; the toggle says how many
  let total = 0;
  for (const [start, count] of s ? noiseRuns(s.entries.map((item) => isNoise(item.e))) : []) {
    total += count;
    for (let k = start; k < start + count; k++) {
      s.entries[k].run = k === start ? count : 0;     // kept on the item: the window draws it later
      markFold(s.entries[k]);
    }
  }
  const shown = document.body.classList.contains("noise-shown");
  $("noise").hidden = total === 0;
  $("noise").textContent = (shown ? "hide " : "show ") + total + " bookkeeping";
}

function markFold(item) {           // the first of a run of bookkeeping stands for the run
  const li = item.el;
  if (!li || item.run === undefined) return;
  li.classList.toggle("fold", item.run > 0);
  if (item.run > 0) li.dataset.run = item.run + (item.run === 1 ? " bookkeeping record" : " bookkeeping records");
}

// --- the conversation: a window over the selected session ----------------------
// Only the entries near the viewport are in the DOM, between two spacers that
// stand for the others at their measured (never drawn: estimated) heights.
// Arriving lines, scrolls and filters only say what changed; one frame then
// decides what is drawn and where the view is, and reads the layout once, to
// measure what it drew. Filters and search run over the items, not the DOM.
const ESTIMATE = 80, WINDOW_LEAST = 100;    // px of an entry never drawn; entries drawn at least

const view = {
  items: [],          // the selected session's entries that pass the filters, in order
  drawn: [],          // those of them in the DOM, in order
  follow: true,       // at the end, staying there as entries arrive
  seenEnd: null,      // the last item when the view was last at the end: after it, the entries are new
  stale: true,        // items must be made again: a selection, a filter, a line not at the end
  pending: false,     // a frame is asked for
  top: null, bottom: null,    // the spacers
};

function scheduleView() {
  if (!view.pending) { view.pending = true; requestAnimationFrame(drawView); }
}

function changed() {
  view.stale = true;
  scheduleView();
}

function select(id, agent) {
  state.selected = id;
  state.agent = agent;
  const s = state.sessions.get(id);
  const box = $("entries");
  for (const item of view.drawn) item.el = null;
  box.textContent = "";               // notices of the session before go too
  box.append(view.top, view.bottom);
  view.drawn = [];
  view.follow = true;
  $("jump").hidden = true;
  $("convo-title").textContent = s ? heading(s) : "";
  headState(s);
  view.stale = true;
  drawView();                         // at once: a click, or a filter, is answered in its own task
  scheduleList();
}

function filters() {
  return {agent: state.agent, type: $("type").value, query: $("search").value.trim().toLowerCase()};
}

function passes(item, f) {
  if (f.agent && item.agent !== f.agent) return false;
  if (f.type && (item.e ? item.e.type : item.msg.kind) !== f.type) return false;
  return !f.query || haystack(item).includes(f.query) || resultsMatch(item, f.query);
}

function resultsMatch(item, query) {  // a call whose result (shown on its card) has the text
  const content = item.e && item.e.type === "assistant" && item.e.message && item.e.message.content;
  if (!Array.isArray(content)) return false;
  for (const b of content) {
    const r = b && b.type === "tool_use" && state.results.get(b.id);
    if (!r) continue;
    if (r.hay === undefined) r.hay = JSON.stringify(r.b).toLowerCase();    // once, at the first search
    if (r.hay.includes(query)) return true;
  }
  return false;
}

function drawView() {
  view.pending = false;
  const box = $("entries");
  const s = state.sessions.get(state.selected);
  if (view.stale) {
    const f = filters();
    view.items = s ? s.entries.filter((item) => passes(item, f)) : [];
    view.stale = false;
    if (!view.items.includes(view.seenEnd)) view.seenEnd = view.items[view.items.length - 1];
  }
  const items = view.items;
  // Decided here, after this frame's scroll events: a line that came just after a
  // scroll up, before its event, is new too.
  if (view.follow) view.seenEnd = items[items.length - 1];
  else if (items.length && items[items.length - 1] !== view.seenEnd) $("jump").hidden = false;
  // Where the reader is: the first drawn entry still in sight, and how far down.
  // The layout is clean here (the last frame measured it), so this reads no new one.
  const scroll = box.scrollTop, viewport = box.clientHeight;
  let anchor = null, offset = 0;
  if (!view.follow) {
    for (const item of view.drawn) {
      if (item.el && item.el.isConnected && item.el.offsetTop + item.el.offsetHeight > scroll) {
        anchor = item; offset = item.el.offsetTop - scroll; break;
      }
    }
  }
  const heights = items.map((item) => item.h || ESTIMATE);
  const tops = [0];
  for (const h of heights) tops.push(tops[tops.length - 1] + h);
  const total = tops[items.length], at = anchor ? items.indexOf(anchor) : -1;
  const want = view.follow ? total - viewport : at >= 0 ? tops[at] - offset : Math.min(scroll, total - viewport);
  const {lo, hi} = windowRange(heights, Math.max(0, want), viewport, WINDOW_LEAST);
  const next = items.slice(lo, hi);
  const keep = new Set(next);
  for (const item of view.drawn) {        // what leaves the window leaves the DOM, and memory
    if (!keep.has(item) && item.el) { item.el.remove(); item.el = null; }
  }
  let ref = view.top.nextSibling;
  for (const item of next) {
    if (item.el && item.el === ref) ref = ref.nextSibling;
    else box.insertBefore(node(item), ref);
  }
  view.top.style.height = tops[lo] + "px";
  view.bottom.style.height = total - tops[hi] + "px";
  view.drawn = next;
  // Measured: one layout for all; an entry's height is up to the next one's top (its margin included).
  for (let i = 0; i < next.length; i++) {
    const below = i + 1 < next.length ? next[i + 1].el : view.bottom;
    next[i].h = below.offsetTop - next[i].el.offsetTop;
  }
  if (view.follow) box.scrollTop = box.scrollHeight;
  else if (anchor && anchor.el) box.scrollTop = anchor.el.offsetTop - offset;
  // Estimates too large for what was drawn: a spacer in sight, another frame fills it.
  const seen = box.scrollTop;
  if ((lo > 0 && view.top.offsetTop + view.top.offsetHeight > seen) ||
      (hi < items.length && view.bottom.offsetTop < seen + viewport)) scheduleView();
  updateEarlier();
  fetchMore(s, lo);
}

function atEnd() {
  const box = $("entries");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 60;
}

function scrolled() {
  view.follow = atEnd();
  if (view.follow) $("jump").hidden = true;
  scheduleView();
}

function fetchMore(s, lo) {       // drawn up to an end of what is held, with more of it dropped there
  if (!s) return;
  if (view.follow && s.laterFrom.size && !state.side) loadLater(s);
  // Scrolled up to the top, by the reader (a filter that leaves a few entries is not a scroll):
  // the part before it, which the bound dropped.
  else if (!view.follow && lo === 0 && $("entries").scrollTop < $("entries").clientHeight && s.trimmed &&
           !state.fetching && hasEarlier(state, s.paths)) loadEarlier();
}

function node(item) {
  if (!item.el) {
    drawing = item;
    item.folds = 0;               // its <details>, counted as drawn: which were open survives a redraw
    try {
      item.el = render(item);
    } catch (err) {               // an entry shaped like nothing we know: show it raw, go on
      item.el = el("li", "entry other");
      item.el.dataset.path = item.path;
      item.el.dataset.offset = item.offset;
      item.el.append(el("pre", null, JSON.stringify(item.e || item.msg, null, 1)));
    }
    drawing = null;
    markFold(item);
  }
  return item.el;
}

function render(item) {
  const {msg, e} = item;
  const li = el("li", "entry");
  li.dataset.path = msg.path;
  li.dataset.offset = msg.offset;
  if (isSidechain(e, msg)) li.classList.add("agent");
  const meta = el("div", "meta");
  const when = item.t ? new Date(item.t).toLocaleTimeString() : "";
  if (!e) {
    li.classList.add("notice");
    li.dataset.type = msg.kind;
    li.append(el("div", "text", msg.kind + " at " + msg.path + ":" + msg.offset + ": " + (msg.reason || "") +
      (msg.excerpt ? " — " + msg.excerpt : "")));
    return li;
  }
  const type = typeof e.type === "string" ? e.type : "?";
  li.dataset.type = type;
  if (isNoise(e)) li.classList.add("noise");
  const content = e.message && e.message.content;
  const command = type === "user" ? commandOf(content) : null;
  // A sub-agent's prompts come from Claude's Task calls, never from the user.
  const who = type === "assistant" ? "claude" : type !== "user" ? type : isToolResults(content) ? "tool result" :
    e.isMeta || command ? "meta" : isSidechain(e, msg) ? "task" : "you";
  meta.append(el("span", "who", who), el("time", null, item.own ? when : ""));
  if (who === "task") meta.append(el("span", "agent-id", agentName(state.tasks.get(plain(content).trim()), item.agent)));
  else if (isSidechain(e, msg)) meta.append(el("span", "agent-id", item.agent ? "agent " + item.agent : "sub-agent"));
  li.append(meta);
  if (type === "user" && (command || e.isMeta)) {
    li.classList.add("system");
    li.append(el("div", "text", command || plain(content)));
  } else if (type === "user") { li.classList.add("user"); blocks(li, content, item); }
  else if (type === "assistant") { li.classList.add("assistant"); blocks(li, content, item); }
  else if (type === "system") {
    li.classList.add("system");
    li.append(el("div", "text", systemText(e)));
  } else if (type === "summary") {
    li.classList.add("system");
    li.append(el("div", "text", "summary: " + (e.summary || "")));
  } else {
    li.classList.add("other");
    li.append(collapsed(null, type, JSON.stringify(e, null, 1)));
  }
  return li;
}

function agentLabel(s, id) {         // a sub-agent by the Task call whose prompt its first line is
  const a = s && s.agents.get(id);
  const prompt = a && a.first && a.first.prompt;
  return agentName(prompt ? state.tasks.get(prompt) : null, id, prompt);
}

function blocks(li, content, item) {
  const md = item.e.type === "assistant";     // Claude writes Markdown; what people type stays as typed
  if (typeof content === "string") { li.append(prose(content, md)); return; }
  if (!Array.isArray(content)) return;
  for (const b of content) {
    if (!b || typeof b !== "object") continue;
    if (b.type === "text") li.append(prose(b.text || "", md));
    else if (b.type === "thinking" || b.type === "redacted_thinking") {
      li.append(collapsed("thinking", "thinking", b.thinking || "(redacted)"));
    } else if (b.type === "tool_use") li.append(toolUse(b));
    else if (b.type === "tool_result") { const card = toolResult(b, item.own ? item.t : 0); if (card) li.append(card); }
    else if (b.type === "image") li.append(image(b));
    else li.append(el("div", "text", "[" + b.type + "]"));
  }
  if (isToolResults(content) && !li.querySelector(".result")) li.classList.add("attached");   // all on their calls' cards
}

function prose(value, md) {
  // Past TEXT_LIMIT, plain and capped (el's "show all"): Markdown is for what can be read.
  if (!md || value.length > TEXT_LIMIT) return el("div", "text", value);
  return markdownNodes(markdown(value), el("div", "text md"));
}

function markdownNodes(parts, parent) {   // markdown's tree as nodes, by createElement and text nodes alone
  for (const part of parts) {
    if (typeof part === "string") { parent.append(document.createTextNode(part)); continue; }
    if (!MD_TAGS.includes(part.tag)) continue;
    const node = document.createElement(part.tag);
    if (part.tag === "a" && /^https?:\/\//i.test(part.href)) {
      node.href = part.href;
      node.target = "_blank";       // the live page stays open
      node.rel = "noopener noreferrer";
    }
    if (part.tag === "ol" && Number.isInteger(part.start)) node.start = part.start;
    if ((part.tag === "th" || part.tag === "td") && ["left", "center", "right"].includes(part.align)) {
      node.className = "align-" + part.align;
    }
    parent.append(markdownNodes(part.children, node));
  }
  return parent;
}

function image(b) {                 // a thumbnail from the block's own data (CSP: data: images only); a click enlarges it
  const source = imageSource(b);
  if (!source.src) return el("div", "text", source.note);
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "image · " + size(source.bytes);
  img.src = source.src;
  img.addEventListener("click", () => img.classList.toggle("big"));
  return img;
}

function toolUse(b) {
  const box = el("div", "tool");
  box.dataset.tool = b.name || "";
  const input = b.input && typeof b.input === "object" ? b.input : {};
  box.append(el("div", "name", (b.name || "tool") + (typeof input.subagent_type === "string" ? " · " + input.subagent_type : "")));
  if (typeof input.description === "string") box.append(el("div", "desc", input.description));
  if (typeof input.command === "string") box.append(el("div", "arg", "$ " + input.command));
  for (const k of ["file_path", "path", "pattern", "url", "query"]) {
    if (typeof input[k] === "string") box.append(el("div", "arg", input[k]));
  }
  if (typeof input.prompt === "string") box.append(collapsed(null, "prompt · " + size(input.prompt.length), input.prompt));
  const edits = typeof input.old_string === "string" ? [input] : Array.isArray(input.edits) ? input.edits : [];
  const str = (v) => typeof v === "string" ? v : "";
  for (const edit of edits) {
    if (edit && typeof edit === "object") box.append(diffView(lineDiff(str(edit.old_string), str(edit.new_string))));
  }
  if (typeof input.plan === "string") box.append(el("div", "text plan", input.plan));
  if (Array.isArray(input.todos)) {
    const list = el("ul", "todos");
    for (const todo of input.todos) {
      if (!todo || typeof todo !== "object") continue;
      const mark = todo.status === "completed" ? "☑ " : todo.status === "in_progress" ? "▶ " : "☐ ";
      list.append(el("li", null, mark + (todo.content || todo.activeForm || "")));
    }
    box.append(list);
  }
  if (typeof input.content === "string") {
    const title = "content · " + size(input.content.length);
    box.append(b.name === "Write" ? diffView(lineDiff("", input.content), title) : collapsed(null, title, input.content));
  }
  const known = ["command", "file_path", "path", "pattern", "url", "query", "description", "subagent_type",
    "prompt", "old_string", "new_string", "edits", "content", "plan", "todos"];
  const rest = Object.keys(input).filter((k) => !known.includes(k));
  if (rest.length) {
    const shown = {};
    for (const k of rest) shown[k] = input[k];
    box.append(collapsed(null, "input", JSON.stringify(shown, null, 1)));
  }
  const call = state.calls.get(b.id), result = state.results.get(b.id);
  if (call) call.box = box;
  if (result && !result.standalone) box.append(resultCard(result.b, result.t, call));
  return box;
}

function diffView(diff, title) {    // removed, added and context lines, the first DIFF_LINES of them; in a <details> if titled
  const pre = el("pre", "diff");
  if (diff.note) pre.append(el("span", "note", diff.note));
  let left = DIFF_LINES;
  for (const h of diff.hunks) {
    if (h.oldStart > 1 || h.newStart > 1) pre.append(el("span", "gap", "⋯"));
    for (const [op, line] of h.lines) {
      if (left-- > 0) pre.append(el("span", op === "-" ? "del" : op === "+" ? "add" : "ctx", op + " " + clip(line)));
    }
  }
  if (left < 0) pre.append(el("span", "note", "… " + -left + " more lines"));
  if (!title) return pre;
  const d = el("details");
  d.append(el("summary", null, title), pre);
  return d;
}

// A result goes on its call's card, collapsed: on the card already drawn, or, if the
// card is drawn later, by toolUse from state.results; null then, for no card of its own.
// A result whose call is not known has a card of its own, and keeps it.
function toolResult(b, t) {
  const call = state.calls.get(b.tool_use_id);
  if (!call) {
    const result = state.results.get(b.tool_use_id);
    if (result) result.standalone = true;
    return resultCard(b, t, null);
  }
  if (call.box && !call.box.querySelector(":scope > .result")) call.box.append(resultCard(b, t, call));
  return null;
}

function resultCard(b, t, call) {
  const text = resultText(b);
  const d = collapsed("result" + (b.is_error ? " error" : ""), "result · " + resultSummary(b, text, call && call.t, t), text);
  if (Array.isArray(b.content)) for (const c of b.content) if (c && c.type === "image") d.append(image(c));
  return d;
}

function notice(msg, text) {
  if (state.selected === null) return;
  const li = el("li", "entry notice", text);
  li.dataset.type = msg.kind;
  $("entries").append(li);
}

// --- "load earlier", and later -------------------------------------------------

function updateEarlier() {
  const s = state.sessions.get(state.selected);
  $("earlier").hidden = !s || !hasEarlier(state, s.paths);
}

function sideFetch(request, text, failed) {
  // A range on a socket of its own, closed once it is sent: the first socket
  // goes on with live lines meanwhile. Lines already held are skipped by (path, offset).
  if (state.side) return false;
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/?hold=1&token=" + encodeURIComponent(token));
  let done = false;
  state.side = ws;
  state.fetching = true;
  setState("catching", text);
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (ws !== state.side) return;
    if (msg.kind === "hello") ws.send(JSON.stringify(Object.assign({kind: "subscribe"}, request)));
    else if (msg.kind === "entry" || msg.kind === "malformed" || msg.kind === "gap") line(msg);
    else if (msg.kind === "live" || (msg.kind === "subscribed" && !msg.backlog)) { done = true; ws.close(1000); }
  };
  ws.onclose = () => {
    if (ws !== state.side) return;
    state.side = null;
    state.fetching = false;
    if (!done && failed) failed();
    if (state.isLive) setState("live", "● live");
    updateEarlier();
    scheduleView();
  };
  return true;
}

function heldUntil(paths) {       // path -> where what is held of it starts: a range ends there
  const until = {};
  for (const p of paths) if ((state.first.get(p) || 0) > 0) until[p] = state.first.get(p);
  return until;
}

function fill() {
  // The first look had each file's last lines: now what came before them in the
  // window, for titles, tokens and scrolling up (the bound keeps the latest).
  const until = heldUntil(state.first.keys());
  const cursors = {};
  for (const p of Object.keys(until)) cursors[p] = 0;
  const since = state.fill;
  if (!Object.keys(until).length) { state.fill = null; return; }
  if (sideFetch({since, cursors, until}, "loading earlier…", () => { state.fill = since; })) state.fill = null;
}

function loadEarlier() {
  const s = state.sessions.get(state.selected);
  if (!s || state.side) return;
  // Room for what comes back: the newer half of what is held goes, to be fetched
  // again on the way down. Each file's lines just before what is held come, at
  // most that many of each.
  while (s.entries.length > PAGE_ENTRIES_KEPT / 2) drop(s, s.entries.pop(), false);
  view.follow = false;
  changed();
  sideFetch({cursors: earlierCursors(s.paths), until: heldUntil(s.paths), last: PAGE_ENTRIES_KEPT / 2},
            "loading earlier…");
}

function setWindow(win) {
  // A wider window is a fresh subscription; what is already shown stays, once.
  state.window = $("window").value = win;
  state.lastEpoch = state.epoch;
  state.epoch = null;
  reconnectNow();
}

function loadLater(s) {           // what was dropped from the end, from where it starts in each file
  const cursors = {};
  for (const [path, offset] of s.laterFrom) cursors[path] = offset;
  if (sideFetch({cursors}, "catching up…")) s.laterFrom.clear();
}

function start() {
  $("window").value = state.window;
  view.top = el("li", "spacer");
  view.bottom = el("li", "spacer");
  for (const spacer of [view.top, view.bottom]) spacer.setAttribute("aria-hidden", "true");
  $("entries").append(view.top, view.bottom);
  $("earlier").addEventListener("click", () => { $("entries").scrollTop = 0; loadEarlier(); });
  $("jump").addEventListener("click", () => {
    const b = $("entries");
    b.scrollTop = b.scrollHeight;
    view.follow = true;
    $("jump").hidden = true;
    scheduleView();
  });
  $("entries").addEventListener("scroll", scrolled, {passive: true});
  for (const id of ["search", "type"]) $(id).addEventListener("input", () => {
    view.stale = true;                  // following the end goes on through a filter change
    drawView();
    scheduleList();
  });
  $("project").addEventListener("change", scheduleList);
  $("machine").addEventListener("change", scheduleList);
  $("window").addEventListener("change", () => { state.widen = false; setWindow($("window").value); });
  $("noise").addEventListener("click", () => { document.body.classList.toggle("noise-shown"); scheduleList(); });
  setInterval(scheduleList, 30000);     // "3 min ago" moves on
  state.notify = stored() === "on" && typeof Notification !== "undefined" && Notification.permission === "granted";
  notifyButton();
  if (typeof Notification !== "undefined") $("notify").addEventListener("click", toggleNotify);
  connect();
}

start();
'''

PAGE_HTML = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
             "<title>claude_stream</title>\n<style>" + PAGE_STYLE + "</style></head>\n<body>"
             + PAGE_BODY + "<script>" + PAGE_SCRIPT + "</script>\n</body></html>\n").encode("utf-8")


# The policy names the page's one script and one style by their SHA-256, written down
# here: hashlib would load OpenSSL for two hashes of constants, and the built-in SHA-256
# module is named differently from one Python to the next. PageTests checks both against
# hashlib (and says the new value when the page changes).
PAGE_SCRIPT_SHA256 = "TybOfiOcZlpgGXe8AssVoiiJWjkIl/r9ov7MB7ygYuY="
PAGE_STYLE_SHA256 = "5AFPW71iE+YC3XbG+7hFqo6KA4DozW80933Sor59Q3g="
PAGE_CSP = ("default-src 'none'; script-src 'sha256-%s'; style-src 'sha256-%s'; connect-src 'self'%%s; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (PAGE_SCRIPT_SHA256, PAGE_STYLE_SHA256))
_SAFE_HOST_RE = re.compile(r"^[A-Za-z0-9.\-]+(:\d+)?$|^\[[0-9A-Fa-f:.]+\](:\d+)?$")


def page_headers(host: Optional[str], secure: bool) -> List[Tuple[str, str]]:
    """Headers for the page: CSP that admits the WebSocket back to this very host."""
    extra = ""
    if host and _SAFE_HOST_RE.match(host):      # 'self' covers ws: in CSP3; older engines need it named
        extra = " %s://%s" % ("wss" if secure else "ws", host)
    return [("Content-Security-Policy", PAGE_CSP % extra), ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY")]


def live_page(host: Optional[str], secure: bool) -> Tuple[List[Tuple[str, str]], bytes]:
    """The PageSource that serve hands the request policy: this page, for any Host."""
    return page_headers(host, secure), PAGE_HTML


# =============================================================================
# Client: the same protocol with masking, a terminal renderer, reconnection
# =============================================================================

# The argument that best names what a tool call does, by tool.
TOOL_KEY_ARGUMENTS = {
    "Bash": "command", "BashOutput": "bash_id", "KillBash": "shell_id", "KillShell": "shell_id",
    "Read": "file_path", "Write": "file_path", "Edit": "file_path", "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path", "NotebookRead": "notebook_path", "LS": "path",
    "Glob": "pattern", "Grep": "pattern", "WebFetch": "url", "WebSearch": "query",
    "Task": "description", "Agent": "description", "Skill": "skill", "SlashCommand": "command",
    "ExitPlanMode": "plan", "TaskOutput": "task_id", "ToolSearch": "query",
}

ANSI = {"dim": "2", "bold": "1", "red": "31", "green": "32", "yellow": "33", "blue": "34",
        "magenta": "35", "cyan": "36"}
_COMMAND_RE = re.compile(r"<command-name>\s*(.*?)\s*</command-name>.*?"
                         r"(?:<command-args>(.*?)</command-args>)?", re.S)
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# The label of each type that is not a conversation turn (labels are 10 columns).
TYPE_LABELS = {
    "api-request": "api-call", "api-request-blob": "api-blob", "api-request-shape": "api-shape",
    "atis-latch": "atis", "tools-used": "tools", "cost-state": "cost", "attachment": "attach",
    "file-history-snapshot": "snapshot", "last-prompt": "lastprompt", "progress": "progress",
    "permission-mode": "permission", "mode": "mode", "ai-title": "title", "custom-title": "title",
    "agent-name": "agent", "agent-setting": "agent", "bridge-session": "bridge", "pr-link": "pr",
    "summary": "summary", "queue-operation": "queue",
}
# Tools whose key argument is a path: shortened from the left, to keep the file name.
PATH_TOOLS = frozenset(("Read", "Write", "Edit", "MultiEdit", "NotebookEdit", "NotebookRead", "LS"))
HELD_LINES_MAX = 100                # untimed lines held per file for the time of the next one
PROJECT_NAME_JOIN = 4               # parts of a project folder's name tried as one path component
PROJECT_NAME_MAX_PARTS = 32         # a folder of more parts is not walked (a few stat()s a part)
HOLD_UNTIMED_SECONDS = 0.5          # ... at most this long; then shown without a time


def human_size(size: int) -> str:
    if size < 1024:
        return "%d B" % size
    if size < 1024 * 1024:
        return "%.1f KB" % (size / 1024)
    return "%.1f MB" % (size / (1024 * 1024))


def one_line(text: str) -> str:
    return " ".join(text.split())


def char_width(ch: str) -> int:
    """Terminal columns of one character: 2 for East Asian wide, 0 for combining marks."""
    if ch < "\u0300":
        return 1
    if unicodedata.combining(ch) or ch in "\u200b\u200c\u200d\ufeff":
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    return len(text) if text.isascii() else sum(map(char_width, text))


def fit(text: str, columns: int) -> str:
    """``text`` cut to ``columns`` terminal columns, an ellipsis marking the cut."""
    if (len(text) <= columns and text.isascii()) or display_width(text) <= columns:
        return text
    out, used = [], 0
    for ch in text:
        width = char_width(ch)
        if used + width > columns - 1:
            break
        out.append(ch)
        used += width
    return "".join(out) + "\u2026"


def pad(text: str, columns: int) -> str:
    """``text`` fitted and padded to exactly ``columns`` terminal columns."""
    text = fit(text, columns)
    return text + " " * (columns - display_width(text))


def shorten_path(path: str, columns: int, cwd: Optional[str] = None) -> str:
    """A path within ``columns``, relative to ``cwd`` when inside it, cut from the left:
    the file name is what says what a call touched."""
    if cwd and path.startswith(cwd.rstrip("/") + "/"):
        path = path[len(cwd.rstrip("/")) + 1:]
    if display_width(path) <= columns:
        return path
    tail = path
    while tail and display_width(tail) > columns - 1:
        cut = tail.find("/", 1)
        tail = tail[cut:] if cut > 0 else tail[1:]
    return "\u2026" + tail


@dataclass(frozen=True)
class Columns:
    """The prefix of a line for a terminal width: narrower terminals get a shorter one
    (at 60 columns 35 remain for the text). ``width`` None: a pipe, nothing cut."""
    width: Optional[int]
    time: int = 8                   # HH:MM:SS, or HH:MM when narrow
    project: int = 14               # 0: not shown
    session: int = 15               # session id (8) and /sub-agent id (6)
    label: int = 10

    @classmethod
    def for_width(cls, width: Optional[int]) -> "Columns":
        if width is None or width >= 120:
            return cls(width)
        if width >= 90:
            return cls(width, project=10)
        return cls(width, time=5, project=0, session=7)

    @property
    def prefix(self) -> int:
        return sum(n + 1 for n in (self.time, self.project, self.session, self.label) if n)

    @property
    def room(self) -> Optional[int]:
        """Columns left for the text (at least 10), or None when nothing is cut."""
        return None if self.width is None else max(10, self.width - self.prefix)


def _joins(tokens: List[str]) -> Iterable[str]:
    """Every name ``tokens`` may have been before each "-", "." and "_" became "-"."""
    if len(tokens) == 1:
        yield tokens[0]
        return
    for rest in _joins(tokens[1:]):
        for separator in "-._":
            yield tokens[0] + separator + rest


def project_label(folder: str) -> str:
    """A project folder's name, best effort, until an entry's cwd says it exactly.

    The folder is the cwd with every character but letters and digits made "-",
    which cannot be undone by itself; when that very path exists here, walking
    down it finds the real name (a few dozen stat()s, once per project folder).
    Elsewhere, the last part.
    """
    tokens = folder.split("-")
    if tokens and tokens[0] == "":
        tokens = tokens[1:]             # the root's "/"
    fallback = next((t for t in reversed(tokens) if t), folder or "-")
    if len(tokens) > PROJECT_NAME_MAX_PARTS:    # from a server: bounded, whatever it sends
        return fallback
    path, i = os.sep, 0
    while i < len(tokens):
        for k in range(1, min(PROJECT_NAME_JOIN, len(tokens) - i) + 1):
            name = next((n for n in _joins(tokens[i:i + k]) if os.path.isdir(os.path.join(path, n))), None)
            if name is not None:
                path, i = os.path.join(path, name), i + k
                break
        else:
            return fallback
    return os.path.basename(path) or fallback


class FileView:
    """What the renderer keeps of one transcript file: its project's name (fixed by
    the first cwd seen), the time of its last timed line, and untimed lines waiting
    for the time of the next."""

    def __init__(self, project: str):
        self.project = project
        self.project_fixed = False
        self.cwd: Optional[str] = None
        self.last_time: Optional[datetime] = None
        self.held: List[Tuple[Dict[str, Any], Tuple[str, str, str]]] = []
        self.held_since = 0.0


class EntryText:
    """(label, colour, text) for each entry: what a line says. Remembers the calls,
    so that a result can say which one it answers; paths fit ``room()`` columns."""

    def __init__(self, room: Callable[[], Optional[int]]):
        self.room = room
        self.calls: Dict[str, Tuple[str, str]] = {}     # tool_use id -> (name, key argument)

    def describe(self, entry: Entry, cwd: Optional[str] = None) -> Tuple[str, str, str]:
        """(label, colour, text) for one entry; paths relative to ``cwd`` when inside it."""
        if isinstance(entry, AssistantEntry):
            return self._assistant(entry, cwd)
        if isinstance(entry, UserEntry):
            return self._user(entry, cwd)
        if isinstance(entry, SystemEntry):
            return self._system(entry)
        label = TYPE_LABELS.get(entry.type or "", "")
        if isinstance(entry, SummaryEntry):
            return label, "magenta", entry.summary
        if isinstance(entry, FileHistorySnapshotEntry):
            return label, "dim", "%d tracked file%s" % (
                entry.tracked_files, "" if entry.tracked_files == 1 else "s")
        if isinstance(entry, QueueOperationEntry):
            return label, "dim", ("%s: %s" % (entry.operation, entry.content)).rstrip(": ")
        if isinstance(entry, ProgressEntry):
            data = entry.data
            detail = data.get("hookName") or data.get("agentId") or data.get("command") or ""
            return label, "dim", "%s %s" % (entry.data_type, detail if isinstance(detail, str) else "")
        if isinstance(entry, AttachmentEntry):
            att = entry.attachment
            detail = att.get("hookName") or att.get("prompt") or att.get("filename") or ""
            return label, "dim", "%s %s" % (entry.attachment_type, _text_of(detail))
        if isinstance(entry, MetadataEntry):
            if entry.type == "last-prompt":
                return label, "dim", "last prompt, offered on resume: %s" % entry.value
            return label or "meta", "dim", entry.value
        if label:
            return label, "dim", self._bookkeeping_text(entry)
        keys = ", ".join(sorted(k for k in entry.raw if k != "type"))[:200]
        return "unknown", "dim", "%s (fields: %s)" % (entry.type or "no type", keys)

    @staticmethod
    def _bookkeeping_text(entry: Entry) -> str:
        raw = entry.raw
        if entry.type == "cost-state":
            cost = raw.get("totalCostUSD")
            lines = (raw.get("totalLinesAdded"), raw.get("totalLinesRemoved"))
            text = "$%.4f so far" % cost if isinstance(cost, (int, float)) else "cost so far"
            if all(isinstance(n, int) for n in lines):
                text += ", lines +%d -%d" % lines
            return text
        if entry.type == "tools-used" and isinstance(raw.get("tools"), list):
            return ", ".join(str(t) for t in raw["tools"])
        for key in ("querySource", "shapeHash", "hash", "atis"):
            if isinstance(raw.get(key), str):
                return "%s %s" % (key, raw[key] or "(empty)")
        return entry.type or ""

    def _assistant(self, entry: AssistantEntry, cwd: Optional[str]) -> Tuple[str, str, str]:
        if entry.is_api_error:
            return "api-error", "red", " ".join(b.text for b in entry.message.content
                                                 if isinstance(b, TextBlock))
        parts: List[Tuple[str, str, str]] = []
        for block in entry.message.content:
            if isinstance(block, TextBlock):
                parts.append(("claude", "blue", block.text))
            elif isinstance(block, ThinkingBlock):
                parts.append(("thinking", "dim", "\u2026 %s" % block.thinking if block.thinking
                              else "\u2026 (thinking)"))
            elif isinstance(block, RedactedThinkingBlock):
                parts.append(("thinking", "dim", "\u2026 (redacted)"))
            elif isinstance(block, ToolUseBlock):
                call = self._remember_call(block, cwd)
                parts.append(("tool", "yellow", ("%s %s" % call).rstrip()))
            else:
                parts.append(("claude", "blue", "[%s]" % (block.type or "block")))
        if not parts:
            return "claude", "blue", ""
        return parts[0][0], parts[0][1], "  \u00b7  ".join(p[2] for p in parts)

    def _remember_call(self, block: ToolUseBlock, cwd: Optional[str]) -> Tuple[str, str]:
        argument = self.key_argument(block)
        if block.name in PATH_TOOLS:
            room = self.room()
            argument = shorten_path(argument, (room or 10 ** 6) - len(block.name) - 1, cwd)
        if len(self.calls) >= TOOL_NAME_MEMORY:
            del self.calls[next(iter(self.calls))]
        self.calls[block.id] = (block.name, argument)
        return block.name, argument

    @staticmethod
    def key_argument(block: ToolUseBlock) -> str:
        tool_input = block.input
        if block.name == "TodoWrite" and isinstance(tool_input.get("todos"), list):
            return "%d todos" % len(tool_input["todos"])
        value = tool_input.get(TOOL_KEY_ARGUMENTS.get(block.name, ""))
        if not isinstance(value, str):
            value = next((v for v in tool_input.values() if isinstance(v, str)), "")
        return value

    def _answered_call(self, block: ToolResultBlock, entry: UserEntry, cwd: Optional[str]) -> str:
        """Which call a result answers: its tool and key argument, when the call was seen,
        else what the result itself says (--type user), else the call's short id."""
        known = self.calls.get(block.tool_use_id)
        if known is not None:
            name, argument = known
            room = self.room()
            if name in PATH_TOOLS and room is not None:
                argument = shorten_path(argument, max(16, room // 2), cwd)
            return ("%s %s" % (name, fit(one_line(argument), 40))).rstrip()
        result = entry.raw.get("toolUseResult")
        result = result if isinstance(result, dict) else {}
        file_info = result.get("file") if isinstance(result.get("file"), dict) else {}
        path = file_info.get("filePath") or result.get("filePath")
        if isinstance(path, str):
            name = "Read" if file_info else ("Write" if "content" in result else "Edit")
            return "%s %s" % (name, shorten_path(path, 30, cwd))
        if "stdout" in result or "stderr" in result:
            return "Bash"
        if "agentId" in result:
            return "Agent %s" % fit(one_line(str(result.get("description") or "")), 30)
        return "call \u2026%s" % block.tool_use_id[-6:] if block.tool_use_id else "tool"

    def _user(self, entry: UserEntry, cwd: Optional[str]) -> Tuple[str, str, str]:
        parts: List[str] = []
        for block in entry.message.content:
            if isinstance(block, ToolResultBlock):
                state, style = ("error", "red") if block.is_error else ("ok", "green")
                first = block.text.strip().split("\n", 1)[0] if block.text else ""
                return "result", style, "%s %s %s  %s" % (
                    self._answered_call(block, entry, cwd), state, human_size(block.size), first)
            if isinstance(block, TextBlock):
                parts.append(self._prompt_text(block.text))
            elif isinstance(block, (ImageBlock, DocumentBlock)):
                parts.append("[%s %s %s]" % (block.type, block.media_type, human_size(block.size * 3 // 4)))
        text = "  ".join(p for p in parts if p)
        if entry.is_compact_summary:
            return "compacted", "magenta", text
        if entry.is_meta:
            return "meta", "dim", text
        if entry.is_sidechain:
            return "task", "green", text        # 1.0.x: the prompt a sub-agent was given
        return "user", "green", text

    @staticmethod
    def _prompt_text(text: str) -> str:
        command = _COMMAND_RE.search(text)
        if command:
            return ("%s %s" % (command.group(1), command.group(2) or "")).strip()
        return _ANSI_RE.sub("", text)

    @staticmethod
    def _system(entry: SystemEntry) -> Tuple[str, str, str]:
        raw = entry.raw
        style = "red" if entry.level == "error" else "yellow" if entry.level == "warning" else "dim"
        subtype = entry.subtype or ""
        if subtype == "turn_duration" and isinstance(raw.get("durationMs"), (int, float)):
            return "system", style, "turn took %.1fs" % (raw["durationMs"] / 1000)
        if subtype == "compact_boundary":
            meta = raw.get("compactMetadata") if isinstance(raw.get("compactMetadata"), dict) else {}
            return "system", "magenta", "conversation compacted (%s, %s tokens before)" % (
                meta.get("trigger", "?"), meta.get("preTokens", "?"))
        if subtype == "stop_hook_summary":
            return "system", style, "stop hooks ran: %s" % raw.get("hookCount", "?")
        if subtype == "away_summary":
            return "away", "dim", _ANSI_RE.sub("", entry.content or "")
        text = _ANSI_RE.sub("", entry.content or "")    # hook lines carry ANSI colours
        return "system", style, ("%s: %s" % (subtype, text) if subtype else text)


# --- live status and usage: what the client knows of each session ---------------

# A status line's colour by state; a dialog the user opened is dim (not Claude asking).
STATE_STYLES = {"working": "yellow", "waiting": "red", "idle": "green", "shell": "green", "ended": "dim"}
DIALOG_OPEN = "dialog open"         # waiting_for of the user's own slash-command dialog (/model)
StateSeen = Tuple[str, Optional[str]]     # (state, waiting_for)


def _last_part(path: Any) -> Optional[str]:
    """A working directory's last part, which names the project on every line, or None."""
    if not isinstance(path, str) or not path.strip("\\/"):
        return None
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]


def usage_cost(usage: Dict[str, Any]) -> str:
    """'$0.42', 'cost unknown' when no model of the session has a price, and the
    unpriced models named when only some have one (their tokens are not in the sum)."""
    cost = usage.get("cost_usd")
    if not isinstance(cost, (int, float)) or isinstance(cost, bool) or not math.isfinite(cost):
        cost = 0.0                  # 1e999 parses as inf: a number from a peer is checked
    unpriced = usage.get("unpriced_models")
    names = ", ".join(str(m) for m in unpriced[:3]) if isinstance(unpriced, list) else ""
    if names and not cost:
        return "cost unknown (%s)" % names
    return "$%.2f" % cost + (" + cost unknown (%s)" % names if names else "")


def known_cost(usage: Optional[Dict[str, Any]]) -> Optional[float]:
    """The session's cost in USD for a program, or None when it is not known: no usage yet,
    or none of its models has a price (a 0 there would read as free)."""
    if usage is None:
        return None
    cost = usage.get("cost_usd")
    if not isinstance(cost, (int, float)) or isinstance(cost, bool) or not math.isfinite(cost):
        return None
    return None if usage.get("unpriced_models") and not cost else cost


def usage_text(usage: Dict[str, Any]) -> str:
    """A ``usage`` message in a few words: tokens in, out, cache written and read, cost."""
    text = "{:,} in, {:,} out, cache {:,} written, {:,} read, ".format(
        *(_count(usage.get(kind)) for kind in TOKEN_KINDS)) + usage_cost(usage)
    return text + (" (so far: older lines still being counted)" if usage.get("complete") is False else "")


class SessionBoard:
    """The state last reported of each session and its last usage, by host and session
    id, bounded. After each subscribe the server tells every live session's state
    again (a reconnect, a restarted server): a state equal to the one reported is
    no change, and is neither shown nor rung again."""

    def __init__(self, memory: int = TOOL_NAME_MEMORY):
        self.memory = memory
        self.states: Dict[Tuple[str, str], StateSeen] = {}
        self.usages: Dict[Tuple[str, str], Dict[str, Any]] = {}

    @staticmethod
    def key(msg: Dict[str, Any]) -> Tuple[str, str]:
        return str(msg.get("host") or ""), str(msg.get("session") or "")

    def _keep(self, table: Dict[Tuple[str, str], Any], key: Tuple[str, str], value: Any) -> None:
        table.pop(key, None)            # the newest last: the oldest goes first when full
        if len(table) >= self.memory:
            del table[next(iter(table))]
        table[key] = value

    def usage(self, msg: Dict[str, Any]) -> None:
        self._keep(self.usages, self.key(msg), msg)

    def usage_of(self, msg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return self.usages.get(self.key(msg))

    def change(self, msg: Dict[str, Any]) -> Optional[Tuple[Optional[StateSeen], StateSeen]]:
        """(state reported before or None, state now) if ``msg`` is news, else None."""
        waiting_for = msg.get("waiting_for")
        now = (str(msg.get("state")), waiting_for if isinstance(waiting_for, str) else None)
        key = self.key(msg)
        before = self.states.get(key)
        if before == now:
            return None
        self._keep(self.states, key, now)
        return before, now


def alert_event(before: Optional[StateSeen], now: StateSeen) -> Optional[str]:
    """'waiting' when a session starts waiting for the user (a dialog the user opened
    is not Claude asking), 'idle' when it finishes a turn (working or shell, then
    idle; a denied prompt is the user's own doing), else None."""
    state, waiting_for = now
    if state == "waiting":
        return None if waiting_for == DIALOG_OPEN else "waiting"
    if state == "idle" and before is not None and before[0] in ("working", "shell"):
        return "idle"
    return None


def status_text(state: str, waiting_for: Optional[str], usage: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    """(colour, text) of a status line: the state, what it waits for, the usage at idle."""
    style = STATE_STYLES.get(state, "dim")
    if state == "waiting":
        return ("dim" if waiting_for == DIALOG_OPEN else style), "waiting: %s" % (waiting_for or "for you")
    if state == "shell":
        return style, "shell (idle; a background shell runs, Claude goes on when it ends)"
    if state == "idle" and usage is not None:
        return style, "idle  \u00b7  " + usage_text(usage)
    return style, state


class Renderer:
    """Turns server messages into one readable line each, for a terminal.

    ``render`` draws one message now; ``feed`` is the stream: an untimed line in a
    file with no timed line yet waits (at most HOLD_UNTIMED_SECONDS) for the
    time of the next, so times never come from the wall clock and never run back.
    """

    def __init__(self, color: bool = False, width: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.color = color
        self.clock = clock
        self.columns = Columns.for_width(width)
        self.text = EntryText(lambda: self.columns.room)
        self.files: Dict[str, FileView] = {}            # path -> its view, bounded
        self.project_names: Dict[str, str] = {}         # project folder -> name
        self.settings: Dict[Tuple[str, str], str] = {}  # (session, type) -> value last shown
        self.board = SessionBoard()                     # each session's state last shown, its usage

    @property
    def width(self) -> Optional[int]:
        return self.columns.width

    def resize(self, width: Optional[int]) -> None:
        self.columns = Columns.for_width(width)

    def paint(self, style: str, text: str) -> str:
        return "\x1b[%sm%s\x1b[0m" % (ANSI[style], text) if self.color and text.strip() else text

    # --- the stream -------------------------------------------------------------

    def feed(self, msg: Dict[str, Any]) -> List[str]:
        """The lines to write for one message, held ones of its file first."""
        if msg.get("kind") in ("status", "usage"):
            line = self._status_line(msg)
            return [line] if line is not None else []
        view = self._view(msg)
        described = self._describe_message(msg, view)
        if described is None:
            return []
        when = self._time_of(msg, view)
        if when is None and view.last_time is None and msg.get("kind") == "entry":
            if not view.held:
                view.held_since = self.clock()
            view.held.append((msg, described))
            return [] if len(view.held) <= HELD_LINES_MAX else self._release(view, None)
        out = self._release(view, when) if view.held else []
        out.append(self._line(msg, view, when or view.last_time, described))
        return out

    def flush(self, force: bool = False) -> List[str]:
        """Held lines that waited long enough (all with ``force``), without a time."""
        now, out = self.clock(), []
        for view in self.files.values():
            if view.held and (force or now - view.held_since >= HOLD_UNTIMED_SECONDS):
                out += self._release(view, None)
        return out

    @property
    def holding(self) -> bool:
        return any(view.held for view in self.files.values())

    def _release(self, view: FileView, when: Optional[datetime]) -> List[str]:
        held, view.held = view.held, []
        return [self._line(msg, view, when, described) for msg, described in held]

    def render(self, msg: Dict[str, Any]) -> Optional[str]:
        """One message as one line, now (an untimed first line shows no time)."""
        if msg.get("kind") in ("status", "usage"):
            return self._status_line(msg)
        view = self._view(msg)
        described = self._describe_message(msg, view)
        if described is None:
            return None
        return self._line(msg, view, self._time_of(msg, view) or view.last_time, described)

    # --- per file -----------------------------------------------------------------

    def _view(self, msg: Dict[str, Any]) -> FileView:
        """The message's file, its project named by the first cwd seen in it."""
        path = str(msg.get("path"))
        view = self.files.get(path)
        if view is None:
            if len(self.files) >= TOOL_NAME_MEMORY:
                del self.files[next(iter(self.files))]
            view = self.files[path] = FileView(self._folder_name(str(msg.get("project") or "-")))
        entry = msg.get("entry")
        cwd = entry.get("cwd") if isinstance(entry, dict) else None
        name = _last_part(cwd)
        if name is not None and not view.project_fixed:
            # The first cwd names the project for good; a later `cd` does not rename it.
            view.project = name
            view.project_fixed = True
            view.cwd = cwd
            self.project_names[str(msg.get("project") or "-")] = view.project
        return view

    def _folder_name(self, folder: str) -> str:
        name = self.project_names.get(folder)
        if name is None:
            if len(self.project_names) >= TOOL_NAME_MEMORY:
                del self.project_names[next(iter(self.project_names))]
            name = self.project_names[folder] = project_label(folder)
        return name

    def _status_line(self, msg: Dict[str, Any]) -> Optional[str]:
        """A session's new state as a line in the entries' columns, timed when it began;
        None for a usage message (kept for the next idle) and for a state already shown."""
        if msg.get("kind") == "usage":
            self.board.usage(msg)
            return None
        change = self.board.change(msg)
        if change is None:
            return None
        state, waiting_for = change[1]
        style, text = status_text(state, waiting_for, self.board.usage_of(msg))
        path = msg.get("path")              # its transcript's name for the project, once there is one
        view = self.files.get(path) if isinstance(path, str) else None
        name = view.project if view is not None else (
            _last_part(msg.get("cwd")) or self._folder_name(str(msg.get("project") or "-")))
        return self._line(msg, FileView(name), parse_timestamp(msg.get("since")), ("status", style, text))

    @staticmethod
    def _time_of(msg: Dict[str, Any], view: FileView) -> Optional[datetime]:
        """The line's own time (a snapshot's inside it); remembered for untimed ones."""
        raw = msg.get("entry")
        if msg.get("kind") != "entry" or not isinstance(raw, dict):
            return None
        when = parse_timestamp(raw.get("timestamp"))
        if when is None and raw.get("type") == "file-history-snapshot":
            when = parse_timestamp(_dict(raw, "snapshot").get("timestamp"))
        if when is not None:
            view.last_time = when
        return when

    # --- one line -----------------------------------------------------------------

    def _describe_message(self, msg: Dict[str, Any], view: FileView) -> Optional[Tuple[str, str, str]]:
        kind = msg.get("kind")
        if kind == "entry" and isinstance(msg.get("entry"), dict):
            entry = parse_entry(msg["entry"])
            if entry.type in SETTING_TYPES and not self._setting_changed(msg, entry):
                return None
            return self.text.describe(entry, view.cwd)
        name = str(msg.get("path", "")).rsplit("/", 1)[-1]
        if kind == "malformed":
            return "malformed", "red", "%s byte %s: %s  %s" % (
                name, msg.get("offset"), msg.get("reason"), msg.get("excerpt") or "")
        if kind == "reset":
            return "reset", "red", "%s was %s; reading it again from the start" % (name, msg.get("reason"))
        if kind == "gap":
            return "gap", "red", "%s: skipped from byte %s: %s" % (name, msg.get("offset"), msg.get("reason"))
        return None

    def _setting_changed(self, msg: Dict[str, Any], entry: Entry) -> bool:
        """A mode is written again every turn: only a change is news (the first is one)."""
        key = (str(msg.get("session") or msg.get("path")), entry.type)
        value = entry.value if isinstance(entry, MetadataEntry) else ""
        if self.settings.get(key) == value:
            return False
        if len(self.settings) >= TOOL_NAME_MEMORY:
            del self.settings[next(iter(self.settings))]
        self.settings[key] = value
        return True

    def _line(self, msg: Dict[str, Any], view: FileView, when: Optional[datetime],
              described: Tuple[str, str, str]) -> str:
        label, style, text = described
        cols = self.columns
        stamp = ""
        if when is not None:
            try:
                local = when.astimezone()
            except (OverflowError, ValueError, OSError):    # year 1 or 9999 in this time zone
                local = when
            stamp = local.strftime("%H:%M:%S" if cols.time == 8 else "%H:%M")
        # Every piece below can come from a transcript or the server: shown, never obeyed.
        session = visible(str(msg.get("session") or "-"))
        agent = visible(str(msg.get("agent") or ""))
        if cols.session >= 15:
            session = session[:8] + ("/" + agent[:6] if agent else "")
        elif agent:
            session = "\u21b3" + agent[:cols.session - 1]      # a sub-agent's line
        else:
            session = session[:cols.session]
        pieces = [self.paint("dim", pad(stamp, cols.time))]
        if cols.project:
            pieces.append(self.paint("cyan", pad(visible(view.project), cols.project)))
        pieces.append(self.paint("dim", pad(session, cols.session)))
        pieces.append(self.paint(style, pad(visible(label), cols.label)))
        text = visible(one_line(text))
        pieces.append(text if cols.room is None else fit(text, cols.room))
        return " ".join(pieces)


def notice_text(text: str, limit: int = NOTIFY_TEXT_MAX) -> str:
    """Text from the registry made fit to go inside an OSC escape: on one line, every
    control character shown (so no ESC, BEL, ST or C1 inside), no Unicode format
    characters (bidi overrides), no ';' (OSC 777 splits its fields on it), cut."""
    text = visible(one_line(text)).replace(";", ",")
    return fit("".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cs")), limit)


def ring_bytes(title: str, body: str) -> bytes:
    """The terminal bell and a desktop notification, as OSC 9 (iTerm2, WezTerm, kitty,
    Windows Terminal) and OSC 777 (urxvt, foot, VTE) say it; a terminal ignores the
    escape it does not know. OSC 9's text starts with our title, never a digit
    (ConEmu reads '9;1'... as its own commands)."""
    title, body = notice_text(title), notice_text(body)
    return ("\a\x1b]9;%s: %s\a\x1b]777;notify;%s;%s\a" % (title, body, title, body)).encode("utf-8", "replace")


def _env_value(value: Any) -> str:
    """A value for the command's environment: as it came, bounded; but a NUL cannot be
    passed, and a lone surrogate (JSON allows "\\ud800") cannot be encoded: a '?'."""
    if value is None or isinstance(value, (dict, list)):
        return ""
    text = str(value).replace("\x00", "")[:NOTIFY_ENV_MAX]
    return text.encode("utf-8", "replace").decode("utf-8")


class Alerts:
    """--notify and --notify-command: when a session starts waiting for the user or
    finishes a turn, once per change (its own SessionBoard: not again for a
    snapshot after a reconnect), ring the terminal and run the user's command.

    The command is argv from shlex.split, run without a shell, with the details
    in CLAUDE_STREAM_* variables (never in its arguments); it is started and not
    waited for, finished ones are reaped by a timer, at most
    ``notify_commands_max`` run at once, and one that cannot start is a warning.
    """

    TITLES = {"waiting": "Claude needs you", "idle": "Claude finished"}

    def __init__(self, loop: EventLoop, log: Log, limits: Limits, bell: bool,
                 command: Optional[List[str]]):
        self.loop, self.log, self.limits = loop, log, limits
        self.bell, self.command = bell, command
        self.board = SessionBoard()
        self.running: List["subprocess.Popen[bytes]"] = []
        self._reap_timer: Optional[Timer] = None

    def usage(self, msg: Dict[str, Any]) -> None:
        self.board.usage(msg)

    def status(self, msg: Dict[str, Any], server: str) -> bytes:
        """What to write to the terminal for ``msg`` (b"" for nothing); its command started."""
        change = self.board.change(msg)
        event = alert_event(*change) if change is not None else None
        if event is None:
            return b""
        who = next((v for v in (msg.get("name"), _last_part(msg.get("cwd"))) if isinstance(v, str) and v),
                   str(msg.get("session") or "?")[:8])
        usage = self.board.usage_of(msg)
        if event == "waiting":
            body = "%s: %s" % (who, msg.get("waiting_for") or "waiting for you")
        else:
            body = "%s: your turn" % who + (", %s" % usage_cost(usage) if usage is not None else "")
        if self.command is not None:
            self._run(msg, event, body, usage, server)
        return ring_bytes(self.TITLES[event], body) if self.bell else b""

    def _run(self, msg: Dict[str, Any], event: str, body: str, usage: Optional[Dict[str, Any]],
             server: str) -> None:
        assert self.command is not None
        self.reap()
        if len(self.running) >= self.limits.notify_commands_max:
            self.log.warn("--notify-command: %d still running; not run for this %s"
                          % (len(self.running), event), key="notify-command")
            return
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}    # it needs no token of ours
        details = {"EVENT": event, "STATE": msg.get("state"), "WAITING_FOR": msg.get("waiting_for"),
                   "SESSION": msg.get("session"), "PROJECT": msg.get("project"), "NAME": msg.get("name"),
                   "CWD": msg.get("cwd"), "SINCE": msg.get("since"), "PID": msg.get("pid"),
                   "TRANSCRIPT": msg.get("path"), "HOST": msg.get("host"), "SERVER": server,
                   "TEXT": notice_text("%s: %s" % (self.TITLES[event], body)),     # as the desktop shows it
                   "COST_USD": known_cost(usage)}
        env.update(("CLAUDE_STREAM_" + k, _env_value(v)) for k, v in details.items())
        import subprocess
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    env=env, close_fds=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.log.warn("--notify-command: cannot run %s: %s" % (
                self.command[0], getattr(exc, "strerror", None) or exc), key="notify-command")
            return
        self.running.append(proc)
        if self._reap_timer is None:
            self._reap_timer = self.loop.call_later(self.limits.notify_reap_interval, self._reap_later)

    def reap(self) -> None:
        """Forget the commands that finished (poll() never blocks), so none stays a zombie."""
        self.running = [proc for proc in self.running if proc.poll() is None]

    def _reap_later(self) -> None:
        self._reap_timer = None
        self.reap()
        if self.running:
            self._reap_timer = self.loop.call_later(self.limits.notify_reap_interval, self._reap_later)


def absolute_since(since: Optional[str], server_time: Any) -> Optional[str]:
    """--since as an ISO time by the server's clock ("all" and None unchanged)."""
    when = parse_timestamp(server_time)
    if since is None or since.strip().lower() == "all" or when is None:
        return since
    start = parse_since(since, when.timestamp())
    if start is None or start == float("-inf"):
        return "all"
    return datetime.fromtimestamp(start, timezone.utc).isoformat().replace("+00:00", "Z")


_URL_TOKEN_RE = re.compile(r"([?&]token=)[^&#]*")


def shown_url(url: str) -> str:
    """A server's URL as logs and the state file name it: a token in its query hidden."""
    return _URL_TOKEN_RE.sub("\\1\u2026", url)


def parse_ws_url(text: str) -> Tuple[str, int, str, bool]:
    """(host, port, resource, secure) of a ws:// or wss:// URL.

    ``HOST[:PORT]`` alone means ws://HOST:8765/; without a port, ws:// means
    80 and wss:// 443, as RFC 6455 says. The page's URL, as ``serve`` prints it
    (http:// or https://, its token included), is its WebSocket's: the same place.
    """
    given = text
    if "://" not in text:
        text = "ws://" + text + ("" if re.search(r":[^:\]]*$", text) else ":%d" % DEFAULT_PORT)
    elif text[:7].lower() == "http://" or text[:8].lower() == "https://":
        text = "ws" + text[4:]
    try:
        parts = urlsplit(text)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError as exc:
        raise UsageError("not a usable URL: %s (%s)" % (given, exc)) from None
    if parts.scheme not in ("ws", "wss"):
        raise UsageError("not a WebSocket URL: %s (expected ws://HOST:PORT/ or wss://)" % text)
    if not parts.hostname:
        raise UsageError("no host in %s" % text)
    resource = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return parts.hostname, port, resource, parts.scheme == "wss"


class ClientLink(WebSocketEndpoint):
    """One server the client follows: connect, handshake, receive, reconnect."""

    side = Side.CLIENT

    def __init__(self, app: "ClientApp", url: str):
        super().__init__(app.loop, app.limits)
        self.app = app
        self.url = shown_url(url)      # what logs say; the request carries the token
        self.host, self.port, self.resource, self.secure = parse_ws_url(url)
        self.failures = 0           # consecutive failed attempts, for the backoff
        self.cursors: Dict[str, int] = {}   # path -> offset of the next line we need
        self.acked: Dict[str, int] = {}     # ... of the lines written out: what --state keeps
        self.epoch: Optional[str] = None    # server time when we first went live
        self.since: Optional[str] = None    # --since, fixed to a server time at the first hello
        self.resuming = False               # not the first connection
        self.duplicates = 0
        self.rejected: Optional[HandshakeError] = None
        self.token_file: Optional[str] = None   # where the token we sent came from, if a file
        self.tls_failure: Optional[BaseException] = None

    def connect(self) -> None:
        self.ws, self.stream, self.rejected, self.lost_reason = None, None, None, None
        self.tls_failure, self.opened = None, False
        open_connection(self.loop, self.host, self.port, self, self._connect_failed,
                        self.app.tls if self.secure else None, self.limits)

    def _connect_failed(self, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ECONNREFUSED:
            reason = "connection refused (is 'claude_stream.py serve' running there?)"
        self.app.link_down(self, "cannot connect to %s: %s" % (self.url, reason), retryable=True)

    def on_connect(self) -> None:
        host_header = self.host if ":" not in self.host else "[%s]" % self.host
        if self.port != 80:
            host_header += ":%d" % self.port
        # hold=1: the server sends only hello until our subscribe (filters, cursors,
        # history) arrives, so nothing slips between connecting and resuming.
        target = self.resource + ("&" if "?" in self.resource else "?") + "hold=1"
        token, self.token_file = self.app.token, None
        if token is None and self.host in LOOPBACK_HOSTS:
            found = find_token_file(self.port)      # a server of ours on this machine
            if found is not None:
                token, self.token_file = found
        headers = [("Authorization", "Bearer " + token)] if token else []
        assert self.ws is not None
        self.ws.send_request(host_header, target, headers)

    def on_handshake_failed(self, error: HandshakeError) -> None:
        self.rejected = error
        if self.stream is not None:
            self.stream.abort()

    def on_message(self, message: Union[TextMessage, BinaryMessage]) -> None:
        self.app.on_message(self, message)

    def _handle_input(self) -> None:
        """The messages of one read, their output written together at the end."""
        self.app.begin_input()
        try:
            super()._handle_input()
        finally:
            self.app.end_input()

    def output_drained(self) -> None:
        exporter = getattr(self.app, "exporter", None)
        if exporter is not None and exporter.paused:
            return                          # the receiver is behind: this link reads nothing yet
        super().output_drained()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if is_tls_error(exc, "SSLError"):
            self.tls_failure = exc
        super().connection_lost(exc)

    def on_closed(self, code: int, reason: str) -> None:
        if is_tls_error(self.tls_failure, "SSLCertVerificationError"):
            self.app.link_down(self, "%s: %s (trust its certificate with --cafile, or skip the "
                                     "check with --insecure)" % (self.url, self.tls_failure.verify_message
                                                                 or self.tls_failure), retryable=False)
        elif self.rejected is not None:
            status = self.rejected.status
            detail = ("the server refused the WebSocket handshake: %s" % self.rejected
                      if status != 101 else "bad handshake answer: %s" % self.rejected)
            if status == 401:
                where = " or ".join(os.path.join(f, "token-%d" % self.port) for f in token_folders())
                if self.app.token is not None:
                    detail = "the server refused the token"
                elif self.token_file is not None:
                    detail = ("the server refused the token in %s (left by an earlier server on "
                              "this port?)" % self.token_file)
                else:
                    detail = ("the server wants its token: pass --token-file FILE or set $%s "
                              "(a server on this machine stores it in %s)" % (TOKEN_ENV, where))
            self.app.link_down(self, "%s: %s" % (self.url, detail), retryable=status in (429, 503))
        elif not self.opened:
            hint = ""
            if self.secure:                 # a plain server answers a TLS hello with nothing, or garbage
                failure = getattr(self.tls_failure, "reason", None) or self.tls_failure
                hint = "; %sa server without --certfile is ws://, not wss://" % (
                    "TLS failed (%s): " % failure if failure else "")
            self.app.link_down(self, "%s: no WebSocket handshake (%s)%s"
                               % (self.url, self.lost_reason or "the connection closed", hint),
                               retryable=True)
        elif code == CloseCode.GOING_AWAY:
            self.app.link_down(self, "%s: the server is going away (%s)" % (self.url, reason or code),
                               retryable=True, clean=True)
        elif code == CloseCode.ABNORMAL:
            self.app.link_down(self, "%s: connection dropped (%s)"
                               % (self.url, reason or "closed without a close frame"), retryable=True)
        else:
            self.app.link_down(self, "%s: connection closed by the server: %d %s"
                               % (self.url, code, reason), retryable=True,
                               clean=code == CloseCode.NORMAL)


# --- OTLP export: client --otlp URL ---------------------------------------------
#
# Each message becomes an OpenTelemetry log record, sent as OTLP/HTTP JSON
# (POST /v1/logs), gzipped. The HTTP status is the acknowledgement: a line's
# cursor (and so --state) moves only once the batch holding it got a 2xx. 429
# and 503 are tried again after Retry-After, other failures with backoff; a 400
# (a record the receiver refuses) is said once and skipped, never tried for
# ever. At least once, and each record carries its dedupe key: host, path, offset.

OTLP_SEVERITY = {"INFO": 9, "ERROR": 17}


def envelope_line(text: str) -> Optional[str]:
    """An ``entry`` message's line, as the server framed it around the line's own text (the
    key's quotes cannot occur inside a JSON string), or None for another framing."""
    at = text.find(',"entry":')
    return text[at + 9:-1] if at >= 0 and text.endswith("}") else None


def reconnect_delay(limits: Limits, failures: int) -> float:
    """Exponential backoff with full jitter, so that restarted servers are not stampeded."""
    delay = min(limits.reconnect_max, limits.reconnect_min * 2 ** min(failures, 64))
    return delay / 2 + random.random() * delay / 2


def otlp_url(url: str) -> Tuple[str, int, str, bool]:
    """(host, port, path, tls) of a receiver: URL/v1/logs, or URL itself if it ends so."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL is needed, not %r" % url)
    path = parts.path.rstrip("/")
    path = path if path.endswith("/v1/logs") else path + "/v1/logs"
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), path, parts.scheme == "https"


def _attribute(key: str, value: Any) -> Dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": str(value)}}


def otlp_record(msg: Dict[str, Any], text: str, observed_ns: int, limit: int) -> Dict[str, Any]:
    """One message as a LogRecord: the line's own text as its body (cut at ``limit`` bytes),
    Claude Code's names as attributes, ``session.id`` as Claude Code's own telemetry says it."""
    kind = msg.get("kind")
    entry = msg.get("entry") if isinstance(msg.get("entry"), dict) else {}
    body = (envelope_line(text) or json.dumps(entry)) if kind == "entry" else text
    attributes = [_attribute("claude.kind", kind)]
    for key, value in (("session.id", msg.get("session")), ("claude.uuid", entry.get("uuid")),
                       ("claude.type", entry.get("type") if kind == "entry" else kind),
                       ("claude.agent_id", msg.get("agent")), ("claude.project", msg.get("project")),
                       ("claude.path", msg.get("path")), ("claude.offset", msg.get("offset"))):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            attributes.append(_attribute(key, value))
    if kind == "status":
        attributes.append(_attribute("event.name", "claude.status"))
        attributes.append(_attribute("claude.state", msg.get("state") or ""))
    data = body.encode("utf-8", "replace")
    if len(data) > limit:
        cut = data[:limit].decode("utf-8", "ignore")
        attributes.append(_attribute("claude.truncated_bytes", len(data) - len(cut.encode("utf-8"))))
        body = cut
    error = kind == "malformed" or entry.get("isApiErrorMessage") is True or (
        entry.get("type") == "system" and entry.get("level") == "error")
    when = parse_timestamp(entry.get("timestamp") if kind == "entry" else msg.get("since"))
    severity = "ERROR" if error else "INFO"
    return {"timeUnixNano": str(int(when.timestamp() * 1e9) if when is not None else observed_ns),
            "observedTimeUnixNano": str(observed_ns), "severityNumber": OTLP_SEVERITY[severity],
            "severityText": severity, "body": {"stringValue": body}, "attributes": attributes}


class HttpPost(Protocol):
    """One POST on the loop, its answer's status and Retry-After, then close."""

    def __init__(self, request: bytes, done: Callable[[int, Optional[str], str], None]):
        self.request, self.done = request, done
        self.reader = HeadReader()
        self.stream: Optional[Stream] = None
        self.finished = False

    def connection_made(self, stream: "Stream") -> None:
        self.stream = stream
        stream.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            head = self.reader.feed(data)
        except HandshakeError:
            head = (b"HTTP/1.1 502 bad answer", b"")
        if head is None:
            return
        try:
            response = parse_head(head[0], request=False)
        except HandshakeError as exc:
            self._finish(502, None, "a bad answer (%s)" % exc)
            return
        self._finish(int(response.start[1]), response.get("Retry-After"), response.start[2])

    def _finish(self, status: int, retry_after: Optional[str], reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.done(status, retry_after, reason)
        if self.stream is not None:
            self.stream.abort()

    def eof_received(self) -> None:
        self._finish(0, None, "the receiver closed the connection without an answer")

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._finish(0, None, "connection lost: %s" % (exc or "closed"))


class OtlpExporter:
    """Batches of records to an OTLP/HTTP receiver; a line's cursor moves on a 2xx only.

    Batched by bytes (``otlp_batch_bytes``, well under the Collector's 20 MiB) and by
    time (``otlp_max_delay``); one request at a time. While more than
    ``otlp_pending_max`` bytes wait, the links stop reading (TCP holds the server
    back, and it catches this client up from disk later): memory stays bounded.
    """

    def __init__(self, app: "ClientApp", url: str, headers: List[Tuple[str, str]],
                 tls: Optional["ssl.SSLContext"]):
        self.app, self.loop, self.log, self.limits = app, app.loop, app.log, app.limits
        self.host, self.port, self.path, secure = otlp_url(url)
        self.headers, self.tls = headers, tls if secure else None
        self.pending: List[Tuple[Optional[str], bytes, Any, Optional[str], Optional[int]]] = []
        self.pending_bytes = 0
        self.batch: List[Tuple[Optional[str], bytes, Any, Optional[str], Optional[int]]] = []
        self.failures = 0
        self.refused: Set[str] = set()  # bodies of 400s said once
        self._timer: Optional[Timer] = None
        self.in_flight = False
        self.retrying = False           # a failed batch waits for its retry: nothing is sent before
        self.paused = False

    def add(self, link: Any, host: Optional[str], msg: Dict[str, Any], text: str) -> None:
        record = otlp_record(msg, text, time.time_ns(), self.limits.otlp_line_limit)
        data = _json(record)
        path, after = msg.get("path"), msg.get("next")
        self.pending.append((host, data, link, path if isinstance(path, str) else None,
                             after if isinstance(after, int) else None))
        self.pending_bytes += len(data)
        if self.pending_bytes >= self.limits.otlp_batch_bytes:
            self._send()
        elif self._timer is None and not self.in_flight:
            self._timer = self.loop.call_later(self.limits.otlp_max_delay, self._send)
        self._backpressure()

    def flush(self) -> None:
        self._send()

    def _retry(self) -> None:
        self._timer, self.retrying = None, False
        self._send()

    def _backpressure(self) -> None:
        """Past ``otlp_pending_max`` waiting, no link reads (a link that connected again too);
        under half of it, they read again."""
        if self.pending_bytes > self.limits.otlp_pending_max:
            self.paused = True
        elif self.pending_bytes <= self.limits.otlp_pending_max // 2:
            self.paused = False
        for link in self.app.links:
            stream = link.stream
            if stream is not None and not stream.closed and stream.reading_paused != self.paused:
                (stream.pause_reading if self.paused else stream.resume_reading)()

    def _send(self) -> None:
        if self.in_flight or self.retrying or not (self.pending or self.batch):
            return                          # one request at a time; a Retry-After is kept
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.batch:                  # a new batch; a failed one is sent again as it was
            size, count = 0, 0
            for item in self.pending:
                if count and size + len(item[1]) > self.limits.otlp_batch_bytes:
                    break
                size, count = size + len(item[1]), count + 1
            self.batch, self.pending = self.pending[:count], self.pending[count:]
            self.pending_bytes -= size
        import gzip
        body = gzip.compress(self._body(self.batch), 6)
        head = ["POST %s HTTP/1.1" % self.path, "Host: %s:%d" % (self.host, self.port),
                "Content-Type: application/json", "Content-Encoding: gzip",
                "Content-Length: %d" % len(body), "Connection: close"]
        head += ["%s: %s" % (k, v) for k, v in self.headers]
        self.in_flight = True
        post = HttpPost(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body, self._answered)
        open_connection(self.loop, self.host, self.port, post, lambda exc: self._answered(0, None, str(exc)),
                        self.tls, self.limits)

    def _body(self, batch: List[Tuple[Optional[str], bytes, Any, Optional[str], Optional[int]]]) -> bytes:
        by_host: Dict[Optional[str], List[bytes]] = {}
        for host, data, _, _, _ in batch:
            by_host.setdefault(host, []).append(data)
        scope = b'{"scope":{"name":"claude_stream","version":"%s"},"logRecords":[' % __version__.encode()
        parts = []
        for host, records in by_host.items():
            resource = [_attribute("service.name", "claude-code")] + (
                [_attribute("host.name", host)] if host else [])
            parts.append(b'{"resource":{"attributes":' + _json(resource) + b'},"scopeLogs":[' + scope
                         + b",".join(records) + b"]}]}")
        return b'{"resourceLogs":[' + b",".join(parts) + b"]}"

    def _answered(self, status: int, retry_after: Optional[str], reason: str) -> None:
        self.in_flight = False
        if 200 <= status < 300 or status == 400:
            if status == 400 and reason not in self.refused:
                self.refused.add(reason)
                self.log.warn("--otlp: the receiver refused %d records (400 %s); skipped"
                              % (len(self.batch), reason), key="otlp")
            for _, _, link, path, after in self.batch:   # acknowledged: the cursors move on
                if link is not None and path is not None and after is not None:
                    link.acked[path] = max(link.acked.get(path, 0), after)
            self.batch, self.failures = [], 0
            self.app._state_changed()
            self._backpressure()
            if self.pending:
                self._send()
            return
        self.failures += 1
        delay = reconnect_delay(self.limits, self.failures)
        if status in (429, 503) and retry_after and retry_after.strip().isdigit():
            delay = min(float(retry_after.strip()), self.limits.otlp_retry_after_max)
        self.log.warn("--otlp: %s; trying again in %.1fs" % (
            "HTTP %d %s" % (status, reason) if status else reason, delay), key="otlp")
        self.retrying = True
        self._timer = self.loop.call_later(delay, self._retry)


class ClientState:
    """``client --state FILE``: each server's cursors of what was written to stdout, kept
    across runs, so that a pipeline restarted (by systemd, say) resumes where its output
    stopped. Written to a new file then renamed over FILE (never half written), mode
    0600 (it names every file), at most every ``state_save_interval`` and on exit."""

    VERSION = 1

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.saved: Dict[str, Any] = {}
        try:
            with open_regular(self.path, follow=True) as fh:
                data = fh.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return                          # the first run: nothing to resume
        if len(data) > MAX_STATE_BYTES:
            raise ValueError("larger than %d MiB" % (MAX_STATE_BYTES >> 20))
        obj = json.loads(data)
        links = obj.get("links") if isinstance(obj, dict) and obj.get("version") == self.VERSION else None
        if not isinstance(links, dict) or not all(
                isinstance(v, dict) and _offsets(v.get("cursors")) for v in links.values()):
            raise ValueError("not a state file of this client (version %d)" % self.VERSION)
        self.saved = links

    def restore(self, links: List["ClientLink"]) -> None:
        """Each link's cursors and first-connection time, as the last run left them."""
        for link in links:
            saved = self.saved.get(link.url)
            if saved is None:
                continue
            link.cursors = dict(saved["cursors"])
            link.acked = dict(saved["cursors"])
            epoch, since = saved.get("epoch"), saved.get("since")
            link.epoch = epoch if isinstance(epoch, str) else None
            link.since = since if isinstance(since, str) else None

    def save(self, links: List["ClientLink"], log: Log) -> None:
        for link in links:
            self.saved[link.url] = {"cursors": dict(link.acked), "epoch": link.epoch, "since": link.since}
        data = json.dumps({"version": self.VERSION, "links": self.saved}, separators=(",", ":")).encode()
        temporary = "%s.%d.tmp" % (self.path, os.getpid())
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warn("--state: cannot write %s: %s" % (self.path, exc.strerror or exc), key="state")


_C1_OR_DEL = re.compile(b"\x7f|\xc2[\x80-\x9f]")     # DEL, and U+0080-U+009F in UTF-8


def escape_c1(data: bytes) -> bytes:
    """JSON text with raw DEL and C1 controls as \\u escapes: the same JSON (they can
    only be in its strings), and nothing a terminal could take for a control."""
    if data.find(b"\x7f") < 0 and data.find(b"\xc2") < 0:
        return data
    return _C1_OR_DEL.sub(lambda m: b"\\u%04x" % m.group()[-1], data)


class ClientApp:
    """The ``client`` command: one or more links, output to stdout."""

    def __init__(self, loop: EventLoop, urls: List[str], json_mode: bool, filters: Filters,
                 reconnect: bool, log: Log, out: Any = None, since: Optional[str] = None,
                 token: Optional[str] = None, tls: Optional["ssl.SSLContext"] = None,
                 limits: Limits = DEFAULT_LIMITS, last: Optional[int] = None, notify: bool = False,
                 notify_command: Optional[List[str]] = None, state: Optional["ClientState"] = None,
                 otlp: Optional[Tuple[str, List[Tuple[str, str]]]] = None):
        self.loop = loop
        self.limits = limits
        self.last = last
        self.token = token
        self.tls = tls
        self.json_mode = json_mode
        self.filters = filters
        self.since = since
        self.reconnect = reconnect
        self.log = log
        self.out = out if out is not None else sys.stdout
        # --json to a terminal: the C1 controls and DEL that JSON leaves raw in a string
        # (U+009B is a CSI to some terminals) go out as \u escapes; to a pipe, as they came.
        self.escape_c1 = json_mode and self.out.isatty()
        color = self.out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.renderer = Renderer(color=color, width=self.terminal_width(), clock=loop.time)
        self.alerts: Optional[Alerts] = None
        if notify or notify_command is not None:
            bell = notify and self.out.isatty()     # escapes are for a terminal, not for a file
            if notify and not bell:
                log.info("--notify: stdout is not a terminal, so nothing rings (--notify-command "
                         "runs a program instead)")
            self.alerts = Alerts(loop, log, limits, bell, notify_command)
        self._flush_timer: Optional[Timer] = None
        self.links = [ClientLink(self, url) for url in urls]
        self.state = state
        self._state_timer: Optional[Timer] = None
        self.exporter = None if otlp is None else OtlpExporter(self, otlp[0], otlp[1], tls)
        if state is not None:
            state.restore(self.links)
        self.finished: Dict[ClientLink, None] = {}
        self.exit_code = EXIT_OK
        self.stopping = False
        # While a link hands over what one read brought, output is gathered and written
        # at its end (or past OUTPUT_GATHER_BYTES) in one write, not one per message.
        # Nothing else runs meanwhile, so --state never sees a cursor before its write.
        self._gathering = False
        self._gathered: List[bytes] = []
        self._gathered_bytes = 0

    def terminal_width(self) -> Optional[int]:
        """Columns of the terminal we write to, or None for a pipe or file (nothing cut)."""
        try:
            return os.get_terminal_size(self.out.fileno()).columns if self.out.isatty() else None
        except (AttributeError, ValueError, OSError):
            return None

    def resized(self) -> None:
        """SIGWINCH: lines from now on fit the new width."""
        self.renderer.resize(self.terminal_width())

    def subscribe_message(self, link: ClientLink) -> bytes:
        """Filters, plus where to start: --since first, then the cursors we hold.

        Files we hold no cursor for are asked for since the server's time when
        we first went live: whatever they gained while we were away is ours.
        """
        request: Dict[str, Any] = self.filters.as_json()
        request["kind"] = "subscribe"
        request["since"] = link.since or (link.epoch if link.resuming else None)
        request["cursors"] = link.cursors
        if self.last and not link.resuming:     # a resume loses nothing: every line from the cursors
            request["last"] = self.last
        return _json(request)

    def start(self) -> None:
        self._watch_reader()
        for link in self.links:
            link.connect()

    def _watch_reader(self) -> None:
        """`client | head`: when the reader of our stdout pipe goes, stop now, not at the next
        write, which may not come for hours when nothing is written to the transcripts.
        The write end of a pipe is never readable; epoll reports the reader's close on it
        as an error, which selectors hands over as readable. Such a pipe is also made
        larger, below."""
        try:
            fd = self.out.fileno()
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return
            self.loop.register(fd, selectors.EVENT_READ, self._reader_gone)
        except (AttributeError, ValueError, OSError):
            return                          # no descriptor, or a selector that cannot watch it
        # A pipe holds 64 KiB: a replay into `jq` or a script then costs both processes a
        # switch every 64 KiB; with OUTPUT_GATHER_BYTES it takes our writes whole (a replay
        # 1.3x as fast here). Linux's limit for anyone is 1 MiB (fs.pipe-max-size); a
        # refusal (the user's pipe quota) leaves it as it was.
        if _F_SETPIPE_SZ is not None:
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, OUTPUT_GATHER_BYTES)
            except OSError:
                pass

    def _reader_gone(self, mask: int) -> None:
        self.loop.unregister(self.out.fileno())
        self._output_gone()

    def _output_gone(self) -> None:
        """The program reading our output went away (`client | head`): so do we, quietly."""
        self.stopping = True
        self.loop.stop()

    def _state_changed(self) -> None:
        if self.state is not None and self._state_timer is None:
            self._state_timer = self.loop.call_later(self.limits.state_save_interval, self.save_state)

    def save_state(self) -> None:
        """--state: the cursors of what was written, atomically (at most every second, and on exit)."""
        self._state_timer = None
        if self.state is not None:
            self.state.save(self.links, self.log)

    def stop(self) -> None:
        """Ctrl-C or SIGTERM: close politely, exit 0."""
        if self.stopping:
            self.loop.stop()
            return
        self.stopping = True
        if not self.json_mode:
            self._write_lines(self.renderer.flush(force=True))
        if self.exporter is not None:
            self.exporter.flush()           # the records waiting for their batch: one last try
        self.save_state()
        for link in self.links:
            if link.opened and link.stream is not None and not link.stream.closed:
                link.close(CloseCode.NORMAL, "client quit")
            elif link.stream is not None:
                link.stream.abort()
        self.loop.call_later(self.limits.shutdown_grace, self.loop.stop)
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        if all(link.stream is None or link.stream.closed for link in self.links):
            self.loop.stop()

    def begin_input(self) -> None:
        self._gathering = True

    def end_input(self) -> None:
        self._gathering = False
        self._write_gathered()

    def _write_gathered(self) -> None:
        if self._gathered:
            data = b"".join(self._gathered)
            self._gathered, self._gathered_bytes = [], 0
            self._write_now(data)

    def on_message(self, link: ClientLink, message: Union[TextMessage, BinaryMessage]) -> None:
        if isinstance(message, BinaryMessage):
            self.log.warn("%s sent a binary message; ignored" % link.url, key="peer")
            return
        if self.json_mode and self.exporter is None and self._entry_as_is(link, message.data):
            return
        try:
            msg = decode_line(message.data, MAX_JSON_DEPTH + ENVELOPE_DEPTH)
        except MalformedLine:
            msg = None
        if msg is None:
            self.log.warn("%s sent a message that is not a JSON object; ignored" % link.url, key="peer")
            return
        kind = msg.get("kind")
        if kind not in ("hello", "error", "live") and not self._track(link, msg):
            return                  # a line we already have: never written twice
        if self.exporter is not None:
            if kind in ("entry", "malformed", "gap", "reset", "status"):
                self.exporter.add(link, msg.get("host") if isinstance(msg.get("host"), str) else None,
                                  msg, message.text)
        elif self.json_mode:
            # One message, one line: a raw newline between a hostile server's JSON tokens would make two.
            self._write_json(message.data if message.data.find(b"\n") < 0 else _json(msg))
        if kind == "hello":
            resuming = link.resuming = link.epoch is not None
            if not resuming:
                link.epoch = msg.get("time")
                # --since 10m means ten minutes before this first hello, by the server's
                # clock, on every reconnection too, not ten minutes before each one.
                link.since = absolute_since(self.since, msg.get("time"))
            self.log.info("%s %s (%s %s, %s files)" % (
                "reconnected to" if resuming else "connected to", link.url, msg.get("server"),
                msg.get("version"), msg.get("files")))
            link.send_text(self.subscribe_message(link))
        elif kind == "error":
            self.log.warn("%s: %s" % (link.url, msg.get("error")), key="peer")
        elif kind == "live":
            link.failures = 0       # a working connection, not just a handshake: reset the backoff
            self.log.info("%s: caught up, following live" % link.url)
        if not self.json_mode and self.exporter is None:
            self._write_lines(self.renderer.feed(msg))
        path = msg.get("path")
        if self.exporter is not None:
            pass                            # the receiver's 2xx moves the cursors, not the write
        elif kind in ("entry", "malformed", "gap", "reset"):
            self._acknowledge(link, path)
        elif kind == "hello":
            self._state_changed()           # its time starts what a resume asks for
        if self.alerts is not None and kind == "usage":
            self.alerts.usage(msg)
        elif self.alerts is not None and kind == "status":
            self._write(self.alerts.status(msg, link.url))      # after the line that says it

    def _write_lines(self, lines: List[str]) -> None:
        if lines:
            self._write("".join(line + "\n" for line in lines).encode("utf-8", "replace"))
        if self.renderer.holding and self._flush_timer is None:
            self._flush_timer = self.loop.call_later(HOLD_UNTIMED_SECONDS, self._flush_held)

    def _flush_held(self) -> None:
        """Untimed lines whose file has not told their time within HOLD_UNTIMED_SECONDS."""
        self._flush_timer = None
        self._write_lines(self.renderer.flush())

    def _entry_as_is(self, link: ClientLink, data: bytes) -> bool:
        """--json: an ``entry`` message written as it came, its cursor taken from the envelope.

        The server checked the line; its envelope begins with the path and offsets, in
        this order (``line_message``), so they alone are read, by one match: decoding
        each entry again here was half of a replay's cost, its envelope a tenth of
        the rest. ``data`` is the message's UTF-8 as received (valid: the frame layer
        checked it), written without a decode or an encode. False for anything else,
        a path with an escape included (the general path).
        """
        head = _ENTRY_HEAD.match(data)
        # A raw newline (it would split the NDJSON line) or ESC (it begins every terminal
        # escape sequence) is never in valid JSON: a hostile server's, refused the general
        # way. Searched for by memchr; a pass over every byte for the other controls would
        # cost a sixth of the client's time. (find, not "in": bytes' "in" first tries its
        # argument as an int, a TypeError made and dropped each call.)
        if head is None or not data.endswith(b"}") or data.find(b',"entry":') < 0 \
                or data.find(b"\n") >= 0 or data.find(b"\x1b") >= 0:
            return False
        path = head.group(1).decode("utf-8")
        if not self._advance(link, path, int(head.group(2)), int(head.group(3))):
            return True             # a line we already have: never written twice
        self._write_json(data)
        self._acknowledge(link, path)
        return True

    def _acknowledge(self, link: ClientLink, path: Any) -> None:
        """A file's line is written (or in this read's one write): the state may say so."""
        if isinstance(path, str) and path in link.cursors:
            link.acked[path] = link.cursors[path]
            self._state_changed()

    @staticmethod
    def _track(link: ClientLink, msg: Dict[str, Any]) -> bool:
        """Move the link's cursor; False for a line we already have (never shown twice)."""
        path, kind = msg.get("path"), msg.get("kind")
        if not isinstance(path, str):
            return True
        if kind == "reset":
            link.cursors[path] = 0
            return True
        after, offset = msg.get("next"), msg.get("offset")
        if not isinstance(after, int) or not isinstance(offset, int):
            return True
        return ClientApp._advance(link, path, offset, after)

    @staticmethod
    def _advance(link: ClientLink, path: str, offset: int, after: int) -> bool:
        """A line of ``path`` from ``offset`` to ``after``: the cursor moves past it, or,
        below the cursor, it is one we already have (False: never shown twice)."""
        if offset < link.cursors.get(path, 0):
            link.duplicates += 1
            return False
        link.cursors[path] = after
        return True

    def _write_json(self, data: bytes) -> None:
        """One message as one NDJSON line (to a terminal, with C1 controls escaped)."""
        self._write((escape_c1(data) if self.escape_c1 else data) + b"\n")

    def _write(self, data: bytes) -> None:
        """``data`` to stdout, after what was written before: now, or while a read's
        messages are handled, at the end of it (or once OUTPUT_GATHER_BYTES wait)."""
        self._gathered.append(data)
        self._gathered_bytes += len(data)
        if not self._gathering or self._gathered_bytes >= OUTPUT_GATHER_BYTES:
            self._write_gathered()

    def _write_now(self, data: bytes) -> None:
        """Write all of ``data`` to stdout, now.

        os.write() in a loop, not sys.stdout.buffer: CPython's buffered writer
        was seen here to drop the rest of a message when a write blocked on a
        full pipe is interrupted (SIGSTOP/SIGCONT), and a message is never cut.
        """
        try:
            fd = self.out.fileno()
        except (AttributeError, ValueError, OSError):
            self.out.write(data.decode("utf-8", "replace"))
            self.out.flush()
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(fd, view):]
                except InterruptedError:
                    continue
                except BlockingIOError:     # someone made our stdout non-blocking
                    select.select([], [fd], [])
        except BrokenPipeError:     # the reader is gone (a pipe not watched, or before its close was seen)
            self._output_gone()

    def link_down(self, link: ClientLink, description: str, retryable: bool,
                  clean: bool = False) -> None:
        """A link failed or closed: retry it with backoff, or finish it.

        With --no-reconnect a server's clean close (1000, 1001) ends with status
        0 and anything else with 1.
        """
        if self.stopping:
            self._maybe_stop()
            return
        if not (retryable and self.reconnect):
            self.log.info(description)
            if not clean:
                self.exit_code = EXIT_ERROR
            self.finished[link] = None
            if len(self.finished) == len(self.links):
                self.loop.stop()
            return
        delay = reconnect_delay(self.limits, link.failures)
        link.failures += 1
        self.log.info("%s; reconnecting in %.1fs" % (description, delay))
        self.loop.call_later(delay, link.connect)


# =============================================================================
# Mirror: a hub's copy of other machines' transcripts, byte for byte
# =============================================================================
#
# serve --mirror DIR --mirror-from URL follows each box as the client does
# (token, TLS, reconnection with backoff, resume) and writes each line it is
# sent into DIR/<box's name>/<its path>, at the offset it has on the box. DIR is
# one of the hub's roots, so its clients read the copies as they read local
# files. The copies are the hub's cursors: on a start (after a kill -9 too) each
# file's size says what it has, a torn last line cut back first.

MIRROR_ASIDE = ".reset-"            # a copy the box reset is kept as <file>.reset-<n>
MIRROR_BLANKS_MAX = 64 << 10        # a hole up to this is written as blanks; a longer one is a
                                    # sparse run of zero bytes (no memory, no disk, one call)
MIRROR_OPEN_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0))     # appends only, never through a link


def cut_torn_tail(path: str) -> int:
    """The file's size after cutting a last line with no newline (a write a kill -9 broke)."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = size
        while pos > 0:
            start = max(0, pos - BOUNDARY_SCAN_BLOCK)
            fh.seek(start)
            block = fh.read(pos - start)
            at = block.rfind(b"\n")
            if at >= 0:
                pos = start + at + 1
                break
            pos = start
    if pos != size:
        os.truncate(path, pos)
    return pos


class MirrorWriteFailed(Exception):
    """A copy could not be written: the box's link is dropped, to resume from the copy later."""


class MirrorRefused(Exception):
    """What a box sent cannot be true of a transcript: the link is closed (1008)."""


class MirrorApp:
    """Each box a ClientLink (the client's own), its lines written into DIR/<host>/.

    What a box sends is hostile like any peer's: its name must be one safe path
    component, its paths safe parts, its offsets the next byte of the copy (a
    line past it is preceded by blanks of the missing length, so that offsets
    stay the box's; a line before it is had already). Its status messages are
    relayed to the hub's clients with its host, through ``on_status``.
    """

    def __init__(self, loop: EventLoop, folder: str, urls: List[str], log: Log, limits: Limits,
                 token: Optional[str], tls: Optional["ssl.SSLContext"],
                 on_status: Callable[[str, Dict[str, Any]], None],
                 on_host: Callable[[str, bool], None]):
        self.loop, self.folder, self.log, self.limits = loop, os.path.abspath(folder), log, limits
        self.token, self.tls = token, tls
        self.on_status, self.on_host = on_status, on_host
        self.links = [ClientLink(self, url) for url in urls]   # type: ignore[arg-type]
        self.hosts: Dict[ClientLink, str] = {}
        self.sizes: Dict[str, int] = {}     # a copy's path -> its size: where its next line goes
        self.folders: Set[str] = set()      # folders of copies made already
        os.makedirs(self.folder, exist_ok=True)
        self._cut_torn_tails()

    def _cut_torn_tails(self) -> None:
        for top, dirs, names in os.walk(self.folder, followlinks=False):
            for name in names:
                path = os.path.join(top, name)
                if name.endswith(TRANSCRIPT_SUFFIX) and not os.path.islink(path):
                    try:
                        self.sizes[path] = cut_torn_tail(path)
                    except OSError as exc:
                        self.log.warn("mirror: cannot read %s: %s" % (path, exc.strerror or exc))

    def start(self) -> None:
        for link in self.links:
            link.connect()

    def begin_input(self) -> None:
        """ClientLink's hooks around one read's messages: nothing is gathered here."""

    end_input = begin_input

    def on_message(self, link: ClientLink, message: Union[TextMessage, BinaryMessage]) -> None:
        if not isinstance(message, TextMessage):
            return
        try:
            msg = json.loads(message.text)
        except ValueError:
            return
        kind = msg.get("kind") if isinstance(msg, dict) else None
        if kind == "hello":
            self._hello(link, msg)
            return
        host = self.hosts.get(link)
        if host is None:
            return
        try:
            self._take(link, host, kind, msg, message.text)
        except MirrorWriteFailed:
            self._drop(link, host, CloseCode.INTERNAL_ERROR, "the hub cannot write its copy")
        except MirrorRefused as exc:
            self.log.warn("mirror: %s: %s; its link is closed" % (host, exc), key="mirror")
            self._drop(link, host, CloseCode.POLICY_VIOLATION, "not a transcript's offsets")

    def _drop(self, link: Any, host: str, code: int, reason: str) -> None:
        """Close a box's link; what it sends until it is gone is not taken."""
        del self.hosts[link]
        self.on_host(host, False)
        link.close(code, reason)

    def _take(self, link: Any, host: str, kind: Any, msg: Dict[str, Any], text: str) -> None:
        if kind == "entry":
            self._entry(host, msg, text)
        elif kind in ("malformed", "gap"):
            self._hole(host, msg)
        elif kind == "reset":
            self._reset(host, msg)
        elif kind == "status":
            self.on_status(host, msg)
        elif kind == "live":
            link.failures = 0
            self.on_host(host, True)

    def _hello(self, link: Any, msg: Dict[str, Any]) -> None:
        host = host_name(msg.get("host"))
        holder = next((l for l, h in self.hosts.items() if h == host and l is not link), None)
        if holder is not None and holder not in self.links:
            self.hosts.pop(holder)          # a box that pushed before, its old link not yet seen gone
            holder.close(CloseCode.POLICY_VIOLATION, "the same box connected again")
            holder = None
        if host is None or holder is not None:
            self.log.warn("mirror: %s says it is %s: %s; not mirrored" % (
                link.url, peer_value(msg.get("host")), "another box has that name" if host else "not a usable name"),
                key="mirror")
            link.close(CloseCode.POLICY_VIOLATION, "no usable host name")
            return
        self.hosts[link] = host
        top = os.path.join(self.folder, host) + os.sep
        cursors = {p[len(top):].replace(os.sep, "/"): size for p, size in self.sizes.items() if p.startswith(top)}
        self.log.info("mirror: %s is %s; %d files here" % (link.url, host, len(cursors)), key="mirror")
        link.send_text(_json({"kind": "subscribe", "since": "all", "cursors": cursors}))

    def _copy(self, host: str, msg: Dict[str, Any]) -> Optional[str]:
        parts = mirror_parts(msg.get("path"))
        if parts is None:
            self.log.warn("mirror: %s sent a path that is not a transcript's: %s" % (host, peer_value(msg.get("path"))),
                          key="mirror")
            return None
        return os.path.join(self.folder, host, *parts)

    def _entry(self, host: str, msg: Dict[str, Any], text: str) -> None:
        path, offset, line = self._copy(host, msg), msg.get("offset"), envelope_line(text)
        if path is None or not isinstance(offset, int) or line is None:
            return
        if "\n" in line or "\r" in line:    # not one line: a box's own framing, not ours
            self._hole(host, msg)
            return
        self._write(path, offset, line.encode("utf-8"))

    def _hole(self, host: str, msg: Dict[str, Any]) -> None:
        """A line the box could not send whole (malformed, over the size limit): filler of its
        length, when known, so the offsets after it stay the box's."""
        path, offset, after = self._copy(host, msg), msg.get("offset"), msg.get("next")
        if path is not None and isinstance(offset, int) and isinstance(after, int) and after > offset:
            self._write(path, offset, None, after)

    def _write(self, path: str, offset: int, line: Optional[bytes], end: int = 0) -> None:
        """``line`` at ``offset`` of the copy (or, with None, a hole up to ``end``), after
        filler for the bytes before it the box did not send (blank lines, holes).

        The filler is one line: blanks, or past MIRROR_BLANKS_MAX a sparse run of zero
        bytes (which the hub reports as a malformed line or a gap, as the box did). A
        hole longer than two of the longest lines is no transcript's: a box that says
        so is refused, else 150 bytes from it could have the hub write a gigabyte.
        """
        size = self.sizes.get(path, 0)
        if offset < size:
            return                          # had already (a resume's first line, say)
        filler = (offset if line is not None else end) - size
        if filler > 2 * self.limits.max_line_bytes:
            raise MirrorRefused("a hole of %d MiB before byte %d of %s" % (filler >> 20, size + filler, path))
        if not filler:
            data = b""
        elif filler <= MIRROR_BLANKS_MAX:
            data = b" " * (filler - 1) + b"\n"
        else:
            data = b"\n"                   # after zeros up to it: the ftruncate below
        if line is not None:
            data += line + b"\n"
        try:
            folder = os.path.dirname(path)
            if folder not in self.folders:  # one mkdir per folder, not one per line
                os.makedirs(folder, exist_ok=True)
                self.folders.add(folder)
            fd = os.open(path, MIRROR_OPEN_FLAGS, 0o600)
            try:
                if filler > MIRROR_BLANKS_MAX:
                    os.ftruncate(fd, size + filler - 1)     # zeros up to the filler's newline
                write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            # Not written: the link is dropped, and the box asked again, from the copy's size,
            # later (blanks for it would lose the line). A folder removed meanwhile is made again.
            self.log.warn("mirror: cannot write %s: %s" % (path, exc.strerror or exc), key="mirror")
            self.folders.discard(os.path.dirname(path))
            try:                            # a write cut short leaves a torn line: cut back to a line's end
                self.sizes[path] = cut_torn_tail(path) if os.path.exists(path) else 0
            except OSError:
                self.sizes.pop(path, None)
            raise MirrorWriteFailed(path) from None
        self.sizes[path] = offset + len(line) + 1 if line is not None else end

    def _reset(self, host: str, msg: Dict[str, Any]) -> None:
        """The box's file starts again: the copy so far is kept aside, the file begins anew."""
        path = self._copy(host, msg)
        if path is None or path not in self.sizes:
            return
        n = 1
        while os.path.exists(path + MIRROR_ASIDE + str(n)):
            n += 1
        try:
            os.rename(path, path + MIRROR_ASIDE + str(n))
        except OSError as exc:
            self.log.warn("mirror: cannot keep %s aside: %s" % (path, exc.strerror or exc), key="mirror")
        self.sizes.pop(path, None)

    def gone(self, link: Any) -> None:
        """A box that pushed to us went away: it dials again, from its side."""
        host = self.hosts.pop(link, None)
        if host is not None:
            self.on_host(host, False)
            self.log.info("mirror: %s (%s) went away" % (host, link.url), key="mirror")

    def link_down(self, link: ClientLink, description: str, retryable: bool, clean: bool = False) -> None:
        """Every failure is retried with the client's backoff: a box may be down for hours."""
        host = self.hosts.pop(link, None)
        if host is not None:
            self.on_host(host, False)
        delay = reconnect_delay(self.limits, link.failures)
        link.failures += 1
        self.log.info("mirror: %s; reconnecting in %.1fs" % (description, delay), key="mirror")
        self.loop.call_later(delay, link.connect)


# --- a box that dials its hub: serve --push-to URL ------------------------------


def frame_payload(frame: bytes) -> bytes:
    """The payload of a whole unmasked frame the server built (to send it again, masked)."""
    length = frame[1] & 0x7F
    return frame[2 + (2 if length == 126 else 8 if length == 127 else 0):]


class PushLink(ClientLink):
    """This box's stream, served over a connection it makes to its hub (no port of its
    own needed: behind NAT, a firewall). To the server it is one more subscriber: it
    gets hello, then the hub's subscribe (with the hub's cursors), then every line,
    sent masked, as a WebSocket client's frames must be."""

    def __init__(self, app: "PushApp", url: str):
        super().__init__(app, url)      # type: ignore[arg-type]
        self.server = app.server
        self._fresh()

    def _fresh(self) -> None:
        limits, now = self.server.limits, self.loop.time()
        self.feed = Feed(limits, self.server.log)
        self.progress = (0, now)
        self.subscribes = RateLimit(limits.subscribe_burst, limits.subscribe_rate, now)

    @property
    def open(self) -> bool:
        return self.ws is not None and self.ws.state is State.OPEN and self.stream is not None \
            and not self.stream.closed

    def _opened(self) -> None:
        super()._opened()
        self._fresh()
        self.app.link_up(self)

    def send_frames(self, frames: List[bytes]) -> None:
        if self.open:
            assert self.ws is not None
            for frame in frames:
                if frame is LIVE_MESSAGE:
                    self.failures = 0   # the hub has all it asked for: a working link, not a handshake
                self.ws.send_text(frame_payload(frame))


class PushApp:
    """serve --push-to: the links to the hubs, dialled again with backoff when they drop."""

    def __init__(self, server: "StreamServer", urls: List[str], token: Optional[str],
                 tls: Optional["ssl.SSLContext"]):
        self.server, self.loop, self.limits, self.log = server, server.loop, server.limits, server.log
        self.token, self.tls = token, tls
        self.links = [PushLink(self, url) for url in urls]

    def start(self) -> None:
        for link in self.links:
            link.connect()

    def link_up(self, link: PushLink) -> None:
        self.log.info("pushing to %s" % link.url)     # the backoff is reset once the hub is caught up
        self.server.adopt(link, Subscription(Filters(), hold=True))     # the hub's subscribe next

    def begin_input(self) -> None:
        """ClientLink's hooks around one read's messages: nothing is gathered here."""

    end_input = begin_input

    def on_message(self, link: PushLink, message: Union[TextMessage, BinaryMessage]) -> None:
        self.server.client_message(link, message)       # type: ignore[arg-type]

    def link_down(self, link: PushLink, description: str, retryable: bool, clean: bool = False) -> None:
        self.server.session_closed(link, 0, description)    # type: ignore[arg-type]
        delay = reconnect_delay(self.limits, link.failures)
        link.failures += 1
        self.log.info("push: %s; dialling again in %.1fs" % (description, delay), key="push")
        self.loop.call_later(delay, link.connect)


# =============================================================================
# Command line
# =============================================================================


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (exit 2), not a usage block."""

    def error(self, message: str) -> None:   # type: ignore[override]
        command = self.prog.replace(PROG, "python3 claude_stream.py", 1)
        raise UsageError("%s: %s (see '%s --help')" % (self.prog, message, command))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None
    if not 0.01 <= value <= 60:
        raise argparse.ArgumentTypeError("must be between 0.01 and 60 seconds")
    return value


def _line_total(text: str) -> int:
    if not (text.isdigit() and text.isascii()) or int(text) < 1:
        raise argparse.ArgumentTypeError("not a number of lines (1 or more): %r" % text)
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError("not a port number: %r" % text)
    return int(text)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Watch Claude Code sessions live.")
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    commands = parser.add_subparsers(dest="command", parser_class=ArgumentParser)
    add_serve_arguments(commands.add_parser(
        "serve", help="tail the transcripts and serve WebSocket clients",
        description="Tail every Claude Code transcript and stream new entries to WebSocket clients."))
    add_client_arguments(commands.add_parser(
        "client", help="show the stream of a server",
        description="Connect to claude_stream servers and show their entries as they are written."))
    add_usage_arguments(commands.add_parser(
        "usage", help="token and cost totals of the transcripts on disk",
        description="Token and cost totals per session (and per file) and per day, from the "
                    "transcripts on disk."))
    return parser


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--root", action="append", metavar="DIR",
                       help="a projects folder to watch (repeatable; default: "
                            "$CLAUDE_CONFIG_DIR/projects, else ~/.claude/projects and "
                            "~/.config/claude/projects)")
    serve.add_argument("--host",
                       help="address to listen on (default: 127.0.0.1 and ::1, this machine only)")
    serve.add_argument("--port", type=_port, default=None,
                       help="port to listen on; 0 picks a free one (default %d; with --push-to, "
                            "none: the hub is reached from here)" % DEFAULT_PORT)
    serve.add_argument("--poll-interval", type=_positive_float, default=DEFAULT_POLL_INTERVAL,
                       metavar="SECONDS", help="how often a file written in the last minute is "
                       "checked; idle files less often (default %(default)s)")
    serve.add_argument("--poll-only", action="store_true",
                       help="find changes by polling alone, without inotify wake-ups (for "
                            "network file systems written from other machines)")
    serve.add_argument("--certfile", metavar="PEM",
                       help="serve wss:// and https:// with this certificate (chain) ...")
    serve.add_argument("--keyfile", metavar="PEM", help="... and this private key")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="also accept WebSocket connections from pages of this origin, e.g. "
                            "https://dash.example:8443 (repeatable; 'null' is never accepted)")
    auth = serve.add_mutually_exclusive_group()
    auth.add_argument("--token-file", metavar="FILE",
                      help="read the token clients must present from the first line of FILE, "
                           "once (a fixed token other users cannot see; default: $%s, else a "
                           "random one, stored for local clients in a file only you can read)"
                           % TOKEN_ENV)
    auth.add_argument("--token", metavar="TOKEN",
                      help="the token on the command line (visible to every user of this machine "
                           "in the process list: prefer --token-file)")
    auth.add_argument("--no-auth", action="store_true",
                      help="accept clients without a token (anyone who can connect reads everything)")
    serve.add_argument("--prices", metavar="FILE",
                       help="prices of models for the usage messages, as for 'usage --prices'")
    serve.add_argument("--mirror", metavar="DIR",
                       help="keep a copy of each box's transcripts in DIR/<its name>/, and serve "
                            "them with this machine's own (a hub)")
    serve.add_argument("--mirror-from", action="append", default=[], metavar="URL",
                       help="a box to mirror: its ws:// or wss:// URL (repeatable; needs --mirror)")
    serve.add_argument("--mirror-token-file", metavar="FILE",
                       help="the token the boxes want, from the first line of FILE")
    serve.add_argument("--push-to", action="append", default=[], metavar="URL",
                       help="dial this hub (ws://HUB:PORT/push) and serve this machine's stream to it "
                            "over that connection: no port of this machine's own is needed (repeatable)")
    serve.add_argument("--push-token-file", metavar="FILE",
                       help="the push token, from the first line of FILE: on a hub, what boxes that "
                            "push must give (it reads nothing); on a box, what it gives the hub")
    serve.add_argument("--name", metavar="NAME",
                       help="this machine's name for clients and hubs (default: its host name; "
                            "letters, digits, '.', '_' and '-')")
    serve.add_argument("--debug", action="store_true", help="log connections; tracebacks on errors")


def add_client_arguments(client: argparse.ArgumentParser) -> None:
    client.add_argument("urls", nargs="*", metavar="URL",
                        help="server to follow (repeatable; default %s)" % DEFAULT_URL)
    client.add_argument("--json", action="store_true",
                        help="write every server message as one JSON line (NDJSON)")
    client.add_argument("--since", metavar="WHEN",
                        help="first replay entries since WHEN: a duration (90s, 10m, 2h, 7d), an "
                             "ISO time, or 'all'; then continue live")
    client.add_argument("--last", type=_line_total, metavar="N",
                        help="of that history, at most each file's last N lines, as tail -n N does "
                             "(alone: --since all --last N)")
    client.add_argument("--project", action="append", default=[], metavar="NAME",
                        help="only projects whose folder name contains NAME (repeatable)")
    client.add_argument("--session", action="append", default=[], metavar="ID",
                        help="only sessions or sub-agents whose id starts with ID (repeatable)")
    client.add_argument("--type", action="append", default=[], metavar="TYPE",
                        help="only entries of this type, e.g. user, assistant (repeatable)")
    client.add_argument("--exclude-type", action="append", default=[], metavar="TYPE",
                        help="no entries of this type (repeatable)")
    client.add_argument("--otlp", metavar="URL",
                        help="send every entry as an OpenTelemetry log record to URL/v1/logs "
                             "(OTLP/HTTP JSON, gzip) instead of writing it; with --state, nothing "
                             "the receiver acknowledged (a 2xx) is sent again")
    client.add_argument("--otlp-header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="a header for the receiver, e.g. 'Authorization: Bearer ...' (repeatable)")
    client.add_argument("--state", metavar="FILE",
                        help="keep the cursors of what was written in FILE and resume from them "
                             "on the next start (for a pipeline restarted by systemd)")
    client.add_argument("--machine", action="append", default=[], metavar="NAME",
                        help="only the machine of this name (a hub's box, or the server's own; "
                             "repeatable)")
    client.add_argument("--all", action="store_true",
                        help="also show Claude Code's bookkeeping records (%s), which the "
                             "readable output leaves out; --json always has everything"
                             % ", ".join(BOOKKEEPING_TYPES))
    client_auth = client.add_mutually_exclusive_group()
    client_auth.add_argument("--token-file", metavar="FILE",
                             help="read the server's token from the first line of FILE (default: "
                                  "$%s, else the token file a local server wrote for this port)"
                                  % TOKEN_ENV)
    client_auth.add_argument("--token", metavar="TOKEN",
                             help="the server's token on the command line (visible to other users "
                                  "in the process list: prefer --token-file)")
    client.add_argument("--cafile", metavar="PEM",
                        help="also trust the certificates in this file for wss:// (e.g. a "
                             "self-signed server certificate)")
    client.add_argument("--insecure", action="store_true",
                        help="do not verify the server's certificate (with a warning)")
    client.add_argument("--notify", action="store_true",
                        help="ring when a session starts waiting for you or finishes a turn: the "
                             "bell and a desktop notification (OSC 9 and OSC 777), on a terminal")
    client.add_argument("--notify-command", metavar="CMD",
                        help="run CMD (split as a shell would, run without one) for the same "
                             "events, the details in CLAUDE_STREAM_* environment variables")
    client.add_argument("--no-reconnect", action="store_true",
                        help="exit with status 1 when the connection fails or drops")
    client.add_argument("--debug", action="store_true", help="tracebacks on errors")


def add_usage_arguments(usage: argparse.ArgumentParser) -> None:
    usage.add_argument("--root", action="append", metavar="DIR",
                       help="a projects folder to read (repeatable; default: "
                            "$CLAUDE_CONFIG_DIR/projects, else ~/.claude/projects and "
                            "~/.config/claude/projects)")
    usage.add_argument("--since", metavar="WHEN",
                       help="only lines written since WHEN: a duration (90s, 10m, 2h, 7d), an ISO "
                            "time, or 'all' (default)")
    usage.add_argument("--json", action="store_true",
                       help="write one JSON document instead of tables")
    usage.add_argument("--prices", metavar="FILE",
                       help="prices of models, replacing or added to the built-in ones (JSON: "
                            '{"MODEL": {"input": USD, "output": USD, ...}}, USD per million tokens)')
    usage.add_argument("--debug", action="store_true", help="tracebacks on errors")


def load_prices(path: Optional[str], command: str) -> Dict[str, Price]:
    """The built-in prices, with a --prices file's models replacing or added to them."""
    prices = dict(BUILTIN_PRICES)
    if path is None:
        return prices
    try:
        with open_regular(path, follow=True) as fh:
            data = fh.read(MAX_PRICES_FILE_BYTES + 1)
        if len(data) > MAX_PRICES_FILE_BYTES:
            raise ValueError("longer than %d bytes" % MAX_PRICES_FILE_BYTES)
        prices.update(parse_prices(data.decode("utf-8")))
    except OSError as exc:
        raise UsageError("%s: --prices %s: %s" % (command, path, exc.strerror or exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError("%s: --prices %s: %s" % (command, path, exc)) from None
    return prices


def usage_document(report: UsageReport, since: Optional[str], prices_file: Optional[str]) -> Dict[str, Any]:
    """``usage --json``: sessions by last activity, each file's own totals, days, totals."""
    book = report.book
    sessions = []
    for s in sorted(book.sessions.values(), key=lambda s: (s.totals.last, s.project, s.session)):
        if not s.totals.models:
            continue
        files = [dict(path=path, last=t.last or None, **t.as_json())
                 for path, t in sorted(s.files.items()) if t.models]
        sessions.append(dict(project=s.project, session=s.session, last=s.totals.last or None,
                             **s.totals.as_json(), files=files))
    days = [dict(day=day or None, **t.as_json()) for day, t in sorted(book.days.items()) if t.models]
    return {"roots": report.roots, "since": since,
            "prices": PRICES_SOURCE + ("; models of %s replaced or added" % prices_file if prices_file else ""),
            "sessions": sessions, "days": days, "totals": book.totals.as_json(),
            "files_read": report.files, "malformed_lines": report.malformed,
            "unreadable_files": report.unreadable, "forgotten_messages": book.forgotten}


USAGE_HEADINGS = ("MODELS", "INPUT", "OUTPUT", "CACHE WRITE", "CACHE READ", "COST")
USAGE_LABEL_MAX = 60                # columns of the session / file / day label


def _cost_text(totals: Dict[str, Any]) -> str:
    """Dollars; '+?' when a model has no price, '?' when none has."""
    if totals["unpriced_models"] and not any(m["cost_usd"] for m in totals["models"].values()):
        return "?"
    return "$%.2f%s" % (totals["cost_usd"], "+?" if totals["unpriced_models"] else "")


def _usage_row(label: str, totals: Dict[str, Any]) -> List[str]:
    models = ", ".join(m[len("claude-"):] if m.startswith("claude-") else (m or "(no model)")
                       for m in totals["models"])
    return ([visible(label), visible(models)] + ["{:,}".format(totals[k]) for k in TOKEN_KINDS]
            + [_cost_text(totals)])


def usage_tables(document: Dict[str, Any]) -> List[str]:
    """``usage``'s readable output: a table of sessions (their files indented below),
    one of days, and the totals; every name from disk through visible()."""
    rows: List[Optional[List[str]]] = [["SESSION / FILE"] + list(USAGE_HEADINGS)]
    for s in document["sessions"]:
        rows.append(_usage_row("%s  %s" % (s["session"], s["project"]), s))
        prefix = s["project"] + "/"
        for f in s["files"]:     # cut from the left: the file name says which agent
            path = f["path"][len(prefix):] if f["path"].startswith(prefix) else f["path"]
            rows.append(_usage_row("  " + shorten_path(path, USAGE_LABEL_MAX - 2), f))
    rows += [None, ["DAY (UTC)"] + list(USAGE_HEADINGS)]
    rows += [_usage_row(d["day"] or "(no time)", d) for d in document["days"]]
    rows += [None, _usage_row("TOTAL", document["totals"])]
    widths = [max(display_width(r[i]) for r in rows if r) for i in range(len(USAGE_HEADINGS) + 1)]
    widths[0] = min(widths[0], USAGE_LABEL_MAX)
    widths[1] = min(widths[1], USAGE_LABEL_MAX // 2)
    lines = []
    for row in rows:
        if row is None:
            lines.append("")
            continue
        cells = [pad(row[0], widths[0]), pad(row[1], widths[1])]
        cells += [" " * (w - display_width(c)) + c for c, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def run_usage(args: argparse.Namespace, log: Log) -> int:
    roots = args.root or default_roots()
    check_roots(roots, "usage", log)
    since = None
    if args.since is not None:
        try:
            if not args.since.strip():
                raise ValueError("an empty WHEN; give a duration (10m), an ISO time or 'all'")
            since = parse_since(args.since, time.time())
        except ValueError as exc:
            raise UsageError("usage: --since: %s" % exc) from None
    book = UsageBook(load_prices(args.prices, "usage"))
    report = read_usage(roots, since, book, log)
    document = usage_document(report, args.since, args.prices)
    if args.json:
        sys.stdout.write(json.dumps(document, ensure_ascii=True) + "\n")
    else:
        sys.stdout.write("\n".join(usage_tables(document)) + "\n")
    sys.stdout.flush()
    skipped = ["%d malformed lines" % report.malformed] if report.malformed else []
    skipped += ["%d unreadable files" % report.unreadable] if report.unreadable else []
    if skipped:
        log.warn("%s skipped (see above)" % " and ".join(skipped))
    return EXIT_OK


def server_tls_context(certfile: Optional[str], keyfile: Optional[str]) -> Optional["ssl.SSLContext"]:
    if certfile is None and keyfile is None:
        return None
    if certfile is None:
        raise UsageError("serve: --keyfile needs --certfile")
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise OperationalError("cannot load the certificate or key: %s" % (
            getattr(exc, "strerror", None) or exc)) from None
    return context


def client_tls_context(cafile: Optional[str], insecure: bool, log: Log) -> "ssl.SSLContext":
    """Verify certificates and host names, with --cafile trusted too; --insecure skips both."""
    import ssl
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("client: --cafile: %s" % (getattr(exc, "strerror", None) or exc)) from None
    if insecure:
        log.warn("--insecure: the server's certificate is not checked; anyone in between can "
                 "read the stream")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def given_token(args: argparse.Namespace, log: Log, command: str) -> Optional[str]:
    """The token from --token-file, --token or the environment, checked; None if none."""
    try:
        if args.token_file is not None:
            return read_secret_line(args.token_file)
        if args.token is not None:
            log.warn("--token is visible to every user of this machine (ps, /proc/PID/cmdline); "
                     "use --token-file FILE or $%s instead" % TOKEN_ENV)
            return check_token(args.token, "--token")
        if os.environ.get(TOKEN_ENV):
            return check_token(os.environ[TOKEN_ENV], "$" + TOKEN_ENV)
    except OSError as exc:
        raise UsageError("%s: --token-file %s: %s" % (command, args.token_file, exc.strerror or exc)) from None
    except ValueError as exc:
        raise UsageError("%s: %s" % (command, exc)) from None
    return None


def check_roots(roots: List[str], command: str = "serve", log: Optional[Log] = None) -> None:
    for root in roots:
        path = os.path.expanduser(root)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError("%s: --root %s is not a folder (give the projects folder that "
                             "holds one folder per project)" % (command, root))
        inner = os.path.join(path, "projects")
        if log is not None and os.path.basename(os.path.normpath(path)) != "projects" and os.path.isdir(inner):
            # ~/.claude itself: its history.jsonl is no transcript, its projects look like sessions.
            log.warn("--root %s holds a projects folder: did you mean --root %s?" % (root, inner))


def tls_for(urls: List[str], log: Log) -> Optional["ssl.SSLContext"]:
    """A verifying client context when any of ``urls`` is wss://, else None."""
    return client_tls_context(None, False, log) if any(parse_ws_url(u)[3] for u in urls) else None


def secret_option(path: Optional[str], option: str) -> Optional[str]:
    """The token in the first line of a file named on the command line, or a usage error."""
    if path is None:
        return None
    try:
        return read_secret_line(path)
    except (OSError, ValueError) as exc:
        raise UsageError("serve: %s: %s" % (option, getattr(exc, "strerror", None) or exc)) from None


def new_token() -> str:
    """A random token, made as secrets.token_urlsafe makes one (secrets would load OpenSSL)."""
    return base64.urlsafe_b64encode(os.urandom(TOKEN_BYTES)).rstrip(b"=").decode("ascii")


def run_serve(args: argparse.Namespace, log: Log) -> int:
    roots = args.root or default_roots()
    check_roots(roots, log=log)
    token = None if args.no_auth else (given_token(args, log, "serve") or new_token())
    tls = server_tls_context(args.certfile, args.keyfile)
    loop = EventLoop(log)
    name = own_host_name() if args.name is None else host_name(args.name)
    if name is None:
        raise UsageError("serve: --name %r: give up to 63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit" % args.name)
    if args.mirror_from and not args.mirror:
        raise UsageError("serve: --mirror-from needs --mirror DIR, the folder the copies go to")
    for url in args.mirror_from + args.push_to:
        parse_ws_url(url)               # a bad URL is a usage error now
    push_token = secret_option(args.push_token_file, "--push-token-file")
    if args.mirror:
        check_roots([args.mirror])
        roots = list(roots) + [args.mirror]
    tailer = Tailer(roots, args.poll_interval, log, wakeups=not args.poll_only, host=name,
                    mirrors=[args.mirror] if args.mirror else [])
    folders = sorted({f for f in map(registry_folder, roots) if f is not None})
    listening = args.port is not None or not args.push_to    # a box that pushes needs no port
    server = StreamServer(loop, tailer, args.host or DEFAULT_HOST,
                          DEFAULT_PORT if args.port is None else args.port, log, token,
                          args.allow_origin, tls, also_ipv6_loopback=args.host is None, page=live_page,
                          registry=Registry(folders, log) if folders else None,
                          prices=load_prices(args.prices, "serve"),
                          push_token=push_token if args.mirror else None)
    mirror = None
    if args.mirror:             # before the tailer starts: the torn tails are cut first
        mirror_token = secret_option(args.mirror_token_file, "--mirror-token-file")
        mirror_tls = tls_for(args.mirror_from, log)
        mirror = MirrorApp(loop, args.mirror, args.mirror_from, log, server.limits, mirror_token, mirror_tls,
                           server.box_status.status, server.box_status.link)
        server.push_handler = mirror if push_token is not None else None
        server.box_status.hub = True
    pushing = None
    if args.push_to:
        pushing = PushApp(server, args.push_to, push_token, tls_for(args.push_to, log))
    loop.handle_signals(STOP_SIGNALS, lambda signum: server.shutdown())   # before any output
    if listening:
        server.listen()
    token_file = None
    if token is not None and listening:
        try:
            token_file = write_token_file(server.port, token)
        except OSError as exc:
            log.warn("cannot store the token for local clients (%s); give it to them with "
                     "--token-file" % (exc.strerror or exc))
    if not listening:
        pass
    elif server.host not in LOOPBACK_HOSTS and (token is None or tls is None):
        log.warn("listening on %s: %s" % (server.host, "anyone who can reach this port reads every "
                 "transcript (--no-auth)" if token is None else "the token and every transcript "
                 "cross the network unencrypted (add --certfile/--keyfile, or use an SSH tunnel)"))
    elif token is None:
        log.warn("--no-auth: every process and user on this machine can read every transcript")
    server.start()
    if mirror is not None:
        mirror.start()
    if pushing is not None:
        pushing.start()
    # Everything alive now (modules, the file records of the first scan) lives for
    # the whole run: keep the garbage collector from walking it again in every
    # full collection during a burst (a quarter of the CPU of a 100k-line burst).
    gc.freeze()
    release_free_memory()
    watching = ["%s" % r.path for r in tailer.discovery.roots if r.present]
    waiting = [r.path for r in tailer.discovery.roots if not r.present]
    page = ("https" if tls else "http") + server.url[server.url.index(":"):] + (
        "?token=" + quote(token, safe="") if token else "")
    line = "%s %s %s, watching %s (%d transcripts, %s)" % (
        PROG, __version__, "serving %s (page: %s)" % (server.url, page) if listening else
        "pushing to %s (no port of its own)" % ", ".join(args.push_to),
        ", ".join(watching) or "nothing yet", len(tailer.files),
        "polling" if tailer.discovery.notify is None else "inotify wake-ups")
    if waiting:
        line += "; waiting for %s to appear" % ", ".join(waiting)
    print(visible(line), flush=True)
    try:
        loop.run()
    finally:
        loop.close()
        tailer.close()
        if server.relay is not None:
            server.relay.close()
        if token_file is not None and read_token_file(server.port) == token:
            os.remove(token_file)   # the next server on this port writes its own
    return EXIT_OK


def otlp_header(text: str) -> Tuple[str, str]:
    """'Name: value' as a header for the receiver, or ValueError (no line breaks inside)."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _TOKEN_RE.match(name) or any(c in value for c in "\r\n\0"):
        raise ValueError("--otlp-header %r: give 'Name: value'" % text)
    return name, value


def notify_argv(command: Optional[str]) -> Optional[List[str]]:
    """--notify-command as argv, split once here: the events' details go in its
    environment, never into a string a shell reads."""
    if command is None:
        return None
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UsageError("client: --notify-command: %s in %r" % (exc, command)) from None
    if not argv:
        raise UsageError("client: --notify-command: no command given")
    return argv


def run_client(args: argparse.Namespace, log: Log) -> int:
    urls = args.urls or [DEFAULT_URL]
    secure = any(parse_ws_url(url)[3] for url in urls)   # a bad URL is a usage error now
    tls = client_tls_context(args.cafile, args.insecure, log) if secure else None
    loop = EventLoop(log)
    exclude = list(args.exclude_type)
    if not (args.json or args.all):     # bookkeeping left out of what a person reads
        exclude += [t for t in BOOKKEEPING_TYPES if t not in args.type and t not in exclude]
    try:
        filters = Filters.from_lists(args.project, args.session, args.type, exclude_types=exclude,
                                     hosts=args.machine)
    except ValueError as exc:
        raise UsageError("client: %s" % exc) from None
    if args.since is not None:
        try:
            if not args.since.strip():
                raise ValueError("an empty WHEN; give a duration (10m), an ISO time or 'all'")
            parse_since(args.since, time.time())
        except ValueError as exc:
            raise UsageError("client: --since: %s" % exc) from None
    since = "all" if args.since is None and args.last else args.since
    try:
        state = ClientState(args.state) if args.state else None
    except (OSError, ValueError) as exc:
        raise UsageError("client: --state %s: %s" % (args.state, getattr(exc, "strerror", None) or exc)) from None
    otlp = None
    if args.otlp is not None:
        try:
            otlp_url(args.otlp)
            headers = [otlp_header(h) for h in args.otlp_header]
        except ValueError as exc:
            raise UsageError("client: --otlp: %s" % exc) from None
        otlp = (args.otlp, headers)
        if tls is None and urlsplit(args.otlp).scheme == "https":
            tls = client_tls_context(args.cafile, args.insecure, log)
    app = ClientApp(loop, urls, args.json, filters, not args.no_reconnect, log, since=since,
                    token=given_token(args, log, "client"), tls=tls, last=args.last,
                    notify=args.notify, notify_command=notify_argv(args.notify_command), state=state,
                    otlp=otlp)
    resize = (signal.SIGWINCH,) if hasattr(signal, "SIGWINCH") else ()
    loop.handle_signals(STOP_SIGNALS + resize,
                        lambda signum: app.resized() if signum in resize else app.stop())
    app.start()
    try:
        loop.run()
    finally:
        app.save_state()
        loop.close()
    return app.exit_code


def main(argv: Optional[List[str]] = None) -> int:
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = getattr(args, "debug", False)
        log = Log(debug)
        if args.command == "serve":
            return run_serve(args, log)
        if args.command == "client":
            return run_client(args, log)
        if args.command == "usage":
            return run_usage(args, log)
        raise UsageError("%s: choose a command: serve, client or usage (see 'python3 claude_stream.py "
                         "--help')" % PROG)
    except UsageError as exc:
        text = visible(str(exc))
        sys.stderr.write("%s\n" % text if text.startswith(PROG) else "%s: %s\n" % (PROG, text))
        return EXIT_USAGE
    except OperationalError as exc:
        sys.stderr.write("%s: error: %s\n" % (PROG, visible(str(exc))))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:        # noqa: BLE001 - one line, not a traceback, unless --debug
        if debug:
            raise
        sys.stderr.write("%s: internal error: %s: %s (run with --debug for details)\n"
                         % (PROG, type(exc).__name__, visible(str(exc))))
        return EXIT_ERROR


# Run as a script, Python keeps the whole file's syntax tree (about 17 MB) until the
# script ends, so a server run for days would carry it for days. ``serve`` therefore
# starts the same interpreter again with the same flags in the same process (exec:
# the same pid, signals and descriptors), as a module, handing it the bytecode this
# process compiled (marshalled into an anonymous file, as a .pyc holds it): the new
# image neither builds the tree nor compiles (a compile there would leave 3 MB of its
# garbage behind, and cost 0.1 s: start-up to the banner 0.35 -> 0.27 s here). Where
# there is no memfd it loads the file as any module is loaded ("-" below). It runs with
# -S: this module needs the standard library only, and a site-packages' .pth files run
# at every start whatever they import (on our CI machine, certifi and 80 modules: 2 MB).
# CLAUDE_STREAM_NO_REEXEC=1 turns this off.
_REEXEC = ("import importlib.util, marshal, os, sys; path, code = sys.argv[1], sys.argv[2]; "
           "spec = importlib.util.spec_from_file_location('claude_stream', path); "
           "module = sys.modules['claude_stream'] = importlib.util.module_from_spec(spec); "
           "fd = None if code == '-' else int(code); "
           "spec.loader.exec_module(module) if fd is None else exec(marshal.loads(b''.join("
           "iter(lambda: os.read(fd, 1 << 20), b''))), module.__dict__); "
           "fd is None or os.close(fd); sys.argv[:3] = [path]; sys.exit(module.main())")   # one line, for ps


def compiled_for_exec(code: Any) -> str:
    """An inherited descriptor holding ``code`` marshalled, as text for argv; "-" if none."""
    try:
        fd = os.memfd_create("claude_stream", 0)        # type: ignore[attr-defined] # Linux only
    except (AttributeError, OSError):
        return "-"
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(marshal.dumps(code))
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        return str(fd)
    except (OSError, ValueError):
        os.close(fd)
        return "-"


def reexec_as_module(argv: List[str], code: Any = None) -> None:
    """exec this file again as a module, for ``serve``, given its compiled ``code``;
    returns if not (a client starts faster without: its first line matters more than 17 MB)."""
    path = globals().get("__file__")
    if argv[1:2] != ["serve"] or os.name != "posix" or not path \
            or os.environ.get("CLAUDE_STREAM_NO_REEXEC") or not sys.executable:
        return
    import subprocess
    flags = subprocess._args_from_interpreter_flags()     # type: ignore[attr-defined] # -X, -W, -O...
    held = "-" if code is None else compiled_for_exec(code)
    command = [sys.executable] + flags + ["-S", "-c", _REEXEC, os.path.abspath(path), held] + argv[1:]
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command)
    except OSError:                 # run as we are: only the memory differs
        if held != "-":
            os.close(int(held))


if __name__ == "__main__":
    reexec_as_module(sys.argv, sys._getframe().f_code)     # this script's own bytecode
    sys.exit(main())

