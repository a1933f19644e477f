#!/usr/bin/env python3
"""pulsar-rest-api: an HTTPS API that runs pulsar deploy tasks on this host.

A person or a chat bot starts a task with `POST /:app/:env` and an `action`; the server runs
`pulsar APP ENV ACTION` in its own process group, keeps what it prints, and lets clients read it,
follow it with a long poll, and kill it.  One file, Python 3.8+ standard library only.

Run:   python3 pulsar_rest_api.py --port 8001          (then: curl -k https://HOST:8001/...)
Try:   python3 pulsar_rest_api.py --pulsar-bin echo    (tasks just echo their arguments)

At start `PULSAR_BIN --version` says which pulsar runs: 1.1+ runs as `pulsar task APP ENV ACTION`,
0.x (and a program that names no version) as `pulsar APP ENV ACTION`.  Each task runs in an empty
working folder of its own.  /stream and /output give terminals colours but no other escape
sequence; the JSON keeps the output as pulsar printed it.

Endpoints (JSON everywhere; every error is {"error": "..."}; ROUTES holds the same rows):

  POST /:app/:env           action (form field, JSON {"action": ...} or query string; `task` is an
                            alias), queue=true to wait in line, wait=true to answer when it ends
                            -> 200 {"taskId": N, "url": ".../task/N", "status": "running"}
                            400 bad input, 403 action outside --allow-action or cross-site,
                            409 app/env busy, 411 chunked body, 413 body over 64 KiB, 415 body
                            type, 429 too many tasks, 503 stopping or history not writable
  GET  /task/:id            -> 200 the task (below); ?offset=N keeps only output from character N
  GET  /task/:id/state      long poll -> 200 {"changed": true, "task": {...}} or {"changed": false}
                            after the poll timeout.  ?version=V and ?offset=N: see "Following" below.
  GET  /task/:id/kill       -> 200 the task once every process of its session is gone; 409 if
                            it already ended
  POST /task/:id/kill       the same
  GET  /task/:id/output     -> 200 text/plain from ?offset=N (X-Text-Size, X-More-Data); wait=1
                            waits for more; ?tail=N gives the last N lines
  GET  /task/:id/stream     -> 200 chunked text/plain, the output as it comes, then a status line;
                            with Accept: text/event-stream, Server-Sent Events (Last-Event-ID)
  POST /task/:id/rerun      -> as POST /:app/:env, with the task's app, env and action
  GET  /tasks               -> 200 {"tasks": [...], "next": path or null, "version": V}: newest
                            first, without output; ?app= &env= &status= &limit= (50, max 500)
                            &before=ID; ?version=V waits until the list changes
  GET  /                    the web page
  GET  /app.js              its script
  GET  /app.css             its style
  GET  /apps                -> 200 {"apps": [{"name", "envs"}], "listedAt", "problem"}: the apps
                            and environments pulsar lists; 501 this pulsar cannot list, 503 the
                            list cannot be had now (tasks still start)
  GET  /health              -> 200 {"status": "ok", "running": N, "version": "...", "pulsar":
                            its version or null}; 503 "stopping"
  GET  /metrics             -> 200 Prometheus text: tasks, durations, requests, waiters, connections
  anything else             404 unknown path, 405 (with Allow) wrong method, 404 unknown task
  with --auth-provider      401 no or wrong credentials, 403 not allowed, 429 too many failed
                            logins, 503 GitHub cannot answer; every endpoint but /health

  A task: {"id", "app", "env", "action", "status", "exitCode", "pid", "createdAt", "startedAt",
           "finishedAt", "version", "outputOffset", "outputLength", "output", "outcome"}
  status: queued | running | finished | failed | killed | lost (its keeper was killed or the machine
  restarted while it ran, or its record of the end cannot be read: its end is unknown).
  finished means pulsar reported success: for pulsar 1.x, which exits 0 whatever happens,
  exit 0 and its own success line as its last line; for 0.x, exit 0.
  Anything else is failed.  outcome is the sentence that says what decided the status.
  exitCode is pulsar's exit status: null while running and when a signal ended pulsar.
  Times are ISO 8601 UTC; startedAt is when pulsar started (null while queued, or if it never
  did).  version goes up by one on every change (new output, new status).

Following a task without missing anything: keep the last `version` and `outputLength` you saw and
pass them back:  GET /task/7/state?version=V&offset=N  answers at once if the task has moved past
them (or has ended), otherwise when it next changes; its `output` then holds only the characters
from N on.  Start with version=0&offset=0, stop when status is no longer `running`.

Tasks: each runs under a keeper (the KEEPER program, appendix B), in a session of its own, which
writes pulsar's output to DB.tasks/ID/output, rings a doorbell FIFO after each piece, ends what
pulsar leaves in its session and records the end in DB.tasks/ID/ended.  The server's death
touches no task; the next server on the same history takes over what still runs, records what
ended meanwhile, and calls lost only a task whose keeper died too.  SIGUSR1 stops at once and
leaves tasks and the line to the next server; SIGTERM waits for tasks, then kills them.

Threading: ThreadingHTTPServer gives each connection a thread, which does its own TLS handshake.
TaskStore's lock guards every live task; a change notifies the task's Condition (waits for its
end, for output) and releases its Followers (each /state poll waits on a lock of its own, and
finds its answer made once for all at its offset).  One watcher thread follows every keeper
(selectors on the doorbells), one reaper thread reaps every child, one persist thread writes to
SQLite (the history is never written under the store's lock), one log thread writes the request
lines, and KeeperFactory forks each task's keeper from a small process of its own.  Lock
order: TaskRunner's lock (under which a task's keeper is started: up to KEEPER_START_TIMEOUT),
then TaskStore's; TaskStore._persisting, then its lock; TaskHistory's two locks (its writer's, its
reader's) are taken alone, never with another held but _persisting; LogLines' lock is the last
of all.  Under TaskStore's lock only memory is touched.

History: a task's folder records it from its creation (DB.tasks/ID/task); SQLite (--db) gets
its record from the persist thread, and its output once it has ended (until then its output
file keeps it); a failed write is retried every second, and a locked history holds up no start.
One server per history (DB.lock).  --keep-days and --keep-tasks trim it.

The file reads top to bottom in the order a request's data flows: constants, errors, input
checks, the task model, the store and the history, running pulsar, access, metrics, TLS, HTTP
(routes, fields, responses), the request handler, the endpoints, the server, the lifecycle, the
command line and main; the web page's HTML, CSS and script are appendix A at the end, and the
keeper's program appendix B.  Each part starts with a banner line: search for "# ----" to jump
between them.

Security: every name is checked against a strict pattern before anything runs (pulsar 1.x passes
the action through a shell; pulsar 0.3 expands globs in app names); the Capistrano tasks `shell`
and `invoke` are refused; pulsar runs from an argument list, never a shell.  TLS 1.2+ only.
Slow or silent clients are dropped after --request-timeout and never hold up anyone else.
--auth-provider basic|github requires credentials on every endpoint but /health (401, 403; 429
for an address after 10 failed logins in a minute; 503 when GitHub cannot answer, never open).
Starts, reruns and kills that a browser sends from another page are refused (403).
One task per app and environment (409, or queue=true to wait in line: status `queued`), at most
--max-tasks running (429), at most --max-connections connections (503; with credentials
required, the oldest connection that has shown none that work gives way to a newcomer first).
"""

import argparse
import base64
import binascii
import codecs
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import fcntl
import fnmatch
import functools
import hashlib
import hmac
import http
import http.client
import io
import ipaddress
import json
import logging
import math
import os
import re
import select
import selectors
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"
SERVER_NAME = "pulsar-rest-api/" + __version__


# ---------------------------------------------------------------- constants and defaults

DEFAULT_PORT = 8001
DEFAULT_HOST = "0.0.0.0"
POLL_TIMEOUT = 30.0        # seconds; the original API's value
KILL_GRACE = 5.0           # seconds between SIGTERM and SIGKILL for a task's process group
REQUEST_TIMEOUT = 10.0     # seconds for a TLS handshake, and for a request from first byte to last
IDLE_TIMEOUT = 60.0        # seconds a keep-alive connection may wait for its next request
SEND_TIMEOUT = 30.0        # seconds to write one response to a client that has stopped reading
TAKE_OVER_CHANGES = 4       # changes of a task but its output (started, pid, end...): a bound
OUTPUT_DRAIN = 1.0         # seconds to wait for output held open by a process that left the group
MAX_BODY = 64 * 1024       # bytes; a task request is a few dozen
MAX_FIELDS = 20            # query or form fields in one request
READ_SIZE = 64 * 1024      # bytes per read from a task's output pipe (fits the CPU cache)
SOCKET_BUFFER = 64 * 1024  # bytes of a client's request read at once
OUTPUT_CHUNK = 16 * 1024   # characters; small reads are merged up to this size
MAX_OUTPUT = 32 * 1024 * 1024   # bytes of output kept per task; the rest is dropped
OUTPUT_DROPPED = "[pulsar-rest-api: the output passed %d bytes; the rest is dropped]\n"
OUTCOME_MAX = 300          # characters of pulsar's own words quoted in a task's outcome
PULSAR_PROBE_TIMEOUT = 30.0     # seconds for `pulsar --version` at start
APPS_FRESH = 300.0         # seconds GET /apps serves the list of apps before listing again
APPS_RETRY = 10.0          # seconds a client is told to wait when the apps cannot be listed
APPS_LOOKED_FOR = 1000     # unknown app/env pairs remembered as already looked for
APPS_TIMEOUT = 120.0       # seconds for `pulsar list` (it clones the configuration repository)
PERSIST_EVERY = 1.0        # seconds between tries of a history write that failed
PERSIST_SOON = 0.02        # seconds the persist thread waits to take more changes in one write
HAND_OVER = signal.SIGUSR1     # stop at once, leaving running tasks to the next server
MAX_QUEUED = 100           # tasks waiting in line at most; more get 429
REAPER_IDLE = 1.0          # seconds the reaper waits when there is no child (orphans may come)
KEEPER_START_TIMEOUT = 5.0  # seconds the keeper factory may take to start a keeper (~1 ms); the
                           # runner waits for it (a stalled factory is ended, and one more tried)
PID_MAX = 1 << 22          # the highest pid Linux gives (kernel.pid_max can be no higher)
LATEST_TIME = 253402300800  # seconds since 1970 of the first moment past year 9999
WATCH_ROUND = 4 * 1024 * 1024  # bytes of one task's output read before the others' turn
SHUTDOWN_TIMEOUT = 600.0   # seconds a stop waits for running tasks before killing them
LIST_LIMIT, LIST_MAX = 50, 500  # tasks per page of GET /tasks
KEEP_DAYS = 90             # days an ended task stays in the history: an audit looks back months
KEEP_TASKS = 10000         # tasks the history keeps at most: at ~100 KB of output a deploy,
                           # about 1 GB, which a bastion host can spare
TRIM_EVERY = 3600.0        # seconds between two trims of the history
TRIM_BATCH = 100           # tasks removed in one transaction, so that requests are not held up
MAX_TASKS = 16             # tasks running at once; more are refused (429) or wait in line
MAX_CONNECTIONS = 256      # client connections at once; more get 503 and are closed
MAX_HEADERS = 64           # header lines in one request; more get 431
MAX_HEADER_LINE = 8192     # bytes in one header line; longer gets 431
MAX_LINE_READ = 65536      # bytes of a line read before a request is refused unread (as
MAX_LINES_READ = 100       # http.server does), and header lines read (past the limits above,
                           # the rest of the request is read, so that the client reads the 431)
ACCEPT_BACKOFF = 0.1       # seconds the accept loop pauses when out of file descriptors
STREAM_CHECK = 0.5         # seconds between checks that a waiting or streaming client is there
SSE_KEEPALIVE = 15.0       # seconds between comment lines on a quiet event stream
LINGER = 0.1               # seconds a follower of a chatty task waits for more output ...
QUIET_GAP = 0.01           # ... unless none comes for this long: the task has gone quiet
LINGER_BYTES = 8192        # ... or for this many characters, to send fewer, fuller replies
KEPT_ANSWERS = 16          # answers kept with a live task for the clients at its state, ...
KEPT_STORED_ANSWERS = 64   # ... of ended tasks read from the history, ...
KEPT_ANSWER_BYTES = 65536  # ... each at most this long: longer ones are made for each asker
CHATTY_GAP = 0.005         # seconds between two outputs that make a task chatty
MAX_TAIL = 100000          # lines GET /task/:id/output?tail= may ask for
REFUSERS = 8               # threads that may answer 503 to connections over the limit at once
REFUSAL_LOG_EVERY = 10     # seconds between log lines about connections over the limit
MAX_PER_ADDRESS = 64       # connections at once from one address (an IPv6 /64), but loopback
LOG_WINDOW = 60            # seconds over which log lines about clients without credentials ...
REFUSALS_PER_ADDRESS = 30  # ... are written at most this many per address ...
REFUSALS_LOGGED = 300      # ... and this many in all, the rest summed up
REFUSE_TIMEOUT = 2.0       # seconds such a 503 may take, handshake included
AUTH_FAILURES = 10         # failed logins from one address within AUTH_WINDOW ...
AUTH_WINDOW = 60           # ... seconds, before it is refused (429) for AUTH_WINDOW seconds
AUTH_TRACKED = 10000       # addresses or tokens remembered before expired ones are dropped
AUTH_CEILING = 100         # failed logins within AUTH_WINDOW from everyone together, past which
                           # credentials that never worked are refused for a while
GITHUB_DEADLINE = 15       # seconds one whole check of a token with GitHub may take
NAME_LOOKUP_TIMEOUT = 2.0  # seconds to learn this host's fully qualified name for a certificate
GITHUB_API = "https://api.github.com"
GITHUB_TIMEOUT = 10        # seconds for one GitHub API call
GITHUB_CACHE_YES = 300     # seconds an allowed token is trusted without asking GitHub again
GITHUB_CACHE_NO = 30       # seconds a refused token is refused without asking again
GITHUB_CACHE_ERROR = 10    # seconds GitHub's failure is answered 503 without asking again
GITHUB_RECHECK = 60        # seconds after which a grant is checked again before a change
GITHUB_LOGIN_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
GITHUB_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,255}")
PASSWORD_VARIABLE = "PULSAR_REST_API_PASSWORD"
PASSWORD_HANDOVER = "PULSAR_REST_API_PASSWORD_PIPE"     # FD:ORIGIN, from a restart that hid it
SERVER_SECRETS = frozenset({PASSWORD_VARIABLE})     # never passed on to pulsar
LOG_NAME = "pulsar-rest-api.log"
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ACTION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:.-]{0,127}")
REFUSED_ACTIONS = frozenset({"shell", "invoke"})   # Capistrano tasks that run any command
# Variables that silence the deprecation lines Thor and Bundler print on every pulsar run.
QUIET_PULSAR = {"THOR_SILENCE_DEPRECATION": "1", "BUNDLE_SILENCE_DEPRECATIONS": "true"}
VERSION_LINE = re.compile(r"v?(\d+)\.(\d+)(\.\d+)?([-.+][0-9A-Za-z.-]+)?")
PULSAR_FAILURE = re.compile(r"Failed to (execute task \S+ for \S+ on \S+|deploy \S+ on \S+)\.")
THOR_ERROR = re.compile(r'(ERROR: "pulsar [^"]*" was called with|Could not find command "[^"]*")')
# What `pulsar --version` answers: 1.1.0, v2.0.0-rc1, pulsar 1.1.0, 1.1.0 (ruby 3.1).
VERSION_ANSWER = re.compile(r"(?:pulsar\s+)?v?(\d+\.\d+(?:\.\d+)?(?:[-.+][0-9A-Za-z.-]+)?)"
                            r"(?:\s+\(.*\))?", re.IGNORECASE)
APP_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*): (.*)")      # a line of `pulsar list`
# Escape sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC strings, and
# two-character escapes.  An unfinished one at the end of a piece of output does not match.
ESCAPE_SEQUENCE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]"          # CSI: colours, cursor moves, screen clears
    r"|\][^\x07\x1b]*(?:\x07|\x1b\\)"       # OSC: window title, clipboard, links
    r"|[PX^_][^\x1b]*\x1b\\"               # DCS, SOS, PM, APC strings
    r"|[ -/]*[0-OQ-WYZ\\`-~])")              # two-character escapes (not the introducers above)
# What TerminalText reads output as: an escape sequence, one cut at the end of a piece, one
# control character (C0, C1, and the bidirectional overrides), or a run of printable text.
TERMINAL_TOKEN = re.compile(
    r"(?P<complete>%s)" % ESCAPE_SEQUENCE.pattern
    + r"|(?P<cut>\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[PX^_][^\x1b]*\x1b?|[ -/]*)\Z)"
    + r"|[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
    + r"|[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]+")
TERMINAL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
MAX_ESCAPE = 4096          # characters an unfinished escape sequence may hold before it is dropped
# SGR parameters a terminal may show of a task's output: styles and colours, not blinking,
# reversed or concealed text.
SAFE_SGR = frozenset([0, 1, 2, 3, 4, 9, 21, 22, 23, 24, 29, 39, 49] + list(range(30, 38))
                     + list(range(40, 48)) + list(range(90, 98)) + list(range(100, 108)))
CLOSING_LINE_KEY = "pulsarrestapitask"    # how a line that reads as our closing line starts
LOOKALIKE_PREFIX = "\x1b[0m(printed by the task) "
MAX_HOLD = 4096            # characters of a line held back to tell whether it reads as our own
# Letters that look like those of the closing line's key: Cyrillic, Greek, IPA, and what else
# a reader would take for them.
LOOKALIKE_TABLE = str.maketrans("аеіјкорстухѕԁɑαεικορτυνμɩӏǀ|1$5ʟɪʀг",
                                "aeijkopctyxsdaaeikoptuvuillllsslirr")
NOT_A_KEY_CHARACTER = re.compile(r"[^a-z0-9]+")
COUNT_PATTERN = re.compile(r"[0-9]{1,15}")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")      # a method or header name (RFC 9110)
# A header line: a name, a colon and a value with the spaces around it left out (no space may
# come before the colon, and a folded line, which starts with one, is not one).
HEADER_FIELD = re.compile(r"^(%s):[ \t]*([^\r\n]*?)[ \t]*\r?\n" % TOKEN.pattern, re.MULTILINE)
HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
HOST_PATTERN = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")

# In the environment of pulsar and all it starts: which task they belong to (its folder).
TASK_MARK = b"PULSAR_REST_API_TASK="

LINGERING = "lingering"    # what Followers files the lingering followers of a chatty task under

QUEUED, RUNNING = "queued", "running"
FINISHED, FAILED, KILLED, LOST = "finished", "failed", "killed", "lost"
ENDED = frozenset({FINISHED, FAILED, KILLED, LOST})
ALL_STATUSES = ENDED | {QUEUED, RUNNING}

logger = logging.getLogger("pulsar-rest-api")


def state_dir(environ=os.environ):
    """Where this server keeps per-user state: $XDG_STATE_HOME/pulsar-rest-api, or ~/.local/state/..."""
    base = environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pulsar-rest-api")


# ---------------------------------------------------------------- errors

class HTTPError(Exception):
    """An error answered to the client as {"error": message}; any layer may raise it."""

    def __init__(self, status, message, headers=(), close=False, details=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)
        self.close = close          # the connection cannot be reused (e.g. an unread body)
        self.details = details or {}    # more fields for the JSON reply

    def reply(self):
        """The JSON body of the answer."""
        return dict({"error": self.message}, **self.details)


class StartupError(Exception):
    """A configuration the server cannot start with; main prints it as one line."""


# ---------------------------------------------------------------- input checks

def check_name(kind, value):
    """An app or environment name, or HTTPError 400 saying what is allowed."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise HTTPError(400, "%s must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit; got %s" % (kind, quoted(value)))
    return value


def check_action(value):
    """One Capistrano task name that is safe to hand to pulsar, or HTTPError 400."""
    if not isinstance(value, str):
        raise HTTPError(400, "action must be a string")
    if not ACTION_PATTERN.fullmatch(value):
        raise HTTPError(400, "action must be one Capistrano task name: 1-128 letters, digits, '_', "
                             "'-', ':' or '.', starting with a letter or digit; got %s" % quoted(value))
    if capistrano_task(value) in REFUSED_ACTIONS:
        raise HTTPError(400, "action %s is refused: the Capistrano tasks shell and invoke run "
                             "arbitrary commands" % quoted(value))
    return value


def capistrano_task(action):
    """The task an action names as Capistrano and Rake resolve it, lowercased: they drop empty
    parts (`shell:` is `shell`) and Rake drops a leading `rake:` (`rake:shell` is `shell`)."""
    parts = [part for part in action.lower().split(":") if part]
    while len(parts) > 1 and parts[0] == "rake":
        parts.pop(0)
    return ":".join(parts)


def parse_count(name, value):
    """A whole number >= 0 given as a query parameter, or HTTPError 400."""
    if not isinstance(value, str) or not COUNT_PATTERN.fullmatch(value):
        raise HTTPError(400, "%s must be a whole number (0 or more); got %s" % (name, quoted(value)))
    return int(value)


def quoted(value, limit=80):
    """A client-supplied value made safe and short enough to echo in a message or a log line."""
    if (isinstance(value, str) and len(value) <= limit and value.isascii()
            and value.isprintable() and "'" not in value and "\\" not in value):
        return "'%s'" % value           # as it is: the common case, cheaply
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return "'%s'" % (text[:limit] + ("..." if len(text) > limit else ""))


def utc_iso(timestamp):
    """ISO 8601 in UTC with milliseconds, as JSON clients expect: 2026-11-28T11:38:54.123Z."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- the task model

class Output:
    """A task's output: text that only grows, kept in chunks so that reading from an offset costs
    only what is read, and appending costs only what is appended.  Past `limit` UTF-8 bytes the
    rest is dropped, after one line that says so."""

    def __init__(self, limit=None):
        self._chunks = []
        self._starts = []       # character offset of each chunk
        self.length = 0         # characters
        self.size = 0           # UTF-8 bytes
        self.limit = limit
        self.full = False

    @classmethod
    def from_chunks(cls, chunks, length):
        """Output read back from storage: (start, text) pairs, possibly only the last ones."""
        output = cls()
        for start, text in chunks:
            output._starts.append(start)
            output._chunks.append(text)
        output.length = length
        return output

    def append(self, text):
        """Add text; False when it was dropped because the output is full."""
        if self.full or not text:
            return False
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if self.limit is not None and self.size + size > self.limit:
            kept = text.encode("utf-8")[:self.limit - self.size].decode("utf-8", "ignore")
            last = kept[-1:] or (self._chunks[-1][-1:] if self._chunks else "\n")
            text = kept + ("" if last == "\n" else "\n") + OUTPUT_DROPPED % self.limit
            self.full = True
        if self._chunks and len(self._chunks[-1]) + len(text) <= OUTPUT_CHUNK:
            self._chunks[-1] += text
        else:
            self._starts.append(self.length)
            self._chunks.append(text)
        self.length += len(text)
        self.size += size
        return True

    def pieces_since(self, offset):
        """(start, text) pieces from character `offset` to the end, without joining them."""
        if offset >= self.length:
            return []
        first = self._chunk_index(offset)
        pieces = list(zip(self._starts[first:], self._chunks[first:]))
        start, text = pieces[0]
        pieces[0] = (offset, text[offset - start:])
        return pieces

    def pieces_backwards(self):
        """(start, text) pieces from the last to the first."""
        return zip(reversed(self._starts), reversed(self._chunks))

    def _chunk_index(self, offset):
        low, high = 0, len(self._starts) - 1
        while low < high:           # the last chunk that starts at or before offset
            middle = (low + high + 1) // 2
            if self._starts[middle] <= offset:
                low = middle
            else:
                high = middle - 1
        return low


class Task:
    """One run of pulsar: what was asked, what it printed, how it ended.

    Fields of a live task change only through TaskStore, under its lock.  `version` counts changes
    so that a client can say which state it has seen; `process` is the running TaskProcess, if any;
    `persisted` is how much of the output is already in the history.
    """

    def __init__(self, task_id, app, env, action, created_at, started_by="-", output=None,
                 status=RUNNING):
        self.id = task_id
        self.app, self.env, self.action = app, env, action
        self.status = status
        self.exit_code = None
        self.pid = None             # pulsar's
        self.process_start = None   # pulsar's start time, from servers older than keepers
        self.keeper_pid = None      # the task's keeper, and its start time: who to adopt
        self.keeper_start = None
        self.created_at = created_at
        self.started_at = None      # when pulsar started: none while queued, or if it never did
        self.finished_at = None
        self.outcome = None         # once ended: the sentence that says what decided its status
        self.started_by = started_by
        self.output = output if output is not None else Output()
        self.version = 1
        self.keeper = None          # the running Keeper, if any
        self.folder = None          # its TaskFolder, until the history holds all of it
        self.stored = False         # the history has its row (until then its folder says it)
        self.persisted = 0          # output characters already in the history ...
        self.persisted_version = 0  # ... and the version written there last
        self.changed = None         # the store's Condition for this task, while it is live
        self.last_output_at = 0.0
        self.chatty = False         # output arrives in quick succession: followers batch it
        self.answers = Answers()    # the bytes of its answers at this version, made once
        self.followers = Followers()    # the /state polls waiting for its next change

    @property
    def ended(self):
        return self.status in ENDED

    def matches(self, app, env, before):
        """True when a list filtered by app, environment and `before` id holds this task."""
        return (app in (None, self.app) and env in (None, self.env)
                and (before is None or self.id < before))

    def has_moved_past(self, version, offset):
        """True when the task holds something a client at (version, offset) has not seen."""
        return (self.ended
                or (version is not None and version != self.version)
                or (offset is not None and self.output.length > offset))

    def check_offset(self, offset):
        if offset is not None and offset > self.output.length:
            raise HTTPError(400, "offset %d is past the end of the output (%d characters)"
                            % (offset, self.output.length))

    def record(self, output_length):
        """The task as the history stores it, with the output length it has written of it."""
        return TaskRecord(self.id, self.app, self.env, self.action, self.status, self.exit_code,
                          self.pid, self.process_start, self.created_at, self.finished_at,
                          self.started_by, self.version, output_length, self.outcome,
                          self.keeper_pid, self.keeper_start, self.started_at)

    def list_entry(self):
        """The task without its output, as GET /tasks lists it."""
        return {
            "id": self.id, "app": self.app, "env": self.env, "action": self.action,
            "status": self.status, "exitCode": self.exit_code, "pid": self.pid,
            "createdAt": utc_iso(self.created_at), "startedAt": utc_iso(self.started_at),
            "finishedAt": utc_iso(self.finished_at), "version": self.version,
            "outputLength": self.output.length, "outcome": self.outcome,
        }

    def snapshot(self, offset=0):
        """The task as it is now, with its output from `offset`: cheap enough to take under the
        store's lock, and turned into the API's reply outside it."""
        self.check_offset(offset)
        return TaskSnapshot(dict(self.list_entry(), outputOffset=offset),
                            self.output.pieces_since(offset))


def last_lines(pieces_backwards, count):
    """The last `count` lines of an output given as (start, text) pieces from its end, lines
    ended by \\n only.  It reads no further back than they go, so that it costs what the tail
    is, not what the output is."""
    taken, found, last = [], 0, True
    for start, text in pieces_backwards:
        end = len(text) - 1 if last and text.endswith("\n") else len(text)   # the last line's end
        last = False
        while True:
            end = text.rfind("\n", 0, end)
            if end < 0:
                break
            found += 1
            if found == count:
                taken.append(text[end + 1:])
                return "".join(reversed(taken))
        taken.append(text)
    return "".join(reversed(taken))


# What the history stores of a task, a row of its table: written by TaskHistory.save.
TaskRecord = collections.namedtuple(
    "TaskRecord",
    "id app env action status exit_code pid process_start created_at finished_at started_by "
    "version output_length outcome keeper_pid keeper_start started_at")


class TaskSnapshot(collections.namedtuple("TaskSnapshot", "fields pieces")):
    """A task's fields and output pieces, taken together; reply() joins the pieces."""

    def reply(self):
        """The task as the API answers it: its fields and "output"."""
        return dict(self.fields, output="".join(text for _, text in self.pieces))


# ---------------------------------------------------------------- the store and the history

class TaskStore:
    """Live tasks by id, the lock and Conditions that guard them, and the history behind them.

    The lock guards the dict and every field of every live Task.  Each task has a Condition on
    that lock, and the store one more for tasks coming and going: every change calls notify_all
    on the task's (and, for comings and goings, the store's), and waiters use wait_for(predicate,
    timeout), so no change is missed between two waits and a busy task wakes only its own
    followers.  Nothing else touches the dict.  Under the lock only memory is touched: the
    history is written by persist(), in the persist thread (see serve), never under it.

    A task is live from its creation, before the history has it: its folder on disk says
    what the history does not have yet (see TaskFolder), so that a locked history holds up
    no start.  A task leaves the dict once it has ended and its last state and whole output are
    in the history; until that write has succeeded (a locked or full disk is retried) it stays
    here, and its folder stays on disk.  A running task's output is safe in its folder's output
    file (written by its keeper), so only its record is written while it runs.
    """

    def __init__(self, history, *, max_output, clock=time.time):
        self._lock = threading.Lock()
        self._comings_and_goings = threading.Condition(self._lock)
        self._persisting = threading.Lock()     # one writer at a time, so writes land in order
        self._write_soon = threading.Event()    # a change that should reach the history now
        self._tasks = {}
        self._last_id = history.last_id()
        self._by_pair = collections.defaultdict(list)   # (app, env) -> its live tasks, oldest first
        self._running = 0
        self._history = history
        self.max_output = max_output
        self._clock = clock
        self._waiters = 0                       # long polls waiting on Conditions now
        # Goes up when a task comes, changes status or goes; and across restarts: it starts from
        # the start's time in milliseconds (no server makes a change a millisecond for long).
        self.list_version = int(time.time() * 1000)
        self._write_failing = False             # the last write failed: say so once, not per try
        self._writes = 0                        # history writes done: tasks move there
        self._stored_answers = collections.OrderedDict()    # see _stored_answer

    # -- tasks coming

    def create(self, app, env, action, started_by="-", status=RUNNING, record=None):
        """A new task with the next id, live at once; the persist thread writes it to the
        history.  `record(task)` records it on disk first, where the next server finds it
        should this one die before the history has it; its OSError means no task."""
        with self._lock:
            self._last_id += 1
            task_id = self._last_id
        task = Task(task_id, app, env, action, self._clock(), started_by,
                    Output(self.max_output), status)
        if record is not None:
            record(task)
        self.add(task)
        self._write_soon.set()
        return task

    def use_ids_above(self, task_id):
        """Give new tasks ids above `task_id` (one the history lacks, found on disk)."""
        with self._lock:
            self._last_id = max(self._last_id, task_id)

    def add(self, task):
        """Make a task live: a new one, or one found in the history at start."""
        task.changed = threading.Condition(self._lock)
        with self._lock:
            self._tasks[task.id] = task
            self._by_pair[task.app, task.env].append(task)
            self._running += task.status == RUNNING
            self._list_changed()

    # -- reading and waiting

    def read(self, task_id, offset=0):
        """The task as the API answers it; its fields are taken together under the lock, its
        output joined after, so that reading a long output does not hold up everyone else."""
        with self._lock:
            task = self._tasks.get(task_id)
            snapshot = task.snapshot(offset) if task is not None else None
        return (snapshot or self._stored_snapshot(task_id, offset)).reply()

    def read_tail(self, task_id, count):
        """(the task without its output, its last `count` lines): read from the end, so that a
        short tail of a long output costs what the tail is."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                return task.list_entry(), last_lines(task.output.pieces_backwards(), count)
        return self.read_entry(task_id), self._history_read(self._history.tail, task_id, count)

    def read_entry(self, task_id):
        """The task without its output, as GET /tasks lists it; 404 if there is none."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                return task.list_entry()
        stored = self._history_read(self._history.load, task_id, None)
        if stored is None:
            raise HTTPError(404, "no task %d" % task_id)
        return stored.list_entry()

    def version_of(self, task_id):
        """The version of a live task now, or None for one that has ended."""
        with self._lock:
            task = self._tasks.get(task_id)
            return None if task is None else task.version

    def wait_for_change(self, task_id, version, offset, timeout):
        """The task as the API answers it once it has moved past (version, offset), or None
        after `timeout`.

        Without a version the client has seen the task as it is now: wait for its next change.
        A task that is no longer live has ended, and answers at once.
        """
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                if not self._wait_past(task, version, offset, timeout):
                    return None
                snapshot = task.snapshot(offset or 0)
        if task is None:
            snapshot = self._stored_snapshot(task_id, offset or 0)
        return snapshot.reply()

    def wait_for_poll_answer(self, task_id, version, offset, timeout):
        """What /state answers once the task has moved past (version, offset), as JSON bytes,
        or None after `timeout` (as wait_for_change).  Its followers wait on Followers, not
        on the task's Condition, and most find their answer made once they wake: they need
        not take the lock again."""
        key = ("state", offset)
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                task.check_offset(offset)
                version = task.version if version is None else version
                ticket = None
                if not task.has_moved_past(version, offset):
                    ticket = task.followers.ticket(offset)
        if task is None:
            return self._stored_answer("state", task_id, offset or 0, poll_answer)
        if ticket is not None and not ticket.acquire(timeout=timeout):
            with self._lock:
                task.followers.cancel(offset, ticket)
                if not task.has_moved_past(version, offset):
                    return None
        if task.chatty and offset is not None and not task.ended:
            self._linger(task, offset)
        answer = task.answers.get(key)      # made by the change that woke it, most often
        if answer is not None:
            return answer
        with self._lock:
            answer = task.answers.get(key)
            if answer is not None:
                return answer
            snapshot, version = task.snapshot(offset or 0), task.version
        return self._remember(task, version, key, poll_answer(snapshot.reply()))

    def _linger(self, task, offset):
        """A follower of a chatty task waits a moment for more, so that it gets fuller answers
        instead of one line per round trip: until LINGER_BYTES more have come, the task has
        ended or gone quiet for QUIET_GAP, or LINGER has passed."""
        deadline = time.monotonic() + LINGER
        while True:
            with self._lock:
                if task.ended or task.output.length - offset >= LINGER_BYTES:
                    return
                ticket = task.followers.ticket(LINGERING)
            wait = min(QUIET_GAP, deadline - time.monotonic())
            if wait <= 0 or not ticket.acquire(timeout=wait):
                with self._lock:
                    task.followers.cancel(LINGERING, ticket)
                return

    def read_answer(self, task_id, offset=0):
        """What GET /task/:id answers, as JSON bytes."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                answer = task.answers.get(("read", offset))
                if answer is not None:
                    return answer
                snapshot, version = task.snapshot(offset), task.version
        if task is None:
            return self._stored_answer("read", task_id, offset, lambda reply: reply)
        return self._remember(task, version, ("read", offset), snapshot.reply())

    def _wait_past(self, task, version, offset, timeout):
        """Wait (the lock held) until a live task has moved past (version, offset); False
        after `timeout`."""
        task.check_offset(offset)
        if version is None:
            version = task.version
        self._waiters += 1
        try:
            return task.has_moved_past(version, offset) or self._wait_and_linger(
                task, version, offset, timeout)
        finally:
            self._waiters -= 1

    @property
    def waiters(self):
        """Long polls waiting for a change now, for /metrics."""
        with self._lock:
            return self._waiters + sum(len(task.followers) for task in self._tasks.values())

    # Followers at one place of a task get one answer: its bytes are made once, kept with the
    # task until its next change, and sent to each of them.

    def _remember(self, task, version, key, reply):
        """The JSON bytes of a live task's answer, kept for the others who ask for the same
        while the task stays at `version` (unless it is long: that one is rarely asked twice)."""
        answer = json_body(reply)
        if len(answer) <= KEPT_ANSWER_BYTES:
            with self._lock:
                task.answers.keep(version, key, answer, task.version)
        return answer

    def _stored_answer(self, kind, task_id, offset, shape):
        """The JSON bytes of an ended task's answer, from the history: a few are kept, the
        most recently asked, since a task in the history does not change (until it is trimmed
        away: trim() forgets them)."""
        key = (kind, task_id, offset)
        with self._lock:
            answer = self._stored_answers.get(key)
            if answer is not None:
                self._stored_answers.move_to_end(key)
                return answer
        answer = json_body(shape(self._stored_snapshot(task_id, offset).reply()))
        if len(answer) <= KEPT_ANSWER_BYTES:
            with self._lock:
                self._stored_answers[key] = answer
                if len(self._stored_answers) > KEPT_STORED_ANSWERS:
                    self._stored_answers.popitem(last=False)
        return answer

    def _wait_and_linger(self, task, version, offset, timeout):
        """Wait (the lock held) for the task to move; if it is chatty, wait a moment more so
        that a follower gets a fuller reply instead of one line per round trip (as _linger)."""
        if not task.changed.wait_for(lambda: task.has_moved_past(version, offset), timeout):
            return False
        deadline = time.monotonic() + LINGER
        while task.chatty and offset is not None and not task.ended:
            if task.output.length - offset >= LINGER_BYTES:
                break
            length, wait = task.output.length, min(QUIET_GAP, deadline - time.monotonic())
            if wait <= 0 or not task.changed.wait_for(
                    lambda: task.ended or task.output.length != length, wait):
                break
        return True

    def wait_for_list_change(self, version, timeout):
        """Wait until list_version differs from `version` (or `timeout`); the current one."""
        with self._lock:
            self._comings_and_goings.wait_for(lambda: self.list_version != version, timeout)
            return self.list_version

    def _list_changed(self):
        self.list_version += 1
        self._comings_and_goings.notify_all()

    def wait_until_ended(self, task_id, timeout):
        """The task as the API answers it once it has ended, or None if it still runs after
        `timeout` (no copy of an output that is still growing)."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                if not task.changed.wait_for(lambda: task.ended, timeout):
                    return None
                return task.snapshot().reply()
        return self.read(task_id)

    def wait_until_idle(self, timeout):
        """True once no task runs or waits in line, False if some still do after `timeout`."""
        with self._lock:
            return self._comings_and_goings.wait_for(
                lambda: all(task.ended for task in self._tasks.values()), timeout)

    def keeper_to_kill(self, task_id):
        """The keeper of a running task, or HTTPError 409 if the task has ended."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None and not task.ended and task.keeper is not None:
                return task.keeper
        ended = self.read_entry(task_id)     # not its output, which may be 32 MiB
        raise HTTPError(409, "task %d has already ended (%s); there is nothing to kill"
                        % (task_id, ended["status"]))

    def running(self):
        """Tasks whose pulsar runs (or is being started)."""
        with self._lock:
            return [task for task in self._tasks.values() if task.status == RUNNING]

    @property
    def running_count(self):
        return self._running

    def task_of_pair(self, app, env, statuses):
        """The oldest task of an app and environment in one of `statuses`, as a list entry with
        who started it, or None.  Costs what the pair has, not what the server has."""
        with self._lock:
            for task in self._by_pair.get((app, env), ()):
                if task.status in statuses:
                    return dict(task.list_entry(), startedBy=task.started_by)
        return None

    def listing(self, app=None, env=None, status=None, before=None, limit=50):
        """(list version, task summaries newest first): live tasks as they are now, the rest
        from the history.  The version is read first, so a change while the list is made
        shows as a newer version at the client's next poll, never as one it already has."""
        while True:
            with self._lock:
                version, writes = self.list_version, self._writes
            rows = self._history_read(self._history.summaries, app, env, status, before, limit)
            with self._lock:
                if self._writes != writes:
                    continue    # a task may have moved from here to the history meanwhile
                tasks = {row.id: row for row in rows}
                # Live tasks as they are now, also those the history did not have when it was
                # read (older ones than the rows fall off at the limit below).
                for task in self._tasks.values():
                    if task.matches(app, env, before):
                        tasks[task.id] = task
                entries = [tasks[task_id].list_entry() for task_id in sorted(tasks, reverse=True)]
                break
        # A task that has just ended may still be running on disk: filter its live state.
        return version, [entry for entry in entries
                         if status is None or entry["status"] == status][:limit]

    # -- changes

    def mark_running(self, task):
        """A queued task leaves the line."""
        with self._lock:
            task.status = RUNNING
            self._running += 1
            self._changed(task)
            self._list_changed()

    def requeue(self, task):
        """A task taken over as running that never started is back in line."""
        with self._lock:
            if task.status == RUNNING:
                task.status = QUEUED
                self._running -= 1
                self._changed(task)
                self._list_changed()

    def add_output(self, task, text):
        """Add output to a running task; False once its output is full (or it has ended)."""
        with self._lock:
            if not task.ended and task.output.append(text):
                now = time.monotonic()
                task.chatty = now - task.last_output_at < CHATTY_GAP
                task.last_output_at = now
                task.version += 1
                task.answers.forget()
                task.changed.notify_all()
                task.followers.wake(task)
            return not (task.ended or task.output.full)

    def attach_keeper(self, task, keeper):
        with self._lock:
            task.keeper = keeper
            task.keeper_pid, task.keeper_start = keeper.pid, keeper.start_token
            self._changed(task)

    def move_version_past(self, task, version):
        """Let a task's version be at least `version` (a task taken over: see _adopt)."""
        with self._lock:
            if task.version < version:
                task.version = version - 1
                self._changed(task)

    def attach(self, task, pid, started_at):
        """pulsar runs, as `pid`, since `started_at`: news to a follower of a queued task."""
        with self._lock:
            task.pid, task.started_at = pid, started_at
            self._changed(task)

    def end(self, task, status, exit_code, outcome, finished_at=None):
        """Record how a task ended; the persist thread writes it to the history."""
        with self._lock:
            self._running -= task.status == RUNNING
            task.status = status
            task.exit_code = exit_code
            task.outcome = outcome
            task.finished_at = finished_at or self._clock()
            task.keeper = None
            self._changed(task)
            self._list_changed()

    def _changed(self, task):
        """Note a change of a task (the lock held): its followers wake, its record is due."""
        task.version += 1
        task.answers.forget()
        task.changed.notify_all()
        task.followers.wake(task)
        self._write_soon.set()

    # -- the history

    def persist(self):
        """Write what the history lacks, in one transaction: the record of each task that
        changed, and the whole output of each that has ended (a running task's output is safe
        in its output file); a task that has ended then leaves the dict and its folder goes.
        A write that fails is logged once and retried at the next call; until it succeeds
        nothing counts as written.  True when everything is written."""
        with self._persisting:
            with self._lock:
                writes = []
                for task in self._tasks.values():
                    if task.version != task.persisted_version:
                        length = task.output.length if task.ended else task.persisted
                        pieces = task.output.pieces_since(task.persisted) if task.ended else []
                        writes.append((task, task.version, length, task.record(length), pieces))
            if not writes:
                return True
            try:
                self._history.save([(record, pieces, not task.stored)
                                    for task, _, _, record, pieces in writes])
            except (sqlite3.Error, OverflowError) as error:
                if not self._write_failing:
                    logger.error("cannot write the task history (retrying every %g s): %s",
                                 PERSIST_EVERY, error)
                self._write_failing = True
                return False
            if self._write_failing:
                logger.info("the task history can be written again")
                self._write_failing = False
            gone = []
            with self._lock:
                self._writes += 1
                for task, version, length, _, _ in writes:
                    task.stored = True
                    task.persisted_version = version
                    task.persisted = length
                    if task.ended and task.version == version:
                        self._forget(task)
                        gone.append(task)
            for task in gone:
                if task.folder is not None:
                    task.folder.remove()
            return True

    def persist_until_stopped(self, stopped, keep_days, keep_tasks):
        """The persist thread: write changes as they come (at most every PERSIST_SOON), retry
        failed writes every PERSIST_EVERY seconds, and trim the history every TRIM_EVERY
        seconds (--keep-days, --keep-tasks), until `stopped` is set."""
        next_trim = 0.0
        self._write_soon.set()      # the first trim comes as the server starts
        while not stopped.is_set():
            self._write_soon.wait(PERSIST_EVERY)
            stopped.wait(PERSIST_SOON)      # what comes with it, and the answers, go first
            self._write_soon.clear()
            try:
                self.persist()
                if time.monotonic() >= next_trim:
                    self.trim(keep_days, keep_tasks)
                    next_trim = time.monotonic() + TRIM_EVERY
            except Exception:       # the history must go on being written, whatever failed
                logger.exception("error while writing the task history; trying again")

    def trim(self, keep_days, keep_tasks):
        """Remove what the history keeps no longer (never a live task: only ended ones)."""
        try:
            removed = self._history.trim(self._clock() - keep_days * 86400, keep_tasks)
        except sqlite3.Error as error:
            logger.error("cannot trim the task history: %s", error)
            return
        if removed:
            with self._lock:
                self._stored_answers.clear()
            logger.info("removed %d task(s) older than %d days or past the newest %d from "
                        "the history", removed, keep_days, keep_tasks)

    def stored(self, task_id):
        """True when the history has a task of this id (sqlite3.Error if it cannot be read)."""
        return self._history.load(task_id, None) is not None

    def history_size(self):
        """(tasks, bytes on disk) of the history, or (None, None) when it cannot be read."""
        try:
            return self._history.size()
        except (sqlite3.Error, OSError):
            return None, None

    def _forget(self, task):
        """A written, ended task leaves the dict (the lock held); it is read from the history."""
        self._tasks.pop(task.id, None)
        pair = self._by_pair.get((task.app, task.env), [])
        if task in pair:
            pair.remove(task)
        if not pair:
            self._by_pair.pop((task.app, task.env), None)
        self._comings_and_goings.notify_all()

    def _stored_snapshot(self, task_id, offset):
        task = self._history_read(self._history.load, task_id, offset)
        if task is None:
            raise HTTPError(404, "no task %d" % task_id)
        return task.snapshot(offset)

    def _history_read(self, read, *arguments):
        try:
            return read(*arguments)
        except sqlite3.Error as error:
            logger.error("cannot read the task history: %s", error)
            raise HTTPError(503, "the task history cannot be read right now; try again shortly",
                            headers=[("Retry-After", "5")])


class TaskHistory:
    """Task records and their output in SQLite (the standard library's sqlite3).

    Two connections, each used under a lock of its own from any thread: one writes (the
    persist thread), one reads, so that a write waiting for a database another process has
    locked holds up no reader (WAL lets reads go on beside a write).  Output is stored as chunks
    keyed by the character offset where each starts, so a write adds only what is new and a
    read from an offset fetches only the chunks it needs.  The server gives each task its id;
    AUTOINCREMENT remembers the highest ever given, so that ids keep rising across restarts.
    """

    SCHEMA_VERSION = 4
    MIGRATIONS = {          # from version N to N + 1
        1: "ALTER TABLE tasks ADD COLUMN outcome TEXT",
        2: "ALTER TABLE tasks ADD COLUMN keeper_pid INTEGER; "
           "ALTER TABLE tasks ADD COLUMN keeper_start TEXT",
        3: "ALTER TABLE tasks ADD COLUMN started_at REAL",
    }
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            app TEXT NOT NULL, env TEXT NOT NULL, action TEXT NOT NULL,
            status TEXT NOT NULL, exit_code INTEGER, pid INTEGER, process_start TEXT,
            created_at REAL NOT NULL, finished_at REAL, started_by TEXT,
            version INTEGER NOT NULL, output_length INTEGER NOT NULL, outcome TEXT,
            keeper_pid INTEGER, keeper_start TEXT, started_at REAL);
        CREATE INDEX IF NOT EXISTS tasks_by_app ON tasks (app, env, id);
        CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, id);
        CREATE TABLE IF NOT EXISTS output (
            task_id INTEGER NOT NULL, start INTEGER NOT NULL, text TEXT NOT NULL,
            PRIMARY KEY (task_id, start)) WITHOUT ROWID;
    """
    COLUMNS = ", ".join(TaskRecord._fields)

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        try:
            if path != ":memory:":
                if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                    raise StartupError("--db: the folder of %s does not exist" % path)
                if not os.path.exists(path):    # deploy output may hold secrets: owner only
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > self.SCHEMA_VERSION:
                raise StartupError("--db: %s holds schema version %d; this server knows %d"
                                   % (path, version, self.SCHEMA_VERSION))
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for step in range(version or self.SCHEMA_VERSION, self.SCHEMA_VERSION):
                # A step and the version it reaches commit together: a server killed halfway
                # leaves a history the next start migrates, not one with half a step done.
                self._db.executescript("BEGIN; %s; PRAGMA user_version = %d; COMMIT;"
                                       % (self.MIGRATIONS[step], step + 1))
            self._db.executescript(self.SCHEMA)
            self._db.execute("PRAGMA user_version = %d" % self.SCHEMA_VERSION)
            self._db.execute("SELECT count(*) FROM tasks").fetchone()
            self._db.execute("BEGIN IMMEDIATE")     # fails now, not at the first task, if read-only
            self._db.execute("COMMIT")
            self._reader, self._read_lock = self._db, self._lock
            if path != ":memory:":              # (a second :memory: would be another database)
                self._reader = sqlite3.connect(path, check_same_thread=False,
                                               isolation_level=None)
                self._reader.row_factory = sqlite3.Row
                self._read_lock = threading.Lock()
        except (sqlite3.Error, OSError) as error:
            raise StartupError("--db: cannot use %s as the task history: %s" % (path, error))

    def last_id(self):
        """The highest task id this history has ever held."""
        with self._read_lock:
            return self._reader.execute(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'tasks'), 0), "
                "coalesce((SELECT max(id) FROM tasks), 0))").fetchone()[0]

    def save(self, changes):
        """Write (TaskRecord, new output pieces, whether the row is new) for each changed task,
        in one transaction."""
        with self._transaction():
            for record, pieces, new in changes:
                self._db.executemany("INSERT INTO output (task_id, start, text) VALUES (?, ?, ?)",
                                     [(record.id, start, text) for start, text in pieces])
                fields = record._asdict()
                if new:
                    self._db.execute("INSERT INTO tasks (%s) VALUES (%s)" % (
                        self.COLUMNS, ", ".join(":" + name for name in fields)), fields)
                else:
                    self._db.execute("UPDATE tasks SET %s WHERE id = :id" % ", ".join(
                        "%s = :%s" % (name, name) for name in fields if name != "id"), fields)

    @contextlib.contextmanager
    def _transaction(self):
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does): the error to report
                # is the one that got us here.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def load(self, task_id, offset=0):
        """The stored task with the output from `offset` on (None: without output), or None."""
        with self._read_lock:
            row = self._reader.execute("SELECT %s FROM tasks WHERE id = ?" % self.COLUMNS,
                                   (task_id,)).fetchone()
            if row is None:
                return None
            # From the last chunk that starts at or before offset (SQLite's length() stops at
            # a NUL character, so chunk ends are not computed in SQL).
            chunks = [] if offset is None else self._reader.execute(
                "SELECT start, text FROM output WHERE task_id = ? AND start >= coalesce("
                "(SELECT max(start) FROM output WHERE task_id = ? AND start <= ?), 0) "
                "ORDER BY start", (task_id, task_id, offset)).fetchall()
        return self._task(row, Output.from_chunks(chunks, row["output_length"]))

    def tail(self, task_id, count):
        """The last `count` lines of a stored task's output, its chunks read from the end."""
        with self._read_lock:
            chunks = self._reader.execute("SELECT start, text FROM output WHERE task_id = ? "
                                      "ORDER BY start DESC", (task_id,))
            return last_lines(chunks, count)

    def summaries(self, app, env, status, before, limit):
        """Stored tasks (without output), newest first, filtered."""
        clauses, values = [], []
        for column, value in (("app", app), ("env", env), ("status", status)):
            if value is not None:
                clauses.append("%s = ?" % column)
                values.append(value)
        if before is not None:
            clauses.append("id < ?")
            values.append(before)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._read_lock:
            rows = self._reader.execute("SELECT %s FROM tasks %s ORDER BY id DESC LIMIT ?"
                                    % (self.COLUMNS, where), values + [limit]).fetchall()
        return [self._task(row, Output.from_chunks([], row["output_length"])) for row in rows]

    def trim(self, older_than, keep):
        """Remove ended tasks created before `older_than`, or past the newest `keep`, with
        their output, a batch per transaction; how many went."""
        removed = 0
        ended = sorted(ENDED)
        while True:
            with self._transaction():
                ids = [row[0] for row in self._db.execute(
                    "SELECT id FROM tasks WHERE status IN (%s) AND (created_at < ? OR id <= "
                    "coalesce((SELECT id FROM tasks ORDER BY id DESC LIMIT 1 OFFSET ?), 0)) "
                    "ORDER BY id LIMIT ?" % ", ".join("?" * len(ended)),
                    ended + [older_than, keep, TRIM_BATCH])]
                for task_id in ids:
                    self._db.execute("DELETE FROM output WHERE task_id = ?", (task_id,))
                    self._db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            removed += len(ids)
            if len(ids) < TRIM_BATCH:
                return removed

    def size(self):
        """(tasks, bytes on disk) of the history."""
        with self._read_lock:
            tasks = self._reader.execute("SELECT count(*) FROM tasks").fetchone()[0]
        if self.path == ":memory:":
            return tasks, 0
        files = (self.path, self.path + "-wal")
        return tasks, sum(os.path.getsize(path) for path in files if os.path.exists(path))

    def unfinished(self):
        """Tasks recorded as not ended: the server stopped while they ran or waited."""
        with self._read_lock:
            rows = self._reader.execute("SELECT %s FROM tasks WHERE status NOT IN (%s) ORDER BY id"
                                    % (self.COLUMNS, ", ".join("?" * len(ENDED))),
                                    sorted(ENDED)).fetchall()
        return [self._task(row, Output.from_chunks([], row["output_length"])) for row in rows]

    def close(self):
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()        # (the same connection again for :memory:: no matter)

    @staticmethod
    def _task(row, output):
        task = Task(row["id"], row["app"], row["env"], row["action"], row["created_at"],
                    row["started_by"], output, row["status"])
        for field in ("exit_code", "pid", "process_start", "finished_at", "version", "outcome",
                      "keeper_pid", "keeper_start", "started_at"):
            setattr(task, field, row[field])
        task.persisted, task.persisted_version = output.length, task.version
        task.stored = True
        return task


# ---------------------------------------------------------------- running pulsar

@dataclasses.dataclass(frozen=True)
class PulsarCommand:
    """How pulsar is run, as found at start from what `PULSAR_BIN --version` says: the `classic`
    form for pulsar 0.x (and any program that names no pulsar version, such as echo), the `v1`
    form (`pulsar task ...`) for pulsar 1.1 and newer."""

    binary: str = "pulsar"
    form: str = "classic"
    conf_repo: str = None
    conf_branch: str = None
    version: str = None         # what --version named, if it named a version
    lister: str = None          # what lists the apps: pulsar 1.x itself, or 0.x's pulsar-utils

    def argv(self, app, env, action):
        if self.form == "v1":
            return [self.binary, "task"] + self._repo_options() + [app, env, action]
        return [self.binary] + self._repo_options() + [app, env, action]

    def list_argv(self):
        """The command line that lists apps and environments, or None if nothing can."""
        return None if self.lister is None else [self.lister, "list"] + self._repo_options()

    def success_line(self, app, env, action):
        """The line pulsar 1.x prints last when a task succeeded (it exits 0 either way); None
        for pulsar 0.x, whose exit status tells."""
        if self.form != "v1":
            return None
        return "Executed task %s for %s on %s!" % (action, app, env)

    def _repo_options(self):
        if not self.conf_repo:
            return []
        if self.form == "v1":
            return ["--conf-repo", self.conf_repo]      # 1.x has no branch option
        return ["--conf-repo", self.conf_repo, "--conf-branch", self.conf_branch or "master"]


def judge_end(command, task, returncode, kill_requested, last_words):
    """(status, outcome) of a task whose pulsar has exited: the status, and one sentence that
    says what decided it.  `last_words` is the end of everything pulsar printed (bytes), even
    past --max-output.

    pulsar 1.x exits 0 whatever happens: a task is finished only if its success line is the
    last thing pulsar printed.  pulsar 0.x (and the classic form) is judged by its exit status.
    """
    if kill_requested:
        return KILLED, "killed on request"
    if returncode < 0:
        return FAILED, "pulsar was ended by signal %d (%s)" % (-returncode,
                                                               signal_name(-returncode))
    if returncode > 0:
        return FAILED, "pulsar exited with code %d" % returncode
    expected = command.success_line(task.app, task.env, task.action)
    lines = visible_lines(last_words)
    failure = reported_failure(lines)
    if expected is None:
        if failure:     # pulsar 1.x run in the classic form: it says so, and exits 0
            return FAILED, "pulsar exited with code 0 but reported failure: %s" % failure
        return FINISHED, "pulsar exited with code 0"
    if lines and lines[-1] == expected:
        return FINISHED, "pulsar reported success: %s" % expected
    if failure:
        return FAILED, "pulsar reported failure: %s" % failure
    last = "'%s'" % printable(lines[-1])[:OUTCOME_MAX] if lines else "nothing"
    return FAILED, ("pulsar exited with code 0 without its success line '%s'; it printed last: %s"
                    % (printable(expected), last))


def reported_failure(lines):
    """pulsar 1.x's own words about a failure, from the last ones in `lines`, or None: its
    failure line and the error after it, or Thor's complaint about the command line."""
    for index in range(len(lines) - 1, -1, -1):
        if PULSAR_FAILURE.match(lines[index]):
            return printable(" ".join(lines[index:index + 2]))[:OUTCOME_MAX]
        if THOR_ERROR.match(lines[index]):
            return printable(lines[index])[:OUTCOME_MAX]
    return None


def printable(text):
    """Text without control or invisible formatting characters, to quote in a sentence."""
    return "".join(char for char in text if unicodedata.category(char) not in ("Cc", "Cf"))


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def visible_lines(data):
    """The non-empty lines of some output as a terminal shows them: escape sequences and
    control characters removed, a line rewritten after a carriage return shown as rewritten,
    surrounding blanks stripped."""
    text = ESCAPE_SEQUENCE.sub("", data.decode("utf-8", "replace"))
    lines = (line.rstrip("\r").rpartition("\r")[2] for line in text.split("\n"))
    lines = (printable(line).strip() for line in lines)
    return [line for line in lines if line]


def process_start_token(pid):
    """Boot id and start time of a live process: the same pid names the same process only if
    these match too (Linux /proc; None elsewhere, and for a process that has exited but is
    not reaped yet)."""
    fields = process_status(pid)
    boot = boot_id()
    if fields is None or fields[0] in (b"Z", b"X") or not boot:
        return None
    return "%s:%s" % (boot, fields[19].decode())


@functools.lru_cache(maxsize=None)
def boot_id():
    """This boot's id: it stays the same while the server runs, so it is read once."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as source:
            return source.read().strip()
    except OSError:
        return ""


def process_status(pid):
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...),
    or None when the process is gone or there is no /proc."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as source:
            data = source.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def processes_where(field, value):
    """The live processes whose /proc stat field (2: group, 3: session) is `value`: a scan of
    /proc, for the rare cases that need one (a keeper gone, a task of an old server)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        fields = process_status(entry) if entry.isdigit() else None
        if fields and int(fields[field]) == value and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def still_running(task):
    """True when the pulsar an old server ran for a task, or what it left in its group, still
    runs (tasks from before keepers: their pid was pulsar's)."""
    token = process_start_token(task.pid)
    if token is not None:
        return token == task.process_start     # else the pid now names another process
    return bool(processes_where(2, task.pid))   # a live group keeps its id from being reused


def end_processes(pids_of, kill_grace, signals=(signal.SIGTERM, signal.SIGKILL)):
    """SIGTERM, then SIGKILL after the grace period, to the processes pids_of() names each
    time, until none is left; for processes that are not the server's children, so nothing
    tells when they end: this re-checks."""
    for number in signals:
        for pid in pids_of():
            with contextlib.suppress(OSError):
                os.kill(pid, number)
        deadline = time.monotonic() + kill_grace
        while pids_of() and time.monotonic() < deadline:
            time.sleep(0.01)


class Reaper:
    """Reaps every child of the server, in one thread: the keeper factory, the short commands
    the server runs (`pulsar list`), and anything else re-parented to a server that runs as
    PID 1 or as a subreaper (a container without --init), which nobody else would reap.

    A child is started through start() with the lock held, so the thread, which reaps first
    and looks the pid up after, always knows whose it was.  Nothing else in the server waits
    for a child once the reaper runs (Popen.wait would race it for the exit status).
    """

    def __init__(self):
        self._lock = threading.Condition()
        self._waiting = {}              # pid -> Exit, of children started through start()
        self._started = 0               # children started so far
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()

    def start(self, popen):
        """Start a child: popen() makes the Popen; its Exit tells when it has been reaped."""
        with self._lock:
            process = popen()
            exit = self._waiting[process.pid] = Exit(process)
            self._started += 1
            self._lock.notify()         # there is a child to wait for now
        return process, exit

    def _reap(self):
        while True:
            with self._lock:
                started = self._started
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:   # no child: wait for one (orphans come unannounced)
                with self._lock:
                    self._lock.wait_for(lambda: self._started != started, REAPER_IDLE)
                continue
            except InterruptedError:
                continue
            with self._lock:
                exit = self._waiting.pop(pid, None)
            if exit is not None:
                exit.set(-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                         else os.WEXITSTATUS(status))


class Exit:
    """The exit status of a child, once the Reaper has reaped it."""

    def __init__(self, process):
        self._process = process
        self._reaped = threading.Event()

    def set(self, code):
        self._process.returncode = code     # so that Popen never waits for it itself
        self._reaped.set()

    def wait(self, timeout=None):
        """The exit status, or None if the child is still running after `timeout`."""
        self._reaped.wait(timeout)
        return self._process.returncode

    @property
    def reaped(self):
        return self._reaped.is_set()


def write_json_whole(path, value):
    """Write a JSON file whole or not at all (a reader never sees half of it)."""
    with open(path + ".tmp", "w") as out:
        json.dump(value, out)
    os.replace(path + ".tmp", path)


class TaskFolder:
    """A task's folder, DB.tasks/ID/, which its keeper and the servers share.  Made with the
    task, it says what the history may not have yet, and is the only record of a task the
    history has not been able to take:

      task        JSON, written first: what was asked, by whom, when, and whether it was queued
      keeper      JSON, written by the factory before it lets the keeper go: its pid and
                  start time.  With it the task has left the line and may run; without it, it
                  never ran
      dropped     JSON: why a queued task left the line without running (a kill, a stop)
      bell        a FIFO the keeper writes a byte to after each piece of output
      output      everything pulsar printed, up to --max-output bytes (and 4 more)
      started     JSON, once pulsar runs: its pid, or why it could not start
      ended       JSON, written last: pulsar's exit status, whether it was killed, when it
                  exited and when all of it had ended, the last bytes it printed
      keeper.log  what the keeper itself had to say, if anything
      work/       pulsar's working folder

    It outlives the server: the next server reads it, and removes it once the task's end and
    whole output are in the history.
    """

    # The fields of the keeper's records and the types it writes them with: a record of
    # another shape was not written by a keeper (a damaged disk, a hand) and is not acted on.
    KEEPER_RECORDS = {
        "started": {"pid": (int, type(None)), "at": (int, float), "error": (str, type(None))},
        "ended": {"exit": (int, type(None)), "killed": (bool,), "ended": (int, float),
                  "last": (str,), "error": (str, type(None))},
    }

    def __init__(self, root, task_id):
        self.path = os.path.join(root, str(task_id))

    @staticmethod
    def ids_in(root):
        """The ids of the task folders in `root`, in order (other names are not ours)."""
        return sorted(int(name) for name in os.listdir(root)
                      if COUNT_PATTERN.fullmatch(name) and int(name) > 0)

    def create(self, task):
        """Make the folder, recording what the task is; OSError if that cannot be done."""
        os.mkdir(self.path, 0o700)
        try:
            os.mkfifo(self.file("bell"), 0o600)
            self.write_json("task", {"id": task.id, "app": task.app, "env": task.env,
                                     "action": task.action, "createdAt": task.created_at,
                                     "startedBy": task.started_by,
                                     "queued": task.status == QUEUED})
        except OSError:
            self.remove()
            raise

    def recorded_task(self, max_output):
        """The task its `task` file describes (or its `dropped` one, once a full disk made
        that of it), or None when neither says anything readable."""
        said = self.read_json("task") or self.read_json("dropped") or {}
        try:
            task = Task(int(said["id"]), str(said["app"]), str(said["env"]), str(said["action"]),
                        float(said["createdAt"]), str(said["startedBy"]), Output(max_output),
                        QUEUED if said["queued"] is True else RUNNING)
        except (KeyError, TypeError, ValueError):
            return None
        names = [NAME_PATTERN.fullmatch(task.app), NAME_PATTERN.fullmatch(task.env),
                 ACTION_PATTERN.fullmatch(task.action)]
        if not (all(names) and 0 < task.created_at < LATEST_TIME):     # not one we took
            return None
        return task if os.path.basename(self.path) == str(task.id) else None

    def file(self, name):
        return os.path.join(self.path, name)

    def exists(self):
        return os.path.isdir(self.path)

    def mark_dropped(self, why):
        """Say that the task left the line without running; OSError if that cannot be said.
        On a full disk the `task` file becomes the `dropped` one: a rename needs no room."""
        try:
            self.write_json("dropped", {"why": why})
        except OSError:
            os.replace(self.file("task"), self.file("dropped"))

    def write_json(self, name, value):
        write_json_whole(self.file(name), value)

    def read_json(self, name):
        """The JSON object written under `name`, or None when there is none of the shape
        expected (not yet, or not readable)."""
        try:
            with open(self.file(name)) as source:
                value = json.load(source)
        except (OSError, ValueError):
            return None
        if not isinstance(value, dict):
            return None
        fields = self.KEEPER_RECORDS.get(name, {})
        fits = all(key in value and type(value[key]) in types for key, types in fields.items())
        return value if fits and keeper_record_holds(name, value) else None

    def keeper_said(self):
        """What the keeper wrote to its log, in one line (empty if nothing)."""
        try:
            with open(self.file("keeper.log"), "rb") as source:
                text = source.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return " / ".join(line for line in text.splitlines() if line.strip())

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


def keeper_record_holds(name, value):
    """True when the values of a keeper's record (of the right shape) are ones a keeper can
    have written: a pid Linux can give, an exit status of 0-255 or a signal, none only for a
    pulsar that never ran (killed first, or it could not start), and a time a date can show."""
    if name == "started":
        return (value["pid"] is None or 0 < value["pid"] <= PID_MAX) and (
            0 < value["at"] < LATEST_TIME)
    if name == "ended":
        code = value["exit"]
        ran = code is not None and -64 <= code <= 255
        never_ran = code is None and (value["killed"] or value["error"] is not None)
        return (ran or never_ran) and 0 < value["ended"] < LATEST_TIME
    return True


class Keeper:
    """The server's side of a task's keeper (the KEEPER program): it has the factory start it,
    follows its doorbell and output file, and asks it to kill the task.  A keeper is never the
    server's child (the factory's, or an earlier server's): it is known by its pid and start
    time, checked before each signal."""

    def __init__(self, task, folder, pid, start_token):
        self.task = task
        self.folder = folder
        self.pid = pid
        self.start_token = start_token      # identifies the keeper across a server restart
        self.adopted = False                # started by an earlier server
        self.kill_requested_by = None
        self.end_rung = False
        self.bell = None
        self._output = None
        self._offset = 0                    # bytes of the output file read so far
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pulsar_pid = None

    @classmethod
    def start(cls, task, folder, *, argv, kill_grace, keep, factory):
        """Have the factory start a keeper that runs a task in its folder; OSError if none was
        started."""
        keeper = cls(task, folder, None, None)
        keeper.open()       # before the factory opens the bell: see TaskWatcher for why
        order = [folder.path, str(kill_grace), str(keep)] + list(argv)
        try:
            keeper.pid, keeper.start_token = factory.start_keeper(
                order, named=lambda: folder.read_json("keeper"))
        except OSError:
            keeper.close()
            raise
        return keeper

    def open(self):
        """Open the doorbell and the output file for reading."""
        self.bell = os.open(self.folder.file("bell"), os.O_RDONLY | os.O_NONBLOCK)
        self._output = os.open(self.folder.file("output"), os.O_RDONLY | os.O_CREAT, 0o600)

    def close(self):
        for fd in (self.bell, self._output):
            if fd is not None:
                os.close(fd)
        self.bell = self._output = None

    def rung(self):
        """Drain the doorbell; False once the keeper has closed it (it has exited).  The
        keeper's last ring is "!", once it has written its end: `end_rung` notes it."""
        while True:
            try:
                data = os.read(self.bell, 4096)
            except BlockingIOError:
                return True
            if not data:
                return False
            self.end_rung = self.end_rung or b"!" in data

    def read_output(self, limit):
        """The output printed since the last call, decoded, at most about `limit` bytes of
        it; (text, whether more is waiting)."""
        data = os.pread(self._output, limit, self._offset)
        self._offset += len(data)
        return self._decoder.decode(data), len(data) == limit

    def last_words(self):
        """Flush the decoder at the end of the output (an unfinished character)."""
        return self._decoder.decode(b"", final=True)

    def alive(self):
        """True while the keeper runs (and its pid still names it)."""
        return self.start_token is not None and process_start_token(self.pid) == self.start_token

    def terminate(self, requested_by):
        """Ask the keeper to kill the task (SIGTERM to it; it ends the whole session)."""
        self.kill_requested_by = self.kill_requested_by or requested_by
        if self.alive():
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGTERM)


class KeeperUnknown(OSError):
    """The factory went away with an order: whether a keeper has it, the folder says."""


class KeeperFactory:
    """Starts the tasks' keepers.  Starting Python for each would cost a task ~12 ms of CPU:
    instead one small process started with the server, the factory (the KEEPER program), forks
    a keeper for each order, in ~1 ms.  The factory opens the task's doorbell for the keeper and
    writes its `keeper` file before it lets it go, so that a keeper that may act is always named
    by its folder and its doorbell reports its exit, whenever it comes.  Keepers are the
    factory's children, not the server's: it reaps them.  A factory that has died is started
    again for the next task; one whose stdin closes (the server stopped or died) exits."""

    def __init__(self, *, environ, reaper, record):
        self._environ = environ
        self._reaper = reaper
        self._record = record       # a file that names the factory, for the next server
        self._lock = threading.Lock()
        self._process = None
        self._exit = None
        try:            # now, so that the first task need not wait for Python to start
            self._start()
        except OSError as error:
            logger.error("cannot start the keeper factory (the first task will try again): %s",
                         error)

    def start_keeper(self, order, named):
        """(pid, start token) of a new keeper for `order` (the folder, the kill grace, bytes
        of output to keep, pulsar's argv); OSError if none was started.  named() reads the
        folder's `keeper` file, which says, should the factory go away with the order, which
        keeper it let go."""
        message = keeper_order(order)
        with self._lock:
            for tries_left in (1, 0):
                try:
                    self._send(message)
                except OSError:     # it had died: nothing of this order reached it
                    self._let_go()
                    self._send(message)
                try:
                    answer = self._answer()
                    break
                except KeeperUnknown as error:
                    # It is gone now: if it named no keeper, it let none go, and the order
                    # can be given again.
                    keeper = named() or {}
                    if isinstance(keeper.get("pid"), int):
                        logger.warning("%s; the folder names the keeper it let go", error)
                        return keeper["pid"], keeper.get("start")
                    logger.warning("%s; it let no keeper go", error)
                    if not tries_left:
                        raise OSError(str(error)) from None
        if answer.startswith("! "):
            raise OSError(answer[2:])
        pid, token = answer.split(" ")
        return int(pid), None if token == "-" else token

    def close(self):
        """Let the factory go (it exits at the end of its standard input)."""
        with self._lock:
            self._let_go()

    def _let_go(self):
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            with contextlib.suppress(OSError):
                self._process.stdout.close()
        self._process = None

    def _send(self, message):
        if self._process is None or self._exit.reaped:
            self._let_go()
            self._start()
        write_all(self._process.stdin.fileno(), message)

    def _answer(self):
        """The factory's one-line answer; KeeperUnknown if it went away without one, or gave
        none in time (it is killed then: a keeper it has not let go exits)."""
        answer, source = b"", self._process.stdout.fileno()
        readable = select.poll()        # (not select: the pipe may be past descriptor 1023)
        readable.register(source, select.POLLIN)
        deadline = time.monotonic() + KEEPER_START_TIMEOUT
        while not answer.endswith(b"\n"):
            waited = readable.poll(max(0, deadline - time.monotonic()) * 1000)
            piece = os.read(source, 4096) if waited else b""
            if not piece:
                pid = self._process.pid
                self._end(stalled=not waited)
                raise KeeperUnknown("the keeper factory (pid %d) %s" % (
                    pid, "went away with the order" if waited else "did not answer in %g s"
                    % KEEPER_START_TIMEOUT))
            answer += piece
        return answer[:-1].decode("utf-8", "replace")

    def _end(self, stalled):
        """See the factory gone before anyone reads the folder it may have written to: a
        stalled one is killed (a keeper it has not let go then exits)."""
        if stalled and not self._exit.reaped:   # (until it is reaped its pid is its own)
            with contextlib.suppress(OSError):
                os.kill(self._process.pid, signal.SIGKILL)
        self._exit.wait(KEEPER_START_TIMEOUT)
        self._let_go()

    def _start(self):
        with kill_held_back():      # the factory keeps SIGTERM blocked, and its keepers too
            self._process, self._exit = self._reaper.start(lambda: subprocess.Popen(
                keeper_command(), cwd="/", env=self._environ, bufsize=0,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True))
        write_all(self._process.stdin.fileno(), KEEPER_PROGRAM)    # it fits in the pipe
        pid = self._process.pid
        try:
            write_json_whole(self._record, {"pid": pid, "start": process_start_token(pid)})
        except OSError as error:
            logger.error("cannot record the keeper factory in %s (the next server cannot end "
                         "it, should it outlive this one): %s", self._record, error)


def end_earlier_keeper_factory(record):
    """End the keeper factory an earlier server on this history left running, before its tasks
    are taken over: it may still hold an order that server gave it, for a task the take-over
    would otherwise call never run.  (A factory ends when its server does, unless stopped.)"""
    try:
        with open(record) as source:
            named = json.load(source)
        pid, start = named["pid"], named["start"]
    except (OSError, ValueError, TypeError, KeyError):
        return
    if not isinstance(pid, int) or start is None or process_start_token(pid) != start:
        return
    logger.warning("ending the keeper factory (pid %d) an earlier server left running", pid)
    end_processes(lambda: [pid] if process_start_token(pid) == start else [],
                  KEEPER_START_TIMEOUT, signals=(signal.SIGKILL,))   # it keeps SIGTERM blocked


def keeper_order(order):
    """An order as the factory reads it: its length in 10 digits, then NUL-terminated fields."""
    fields = b"".join(os.fsencode(part) + b"\0" for part in order)
    return b"%010d" % len(fields) + fields


def keeper_command():
    """The factory's command line: its program comes first on its standard input, since a
    command line that held it would put 16 KB of code in every `ps` listing of the host."""
    return [sys.executable, "-I", "-S", "-c", "import sys; exec(compile(sys.stdin.buffer.read("
            "%d), 'pulsar-rest-api-keeper', 'exec'))" % len(KEEPER_PROGRAM),
            "pulsar-rest-api-keeper"]


def write_all(fd, data):
    """Write all of data to a blocking pipe (a write a signal interrupts may write part)."""
    while data:
        data = data[os.write(fd, data):]


@contextlib.contextmanager
def kill_held_back():
    """SIGTERM blocked in this thread while a keeper is started, so that the keeper starts with
    it blocked: a kill that comes before it can take one waits until it can (it unblocks it)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class TaskWatcher:
    """One thread that follows every running task: it waits on all keepers' doorbells at once,
    reads each task's new output from its output file into the store, notes pulsar's pid, and
    hands a task to `on_end` once its keeper has gone.

    A doorbell is a FIFO the keeper holds open read-write, so that its rings never block and
    never fail, whether or not a server reads them.  Opened for reading before the keeper
    starts (or, for an adopted keeper, before its `ended` file is looked for), it reports
    end-of-file exactly when the keeper has exited.
    """

    def __init__(self, *, store, on_end):
        self._store = store
        self._on_end = on_end
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._new = []                  # keepers handed over, not yet registered
        self._pending = set()           # keepers with more output to read than one round took
        threading.Thread(target=self._run, name="watcher", daemon=True).start()

    def follow(self, keeper):
        """Follow a keeper from now on (its doorbell is open already)."""
        with self._lock:
            self._new.append(keeper)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b".")

    def _run(self):
        while True:
            ready = self._selector.select(0 if self._pending else None)
            keepers = {key.data for key, _ in ready if key.data is not None}
            if any(key.data is None for key, _ in ready):
                keepers |= self._take_new()
            keepers |= self._pending
            self._pending = set()
            for keeper in keepers:
                self._serve(keeper)

    def _take_new(self):
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)
        with self._lock:
            new, self._new = self._new, []
        for keeper in new:
            self._selector.register(keeper.bell, selectors.EVENT_READ, keeper)
        return set(new)         # each is served once at once: an adopted one may be gone

    def _serve(self, keeper):
        """Read what a keeper has for its task; end the task once the keeper has gone."""
        ended = None
        try:
            # End-of-file on the doorbell comes once the keeper has exited, and also before a
            # new keeper has opened it: the keeper is gone once it wrote its end (it rings "!"
            # then, a moment before it exits) or has died.
            still_open = keeper.rung()
            # Whether it lives is asked before its end is read: a keeper seen dead had
            # written its end by then, if it ever did.
            dead = not still_open and not keeper.alive()
            ended = keeper.folder.read_json("ended") if (
                keeper.end_rung or not still_open) else None
            gone = ended is not None or dead
            more = self._read_output(keeper, finish=gone)
            if keeper.pulsar_pid is None:
                self._note_start(keeper)
        except Exception:       # one task's trouble must not stop every task being followed
            logger.exception("task %d: error while following its keeper", keeper.task.id)
            # A keeper that has gone is let go all the same: its task must still end (its
            # record says how, or that its end is unknown), and its closed doorbell would
            # otherwise be ready at every select.
            more, gone = False, ended is not None or not keeper.alive()
            if gone and ended is None:      # what failed may have come before its end was read
                with contextlib.suppress(Exception):
                    ended = keeper.folder.read_json("ended")
        if more:
            self._pending.add(keeper)
        elif gone:
            self._unfollow(keeper)
            try:
                self._on_end(keeper, ended)
            except Exception:
                logger.exception("task %d: error while ending it", keeper.task.id)

    def _unfollow(self, keeper):
        self._selector.unregister(keeper.bell)
        keeper.close()

    def _read_output(self, keeper, finish):
        """Move new output into the store, a few MiB at a time; True if more is waiting."""
        for _ in range(WATCH_ROUND // READ_SIZE):
            text, more = keeper.read_output(READ_SIZE)
            if text:
                self._store.add_output(keeper.task, text)
            if not more:
                if finish:
                    self._store.add_output(keeper.task, keeper.last_words())
                return False
        return True

    def _note_start(self, keeper):
        started = keeper.folder.read_json("started")
        if started is None:
            return
        keeper.pulsar_pid = started.get("pid") or 0
        if started.get("error"):
            self._store.add_output(keeper.task, started["error"] + "\n")
        elif keeper.pulsar_pid:
            self._store.attach(keeper.task, keeper.pulsar_pid, started["at"])
            logger.info("task %d: pulsar runs as pid %d", keeper.task.id, keeper.pulsar_pid)


class TaskRunner:
    """Starts each task under a keeper, keeps the line of tasks waiting for their app and
    environment, ends tasks when asked, and takes over at start what an earlier server left.

    Two deploys of one app and environment at once corrupt its releases, so a pair runs one task
    at a time (unless --allow-concurrent); a request for a busy pair is refused, or with
    queue=true waits in line and starts, in order, when the pair is free.  At most --max-tasks
    run, and at most MAX_QUEUED wait.  The line is kept by pair, so that a task's end looks only
    at the pairs that have tasks waiting.  Lock order: the runner's lock, then the store's.
    """

    def __init__(self, *, store, metrics, settings, command, task_folders, keepers):
        self._store = store
        self._metrics = metrics
        self._command = command
        self._kill_grace = settings.kill_grace
        self._task_folders = task_folders   # each task's folder is made in here
        self._keepers = keepers             # a KeeperFactory
        self._max_tasks = settings.max_tasks
        self._one_per_pair = not settings.allow_concurrent
        self._allowed_actions = tuple(settings.allow_action)
        self._lock = threading.Lock()       # guards the line and starts: check, create, launch
        self._line = collections.OrderedDict()  # (app, env) -> its queued tasks, oldest first
        self._queued = 0
        self._stopping = False
        self._watcher = TaskWatcher(store=store, on_end=self._ended)

    # -- requests

    def start(self, app, env, action, started_by="-", queue=False):
        """Start a task, or queue it; HTTPError 403/409/429/503 when it may not run now."""
        self._check_allowed(action)
        with self._lock:
            if self._stopping:
                raise HTTPError(503, "the server is stopping; no new tasks")
            blocker = self._blocker(app, env, advise=not queue)
            if blocker is None:
                task = self._store.create(app, env, action, started_by, record=self._record)
                self._launch(task)
                return task
            if not queue:
                raise blocker
            if self._queued >= MAX_QUEUED:
                raise HTTPError(429, "%d tasks wait in line already, the most this server keeps; "
                                     "try later" % self._queued, headers=[("Retry-After", "60")])
            task = self._store.create(app, env, action, started_by, status=QUEUED,
                                      record=self._record)
            self._enqueue(task)
        logger.info("task %d queued by %s: %s %s %s (%s)", task.id, started_by, app, env, action,
                    blocker.message)
        return task

    def kill(self, task_id, requested_by="-"):
        """End a task: take it out of the line, or have its keeper end its session; the task
        as the API answers it once it has ended, or 409 if it ended by itself first."""
        logger.info("task %d: kill requested by %s", task_id, requested_by)
        why = "removed from the line by %s" % requested_by
        with self._lock:
            queued = self._in_line(task_id)
            if queued is not None:
                self._note_dropped(queued, why, refuse=True)
                self._take_from_line(task_id)
        if queued is not None:
            self._drop(queued, why)
            return self._store.read(task_id)
        self._store.keeper_to_kill(task_id).terminate(requested_by)
        task = (self._store.wait_until_ended(task_id, self._kill_grace + OUTPUT_DRAIN + 2)
                or self._store.read(task_id))
        if task["status"] not in (KILLED, RUNNING):
            raise HTTPError(409, "task %d was not killed: it ended %s (%s)"
                            % (task_id, task["status"], task["outcome"]))
        return task

    def refuse_new(self, keep_line=False):
        """From now on a new task is answered 503; tasks waiting in line are dropped, unless
        they are kept for the next server (a hand-over).  The tasks that were in line."""
        with self._lock:
            self._stopping = True
            line = [task for tasks in self._line.values() for task in tasks]
            self._line.clear()
            self._queued = 0
        line.sort(key=lambda task: task.id)
        for task in line:
            if not keep_line:
                self._drop(task, "the server stopped before this task's turn")
        return line

    @property
    def stopping(self):
        return self._stopping

    def stop_all(self):
        """Refuse new tasks, kill every running one and wait for them to end."""
        self.refuse_new()
        tasks = self._store.running()
        for task in tasks:
            keeper = task.keeper
            if keeper:
                keeper.terminate("the server's stop")
        for task in tasks:
            self._store.wait_until_ended(task.id, self._kill_grace + OUTPUT_DRAIN + 2)

    # -- what an earlier server left

    def take_over(self, unfinished):
        """Take over what an earlier server left: the tasks the history says are unfinished,
        and those only their folders know (it died before the history had them).  A task
        whose keeper got its order is adopted, whether its keeper still runs or recorded its
        end, or else it is lost; a queued one goes back in line, unless it was dropped, or the
        task before it in line was lost (it was queued behind a deploy whose end is unknown);
        one that was to start but never got a keeper did not run."""
        tasks = {task.id: task for task in unfinished}
        for task_id in TaskFolder.ids_in(self._task_folders):
            self._store.use_ids_above(task_id)
            if task_id not in tasks:
                found = self._found_on_disk(task_id)
                if found is not None:
                    tasks[task_id] = found
        lost_pairs, line = set(), []
        for task in sorted(tasks.values(), key=lambda task: task.id):
            how = self._take_over_one(task)
            if how == LOST:
                lost_pairs.add((task.app, task.env))
            elif how == QUEUED:
                line.append(task)
        for task in line:
            if (task.app, task.env) in lost_pairs:
                self._drop(task, "the task before it in line was lost, so it was not started")
            else:
                with self._lock:
                    self._enqueue(task)
                logger.info("task %d is back in line", task.id)
        with self._lock:
            self._start_from_line()
        self._store.persist()       # what the history lacks, before anyone reads it

    def _found_on_disk(self, task_id):
        """The task a folder records that the history does not have as unfinished, or None
        (the folder is removed when the history has all of the task, or when it says
        nothing of a task)."""
        folder = TaskFolder(self._task_folders, task_id)
        if self._store.stored(task_id):
            logger.info("removing %s: the history has all of task %d", folder.path, task_id)
            folder.remove()
            return None
        task = folder.recorded_task(self._store.max_output)
        if task is None and folder.read_json("keeper") is not None:
            logger.error("%s does not say which task it is for, but a keeper has run there: "
                         "left as it is", folder.path)
            return None
        if task is None:
            logger.warning("removing %s: it does not say which task it is for", folder.path)
            folder.remove()
            return None
        logger.info("task %d (%s %s %s) is not in the history yet: %s says what it is",
                    task.id, task.app, task.env, task.action, folder.path)
        return task

    def _take_over_one(self, task):
        """Take over one unfinished task; what it is now: RUNNING, QUEUED, or how it ended."""
        folder = TaskFolder(self._task_folders, task.id)
        if folder.exists():
            task.folder = folder
        keeper = folder.read_json("keeper") or {}
        pid, start = keeper.get("pid"), keeper.get("start")
        if pid is None:         # from a server that wrote no keeper file
            pid, start = task.keeper_pid, task.keeper_start
        if isinstance(pid, int):
            return self._adopt(task, folder, pid, start)
        self._store.add(task)
        dropped = folder.read_json("dropped")
        if dropped is not None:
            self._drop(task, dropped.get("why") or "taken out of the line before the earlier "
                                                   "server stopped")
            return KILLED
        recorded = folder.recorded_task(self._store.max_output)
        if task.status == QUEUED or (recorded and recorded.status == QUEUED):
            self._store.requeue(task)   # its turn had come, but it never got a keeper
            return QUEUED
        if task.pid:            # from a server older than keepers: pulsar was its child
            note = "the server stopped while this task ran; its end is unknown"
            if still_running(task):
                end_processes(lambda: processes_where(2, task.pid), self._kill_grace)
                note += ("; its processes (group %d) were still running and have been killed"
                         % task.pid)
            return self._lost(task, note)
        why = "the server stopped before it could start this task; it did not run"
        self._store.add_output(task, "[pulsar-rest-api: %s]\n" % why)
        self._store.end(task, KILLED, None, why)
        logger.info("task %d killed: %s", task.id, why)
        return KILLED

    def _adopt(self, task, folder, pid, start):
        """Follow a task whose keeper an earlier server started (or call it lost when its
        folder is gone)."""
        task.keeper_pid, task.keeper_start = pid, start
        if task.status == QUEUED:
            logger.info("task %d had just left the line when the earlier server stopped",
                        task.id)
            task.status = RUNNING
        if not folder.exists():
            self._store.add(task)
            return self._lost(task, "the server stopped while this task ran, and its folder %s "
                                    "is gone; its end is unknown" % folder.path)
        task.output = Output(self._store.max_output)    # read again whole from its folder
        keeper = Keeper(task, folder, pid, start)
        keeper.adopted = True
        try:
            keeper.open()
        except OSError as error:
            self._store.add(task)
            return self._lost(task, "the server stopped while this task ran, and its folder "
                                    "cannot be followed (%s); its end is unknown" % error)
        task.keeper = keeper
        recorded_version, recorded_length = task.version, task.persisted
        self._store.add(task)
        # What it printed so far, read before anyone can ask (the server does not listen yet),
        # so that a follower's offset from the earlier server is never past the end.
        while True:
            text, more = keeper.read_output(READ_SIZE)
            self._store.add_output(task, text)
            if not more:
                break
        # The earlier server may have shown versions past the last one it recorded: at most
        # one per character printed since that record, and one per change of status.  Go past
        # them all, so that a version never goes back.
        self._store.move_version_past(task, recorded_version + TAKE_OVER_CHANGES + max(
            0, task.output.length - recorded_length))
        self._watcher.follow(keeper)    # adopted, or ended: the watcher reads on
        logger.info("task %d (%s %s %s) taken over from an earlier server: keeper pid %d %s",
                    task.id, task.app, task.env, task.action, keeper.pid,
                    "still runs" if keeper.alive() else "has ended")
        return RUNNING

    def _lost(self, task, note):
        self._store.add_output(task, "\n[pulsar-rest-api: %s]\n" % note)
        self._store.end(task, LOST, None, note)
        logger.warning("task %d (%s %s %s) is lost: %s", task.id, task.app, task.env,
                       task.action, note)
        return LOST

    # -- starting

    def _check_allowed(self, action):
        if self._allowed_actions and not any(fnmatch.fnmatchcase(action, pattern)
                                             for pattern in self._allowed_actions):
            raise HTTPError(403, "action %s is not allowed on this server; allowed: %s"
                            % (quoted(action), ", ".join(self._allowed_actions)))

    def _blocker(self, app, env, queued=False, advise=False):
        """Why a task for this pair cannot start now (an HTTPError to raise), or None.  A new
        request waits for any live task of the pair; a queued one, whose elders in line have
        had their turn, only for a running one.  `advise`: the reason says how to wait."""
        if self._one_per_pair:
            holder = self._store.task_of_pair(app, env, (RUNNING,) if queued else (RUNNING, QUEUED))
            if holder is not None:
                return HTTPError(409, "%s/%s already has task %d (%s, %s), started by %s at %s%s"
                                 % (app, env, holder["id"], holder["action"], holder["status"],
                                    holder["startedBy"], holder["createdAt"],
                                    "; add queue=true to wait in line" if advise else ""),
                                 details={"taskId": holder["id"], "action": holder["action"],
                                          "status": holder["status"],
                                          "startedBy": holder["startedBy"],
                                          "createdAt": holder["createdAt"],
                                          "startedAt": holder["startedAt"]})
        running = self._store.running_count
        if running >= self._max_tasks:
            return HTTPError(429, "%d tasks are running, the most this server runs at once "
                                  "(--max-tasks)%s" % (running, "; try later, or add queue=true"
                                                       if advise else ""))
        return None

    def _record(self, task):
        """Make a new task's folder, its record until the history has it; 503 if it cannot."""
        folder = TaskFolder(self._task_folders, task.id)
        try:
            folder.create(task)
        except OSError as error:
            logger.error("task %d: cannot create its folder %s: %s", task.id, folder.path, error)
            raise HTTPError(503, "the server cannot record a new task (%s), so none was started"
                                 % (error.strerror or error), headers=[("Retry-After", "5")])
        task.folder = folder

    def _launch(self, task):
        """Start a task's keeper in the task's folder (the lock is held); a keeper that cannot
        start fails the task."""
        argv = self._command.argv(task.app, task.env, task.action)
        self._metrics.task_started()
        try:
            if task.folder is None:         # queued under a server that made no folders
                task.folder = TaskFolder(self._task_folders, task.id)
                task.folder.create(task)
            keeper = Keeper.start(task, task.folder, argv=argv, kill_grace=self._kill_grace,
                                  keep=self._store.max_output + 4, factory=self._keepers)
        except OSError as error:
            logger.error("task %d: could not start its keeper: %s", task.id, error)
            self._metrics.task_finished(FAILED, 0.0)
            self._store.add_output(task, "could not start pulsar's keeper: %s\n" % error)
            self._store.end(task, FAILED, None, "could not start pulsar's keeper: %s" % error)
            return
        self._store.attach_keeper(task, keeper)
        self._watcher.follow(keeper)
        logger.info("task %d started by %s: %s %s %s (keeper pid %d)",
                    task.id, task.started_by, task.app, task.env, task.action, keeper.pid)

    # -- the line: by pair, each pair's tasks oldest first

    def _enqueue(self, task):
        self._line.setdefault((task.app, task.env), []).append(task)
        self._queued += 1

    def _start_from_line(self):
        """Start, oldest first, the queued tasks whose pair is free (the lock is held): it
        looks at the first task of each pair that waits, not at every task in line."""
        heads = sorted((tasks[0] for tasks in self._line.values()), key=lambda task: task.id)
        for task in heads:
            if self._stopping or self._blocker(task.app, task.env, queued=True):
                continue
            self._take_from_line(task.id, task)
            self._store.mark_running(task)
            self._launch(task)
            if not self._one_per_pair:
                self._start_from_line()     # its pair may start more than one
                return

    def _in_line(self, task_id):
        """The queued task of this id, or None (the lock is held)."""
        return next((task for tasks in self._line.values() for task in tasks
                     if task.id == task_id), None)

    def _note_dropped(self, task, why, refuse=False):
        """Have the task's folder say it left the line without running (once is enough);
        when it cannot: HTTPError 503 if `refuse`, else an error in the log."""
        if task.folder is None or task.folder.read_json("dropped") is not None:
            return
        try:
            task.folder.mark_dropped(why)
        except OSError as error:
            logger.error("task %d: cannot note in %s that it left the line: %s", task.id,
                         task.folder.path, error)
            if refuse:
                raise HTTPError(503, "task %d cannot be taken out of the line now: %s; it "
                                     "stays in line" % (task.id, error.strerror or error),
                                headers=[("Retry-After", "5")])

    def _take_from_line(self, task_id, task=None):
        """Take a queued task out of the line (the lock is held); it, or None."""
        for pair, tasks in self._line.items():
            for queued in tasks:
                if queued.id == task_id:
                    tasks.remove(queued)
                    if not tasks:
                        del self._line[pair]
                    self._queued -= 1
                    return queued
        return None

    def _drop(self, task, why):
        """End a queued task; its folder says so at once, should the history not have it
        before this server stops."""
        self._note_dropped(task, why)
        self._store.add_output(task, "[pulsar-rest-api: %s]\n" % why)
        self._store.end(task, KILLED, None, why)
        logger.info("task %d killed: %s", task.id, why)

    # -- ending

    def _ended(self, keeper, ended):
        """A task's keeper has gone (the watcher's thread): judge how the task ended.  A lost
        task ends once what it left has been ended (in a thread of its own: that takes up to
        the kill grace), so that the next task of its pair never runs beside it."""
        try:
            status, exit_code, outcome = self._judge(keeper, ended)
        except Exception as error:      # it must end all the same, and its line move on
            logger.exception("task %d: cannot judge how it ended", keeper.task.id)
            status, exit_code, outcome = LOST, None, (
                "the server could not judge how it ended (%s); its end is unknown" % error)
        if status != LOST:
            self._record_end(keeper, ended, status, exit_code, outcome)
            return

        def end_what_is_left():
            if keeper.start_token and keeper.start_token.startswith(boot_id() + ":"):
                end_processes(lambda: leftovers_of(keeper), self._kill_grace)
            self._store.add_output(keeper.task, "\n[pulsar-rest-api: %s]\n" % outcome)
            self._record_end(keeper, ended, status, exit_code, outcome)

        try:
            threading.Thread(target=end_what_is_left, name="lost-%d" % keeper.task.id,
                             daemon=True).start()
        except RuntimeError:    # no thread to be had: it ends here, late rather than never
            end_what_is_left()

    def _record_end(self, keeper, ended, status, exit_code, outcome):
        task = keeper.task
        finished_at = (ended or {}).get("ended") or time.time()
        said = keeper.folder.keeper_said()
        if said:
            logger.info("task %d: its keeper said: %s", task.id, said)
        # Counted and logged before anyone can see that it ended, so that /metrics and the
        # log already say so when a client that saw the end looks there.
        started_at = task.started_at or task.created_at     # how long it ran, not waited
        duration = finished_at - started_at
        self._metrics.task_finished(status, duration)
        code = (ended or {}).get("exit")
        how = ("no exit code" if code is None else "signal %d" % -code if code < 0
               else "exit code %d" % code)
        waited = started_at - task.created_at
        log = logger.warning if status == LOST else logger.info
        log("task %d %s (%s) after %.1f s%s: %s", task.id, status, how, duration,
            ", started %.1f s after it was asked for" % waited if waited >= 1 else "", outcome)
        with self._lock:    # the freed slot goes to the line, not to a newcomer in between
            self._store.end(task, status, exit_code, outcome, finished_at)
            self._start_from_line()

    def _judge(self, keeper, ended):
        """(status, exit code, outcome) from what the keeper recorded at its end."""
        if ended is None and os.path.exists(keeper.folder.file("ended")):
            return LOST, None, ("its keeper's record of how the task ended (%s) cannot be "
                                "read; its end is unknown" % keeper.folder.file("ended"))
        if ended is None and not os.path.exists(keeper.folder.file("keeper.log")):
            # The keeper makes its log first thing once it has its order: it never had one.
            return KILLED, None, ("its keeper ended before it could start pulsar (the server or "
                                  "its keeper factory stopped); it did not run")
        if ended is None:
            return LOST, None, ("its keeper (pid %d) ended without recording how the task ended "
                                "(killed with SIGKILL, or the host restarted); its end is "
                                "unknown" % keeper.pid)
        if ended.get("error"):
            return FAILED, None, ended["error"]
        code = ended.get("exit")
        killed = bool(ended.get("killed")) and code != 0     # it exited 0 by itself first
        status, outcome = judge_end(self._command, keeper.task, code, killed,
                                    ended["last"].encode("latin-1", "replace"))
        if status == KILLED:
            outside = ("a request to an earlier server, or a signal to its keeper from outside"
                       if keeper.adopted else "a signal to its keeper from outside the server")
            outcome = "killed by %s" % (keeper.kill_requested_by or outside)
        return status, code if code is not None and code >= 0 else None, outcome


def leftovers_of(keeper):
    """The live processes a dead keeper's task left (pulsar and its children would otherwise
    run on untracked): those of its session, whose id is the
    keeper's pid, that carry the task's mark in their environment.  The id stays taken while
    any of the session lives; once none does, a new process may get that pid and a new
    session that id, which is why the pid must not name a live process and the mark must
    match."""
    if process_start_token(keeper.pid) is not None:
        return []           # the pid names a live process: nothing of ours was left
    mark = TASK_MARK + os.fsencode(keeper.folder.path)
    return [pid for pid in processes_where(3, keeper.pid) if mark in environment_of(pid)]


def environment_of(pid):
    """The environment a process started with, as NAME=VALUE bytes (empty if unreadable)."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as source:
            return source.read().split(b"\0")
    except OSError:
        return []


def find_pulsar(settings, environ, workdir, reaper):
    """The PulsarCommand for --pulsar-bin and --pulsar-cli, from what `PULSAR_BIN --version`
    says; StartupError when pulsar is missing, does not answer, or cannot work as asked."""
    binary = shutil.which(settings.pulsar_bin)
    if binary is None:
        raise StartupError("--pulsar-bin %s: no such executable file (as a path or on PATH); "
                           "install pulsar (gem install pulsar), or try --pulsar-bin echo"
                           % settings.pulsar_bin)
    try:
        code, output = run_bounded([binary, "--version"], PULSAR_PROBE_TIMEOUT, environ,
                                   workdir, reaper)
    except subprocess.TimeoutExpired:
        raise StartupError("%s --version did not answer within %d s; is it pulsar?"
                           % (binary, PULSAR_PROBE_TIMEOUT))
    except OSError as error:
        raise StartupError("cannot run %s: %s" % (binary, error.strerror or error))
    if code != 0 and settings.pulsar_cli == "auto":
        said = " ".join(visible_lines(output))[-200:] or "nothing"
        raise StartupError("%s --version failed (%s; it printed: %s): is it pulsar? "
                           "(--pulsar-cli classic or v1 runs it all the same)"
                           % (binary, "exit code %d" % code if code > 0 else
                              "signal %d" % -code, said))
    version = named_version(output)
    form = pulsar_form(settings.pulsar_cli, version)
    if form == "v1" and settings.config_branch:
        raise StartupError("--config-branch: pulsar %s has no branch option (only 0.x has): "
                           "leave --config-branch out" % (version or "1.x"))
    lister = binary if form == "v1" else sibling_program(binary, "pulsar-utils")
    return PulsarCommand(binary, form, settings.config_repo, settings.config_branch, version,
                         lister)


def pulsar_form(asked, version):
    """The command-line form for pulsar `version` (None: it named none) and --pulsar-cli."""
    if version is None:
        return "classic" if asked == "auto" else asked
    major, minor = (int(part) for part in VERSION_LINE.fullmatch(version).group(1, 2))
    if (major, minor) == (1, 0):
        raise StartupError("pulsar %s has no `task` command, which this server runs (it came in "
                           "1.1.0): upgrade pulsar (gem install pulsar)" % version)
    needed = "v1" if major >= 1 else "classic"
    if asked not in ("auto", needed):
        raise StartupError("--pulsar-cli %s cannot work with pulsar %s, which takes the %s form; "
                           "leave --pulsar-cli out and the server picks it"
                           % (asked, version, needed))
    return needed


def named_version(output):
    """The version a `--version` answer names (a line such as 1.1.0), or None."""
    for line in visible_lines(output):
        match = VERSION_ANSWER.fullmatch(line)
        if match:
            return match.group(1)
    return None


def sibling_program(binary, name):
    """An executable called `name` in the folder of `binary`, or None."""
    path = os.path.join(os.path.dirname(os.path.realpath(binary)), name)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def run_bounded(argv, timeout, environ, cwd, reaper):
    """(exit status, output) of a short command run in a session of its own, with its stdout
    and stderr merged; after `timeout` its whole group is killed and TimeoutExpired raised."""
    process, exit = reaper.start(lambda: subprocess.Popen(
        argv, env=environ, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    chunks = []
    readable = select.poll()            # (not select: the pipe may be past descriptor 1023)
    readable.register(process.stdout, select.POLLIN)
    with process.stdout:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not readable.poll(remaining * 1000):
                break
            data = os.read(process.stdout.fileno(), READ_SIZE)
            if not data:
                break
            chunks.append(data)
    code = exit.wait(max(0.0, deadline - time.monotonic()))
    if code is None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        exit.wait()
        raise subprocess.TimeoutExpired(argv, timeout)
    return code, b"".join(chunks)


def plain_folder_branch_warning(command):
    """Why --config-branch does nothing here, or None: pulsar 0.x copies a configuration
    repository given as a plain folder as it is, whatever branch is asked for."""
    repo = command.conf_repo
    if command.form != "classic" or not command.conf_branch or not repo or "://" in repo:
        return None
    if not os.path.isdir(repo):
        return None
    return ("--config-branch %s is ignored: pulsar %s copies the configuration repository %s as "
            "it is, since it is a plain folder; give it as file://%s to use the branch"
            % (command.conf_branch, command.version or "0.x", repo, os.path.abspath(repo)))


class AppCatalog:
    """The applications and environments pulsar knows, for GET /apps and the page's form.

    Listed with `pulsar list` (1.x) or `pulsar-utils list` (0.x, where it stands beside pulsar),
    which clone the configuration repository: a list is kept for APPS_FRESH seconds, and listed
    again sooner when a task names a pair it does not hold.  One listing runs at a time; requests
    that come meanwhile wait for it.
    """

    def __init__(self, *, command, environ, workdir, reaper, clock=time.monotonic):
        self._command = command
        self._reaper = reaper
        self._environ = environ
        self._workdir = workdir
        self._clock = clock
        self._lock = threading.Lock()       # guards the fields below
        self._listing = threading.Lock()    # one `pulsar list` at a time
        self._apps = None                   # {app: [environments]} of the last good list
        self._listed_at = None              # when that list was made (time.time())
        self._fresh_until = 0.0
        self._looked_for = set()            # unknown pairs a listing was made to look for
        self._listing_behind = False        # a listing asked for by tasks runs in the background
        self._again = False                 # ... and another is wanted after it
        self._problem = None                # why the last listing failed, if it did

    @property
    def pulsar_version(self):
        return self._command.version

    def read(self):
        """The apps as GET /apps answers them; HTTPError 501 when this pulsar cannot list,
        503 when the list cannot be had now."""
        argv = self._command.list_argv()
        if argv is None:
            raise HTTPError(501, "pulsar %s cannot list applications here: 0.x lists them with "
                                 "pulsar-utils, and there is none beside %s"
                            % (self._command.version or "(no version named)",
                               self._command.binary))
        if self._clock() >= self._fresh_until:
            self._refresh(argv)
        with self._lock:
            if self._apps is None:
                raise HTTPError(503, "the applications cannot be listed: %s" % self._problem,
                                headers=[("Retry-After", "%d" % APPS_RETRY)])
            apps = [{"name": app, "envs": envs} for app, envs in sorted(self._apps.items())]
            return {"apps": apps, "listedAt": utc_iso(self._listed_at), "problem": self._problem}

    def note_pair(self, app, env):
        """A task names app/env: if the list does not hold it, list again in the background,
        once for each such pair (a mistyped name must not make every request list), and one
        listing at a time for all of them."""
        argv = self._command.list_argv()
        with self._lock:
            if argv is None or env in (self._apps or {}).get(app, ()):
                return
            if (app, env) in self._looked_for:
                return
            if len(self._looked_for) >= APPS_LOOKED_FOR:
                self._looked_for.clear()
            self._looked_for.add((app, env))
            self._again = self._listing_behind
            if self._listing_behind:
                return              # the listing that runs will be followed by one more
            self._listing_behind = True
        threading.Thread(target=self._list_behind, args=(argv,), name="list-apps",
                         daemon=True).start()

    def _list_behind(self, argv):
        while True:
            self._refresh(argv, forced=True)
            with self._lock:
                if not self._again:
                    self._listing_behind = False
                    return
                self._again = False

    def _refresh(self, argv, forced=False):
        with self._listing:
            if not forced and self._clock() < self._fresh_until:
                return                  # another request listed them while this one waited
            try:
                code, output = run_bounded(argv, APPS_TIMEOUT, self._environ, self._workdir,
                                           self._reaper)
                apps, problem = parse_app_list(code, output)
            except subprocess.TimeoutExpired:
                apps, problem = None, "%s did not answer within %d s" % (argv[0], APPS_TIMEOUT)
            except OSError as error:
                apps, problem = None, "cannot run %s: %s" % (argv[0], error.strerror or error)
            with self._lock:
                self._problem = problem
                if apps is not None:
                    self._apps, self._listed_at = apps, time.time()
                # A failure is kept too, for a while: a client asking again at once must not
                # make the server clone again (and hold one more thread) each time.
                self._fresh_until = self._clock() + (APPS_FRESH if apps is not None
                                                     else APPS_RETRY)
            if problem:
                logger.warning("cannot list the applications: %s", problem)


def parse_app_list(code, output):
    """({app: [environments]}, None) from what `pulsar list` printed, or (None, why not)."""
    apps = {}
    lines = visible_lines(output)
    for line in lines:
        match = APP_LINE.fullmatch(line)
        envs = [env.strip() for env in match.group(2).split(",")] if match else []
        if envs and all(NAME_PATTERN.fullmatch(name) for name in [match.group(1)] + envs):
            apps[match.group(1)] = envs
    failed = code != 0 or any(line.startswith("Failed to list") for line in lines)
    if apps and not failed:
        return apps, None
    if not failed:
        return {}, None
    said = " ".join(line for line in lines if not line.startswith(("from ", "\tfrom ")))[-400:]
    return None, "exit code %d: %s" % (code, said or "no output")


def child_environment(environ):
    """The server's environment for pulsar, less the secrets that are the server's alone, and
    with the variables that silence Thor's and Bundler's deprecation lines (unless set)."""
    child = dict(QUIET_PULSAR)
    child.update((name, value) for name, value in environ.items() if name not in SERVER_SECRETS)
    return child


# ---------------------------------------------------------------- access: who may use the API

class Access:
    """Decides who a request comes from: an authenticator, and a brake on failed logins.

    Only failed logins count: an address (an IPv6 address by its /64, which one client holds
    whole) that fails AUTH_FAILURES times within AUTH_WINDOW seconds is refused (429) for
    AUTH_WINDOW seconds, whatever it sends; while a slow check is running, distinct credentials
    being checked from an address count as failures would (parallel guesses), the same
    credentials sent many times at once count once.  Past AUTH_CEILING failures a minute from
    everyone together, credentials not seen to work before are refused for a while too.  The
    tables only drop what has expired, so nobody's brake is reset by someone else's flood.
    """

    def __init__(self, authenticator, *, failures_allowed=AUTH_FAILURES, window=AUTH_WINDOW,
                 ceiling=AUTH_CEILING, clock=time.monotonic):
        self.authenticator = authenticator
        self._failures_allowed = failures_allowed
        self._window = window
        self._ceiling = ceiling
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = {}             # address key -> times of its recent failures
        self._cooling = {}              # address key -> when it may try again
        self._checking = {}             # address key -> {credential hash: checks running}
        self._all_failures = collections.deque()    # times of everyone's recent failures
        self._worked = {}               # credential hash -> when it last let someone in

    @property
    def requires_credentials(self):
        """False for an open server."""
        return not isinstance(self.authenticator, OpenAccess)

    def login(self, authorization, address, changes_state=False):
        """The client's login ("-" when the API is open), or HTTPError 401/403/429/503.  A
        request that changes something has a GitHub grant re-checked once it is older than
        GITHUB_RECHECK."""
        if isinstance(self.authenticator, OpenAccess):
            return "-"                  # nothing to guess, nothing to brake
        key = brake_key(address)
        credential = hashlib.sha256((authorization or "").encode("utf-8", "replace")).digest()
        self._begin_attempt(key, address, credential)
        try:
            login = self.authenticator.login(
                authorization, fresh_within=GITHUB_RECHECK if changes_state else None)
        except HTTPError as error:
            if error.status == 401 and authorization:
                self._failed(key, address)
            raise
        finally:
            self._end_attempt(key, credential)
        with self._lock:
            self._worked[credential] = self._clock()
        return login

    def _begin_attempt(self, key, address, credential):
        """429 (with the truth about when to retry) while an address cools down, while its
        failures and the distinct credentials it has being checked reach the limit, or while
        everyone's failures pass the ceiling and these credentials never worked."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            wait, whose = self._cooling.get(key, now) - now, "from %s" % address
            if wait <= 0:
                checking = self._checking.get(key, {})     # made only for an accepted attempt
                guesses = self._recent_failures(key, now) + len(set(checking) - {credential})
                if guesses >= self._failures_allowed:
                    wait = min(GITHUB_DEADLINE, self._window)   # when the checks will be over
                elif (len(self._all_failures) >= self._ceiling
                      and credential not in self._worked):
                    wait = self._all_failures[0] + self._window - now
                    whose = ("from all addresses together (credentials that have worked since "
                             "the server started still get in)")
                else:
                    checking = self._checking.setdefault(key, checking)
                    checking[credential] = checking.get(credential, 0) + 1
                    return
        retry = max(1, int(math.ceil(wait)))
        raise HTTPError(429, "too many failed logins %s; try again in %d s"
                        % (whose, retry), headers=[("Retry-After", "%d" % retry)])

    def _end_attempt(self, key, credential):
        with self._lock:
            checking = self._checking.get(key, {})
            checking[credential] = checking.get(credential, 1) - 1
            if checking[credential] <= 0:
                del checking[credential]
            if not checking:
                self._checking.pop(key, None)

    def _recent_failures(self, key, now):
        times = self._failures.get(key)
        while times and times[0] <= now - self._window:
            times.popleft()
        return len(times or ())

    def _failed(self, key, address):
        now = self._clock()
        with self._lock:
            self._recent_failures(key, now)
            recent = self._failures.setdefault(key, collections.deque())
            recent.append(now)
            self._all_failures.append(now)
            if len(recent) >= self._failures_allowed:
                self._cooling[key] = now + self._window
                del self._failures[key]
                logger.warning("%s: %d failed logins in %d s; refused for %d s", address,
                               len(recent), self._window, self._window)

    def _prune(self, now):
        """Forget what has expired (the lock held), and only that."""
        horizon = now - self._window
        while self._all_failures and self._all_failures[0] <= horizon:
            self._all_failures.popleft()
        if len(self._failures) + len(self._cooling) + len(self._worked) < AUTH_TRACKED:
            return
        for key in list(self._failures):
            if not self._recent_failures(key, now):
                del self._failures[key]
        for key, until in list(self._cooling.items()):
            if until <= now:
                del self._cooling[key]
        for credential, when in list(self._worked.items()):
            if when <= now - GITHUB_CACHE_YES:
                del self._worked[credential]


@functools.lru_cache(maxsize=1024)
def brake_key(address):
    """What the brake counts by: an IPv4 address, or the /64 of an IPv6 one (one client has a
    whole /64 to pick addresses from)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network("%s/64" % ip, strict=False))
    return str(ip)


class RefusalLog:
    """Log lines about what clients without credentials do (their requests, connections
    dropped before a request): REFUSALS_PER_ADDRESS per address in each LOG_WINDOW, no more than
    REFUSALS_LOGGED in all, then one summary line per address at the window's end.  So nothing a
    client without credentials sends grows the log faster than about 2 x REFUSALS_LOGGED lines
    a window, however many addresses it has."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._window_ends = 0.0
        self._logged = collections.Counter()    # brake_key(address) -> lines this window
        self._silenced = collections.Counter()  # brake_key(address) -> lines not logged
        self._summary = None                    # the Timer that writes the summary lines

    def info(self, address, message, *arguments):
        if self.allows(address):
            logger.info(message, *arguments)

    def allows(self, address):
        """True when a line about this address may be logged now (it is then counted)."""
        if is_loopback(address):    # a proxy in front, or someone on this host: not told apart
            return True
        key = brake_key(address)
        with self._lock:
            if self._clock() >= self._window_ends:
                self._window_ends = self._clock() + LOG_WINDOW
                self._logged.clear()
            if self._logged[key] >= REFUSALS_PER_ADDRESS or sum(
                    self._logged.values()) >= REFUSALS_LOGGED:
                self._silenced[key] += 1
                if self._summary is None:
                    self._summary = threading.Timer(max(0.0, self._window_ends - self._clock()),
                                                    self._summarize)
                    self._summary.daemon = True
                    self._summary.start()
                return False
            self._logged[key] += 1
        return True

    def _summarize(self):
        with self._lock:
            silenced, self._silenced = self._silenced, collections.Counter()
            self._summary = None
        for key, count in silenced.most_common(REFUSALS_LOGGED):
            logger.info("%s: %d more requests or connections without credentials in the last "
                        "%d s, not logged one by one", key, count, LOG_WINDOW)
        if len(silenced) > REFUSALS_LOGGED:
            logger.info("and %d more addresses", len(silenced) - REFUSALS_LOGGED)


class OpenAccess:
    """No authentication: anyone who reaches the port may use the API."""

    description = ("OPEN: no authentication (--auth-provider is not set); anyone who reaches "
                   "the port can start and kill tasks")

    def login(self, authorization, fresh_within=None):
        return "-"


class BasicLogin:
    """One username and password, sent as HTTP Basic, compared in constant time."""

    def __init__(self, username, password):
        self._username = nfc(username).encode("utf-8")
        self._password = nfc(password).encode("utf-8")
        self.description = "HTTP Basic, user %s" % username

    def login(self, authorization, fresh_within=None):
        scheme, user, secret = parse_authorization(authorization)
        if scheme != "basic":
            raise unauthorized("send a username and password (curl -u USER:PASSWORD)")
        # Compared as NFC: the same name typed on another system may come composed otherwise.
        user_ok = hmac.compare_digest(nfc(user).encode("utf-8"), self._username)
        password_ok = hmac.compare_digest(nfc(secret).encode("utf-8"), self._password)
        if not (user_ok and password_ok):
            raise unauthorized("wrong username or password")
        return user


class GitHubLogin:
    """A GitHub token, resolved with the GitHub API: allowed when its login is one of `names`
    (method user) or a member of the organisation `names[0]` (method org).

    Answers are cached under a hash of the token: a grant for GITHUB_CACHE_YES seconds (but a
    request that changes something re-checks one older than GITHUB_RECHECK, so that a revoked
    token cannot start or kill for long), a refusal for GITHUB_CACHE_NO, GitHub's own failure
    for GITHUB_CACHE_ERROR (503 at once, without asking again).  One check of a token runs at
    a time: requests with the same token wait for its answer.  A whole check must end within
    GITHUB_DEADLINE, however slowly GitHub trickles.  GitHub failing means 503, never open.
    """

    def __init__(self, api, method, names, server_token=None, clock=time.monotonic):
        self._api = urllib.parse.urlsplit(api.rstrip("/"))
        self._method = method
        self._names = names
        self._server_token = server_token
        self._clock = clock
        self._lock = threading.Condition()
        self._cache = {}                # sha256(token) -> GitHubAnswer
        self._checking = set()          # sha256(token) of the checks running now
        self.description = "GitHub tokens via %s: %s %s" % (
            api, "logins" if method == "user" else "members of organisation", ", ".join(names))

    def login(self, authorization, fresh_within=None):
        token = github_token(parse_authorization(authorization))
        answer = self._answer(hashlib.sha256(token.encode("utf-8")).hexdigest(), token,
                              fresh_within)
        if answer.status == 401:
            raise unauthorized("GitHub does not accept this token")
        if answer.status == 403:
            raise HTTPError(403, "GitHub user %s may not use this server" % answer.login)
        if answer.status == 503:
            raise HTTPError(503, "GitHub cannot be asked who you are right now; try again "
                                 "later", headers=[("Retry-After", "%d" % GITHUB_CACHE_ERROR)])
        return answer.login

    def _answer(self, key, token, fresh_within):
        """The cached answer for a token, or a new one: asked here, or by the request that
        is asking GitHub about the same token now."""
        with self._lock:
            while True:
                answer = self._cache.get(key)
                now = self._clock()
                if answer is not None and answer.expires > now and not (
                        fresh_within is not None and answer.status == 200
                        and now - answer.asked > fresh_within):
                    return answer
                if key not in self._checking:
                    break
                self._lock.wait()
            self._checking.add(key)
        answer = None
        try:
            answer = self._ask(token)
            return answer
        finally:
            with self._lock:
                self._checking.discard(key)
                if answer is not None:
                    self._forget_expired()
                    self._cache[key] = answer
                self._lock.notify_all()

    def _ask(self, token):
        """GitHub's answer about a token.  A grant lasts from when it was asked; a refusal or a
        failure from when it came, or a GitHub that hangs for the whole deadline would be asked
        again at once by every request waiting behind the check."""
        asked = self._clock()
        try:
            status, login = self._decide(token, asked + GITHUB_DEADLINE)
        except GitHubUnavailable as error:
            logger.error("GitHub API unavailable while checking credentials: %s", error)
            return GitHubAnswer(503, None, asked, self._clock() + GITHUB_CACHE_ERROR)
        if status == 200:
            return GitHubAnswer(status, login, asked, asked + GITHUB_CACHE_YES)
        return GitHubAnswer(status, login, asked, self._clock() + GITHUB_CACHE_NO)

    def _forget_expired(self):
        if len(self._cache) > AUTH_TRACKED:
            now = self._clock()
            for key in [key for key, answer in self._cache.items() if answer.expires <= now]:
                del self._cache[key]

    def _decide(self, token, deadline):
        """(200, login) allowed, (403, login) not allowed, (401, None) not a valid token;
        GitHubUnavailable when GitHub cannot say."""
        status, user = self._get("/user", token, deadline)
        if status == 401:
            return 401, None
        if status != 200 or not isinstance(user, dict) or not isinstance(user.get("login"), str):
            raise GitHubUnavailable("GET /user answered %s" % status)
        login = user["login"]
        if not GITHUB_LOGIN_PATTERN.fullmatch(login):
            raise GitHubUnavailable("GET /user answered a login that no GitHub account can "
                                    "have: %s" % quoted(login))
        if self._method == "user":
            return (200 if login.lower() in (name.lower() for name in self._names) else 403), login
        status, _ = self._get("/orgs/%s/members/%s" % (urllib.parse.quote(self._names[0], safe=""),
                                                       login),
                              self._server_token or token, deadline)
        if status == 204:
            return 200, login
        if status in (302, 404):
            return 403, login
        raise GitHubUnavailable("the organisation membership check answered %s" % status)

    def _get(self, path, token, deadline):
        """(status, JSON body or None) of one GET; a redirect is answered as it is, never
        followed (that would hand the token to wherever it points)."""
        connection = github_connection(self._api, GITHUB_TIMEOUT)
        # The socket's timeout bounds each read; this bounds them all together.
        guard = threading.Timer(max(0.0, deadline - self._clock()), give_up_on, [connection])
        guard.start()
        try:
            connection.request("GET", self._api.path + path, headers={
                "Authorization": "token " + token, "Accept": "application/vnd.github+json",
                "User-Agent": SERVER_NAME})
            response = connection.getresponse()
            body = response.read(MAX_BODY)
            if response.status != 200:
                return response.status, None
            return response.status, json.loads(body)
        except (OSError, http.client.HTTPException, ValueError, RecursionError) as error:
            late = self._clock() >= deadline
            raise GitHubUnavailable("no answer within %d s" % GITHUB_DEADLINE if late
                                    else str(error) or type(error).__name__)
        finally:
            guard.cancel()
            connection.close()


GitHubAnswer = collections.namedtuple("GitHubAnswer", "status login asked expires")


class GitHubUnavailable(Exception):
    """GitHub could not say who a token belongs to (an error, no answer, nonsense)."""


def github_connection(api, timeout):
    """An HTTP(S) connection to the GitHub API, through the proxy the environment names for
    it (https_proxy, no_proxy), as urllib would use."""
    https = api.scheme == "https"
    connect = http.client.HTTPSConnection if https else http.client.HTTPConnection
    options = {"timeout": timeout}
    if https:
        options["context"] = ssl.create_default_context()
    import urllib.request   # here: only GitHub logins need it, and it costs every server 1 MB
    proxy = urllib.request.getproxies().get(api.scheme)
    if proxy and not urllib.request.proxy_bypass(api.hostname):
        proxy = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        connection = connect(proxy.hostname, proxy.port or 8080, **options)
        connection.set_tunnel(api.hostname, api.port)
        return connection
    return connect(api.hostname, api.port, **options)


def give_up_on(connection):
    """Shut a connection's socket, so that whatever waits on it returns now."""
    if connection.sock is not None:
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)


def parse_authorization(header):
    """('basic', user, password) or ('bearer', token, None); 401 when absent or malformed."""
    if not header:
        raise unauthorized("credentials are required")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return "bearer", value, None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise unauthorized("the Basic credentials are not valid base64 of user:password")
        try:
            user, colon, secret = decoded.decode("utf-8").partition(":")
        except UnicodeDecodeError:
            raise unauthorized("the Basic credentials are not UTF-8 (send the username and "
                               "password encoded as UTF-8)")
        if colon:
            return "basic", user, secret
    raise unauthorized("send HTTP Basic credentials or a Bearer token")


def nfc(text):
    return unicodedata.normalize("NFC", text)


def github_token(credentials):
    """The token in Bearer TOKEN, or Basic TOKEN:x-oauth-basic (or USER:TOKEN)."""
    scheme, user, secret = credentials
    token = user if scheme == "bearer" or secret in ("", "x-oauth-basic") else secret
    if not GITHUB_TOKEN_PATTERN.fullmatch(token):
        raise unauthorized("that is not a GitHub token")
    return token


def unauthorized(message):
    return HTTPError(401, message, headers=[("WWW-Authenticate", 'Basic realm="pulsar-rest-api"')])




# ---------------------------------------------------------------- metrics

class Metrics:
    """Counters for GET /metrics, in the Prometheus text format; gauges are read when scraped."""

    DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)   # seconds

    def __init__(self):
        self._lock = threading.Lock()
        self._started = 0
        self._finished = {}             # status -> count
        self._buckets = [0] * len(self.DURATION_BUCKETS)
        self._duration_sum = 0.0
        self._requests = {}             # HTTP status -> count
        self.connections = 0
        self._refused = 0

    def task_started(self):
        with self._lock:
            self._started += 1

    def task_finished(self, status, seconds):
        with self._lock:
            self._finished[status] = self._finished.get(status, 0) + 1
            self._duration_sum += seconds
            for index, bound in enumerate(self.DURATION_BUCKETS):
                if seconds <= bound:
                    self._buckets[index] += 1

    def request_answered(self, status):
        with self._lock:
            self._requests[status] = self._requests.get(status, 0) + 1

    def open_connection(self, limit):
        """Count a new connection; False (and not counted) when `limit` are open already."""
        with self._lock:
            if self.connections >= limit:
                return False
            self.connections += 1
            return True

    def close_connection(self):
        with self._lock:
            self.connections -= 1

    def connection_refused(self):
        with self._lock:
            self._refused += 1

    def render(self, running, waiters, history_size):
        with self._lock:
            finished = sum(self._finished.values())
            buckets = [('{le="%s"}' % bound, count)
                       for bound, count in zip(self.DURATION_BUCKETS, self._buckets)]
            families = [
                ("tasks_started_total", "counter", "Tasks started since the server started.",
                 [("", self._started)]),
                ("tasks_finished_total", "counter", "Tasks ended, by status.",
                 [('{status="%s"}' % status, count)
                  for status, count in sorted(self._finished.items())]),
                ("tasks_running", "gauge", "Tasks running now.", [("", running)]),
                ("task_duration_seconds", "histogram", "How long tasks ran.",
                 [("_bucket" + le, count) for le, count in buckets]
                 + [('_bucket{le="+Inf"}', finished), ("_sum", round(self._duration_sum, 3)),
                    ("_count", finished)]),
                ("http_requests_total", "counter", "HTTP requests answered, by status.",
                 [('{code="%d"}' % code, count) for code, count in sorted(self._requests.items())]),
                ("long_poll_waiters", "gauge", "Long polls waiting for a change now.",
                 [("", waiters)]),
                ("history_tasks", "gauge", "Tasks in the history.",
                 [("", history_size[0])] if history_size[0] is not None else []),
                ("history_bytes", "gauge", "Bytes the history takes on disk.",
                 [("", history_size[1])] if history_size[1] is not None else []),
                ("open_connections", "gauge", "Client connections open now.",
                 [("", self.connections)]),
                ("refused_connections_total", "counter",
                 "Connections refused over --max-connections.", [("", self._refused)]),
            ]
        lines = []
        for name, kind, description, samples in families:
            name = "pulsar_rest_api_" + name
            lines += ["# HELP %s %s" % (name, description), "# TYPE %s %s" % (name, kind)]
            lines += ["%s%s %s" % (name, suffix, value) for suffix, value in samples]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- TLS

SELF_SIGNED_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = %(name)s
O = pulsar-rest-api self-signed certificate
[ext]
subjectAltName = %(names)s
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def self_signed_pair(folder, names):
    """(cert, key) paths in `folder`, made with the openssl command for `names` (subject
    alternative names such as DNS:host, IP:10.0.0.5) and reused while the names stay those."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    named = os.path.join(folder, "names.txt")
    try:
        with open(named) as source:
            made_for = source.read().strip()
    except OSError:
        made_for = None
    if os.path.isfile(cert) and os.path.isfile(key) and made_for == ", ".join(names):
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StartupError("no TLS certificate: there is no ssl/ beside the script and no openssl "
                           "command to make one; give --ssl-cert/--ssl-key, or --no-ssl behind a "
                           "TLS-terminating proxy")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)         # the key is written here before it is locked down
        config = os.path.join(folder, "openssl.cnf")
        with open(config, "w") as out:
            out.write(SELF_SIGNED_CONFIG % {"name": names[0].partition(":")[2],
                                            "names": ", ".join(names)})
        run_openssl([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                     "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3660", "-config", config,
                     "-keyout", key + ".new", "-out", cert + ".new"], "make a certificate")
        os.chmod(key + ".new", 0o600)
        os.replace(key + ".new", key)
        os.replace(cert + ".new", cert)
        os.remove(config)
        with open(named, "w") as out:
            out.write(", ".join(names) + "\n")
    except OSError as error:
        raise StartupError("cannot make a self-signed certificate in %s: %s" % (folder, error))
    logger.info("made a self-signed certificate in %s for %s", folder, ", ".join(names))
    return cert, key


def this_hosts_names(listen_host):
    """What clients may call this host, for a self-made certificate: its name and fully
    qualified name, the address it listens on when that is a specific one, and loopback."""
    names = [socket.gethostname()]
    found = []
    lookup = threading.Thread(target=lambda: found.append(socket.getfqdn()), daemon=True)
    lookup.start()
    lookup.join(NAME_LOOKUP_TIMEOUT)    # a broken DNS must not stall the start
    names += found
    if listen_host not in ("", "0.0.0.0", "::"):
        names.append(listen_host)
    names += ["localhost", "127.0.0.1", "::1"]
    entries = []
    for name in names:
        try:
            entry = "IP:%s" % ipaddress.ip_address(name)
        except ValueError:
            entry = "DNS:%s" % name
        if name and entry not in entries:
            entries.append(entry)
    return entries


def run_openssl(argv, purpose, stdin=b""):
    """The openssl command's standard output, or StartupError with its message."""
    try:
        result = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise StartupError("cannot %s with openssl: %s" % (purpose, error))
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise StartupError("cannot %s with openssl: %s" % (purpose, detail[0] if detail else
                                                           "exit code %d" % result.returncode))
    return result.stdout


def pfx_to_pem(pfx_file, passphrase):
    """A PKCS#12 file as PEM text (certificate, its chain, then the key), via the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StartupError("--ssl-pfx needs the openssl command, which is not on PATH; convert the "
                           "file to PEM and give --ssl-cert/--ssl-key instead")
    password = (passphrase or "").encode() + b"\n"
    parts = []
    for selection in (["-nokeys", "-clcerts"], ["-nokeys", "-cacerts"], ["-nocerts", "-nodes"]):
        argv = [openssl, "pkcs12", "-in", pfx_file, "-passin", "stdin"] + selection
        try:
            parts.append(run_openssl(argv, "read %s" % pfx_file, password))
        except StartupError:
            # OpenSSL 3 reads old (RC2/3DES) PKCS#12 files only with its legacy provider.
            parts.append(run_openssl(argv + ["-legacy"], "read %s (wrong passphrase?)" % pfx_file,
                                     password))
    return b"".join(parts)


def tls_context(cert_file, key_file=None, passphrase=None):
    """A server SSLContext (TLS 1.2 or newer) for a PEM certificate chain and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2

    def password():
        if passphrase is None:
            raise StartupError("the TLS key is encrypted: give its passphrase with --ssl-passphrase")
        return passphrase

    try:
        context.load_cert_chain(cert_file, key_file, password=password)
    except ssl.SSLError as error:
        raise StartupError("cannot use the TLS key %s with the certificate %s: wrong passphrase, "
                           "not a PEM key, or not this certificate's key (%s)"
                           % (key_file or cert_file, cert_file,
                              re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(error))))
    return context


def pfx_tls_context(pfx_file, passphrase):
    """A server SSLContext from a PKCS#12 file, through a private temporary PEM file."""
    pem = pfx_to_pem(pfx_file, passphrase)
    handle, path = tempfile.mkstemp(prefix="pulsar-rest-api-", suffix=".pem")   # mode 0600
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(pem)
        return tls_context(path), certificate_fingerprint(path)
    finally:
        os.remove(path)


def certificate_fingerprint(cert_file):
    """(SHA-256 of the first certificate in a PEM file, as AA:BB:... (what browsers show),
    SHA-256 of its public key in base64, as curl --pinnedpubkey sha256//... takes it)."""
    try:
        with open(cert_file, encoding="ascii", errors="replace") as source:
            text = source.read()
        end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(text[text.index("-----BEGIN CERTIFICATE-----"):end])
    except (OSError, ValueError) as error:
        raise StartupError("cannot read a certificate from %s: %s" % (cert_file, error))
    digest = hashlib.sha256(der).hexdigest().upper()
    fingerprint = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    try:
        pin = base64.b64encode(hashlib.sha256(public_key_info(der)).digest()).decode("ascii")
    except (IndexError, ValueError):
        pin = None                  # a certificate this small parser does not follow
    return fingerprint, pin


def public_key_info(der):
    """The DER SubjectPublicKeyInfo of a DER certificate: Certificate is a SEQUENCE holding
    tbsCertificate, a SEQUENCE of an optional [0] version, serialNumber, signature, issuer,
    validity, subject, subjectPublicKeyInfo, ..."""
    certificate = der_elements(der)[0][1]
    tbs = der_elements(certificate)[0][1]
    fields = der_elements(tbs)
    if fields[0][0] == 0xA0:            # the version
        fields = fields[1:]
    return fields[5][2]


def der_elements(data):
    """[(tag, content, whole element)] of the DER elements one after the other in `data`."""
    elements, at = [], 0
    while at < len(data):
        length, start = der_length(data, at + 1)
        elements.append((data[at], data[start:start + length], data[at:start + length]))
        at = start + length
    return elements


def der_length(data, at):
    """(length, where the content starts) of a DER element whose length begins at `at`."""
    first = data[at]
    if first < 0x80:
        return first, at + 1
    size = first & 0x7F
    if not 0 < size <= 4:
        raise ValueError("a DER length of %d bytes" % size)
    return int.from_bytes(data[at + 1:at + 1 + size], "big"), at + 1 + size


def load_tls(settings):
    """(SSLContext, fingerprint) for the settings: pfx, cert/key, ssl/ beside us, or self-signed."""
    if settings.ssl_pfx:
        return pfx_tls_context(settings.ssl_pfx, settings.tls_passphrase)
    if settings.ssl_cert:
        cert, key = settings.ssl_cert, settings.ssl_key
    else:
        bundled = os.path.join(SCRIPT_DIR, "ssl")
        if os.path.isfile(os.path.join(bundled, "cert.pem")):
            cert, key = os.path.join(bundled, "cert.pem"), os.path.join(bundled, "key.pem")
        else:
            cert, key = self_signed_pair(state_dir(), this_hosts_names(settings.host))
    return tls_context(cert, key, settings.tls_passphrase), certificate_fingerprint(cert)


# ---------------------------------------------------------------- HTTP: routes, fields, responses

@dataclasses.dataclass(frozen=True)
class Route:
    """One endpoint, with every rule about it; RequestHandler._dispatch applies them all."""

    method: str
    path: str                   # as the manual writes it; :id, :app and :env match one segment
    handler: str                # the RequestHandler method that answers
    fields: tuple = ()          # the request fields (query, form or JSON) it accepts
    public: bool = False        # answered without credentials
    changes_state: bool = None  # refused when a browser sends it from another page; by default
                                # true for every method but GET and HEAD

    pattern: object = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.changes_state is None:
            object.__setattr__(self, "changes_state", self.method not in ("GET", "HEAD"))
        pattern = re.sub(r":(id|app|env)\b", lambda match: "(?P<%s>[^/]*)" % {
            "id": "task_id"}.get(match.group(1), match.group(1)), re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(pattern))


# Every endpoint.  For a path, the first row whose pattern matches decides which rows apply; a
# method none of them has gets 405 with Allow.  /task/... comes first: it is never an app name.
ROUTES = (
    Route("GET", "/", "send_page"),
    Route("GET", "/app.js", "send_script"),
    Route("GET", "/app.css", "send_style"),
    Route("GET", "/tasks", "list_tasks",
          fields=("app", "env", "status", "limit", "before", "version")),
    Route("GET", "/apps", "list_apps"),
    Route("GET", "/health", "health", public=True),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/task/:id", "read_task", fields=("offset",)),
    Route("GET", "/task/:id/state", "poll_task", fields=("version", "offset")),
    Route("GET", "/task/:id/kill", "kill_task", changes_state=True),
    Route("POST", "/task/:id/kill", "kill_task"),
    Route("GET", "/task/:id/output", "read_output", fields=("offset", "wait", "tail")),
    Route("GET", "/task/:id/stream", "stream_task", fields=("offset",)),
    Route("POST", "/task/:id/rerun", "rerun_task", fields=("queue", "wait")),
    Route("POST", "/:app/:env", "create_task", fields=("action", "task", "queue", "wait")),
)


@functools.lru_cache(maxsize=4096)     # the same few paths, asked again and again
def find_route(method, raw_path):
    """(Route, keyword arguments) for a request, or HTTPError 404/405.  Routes match the
    percent-decoded path, so that /%74ask/... is /task/... and never an app named task."""
    segments = [path_segment(segment) for segment in raw_path.split("/")]
    if any("/" in segment for segment in segments):
        raise HTTPError(400, "a path segment may not contain an encoded '/': %s" % quoted(raw_path))
    path = "/".join(segments)
    first = next((route for route in ROUTES if route.pattern.fullmatch(path)), None)
    if first is None:
        raise HTTPError(404, "no such endpoint: %s %s" % (quoted(method, 20), quoted(raw_path)))
    routes = [route for route in ROUTES if route.path == first.path]
    route = next((route for route in routes if route.method == method), None)
    if route is None:
        allowed = ", ".join(sorted(route.method for route in routes))
        raise HTTPError(405, "%s is not allowed here; use %s" % (method, allowed),
                        headers=[("Allow", allowed)])
    arguments = route.pattern.fullmatch(path).groupdict()
    if "task_id" in arguments:
        arguments["task_id"] = parse_task_id(arguments["task_id"])
    return route, arguments


def path_segment(raw):
    try:
        return urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the path is not valid UTF-8 once percent-decoded: %s" % quoted(raw))


def parse_task_id(text):
    if not COUNT_PATTERN.fullmatch(text) or int(text) == 0:
        raise HTTPError(404, "no task %s (task ids are whole numbers from 1)" % quoted(text))
    return int(text)


class Fields:
    """A request's fields from the query string and a form or JSON body, each name at most once
    (an endpoint takes only the names its Route lists)."""

    def __init__(self, values=None):
        self._values = values or {}         # name -> [values], in the order given

    @classmethod
    def parse(cls, query, body, content_type, accepted):
        """The fields of a request, or HTTPError 400/415 naming what is wrong."""
        values = {}
        sources = [parse_form(query, "the query string")]
        if body:
            if content_type in (None, "application/x-www-form-urlencoded"):
                sources.append(parse_form(decode_utf8(body, "the body"), "the body"))
            elif content_type == "application/json":
                sources.append(parse_json_object(body))
            else:
                raise HTTPError(415, "the body must be a form (curl -d action=deploy) or JSON "
                                     "({\"action\": \"deploy\"}); got %s" % quoted(content_type))
        for source in sources:
            for name, value in source:
                values.setdefault(name, []).append(value)
        for name in values:
            if name not in accepted:
                raise HTTPError(400, "unknown parameter %s (this endpoint takes: %s)"
                                % (quoted(name), ", ".join(accepted) or "none"))
        return cls(values)

    def one(self, name, *aliases, example=""):
        """The one value given under `name` or an alias; 400 when absent or given twice."""
        values = [value for key in (name,) + aliases for value in self._values.get(key, [])]
        if not values:
            raise HTTPError(400, "%s is required, e.g. curl -k -d %s=deploy %s"
                            % (name, name, example))
        if len(values) > 1:
            raise HTTPError(400, "give %s once (as %s, in the query string or the body)"
                            % (name, " or ".join((name,) + aliases)))
        return values[0]

    def value(self, name):
        """The value given for `name`, or None; 400 when it is given twice."""
        values = self._values.get(name, [])
        if len(values) > 1:
            raise HTTPError(400, "give %s once" % name)
        return values[0] if values else None

    def text(self, name):
        value = self.value(name)
        if value is not None and not isinstance(value, str):
            raise HTTPError(400, "%s must be a string" % name)
        return value

    def count(self, name):
        value = self.text(name)
        return None if value is None else parse_count(name, value)

    def flag(self, name):
        """A yes/no field: JSON true/false, or true, false, 1, 0 as text; absent is false."""
        value = self.value(name)
        if isinstance(value, str):
            value = {"true": True, "1": True, "false": False, "0": False}.get(value.lower(), value)
        if value is not None and not isinstance(value, bool):
            raise HTTPError(400, "%s must be true or false" % name)
        return bool(value)


def parse_form(text, where):
    if "%" not in text and "+" not in text and ";" not in text:   # nothing to decode: quickly
        if text.count("&") >= MAX_FIELDS:
            raise HTTPError(400, "%s has more than %d fields" % (where, MAX_FIELDS))
        return [(name, value) for name, _, value in
                (pair.partition("=") for pair in text.split("&") if pair)]
    try:
        return urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict",
                                      max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        raise HTTPError(400, "%s is not valid UTF-8 once percent-decoded" % where)
    except ValueError:
        raise HTTPError(400, "%s has more than %d fields" % (where, MAX_FIELDS))


def parse_json_object(body):
    def no_duplicates(pairs):
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError("a name appears twice in one object")
        return dict(pairs)

    try:
        value = json.loads(decode_utf8(body, "the body"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as error:
        raise HTTPError(400, "the body is not valid JSON: %s" % error)
    if not isinstance(value, dict):
        raise HTTPError(400, "the JSON body must be an object, e.g. {\"action\": \"deploy\"}")
    if len(value) > MAX_FIELDS:
        raise HTTPError(400, "the body has more than %d fields" % MAX_FIELDS)
    return list(value.items())


def decode_utf8(data, where):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "%s is not valid UTF-8" % where)


def response_head(status, content_type, headers=(), close=False):
    """The status line and headers of every answer this server sends, as bytes."""
    head = ("HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: %s\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            % (status, STATUS_PHRASES[status], SERVER_NAME, http_date(), content_type))
    head += "".join("%s: %s\r\n" % header for header in headers)
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("latin-1")


STATUS_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


class HttpDate:
    """The Date header's value now: formatted once a second, not once an answer."""

    def __init__(self):
        self._now = (None, "")

    def __call__(self):
        second = int(time.time())
        now = self._now
        if now[0] != second:
            now = self._now = (second, email.utils.formatdate(second, usegmt=True))
        return now[1]


http_date = HttpDate()


def whole_response(status, body, content_type, headers=(), close=False):
    """A complete answer with its Content-Length, as bytes."""
    headers = [("Content-Length", str(len(body)))] + list(headers)
    return response_head(status, content_type, headers, close) + body


def json_body(payload):
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")


UNCHANGED = json_body({"changed": False})


def poll_answer(task):
    """What /state answers once the task has moved: the task."""
    return {"changed": True, "task": task}


class Followers:
    """The /state polls waiting for a task to change, by the offset each has read to, each on
    a lock of its own.  A change makes the answer for each offset waited at, once, and then
    releases them all: a woken follower finds its answer made and needs no lock to send it.
    (With a Condition on the store's lock, each woken thread takes that lock in turn: 200
    followers woken at once queue on it, a context switch each.)  Used with that lock held."""

    def __init__(self):
        self._waiting = {}      # offset (or LINGERING) -> [the lock each waits on]

    def __len__(self):
        return sum(len(locks) for locks in self._waiting.values())

    def ticket(self, offset):
        """A lock, held, that the next change releases."""
        lock = threading.Lock()
        lock.acquire()
        self._waiting.setdefault(offset, []).append(lock)
        return lock

    def cancel(self, offset, lock):
        """A follower that stopped waiting (its timeout)."""
        locks = self._waiting.get(offset, [])
        if lock in locks:
            locks.remove(lock)

    def wake(self, task):
        """The task has changed: make what the followers at each offset will answer (unless
        it is long, or the task chatty: its followers linger), then release them all."""
        waiting, self._waiting = self._waiting, {}
        for offset, locks in waiting.items():
            if (offset is not LINGERING and not task.chatty
                    and task.output.length - (offset or 0) <= KEPT_ANSWER_BYTES):
                task.answers.keep(task.version, ("state", offset), json_body(poll_answer(
                    task.snapshot(offset or 0).reply())), task.version)
            for lock in locks:
                lock.release()


class Answers:
    """A live task's answers while it stays at one version: JSON bytes by (kind, offset)."""

    def __init__(self):
        self._version = None
        self._answers = {}

    def get(self, key):
        return self._answers.get(key)

    def keep(self, version, key, answer, version_now):
        """Keep an answer made at `version`, if the task is still there (`version_now`)."""
        if version != version_now:
            return
        if self._version != version:
            self._version, self._answers = version, {}
        if len(self._answers) < KEPT_ANSWERS:
            self._answers[key] = answer

    def forget(self):
        """The task has changed: what was kept answers an older version."""
        if self._answers:
            self._answers = {}


def netloc_of(url):
    """host[:port] of a URL, lowercased; '' when it has none or is malformed."""
    try:
        return urllib.parse.urlsplit(url.strip()).netloc.lower()
    except ValueError:
        return ""


def describe_socket_error(error):
    """A short reason for a dropped connection, for one log line."""
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    return str(error) or type(error).__name__


class DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline, so that a request trickled in a byte at a time still
    ends in bounded time (a plain socket timeout restarts with every byte)."""

    def __init__(self, sock):
        super().__init__()
        self._sock = sock
        self.deadline = None

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline passed")
            self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


# ---------------------------------------------------------------- HTTP: the request handler

class Headers:
    """A request's header fields: get() and get_all() by name in any case, items() in the order
    sent.  RequestHandler reads them itself: http.server's email parser cost a reply more than
    everything else it does."""

    def __init__(self, fields):
        self._fields = fields               # [(name, value)] as sent
        self._by_name = {}
        for name, value in fields:
            self._by_name.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self._by_name.get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        return self._by_name.get(name.lower(), [])

    def items(self):
        return list(self._fields)

    def __len__(self):
        return len(self._fields)

    def media_type(self):
        """The body's media type, lower case and without parameters, as the email module has
        it ("text/plain" for one that is not TYPE/SUBTYPE); None when none is given."""
        value = self.get("Content-Type")
        if not value:
            return None
        media = value.partition(";")[0].strip().lower()
        return media if media.count("/") == 1 else "text/plain"


def parse_header_field(line):
    """(name, value) of a header line; 400 for one that is not NAME: VALUE.  A folded line
    (one that starts with a space), a space before the colon and a CR but at the line's end
    are refused, as RFC 9112 asks, since servers that read them otherwise can be made to
    disagree about a request."""
    text = line.decode("latin-1")
    text = text[:-2] if text.endswith("\r\n") else text.rstrip("\n")
    name, colon, value = text.partition(":")
    if not colon or not TOKEN.fullmatch(name) or "\r" in value:
        raise HTTPError(400, "malformed header line %s" % quoted(text, 60), close=True)
    return name, value.strip(" \t")


class Exchange:
    """One request and its answer: what was asked, by whom, and how far the answer has got."""

    def __init__(self, started):
        self.started = started          # time.monotonic() of the request's first byte
        self.method = "-"
        self.target = "-"               # the request target as sent: path and query string
        self.route = None
        self.fields = Fields()
        self.login = "-"                # who the credentials say sent it; "-" for nobody
        self.head_sent = False          # from then on an error can only close the connection
        self.refused = None             # why it was refused (an HTTPError's message), for the log

    @property
    def path(self):
        return self.target.partition("?")[0]

    @property
    def query(self):
        return self.target.partition("?")[2]


class RequestHandler(BaseHTTPRequestHandler):
    """One connection: its TLS handshake, then each request routed through ROUTES, every error
    answered as JSON by _dispatch, every answer written through response_head().  ApiHandler
    adds the endpoints."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    sys_version = ""
    disable_nagle_algorithm = True      # headers and body leave in one write, without a 40 ms stall

    # -- the connection

    def setup(self):
        super().setup()
        self.rfile.close()              # replaced by a reader that enforces a whole-request deadline
        self._reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, SOCKET_BUFFER)
        self.exchange = None            # the request being answered; None before the first
        self.proven = False             # a request here has shown good credentials (or, on an
                                        # open server, has been answered)
        self._chunked = False           # the streamed answer being sent is chunked

    def handle(self):
        try:
            if isinstance(self.connection, ssl.SSLSocket) and not self._handshake():
                return
            self.close_connection = False
            while not self.close_connection:
                self.handle_one_request()
        except (ConnectionError, ssl.SSLError, socket.timeout) as error:
            self._note("%s: connection dropped: %s", self.peer, describe_socket_error(error))

    def _note(self, message, *arguments):
        """Log a line about this connection; throttled while it has not shown credentials."""
        if self.proven:
            logger.info(message, *arguments)
        else:
            self.server.refusals.info(self.client_address[0], message, *arguments)

    def _handshake(self):
        deadline = time.monotonic() + self.server.request_timeout
        self.connection.settimeout(self.server.request_timeout)
        try:
            first = socket.socket.recv(self.connection, 1, socket.MSG_PEEK)
            if not first:
                self._note("%s: closed before a TLS hello", self.peer)
                return False
            if first.isalpha():
                self._answer_plain_http()
                return False
            self.connection.settimeout(max(0.001, deadline - time.monotonic()))
            self.connection.do_handshake()      # the timeout bounds the whole handshake
            return True
        except socket.timeout:
            self._note("%s: no TLS handshake within %g s; dropped", self.peer,
                       self.server.request_timeout)
        except (ssl.SSLError, OSError) as error:
            self._note("%s: TLS handshake failed: %s", self.peer, describe_socket_error(error))
        return False

    def _answer_plain_http(self):
        """A plain-HTTP request on the TLS port gets a hint instead of a silent close."""
        body = b"This server speaks HTTPS: use https:// (curl -k https://HOST:PORT/...).\n"
        socket.socket.sendall(self.connection, whole_response(     # beneath TLS, as plain bytes
            400, body, "text/plain; charset=utf-8", close=True))
        self._note("%s: plain HTTP on the TLS port; answered 400", self.peer)

    def handle_one_request(self):
        first = self.exchange is None
        # A connection that has not shown good credentials may wait for its next request no
        # longer than a request may take, so that clients without them cannot hold on to the
        # connections users need.
        idle = IDLE_TIMEOUT if self.proven else self.server.request_timeout
        self._reader.deadline = time.monotonic() + (
            self.server.request_timeout if first else idle)
        if not self.rfile.peek(1):      # the client closed a keep-alive connection
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + self.server.request_timeout
        self.exchange = Exchange(time.monotonic())
        self.command = self.path = None     # set by _read_head once it has read them
        self.request_version, self.headers = "HTTP/1.1", Headers([])
        try:
            if not self._read_head():
                return
            if self.headers.get("Expect", "").lower() == "100-continue" and (
                    self.request_version != "HTTP/1.0" and not self.handle_expect_100()):
                return
        except HTTPError as error:
            self.exchange.method = self.command or "-"
            self.exchange.target = self.path or "-"
            self._answer_error(error)
            return
        self._dispatch()

    def _read_head(self):
        """Read the request line and header fields, as http.server does but without its
        email parser; False when the client closed instead, HTTPError 400, 414, 431, 501 or
        505 for a request that cannot be served."""
        line = self.rfile.readline(MAX_LINE_READ + 1)
        if not line:
            self.close_connection = True
            return False
        if len(line) > MAX_LINE_READ:
            raise HTTPError(414, "the request line is longer than %d bytes" % MAX_LINE_READ,
                            close=True)
        self.raw_requestline = line
        self.requestline = line.decode("latin-1").rstrip("\r\n")
        words = self.requestline.split(" ")
        if len(words) == 3:
            self.command, self.path = words[0], words[1]
        version = HTTP_VERSION.fullmatch(words[-1]) if len(words) == 3 else None
        if version is None or not TOKEN.fullmatch(self.command) or not self.path:
            raise HTTPError(400, "malformed request line %s" % quoted(self.requestline, 100),
                            close=True)
        if version.group(1) != "1":
            raise HTTPError(505, "HTTP version %s is not supported; use HTTP/1.1" % quoted(
                words[-1], 20), close=True)
        self.request_version = words[-1]
        self.headers = Headers(self._header_fields())
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive")
        if self.command not in METHODS:
            raise HTTPError(501, "method %s is not supported" % quoted(self.command, 20),
                            close=True)
        return True

    def _header_fields(self):
        lines = []
        while True:
            line = self.rfile.readline(MAX_LINE_READ + 1)
            if len(line) > MAX_LINE_READ:
                raise HTTPError(431, "a header line is longer than %d bytes" % MAX_LINE_READ,
                                close=True)
            if line in (b"\r\n", b"\n", b""):
                break
            if len(lines) >= MAX_LINES_READ:
                raise HTTPError(431, "more than %d header lines" % MAX_LINES_READ, close=True)
            lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise HTTPError(431, "more than %d header lines" % MAX_HEADERS, close=True)
        fields = HEADER_FIELD.findall(b"".join(lines).decode("latin-1"))   # one pass for all
        if len(fields) != len(lines):       # a line that is not NAME: VALUE: say which
            fields = [parse_header_field(line) for line in lines]
        for line, (name, _) in zip(lines, fields):
            if len(line) > MAX_HEADER_LINE and len(line.rstrip(b"\r\n")) > MAX_HEADER_LINE:
                raise HTTPError(431, "header %s is longer than %d bytes"
                                % (quoted(name, 40), MAX_HEADER_LINE), close=True)
        return fields

    @property
    def who(self):
        """Who sent the request, for the log and the task: login and address."""
        login = self.exchange.login if self.exchange else "-"
        return self.peer if login == "-" else "%s (%s)" % (login, self.peer)

    @property
    def peer(self):
        host, port = self.client_address[:2]
        return "%s:%s" % (host, port)

    # -- every request: route, credentials, same-site check, fields; one error boundary

    def _dispatch(self):
        exchange = self.exchange
        exchange.method, exchange.target = self.command, self.path
        try:
            body = self._read_body()
            exchange.route, arguments = find_route(self.command, exchange.path)
            if not exchange.route.public:
                exchange.login = self.server.access.login(self.headers.get("Authorization"),
                                                          self.client_address[0],
                                                          exchange.route.changes_state)
                if not self.proven:
                    self.proven = True
                    self.server.proven(self.connection)
            if exchange.route.changes_state:
                self._check_same_site()
            exchange.fields = Fields.parse(exchange.query, body, self.headers.media_type(),
                                           exchange.route.fields)
            getattr(self, exchange.route.handler)(**arguments)
        except HTTPError as error:
            self._answer_error(error)
        except (ConnectionError, socket.timeout, ssl.SSLError):
            raise                       # the client went away: handle() logs one line
        except Exception:
            incident = os.urandom(6).hex()
            self.close_connection = True
            if exchange.head_sent:      # a second answer would land inside the first
                logger.exception("internal error %s in %s %s after its answer had begun; the "
                                 "connection is closed", incident, self.command,
                                 quoted(self.path))
                return
            logger.exception("internal error %s in %s %s", incident, self.command,
                             quoted(self.path))
            self.send_json(500, {"error": "internal error", "id": incident})

    def _answer_error(self, error):
        # A 401 to a request without credentials is what a client that has none gets: it
        # keeps no connection for it.
        closes = error.close or (error.status == 401 and not self.headers.get("Authorization"))
        self.close_connection = self.close_connection or closes
        if self.exchange is not None:
            self.exchange.refused = error.message
        self.send_json(error.status, error.reply(), error.headers)

    def _check_same_site(self):
        """Refuse a state change that a browser sends for another page than this server's:
        browsers add Basic credentials by themselves, so an <img> on any other page (another
        site, or another port or subdomain of this one) could kill a task.  curl and bots send
        none of these headers.  A prefetch or prerender is never a person asking: refused too
        (a browser may fetch a kill URL while its user is still typing it)."""
        purposes = " ".join(self.headers.get(name, "") for name in (
            "Sec-Purpose", "Purpose", "X-Purpose", "X-Moz")).lower()
        if "prefetch" in purposes or "prerender" in purposes or "preview" in purposes:
            raise HTTPError(403, "a prefetch or prerender may not start or kill tasks; open the "
                                 "page and ask again")
        fetched_from = self.headers.get("Sec-Fetch-Site", "").strip().lower()
        if fetched_from not in ("", "same-origin", "none"):
            raise HTTPError(403, "requests from another page (%s) may not start or kill tasks"
                            % quoted(fetched_from, 20))
        for header in ("Origin", "Referer"):    # older browsers send no Sec-Fetch-Site
            value = self.headers.get(header)
            if value is not None and netloc_of(value) != self.headers.get("Host", "").lower():
                raise HTTPError(403, "requests from %s %s may not start or kill tasks here"
                                % (header.lower(), quoted(value)))

    def _content_length(self):
        """The declared body length; 411, 400 or 413 for a body this server will not read."""
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "send the body with a Content-Length (chunked bodies are not "
                                 "accepted)", close=True)
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if not lengths:
            return 0
        length = lengths.pop()
        if lengths or not COUNT_PATTERN.fullmatch(length):
            raise HTTPError(400, "Content-Length must be one whole number", close=True)
        if int(length) > MAX_BODY:
            raise HTTPError(413, "the body is %s bytes; the limit is %d" % (length, MAX_BODY),
                            close=True)
        return int(length)

    def _read_body(self):
        length = self._content_length()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise ConnectionResetError("closed in the middle of the request body")
        return body

    def handle_expect_100(self):
        self._content_length()      # a body that would be refused is refused before it is sent
        return super().handle_expect_100()

    # -- helpers of the endpoints

    def _absolute_url(self, path):
        scheme = "https" if self.server.tls else "http"
        host = self.headers.get("Host", "")
        if not HOST_PATTERN.fullmatch(host):
            address = self.connection.getsockname()
            host = ("[%s]:%d" if ":" in address[0] else "%s:%d") % address[:2]
        return "%s://%s%s" % (scheme, host, path)

    def _wait_while_here(self, wait):
        """wait(timeout)'s answer once it has one, or None after the poll timeout; asked in
        slices of STREAM_CHECK, so that a client that leaves frees its thread and connection
        within half a second (ConnectionAbortedError), not at the end of the poll."""
        deadline = time.monotonic() + self.server.poll_timeout
        while True:
            answer = wait(max(0.0, min(STREAM_CHECK, deadline - time.monotonic())))
            if answer is not None or time.monotonic() >= deadline:
                return answer
            if self._client_gone():
                raise ConnectionAbortedError("went away during a long poll")

    def _client_gone(self):
        """True when the client has closed its end (or sent something it should not have)."""
        poller = select.poll()      # select.select fails on a descriptor past 1023
        poller.register(self.connection, select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    # -- answers: every one starts with _begin_answer()

    def send_json(self, status, payload, headers=()):
        self.send_bytes(status, json_body(payload), "application/json", headers)

    def send_bytes(self, status, body, content_type, headers=()):
        head = self._begin_answer(status, content_type,
                                  [("Content-Length", str(len(body)))] + list(headers))
        if self.command == "HEAD":
            self.wfile.write(head)
        elif len(body) > SOCKET_BUFFER:     # a long output: no extra copy just to join the two
            self.wfile.write(head)
            self.wfile.write(body)
        else:
            self.wfile.write(head + body)
        self._answered(status, len(body))

    def start_chunked(self, content_type):
        """Send the head of a streamed 200 response; send_chunk() sends the rest.  HTTP/1.0
        has no chunks: its stream ends when the connection closes."""
        self._chunked = self.request_version != "HTTP/1.0"
        self.close_connection = self.close_connection or not self._chunked
        framing = [("Transfer-Encoding", "chunked")] if self._chunked else []
        self.wfile.write(self._begin_answer(200, content_type, framing))
        self._streamed = 0

    def send_chunk(self, data):
        """One chunk of a streamed response; an empty one ends it."""
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:
            self.wfile.write(data)
        self._streamed += len(data)
        if not data:
            self._answered(200, self._streamed)

    def _begin_answer(self, status, content_type, headers):
        """The head of the answer, as bytes.  The request's deadline ends here: from now on each
        write to a client that has stopped reading may take SEND_TIMEOUT."""
        self._reader.deadline = None
        self.connection.settimeout(SEND_TIMEOUT)
        if self.exchange is not None:
            self.exchange.head_sent = True
        return response_head(status, content_type, headers, self.close_connection)

    def _answered(self, status, size):
        """Count and log an answer that has been written whole."""
        self.server.metrics.request_answered(status)
        exchange = self.exchange
        # On a server that asks for credentials, a request nobody logged in for is throttled
        # like the connection's other lines.
        if (exchange.login != "-" or not self.server.access.requires_credentials
                or self.server.refusals.allows(self.client_address[0])):
            log_request("%s %s %s %d %d %.0fms%s%s" % (
                self.peer, quoted(exchange.method, 20)[1:-1], quoted(exchange.target, 200),
                status, size, (time.monotonic() - exchange.started) * 1000,
                "" if exchange.login == "-" else " user=%s" % quoted(exchange.login),
                "" if exchange.refused is None else ": " + printable(exchange.refused)))

    def log_message(self, format, *args):
        logger.info("%s: %s", self.peer, format % args)


# ---------------------------------------------------------------- HTTP: the endpoints

class ApiHandler(RequestHandler):
    """The endpoints: ROUTES says which method and path reach each, and what it accepts."""

    def create_task(self, app, env):
        fields = self.exchange.fields
        action = fields.one("action", "task", example=self._absolute_url(self.exchange.path))
        self._start(check_name("app", app), check_name("env", env), check_action(action))

    def list_apps(self):
        self.send_json(200, self.server.apps.read())

    def rerun_task(self, task_id):
        old = self.server.store.read(task_id)
        self._start(old["app"], old["env"], check_action(old["action"]))

    def _start(self, app, env, action):
        """Start (or queue) a task; with wait=true answer once it has ended, with all of it."""
        fields = self.exchange.fields
        queue, wait = fields.flag("queue"), fields.flag("wait")
        task = self.server.runner.start(app, env, action, self.who, queue)
        self.server.apps.note_pair(app, env)
        reply = {"taskId": task.id, "url": self._absolute_url("/task/%d" % task.id),
                 "status": task.status}
        if wait:
            reply["task"] = self._wait_until_ended(task.id)
            reply["status"] = reply["task"]["status"]
        self.send_json(200, reply)

    def _wait_until_ended(self, task_id):
        """The ended task; if the client goes away first, stop waiting (the task goes on)."""
        while True:
            task = self.server.store.wait_until_ended(task_id, STREAM_CHECK)
            if task is not None:
                return task
            if self._client_gone():
                raise ConnectionAbortedError("went away while waiting for task %d, which goes on"
                                             % task_id)

    def read_task(self, task_id):
        answer = self.server.store.read_answer(task_id, self.exchange.fields.count("offset") or 0)
        self.send_bytes(200, answer, "application/json")

    def poll_task(self, task_id):
        fields = self.exchange.fields
        version, offset = fields.count("version"), fields.count("offset")
        if version is None:     # the client has seen the task as it is now: wait for a change
            version = self.server.store.version_of(task_id)
        answer = self._wait_while_here(lambda timeout: self.server.store.wait_for_poll_answer(
            task_id, version, offset, timeout))
        self.send_bytes(200, answer or UNCHANGED, "application/json")

    def read_output(self, task_id):
        """The output as plain text from an offset (or its last lines), with X-Text-Size and
        X-More-Data as Jenkins' progressive text has them; wait=1 waits for more."""
        fields = self.exchange.fields
        offset, tail, wait = fields.count("offset"), fields.count("tail"), fields.flag("wait")
        store = self.server.store
        if tail is not None:
            if offset is not None or wait or not 0 < tail <= MAX_TAIL:
                raise HTTPError(400, "tail takes 1 to %d lines, without offset or wait" % MAX_TAIL)
            task, text = store.read_tail(task_id, tail)
        else:
            offset = offset or 0
            task = None
            if wait:
                task = self._wait_while_here(lambda timeout: store.wait_for_change(
                    task_id, None, offset, timeout))
            task = task or store.read(task_id, offset)
            text = task["output"]
        # What a terminal may show; a running task's last characters that might still become
        # an escape sequence or a lookalike of the closing line wait for the next request.
        terminal = TerminalText()
        text = terminal.feed(text, final=task["status"] in ENDED)
        self.send_bytes(200, text.encode("utf-8"), "text/plain; charset=utf-8", [
            ("X-Text-Size", str(task["outputLength"] - terminal.held_back())),
            ("X-More-Data", "false" if task["status"] in ENDED else "true"),
            ("X-Task-Status", task["status"])])

    def stream_task(self, task_id):
        """The output as it comes, in one chunked response that ends with the task: plain text
        ending with a status line, or Server-Sent Events (output, status, end)."""
        events = "text/event-stream" in self.headers.get("Accept", "")
        offset = self.exchange.fields.count("offset")
        resume = self.headers.get("Last-Event-ID") if events else None
        if resume:
            offset = parse_count("Last-Event-ID", resume.strip())
        offset = offset or 0
        first = self.server.store.read(task_id, offset)     # a 404 or 400 comes before the stream
        if events:
            stream = EventStream(self)
        else:
            before = self.server.store.read(task_id, offset - 1)["output"][:1] if offset else "\n"
            stream = TextStream(self, before)
        for task in self._follow(task_id, first):
            if task is None:
                stream.keep_alive()
            else:
                stream.send(task)
        stream.close()

    def _follow(self, task_id, task):
        """The task snapshot given, then one with the new output at each change until the task
        ends, and None after each quiet SSE_KEEPALIVE; stops early (ConnectionAbortedError)
        when the client goes away."""
        store = self.server.store
        quiet_since = time.monotonic()
        while True:
            yield task
            if task["status"] in ENDED:
                return
            while True:
                moved = store.wait_for_change(task_id, task["version"], task["outputLength"],
                                              STREAM_CHECK)
                if moved is not None:
                    task = moved
                    break
                if self._client_gone():
                    raise ConnectionAbortedError("went away during the stream of task %d" % task_id)
                if time.monotonic() - quiet_since > SSE_KEEPALIVE:
                    yield None
                    quiet_since = time.monotonic()

    def kill_task(self, task_id):
        self.send_json(200, self.server.runner.kill(task_id, requested_by=self.who))

    def list_tasks(self):
        fields = self.exchange.fields
        app, env, status = (fields.text(name) for name in ("app", "env", "status"))
        if status is not None and status not in ALL_STATUSES:
            raise HTTPError(400, "status must be one of %s" % ", ".join(sorted(ALL_STATUSES)))
        limit = fields.count("limit")
        limit = LIST_LIMIT if limit is None else limit
        if not 1 <= limit <= LIST_MAX:
            raise HTTPError(400, "limit must be from 1 to %d" % LIST_MAX)
        for kind, name in (("app", app), ("env", env)):
            if name is not None:
                check_name(kind, name)
        before, version = fields.count("before"), fields.count("version")
        if version is not None:     # a long poll: answer when a task comes, changes status or goes
            def changed(timeout):       # True once the list is past `version`, else None
                return self.server.store.wait_for_list_change(version, timeout) != version or None

            self._wait_while_here(changed)
        version, tasks = self.server.store.listing(app, env, status, before, limit)
        following = None
        if len(tasks) == limit:
            query = {name: value for name, value in (("app", app), ("env", env),
                                                      ("status", status)) if value}
            query.update(limit=limit, before=tasks[-1]["id"])
            following = "/tasks?" + urllib.parse.urlencode(query)
        self.send_json(200, {"tasks": tasks, "next": following, "version": version})

    def send_page(self):
        self._send_asset(PAGE_HTML, "text/html; charset=utf-8")

    def send_script(self):
        self._send_asset(PAGE_JS, "text/javascript; charset=utf-8")

    def send_style(self):
        self._send_asset(PAGE_CSS, "text/css; charset=utf-8")

    def _send_asset(self, text, content_type):
        self.send_bytes(200, text.encode("utf-8"), content_type, PAGE_SECURITY)

    def health(self):
        if not self.proven and self.server.access.requires_credentials:
            self.close_connection = True    # /health is public: it must not hold connections
        stopping = self.server.runner.stopping
        self.send_json(503 if stopping else 200, {
            "status": "stopping" if stopping else "ok",
            "running": self.server.store.running_count, "version": __version__,
            "pulsar": self.server.apps.pulsar_version})

    def metrics(self):
        store = self.server.store
        text = self.server.metrics.render(store.running_count, store.waiters,
                                          store.history_size())
        self.send_bytes(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")


class TerminalText:
    """Task output made safe to print in a terminal (GET /task/:id/stream and /output): colours
    pass; every other escape sequence (window titles, clipboard writes, screen clears, cursor
    moves), concealed or blinking text, and control characters but tab and newline are dropped;
    a carriage return ends a line (a line rewritten in place could not be checked).  Wherever a
    line holds text that reads as the server's closing line, a visible marker comes first.
    Output comes in pieces: a sequence cut in two, and the end of a line that may still turn
    into such text, are held back until the next piece.
    """

    def __init__(self):
        self._unfinished = ""       # the start of an escape sequence cut at the end of a piece
        self._line = []             # [safe text, visible text, length given] of the current
                                    # line, not sent yet
        self._after_return = False  # the last character was a carriage return
        self.coloured = False       # a colour has passed: reset it before anything of our own

    def feed(self, text, final=False):
        """The safe text for the next piece of output; `final` flushes what is held back."""
        text = self._unfinished + text
        self._unfinished = ""
        out = []
        for match in TERMINAL_TOKEN.finditer(text):
            token = match.group()
            after_return, self._after_return = self._after_return, token == "\r"
            if match.group("cut") is not None:
                if not final and len(token) <= MAX_ESCAPE:
                    self._unfinished = token
            elif match.group("complete") is not None:
                colour = safe_sgr(token)
                self.coloured = self.coloured or bool(colour)
                self._line.append([colour, "", len(token)])
            elif token in ("\n", "\r"):
                if not (token == "\n" and after_return):      # \r\n is one line end
                    self._release(out, line_ends=True)
                    out.append("\n")
            elif token == "\t" or not TERMINAL_CONTROL.match(token):
                self._line.append([token, token, len(token)])
        self._release(out, line_ends=final)
        return "".join(out)

    def held_back(self):
        """How many characters given so far are held back, not yet in what feed returned."""
        return len(self._unfinished) + sum(length for _, _, length in self._line)

    def _release(self, out, line_ends):
        """Send what is known of the current line, with the marker before each place that
        reads as the closing line; unless the line ends, keep back the end that may still
        become one (at most MAX_HOLD characters: past that it is marked all the same)."""
        visible = "".join(shown for _, shown, _ in self._line)
        starts, keep_from = lookalike_spots(visible, line_ends)
        if keep_from is not None and len(visible) - keep_from > MAX_HOLD:
            starts, keep_from = starts + [keep_from], None
        position, kept = 0, []
        for piece in self._line:
            safe, shown, length = piece
            for start in [start for start in starts if position <= start < position + len(shown)
                          or not shown and start == position]:
                cut = start - position
                if cut:
                    out.append(safe[:cut])
                    safe, shown, position = safe[cut:], shown[cut:], start
                out.append(LOOKALIKE_PREFIX)
                starts.remove(start)
            if keep_from is not None and position + len(shown) > keep_from:
                cut = max(0, keep_from - position)
                out.append(safe[:cut])
                kept.append([safe[cut:], shown[cut:], len(shown) - cut if shown else length])
                keep_from = position + len(shown)       # all the rest of the line is kept
            else:
                out.append(safe)
            position += len(shown)
        self._line = kept


def lookalike_spots(visible, line_ends):
    """(where text reading as the closing line starts in `visible`, where its end begins that
    may still become such text, or None): positions in `visible`."""
    folded = fold_like_a_reader(visible)
    partial = not line_ends and any(folded.endswith(CLOSING_LINE_KEY[:size])
                                    for size in range(1, len(CLOSING_LINE_KEY)))
    if CLOSING_LINE_KEY not in folded and not partial:
        # The common case, at C speed: nothing to look into; but a bracket at the very end
        # waits for what follows it, so that a marker could come before it.
        opening = with_its_bracket(visible, len(visible))
        return [], opening if not line_ends and opening < len(visible) else None
    key, places = "", []
    for place, char in enumerate(visible):
        for folded_char in fold_like_a_reader(char):
            key += folded_char
            places.append(place)
    starts, index = [], key.find(CLOSING_LINE_KEY)
    while index >= 0:
        starts.append(with_its_bracket(visible, places[index]))
        index = key.find(CLOSING_LINE_KEY, index + len(CLOSING_LINE_KEY))
    keep_from = None
    if not line_ends:
        for size in range(len(CLOSING_LINE_KEY) - 1, 0, -1):
            if key.endswith(CLOSING_LINE_KEY[:size]):
                keep_from = with_its_bracket(visible, places[len(key) - size])
                break
    return starts, keep_from


def with_its_bracket(visible, place):
    """The place a marker goes for text that starts at `place`: before the few signs (a
    bracket, an invisible character) that open it."""
    for _ in range(4):
        opener = visible[place - 1] if place else " "
        if opener.isspace() or fold_like_a_reader(opener):
            break
        place -= 1
    return place


def fold_like_a_reader(text):
    """Text as a reader takes it, to find the closing line in it: letters folded (fullwidth,
    mathematical, the Cyrillic and Greek ones that look Latin, 1 and | for l), everything but
    ASCII letters and digits left out (punctuation, blanks, invisible characters)."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(LOOKALIKE_TABLE)
    return NOT_A_KEY_CHARACTER.sub("", text)


def safe_sgr(sequence):
    """An escape sequence reduced to the colours and styles a terminal may show of a task's
    output, or "" when nothing of it may pass."""
    if not sequence.startswith("\x1b[") or not sequence.endswith("m"):
        return ""
    params = sequence[2:-1].split(";") if len(sequence) > 3 else ["0"]
    kept, index = [], 0
    while index < len(params):
        param = params[index]
        if param in ("38", "48"):       # 38;5;N or 38;2;R;G;B: a colour from a palette or RGB
            size = {"5": 3, "2": 5}.get(params[index + 1] if index + 1 < len(params) else "", 0)
            if size and all(part.isdigit() and int(part) < 256
                            for part in params[index + 2:index + size]):
                kept += params[index:index + size]
            index += size or len(params)
            continue
        if param.isdigit() and int(param) in SAFE_SGR:
            kept.append(str(int(param)))
        index += 1
    return "\x1b[%sm" % ";".join(kept) if kept else ""


class TextStream:
    """A task's output as chunked text/plain, made safe for a terminal, ending with a line that
    gives how it ended."""

    def __init__(self, handler, before="\n"):
        self._handler = handler
        self._last = before         # the character before the stream's first: ends a line?
        self._terminal = TerminalText()
        handler.start_chunked("text/plain; charset=utf-8")

    def send(self, task):
        ended = task["status"] in ENDED
        text = self._terminal.feed(task["output"], final=ended)
        if text:
            self._last = text[-1]
            self._handler.send_chunk(text.encode("utf-8"))
        if ended:
            self._handler.send_chunk((("\x1b[0m" if self._terminal.coloured else "")
                                      + ("" if self._last == "\n" else "\n")
                                      + closing_line(task)).encode("utf-8"))

    def keep_alive(self):
        pass                        # plain text has no invisible filler; _client_gone() checks

    def close(self):
        self._handler.send_chunk(b"")


def closing_line(task):
    """The line that ends a task's text stream: how it ended, and why."""
    return "[pulsar-rest-api: task %d %s, exit code %s%s]\n" % (
        task["id"], task["status"], "none" if task["exitCode"] is None else task["exitCode"],
        ": " + task["outcome"] if task["outcome"] else "")


class EventStream:
    """A task as Server-Sent Events: `status` when it changes, `output` with the new text (its id
    is the output length so far, so Last-Event-ID resumes without loss or repeat), then `end`."""

    def __init__(self, handler):
        self._handler = handler
        self._status = None
        handler.start_chunked("text/event-stream; charset=utf-8")
        handler.send_chunk(b"retry: 3000\n\n")

    def send(self, task):
        summary = {key: value for key, value in task.items() if key != "output"}
        events = []
        if task["status"] != self._status and task["status"] not in ENDED:
            self._status = task["status"]
            events.append(("status", None, summary))
        if task["output"]:
            events.append(("output", task["outputLength"],
                           {"offset": task["outputOffset"], "text": task["output"]}))
        if task["status"] in ENDED:
            events.append(("end", None, summary))
        if not events:
            return                  # a change it has no event for (pulsar's pid): an empty
                                    # chunk would end the stream
        self._handler.send_chunk("".join(
            "event: %s\n%sdata: %s\n\n" % (name, "" if event_id is None else "id: %d\n" % event_id,
                                          json.dumps(data, ensure_ascii=False))
            for name, event_id, data in events).encode("utf-8"))

    def keep_alive(self):
        self._handler.send_chunk(b": still running\n\n")

    def close(self):
        self._handler.send_chunk(b"")


# ---------------------------------------------------------------- the server

class PulsarServer(ThreadingHTTPServer):
    """The HTTP(S) server: accepts in one thread, and hands each connection, still before its TLS
    handshake, to a thread of its own."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, *, settings, store, runner, apps, metrics, access, tls):
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        self.store = store
        self.runner = runner
        self.apps = apps
        self.metrics = metrics
        self.access = access
        self.tls = tls                  # an SSLContext, or None with --no-ssl
        self.max_connections = settings.max_connections
        self.poll_timeout = settings.poll_timeout
        self.request_timeout = settings.request_timeout
        self._refusing = threading.BoundedSemaphore(REFUSERS)
        self._refusal_logged = -REFUSAL_LOG_EVERY
        self._lock = threading.Lock()
        self._per_address = collections.Counter()   # brake_key(address) -> connections open
        # Connections none of whose requests has shown working credentials, oldest first:
        # socket -> address.  At --max-connections the oldest gives way to a newcomer.
        self._unproven = collections.OrderedDict()
        self.refusals = RefusalLog()
        self._stop_bell = os.pipe()     # rung by shutdown() to wake the accept loop
        self._stopping = threading.Event()
        self._accepting_ended = threading.Event()
        super().__init__((settings.host, settings.port), ApiHandler)    # closes all if it fails

    def serve_forever(self, poll_interval=None):
        """Accept connections until shutdown().  socketserver's own loop wakes every poll
        interval to see a stop; this one sleeps until a connection comes or shutdown() rings,
        so that an idle server costs no CPU and a stop takes no wait."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._stop_bell[0], selectors.EVENT_READ)
                while not self._stopping.is_set():
                    ready = [key.fileobj for key, _ in selector.select()]
                    if self in ready and not self._stopping.is_set():
                        self._handle_request_noblock()
        finally:
            self._accepting_ended.set()

    def shutdown(self):
        """Stop the accept loop and wait for it to end (it must be running)."""
        self._stopping.set()
        os.write(self._stop_bell[1], b"!")
        self._accepting_ended.wait()

    def server_close(self):
        super().server_close()
        for fd in self._stop_bell:
            os.close(fd)

    def server_bind(self):
        # HTTPServer.server_bind also looks up our own name (getfqdn), which can stall on bad DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        try:
            sock, address = self.socket.accept()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                # The listening socket stays readable: without a pause this loop would spin.
                logger.error("cannot accept a connection: %s; pausing", error.strerror)
                time.sleep(ACCEPT_BACKOFF)
            raise
        if self.tls:
            # No handshake here: a client that never sends a hello would stall every other.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request, client_address):
        if not self._count_in(client_address[0]):
            self._refuse(request, client_address, "from its address (%d)" % MAX_PER_ADDRESS)
            return
        if not (self.metrics.open_connection(self.max_connections) or self._make_room()):
            self._count_out(client_address[0])
            self._refuse(request, client_address, "(--max-connections)")
            return
        with self._lock:
            self._unproven[request] = client_address
        try:
            super().process_request(request, client_address)
        except RuntimeError as error:      # can't start new thread
            self.metrics.close_connection()
            self._count_out(client_address[0])
            self.proven(request)
            logger.error("%s:%s: dropped: %s", client_address[0], client_address[1], error)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.metrics.close_connection()
            self._count_out(client_address[0])
            self.proven(request)

    def proven(self, connection):
        """A request on this connection has shown working credentials: it never gives way."""
        with self._lock:
            self._unproven.pop(connection, None)

    def _make_room(self):
        """At --max-connections, on a server that asks for credentials: end the oldest
        connection that has shown none that work, and count the newcomer in its place, so that
        clients without credentials, from however many addresses, never keep a user out.
        False when there is none (every open connection is a user's)."""
        if not self.access.requires_credentials:
            return False
        with self._lock:
            if not self._unproven:
                return False
            oldest, address = self._unproven.popitem(last=False)
        self.metrics.connection_refused()
        self.refusals.info(address[0], "%s:%s: closed to make room for a new connection "
                           "(--max-connections): it had shown no working credentials",
                           address[0], address[1])
        try:        # beneath TLS: its thread, reading, sees the end and counts it out
            socket.socket.shutdown(oldest, socket.SHUT_RDWR)
        except OSError:
            pass
        self.metrics.open_connection(float("inf"))
        return True

    def _count_in(self, address):
        """Count a connection from `address`; False (not counted) when that address has
        MAX_PER_ADDRESS open already.  This host's own addresses are not capped: they are a
        proxy in front, or someone already on the bastion."""
        key = brake_key(address)
        with self._lock:
            if self._per_address[key] >= MAX_PER_ADDRESS and not is_loopback(address):
                return False
            self._per_address[key] += 1
            return True

    def _count_out(self, address):
        key = brake_key(address)
        with self._lock:
            self._per_address[key] -= 1
            if self._per_address[key] <= 0:
                del self._per_address[key]

    def _refuse(self, request, client_address, limit):
        """Over a limit of connections: answer 503 and close, in a thread of a few kept for
        this, so that the accept loop goes on; when those are busy too, just close."""
        self.metrics.connection_refused()
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            logger.warning("%s:%s: refused: as many connections are open as allowed %s "
                           "(next note in %d s at the earliest)", client_address[0],
                           client_address[1], limit, REFUSAL_LOG_EVERY)
        if not self._refusing.acquire(blocking=False):
            self.shutdown_request(request)
            return
        threading.Thread(target=self._answer_busy, args=(request,), daemon=True).start()

    def _answer_busy(self, request):
        try:
            request.settimeout(REFUSE_TIMEOUT)
            if isinstance(request, ssl.SSLSocket):
                request.do_handshake()
            request.sendall(whole_response(
                503, json_body({"error": "the server has too many connections; try again shortly"}),
                "application/json", [("Retry-After", "1")], close=True))
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.shutdown_request(request)
            self._refusing.release()

    def handle_error(self, request, client_address):
        logger.exception("unexpected error with %s:%s", *client_address[:2])


# ---------------------------------------------------------------- the lifecycle: start, serve, stop

def configure_logging(log_dir):
    if log_dir:
        try:
            os.makedirs(log_dir, mode=0o700, exist_ok=True)
            if os.stat(log_dir).st_mode & stat.S_IWOTH:
                raise StartupError("--log-dir %s is writable by every user, who could put a "
                                   "link there in place of the log: give a folder of its own"
                                   % log_dir)
            handler = LogLines(os.path.join(log_dir, LOG_NAME))
        except OSError as error:
            raise StartupError("--log-dir: cannot write %s: %s" % (log_dir, error))
    else:
        handler = LogLines()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # What a line would cost to find out and no line says (the logging manual's optimisations).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False


def log_request(line):
    """Log the line of an answered request: queued for the log's thread (see LogLines)."""
    handler = logger.handlers[0] if logger.handlers else None
    if isinstance(handler, LogLines):
        handler.queue(line)
    else:
        logger.info("%s", line)


class LogLines(logging.Handler):
    """Where the log goes, a line for each event: TIME.mmmZ LEVEL message, the time in UTC.

    To the file in --log-dir (created for its owner only, never through a link put in its
    place, and opened again when logrotate has moved it away), or else to standard error.
    Every answered request is logged, and 200 followers woken at once would take turns at a
    lock and a write each: so a request's line is queued (queue()) and the log's thread writes
    all that is queued in one write.  Any other line is written at once, after what is queued,
    so that a task's end is in the log before any client can have seen it.
    """

    def __init__(self, path=None):
        super().__init__()
        self._path = path
        self._fd = None
        self._opened = None             # (device, inode) of the file that _fd writes to
        self._queued = collections.deque()
        self._wake = threading.Event()
        self._writing = threading.Lock()
        self._stamp = (None, "")        # (second, its text): formatted once a second
        self._failing = False
        if path:
            self._open()
        threading.Thread(target=self._write_queued, name="log", daemon=True).start()

    def queue(self, message):
        """An INFO line, written moments later by the log's thread."""
        self._queued.append(self._line(time.time(), "INFO", message))
        if not self._wake.is_set():
            self._wake.set()

    def emit(self, record):
        line = self._line(record.created, record.levelname, record.getMessage())
        if record.exc_info:
            line += logging.Formatter().formatException(record.exc_info) + "\n"
        self._write(line)

    def flush(self):
        self._write("")

    def close(self):
        self.flush()
        with self._writing:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()

    def _line(self, when, level, message):
        second = int(when)
        stamp = self._stamp
        if stamp[0] != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            stamp = self._stamp = (second, text)
        return "%s.%03dZ %s %s\n" % (stamp[1], (when - second) * 1000, level, message)

    def _write_queued(self):
        while True:
            self._wake.wait()
            self._wake.clear()
            self._write("")

    def _write(self, line):
        """Write what is queued, then `line`, in one write."""
        with self._writing:
            lines = []
            while self._queued:
                lines.append(self._queued.popleft())
            text = "".join(lines) + line
            if text:
                self._write_out(text)

    def _write_out(self, text):
        try:
            if self._path is None:
                sys.stderr.write(text)
                sys.stderr.flush()
                return
            self._reopen_if_moved()
            data = text.encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self._fd, data):]
            self._failing = False
        except (OSError, ValueError) as error:
            if not self._failing:       # once, not for every line that cannot be written
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write("pulsar-rest-api: cannot write the log: %s\n" % error)
            self._failing = True

    def _open(self):
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        info = os.fstat(fd)
        self._opened = (info.st_dev, info.st_ino)

    def _reopen_if_moved(self):
        try:
            info = os.stat(self._path, follow_symlinks=False)
            moved = (info.st_dev, info.st_ino) != self._opened
        except FileNotFoundError:
            moved = True
        if moved:
            self._open()


def serve(settings):
    """Run the server until a stop signal; the exit code."""
    tls, fingerprint = (None, None) if settings.no_ssl else load_tls(settings)
    with history_lock(settings.db):     # one server per history, from before it is opened
        history = TaskHistory(settings.db)
        with task_folders_for(settings.db) as task_folders:
            reaper = Reaper()
            environ = child_environment(os.environ)
            command = find_pulsar(settings, environ, task_folders, reaper)
            metrics = Metrics()
            store = TaskStore(history, max_output=settings.max_output)
            factory_record = os.path.join(task_folders, "factory")
            end_earlier_keeper_factory(factory_record)
            keepers = KeeperFactory(environ=environ, reaper=reaper, record=factory_record)
            runner = TaskRunner(store=store, metrics=metrics, settings=settings, command=command,
                                task_folders=task_folders, keepers=keepers)
            apps = AppCatalog(command=command, environ=environ, workdir=task_folders,
                              reaper=reaper)
            access = Access(settings.authenticator)
            try:
                server = PulsarServer(settings=settings, store=store, runner=runner, apps=apps,
                                      metrics=metrics, access=access, tls=tls)
            except OSError as error:
                raise StartupError("cannot listen on %s:%d: %s" % (
                    settings.host, settings.port, error.strerror or error))
            try:
                runner.take_over(history.unfinished())
            except (sqlite3.Error, OSError) as error:
                raise StartupError("cannot take over the tasks an earlier server left in %s: %s"
                                   % (settings.db, error))
            signals = StopSignals()     # from here on a stop signal waits for its turn
            announce(settings, server, fingerprint, history, command)
            try:
                return serve_until_stopped(settings, server, signals, store, runner, history)
            finally:
                keepers.close()


def serve_until_stopped(settings, server, signals, store, runner, history):
    """Serve until a stop signal, stop as it asks, and close everything; the exit code."""
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    stopped = threading.Event()
    threading.Thread(target=store.persist_until_stopped, name="persist", daemon=True,
                     args=(stopped, settings.keep_days, settings.keep_tasks)).start()
    signum = signals.wait()
    if signum == HAND_OVER and settings.db == ":memory:":
        logger.warning("SIGUSR1: with --db :memory: no server can take over the running tasks; "
                       "stopping as SIGTERM does")
        signum = signal.SIGTERM
    if signum == HAND_OVER:
        hand_over(store, runner)
    else:
        stop_gracefully(signum, signals, store, runner, settings.shutdown_timeout)
    server.shutdown()
    stopped.set()
    if not store.persist():
        logger.error("the task history could not be written at the stop; what it lacks stays "
                     "in %s.tasks for the next start", settings.db)
    history.close()
    server.server_close()
    logger.info("stopped")
    return 0


def hand_over(store, runner):
    """Stop at once, leaving running tasks and the line to the next server on this history
    (the upgrade path: stop with SIGUSR1, replace the file, start)."""
    queued = runner.refuse_new(keep_line=True)
    running = store.running()
    logger.info("SIGUSR1: stopping at once; %d running task(s) go on under their keepers and "
                "%d queued task(s) stay in line, for the next server to take over%s",
                len(running), len(queued), ": " + ", ".join(
                    str(task.id) for task in sorted(running + queued, key=lambda task: task.id))
                if running or queued else "")


def stop_gracefully(signum, signals, store, runner, timeout):
    """Refuse new tasks, let running ones finish (reads and polls still answered), then kill
    what is left; a second signal skips the wait, SIGUSR1 hands the tasks over instead."""
    runner.refuse_new()
    running = len(store.running())
    logger.info("%s: stopping%s", signal.Signals(signum).name, "" if not running else
                ": new tasks are refused; waiting up to %g s for %d running task(s) (a second "
                "signal stops at once; SIGUSR1 leaves them to the next server)"
                % (timeout, running))
    if running:
        def note_when_idle():
            store.wait_until_idle(timeout)
            signals.note_drained()

        threading.Thread(target=note_when_idle, name="drain", daemon=True).start()
        again = signals.wait()
        if again == HAND_OVER:
            hand_over(store, runner)
            return
        if again != StopSignals.DRAINED:
            logger.info("%s again: stopping at once", signal.Signals(again).name)
    left = store.running()
    if left:
        logger.info("killing %d task(s) still running: %s", len(left),
                    ", ".join(str(task.id) for task in left))
    runner.stop_all()


def history_lock(db):
    """A context that holds DB.lock for as long as the server runs, so that one server uses a
    history at a time: a second one stops at start, naming the first, and touches nothing.
    The system releases the lock when the server dies, however it dies."""
    if db == ":memory:":
        return contextlib.nullcontext()
    return HistoryLock(db + ".lock")


class HistoryLock:
    """An exclusive flock on a file that says which server holds it."""

    def __init__(self, path):
        self.path = path
        self._fd = None

    def __enter__(self):
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise StartupError("--db: cannot open %s: %s" % (self.path, error.strerror or error))
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(self._fd)
            raise StartupError("--db %s is in use by another server (pid %s): stop it first, or "
                               "give this one a --db of its own"
                               % (self.path[:-len(".lock")], holder))
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, b"%d\n" % os.getpid(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self._fd)          # and with it the lock


def task_folders_for(db):
    """A context giving the folder in which each task gets its working folder: beside the
    history (DB.tasks), or a temporary one removed at the end for --db :memory:."""
    if db == ":memory:":
        return tempfile.TemporaryDirectory(prefix="pulsar-rest-api-tasks-")
    folder = db + ".tasks"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as error:
        raise StartupError("--db: cannot create %s for the tasks' working folders: %s"
                           % (folder, error.strerror or error))
    return contextlib.nullcontext(folder)


def announce(settings, server, fingerprint, history, command):
    host, port = server.server_address[:2]
    scheme = "http" if settings.no_ssl else "https"
    shown = "[%s]" % host if ":" in host else host
    logger.info("pulsar-rest-api %s listening on %s://%s:%d/", __version__, scheme, shown, port)
    if host in ("0.0.0.0", "::"):
        logger.info("reachable as %s://%s:%d/ on this host's addresses", scheme,
                    socket.gethostname(), port)
    if fingerprint:
        logger.info("TLS certificate SHA-256 fingerprint %s", fingerprint[0])
        if fingerprint[1]:
            logger.info("TLS public key pin: curl --pinnedpubkey sha256//%s (with -k, this "
                        "checks the key whatever name the certificate gives)", fingerprint[1])
    else:
        logger.warning("TLS IS OFF (--no-ssl): requests and answers travel in clear text; use "
                       "this only behind a TLS-terminating proxy")
    authenticator = settings.authenticator
    if isinstance(authenticator, OpenAccess):
        logger.warning("access: %s", authenticator.description)
    else:
        logger.info("access: %s", authenticator.description)
    if settings.password_in_argv:
        logger.warning("--auth-password is in the shell's history, and was in ps until the "
                       "server restarted itself without it; prefer --auth-password-file or %s",
                       PASSWORD_VARIABLE)
    logger.info("task history: %s", history.path if history.path != ":memory:" else
                "in memory only (--db :memory:): nothing is kept after a stop")
    argv = " ".join(command.argv("APP", "ENV", "ACTION"))
    if command.version:
        logger.info("pulsar %s, %s form: tasks run: %s", command.version, command.form, argv)
    else:
        logger.warning("%s --version names no pulsar version: tasks run in the %s form: %s",
                       command.binary, command.form, argv)
    warning = plain_folder_branch_warning(command)
    if warning:
        logger.warning("%s", warning)
    if os.getpid() == 1:
        logger.warning("this server runs as PID 1 (a container without --init): every task "
                       "ends with it, since the system ends all processes of the container "
                       "then, so SIGUSR1 cannot hand tasks over and is ignored; run it under "
                       "an init (docker run --init) for tasks to outlive it")


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (HAND_OVER) as bytes in a pipe that the main thread reads, so
    that no Python code runs inside a signal handler; other threads may write DRAINED to it too.

    SIGHUP (a closed terminal, a logrotate script) does not stop the server: dying on it would
    leave deploys running untracked, and the log file is reopened without it.
    """

    DRAINED = 0

    def __init__(self):
        self._read_end, self._write_end = os.pipe()
        os.set_blocking(self._write_end, False)
        signal.set_wakeup_fd(self._write_end)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, HAND_OVER):
            signal.signal(signum, lambda *_: None)      # the wakeup fd does the work

    def wait(self):
        """The next SIGTERM, SIGINT or HAND_OVER, or DRAINED."""
        while True:
            data = os.read(self._read_end, 1)
            if data and data[0] == signal.SIGHUP:
                logger.info("SIGHUP ignored; stop with SIGTERM or Ctrl-C (the log file is "
                            "reopened by itself when it is moved)")
            elif data and data[0] == HAND_OVER and os.getpid() == 1:
                logger.error("SIGUSR1 ignored: running as PID 1, this server cannot leave its "
                             "tasks to a next one (they would end with it); stop it with "
                             "SIGTERM, or run it under an init (docker run --init)")
            elif data and data[0] in (signal.SIGTERM, signal.SIGINT, HAND_OVER, self.DRAINED):
                return data[0]

    def note_drained(self):
        os.write(self._write_end, bytes([self.DRAINED]))


# ---------------------------------------------------------------- the command line

class Settings(argparse.Namespace):
    """Everything the command line decides, as one object handed to whatever needs it: each
    flag's value under its argparse name (build_parser declares them all, with their defaults),
    and what parse_args derives from them: `authenticator`, `tls_passphrase` (read from the
    --ssl-passphrase file) and `password_in_argv`."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that main decides the exit code."""

    def error(self, message):
        raise StartupError(message)


def positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text)
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError("must be more than 0 seconds, got %s" % text)
    return value


def byte_count(text):
    match = re.fullmatch(r"([0-9]{1,12})([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError("%r is not a size in bytes (e.g. 32M)" % text)
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")


def positive_count(text):
    if not COUNT_PATTERN.fullmatch(text) or int(text) == 0:
        raise argparse.ArgumentTypeError("%r is not a whole number above 0" % text)
    return int(text)


def port_number(text):
    if not COUNT_PATTERN.fullmatch(text) or int(text) > 65535:
        raise argparse.ArgumentTypeError("%r is not a port number (0-65535)" % text)
    return int(text)


def build_parser():
    parser = ArgumentParser(
        prog="pulsar_rest_api.py",
        description="An HTTPS REST API that runs pulsar deploy tasks: POST /APP/ENV with an "
                    "action, then GET /task/ID, /task/ID/state (long poll) and /task/ID/kill.",
        epilog="Without --ssl-* flags the certificate in ssl/ beside this script is used (a "
               "development certificate), or one made once with openssl in "
               "$XDG_STATE_HOME/pulsar-rest-api/.")
    add = parser.add_argument
    add("--config-repo", metavar="REPO",
        help="pulsar configuration repository (pulsar --conf-repo); default: pulsar finds its "
             "own (PULSAR_CONF_REPO, ~/.pulsar/config)")
    add("--config-branch", metavar="BRANCH",
        help="branch of the configuration repository (default: master); classic pulsar only")
    add("--pulsar-cli", choices=("auto", "classic", "v1"), default="auto",
        help="auto (default): the form that the version `PULSAR_BIN --version` names takes; "
             "classic: pulsar [--conf-repo R --conf-branch B] APP ENV ACTION (pulsar 0.x); "
             "v1: pulsar task [--conf-repo R] APP ENV ACTION (pulsar 1.1+)")
    add("--pulsar-bin", metavar="PATH", default="pulsar",
        help="the pulsar executable (default: pulsar on PATH); 'echo' is a harmless way to try")
    add("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    add("--port", type=port_number, default=DEFAULT_PORT,
        help="port to listen on (default: %(default)s; 0 picks a free one)")
    add("--log-dir", metavar="DIR",
        help="write the log to DIR/%s, creating DIR (default: standard error)" % LOG_NAME)
    add("--ssl-cert", metavar="FILE",
        help="PEM certificate; a CA chain appended to it is sent as the chain")
    add("--ssl-key", metavar="FILE", help="PEM private key of --ssl-cert")
    add("--ssl-pfx", metavar="FILE",
        help="PKCS#12 file with key and certificate (read with the openssl command); overrides "
             "--ssl-cert/--ssl-key")
    add("--ssl-passphrase", metavar="FILE", help="file holding the passphrase of the key or pfx")
    add("--no-ssl", action="store_true",
        help="plain HTTP, only behind a TLS-terminating proxy")
    add("--poll-timeout", type=positive_seconds, default=POLL_TIMEOUT, metavar="SECONDS",
        help="how long GET /task/ID/state waits for a change (default: %(default)g)")
    add("--kill-grace", type=positive_seconds, default=KILL_GRACE, metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when a task is killed (default: %(default)g)")
    add("--request-timeout", type=positive_seconds, default=REQUEST_TIMEOUT, metavar="SECONDS",
        help="time allowed for a TLS handshake, and for a request from its first byte to its last; "
             "slower clients are dropped (default: %(default)g)")
    add("--db", metavar="PATH",
        help="SQLite file holding the task history (default: tasks.sqlite3 in "
             "$XDG_STATE_HOME/pulsar-rest-api, or ~/.local/state/pulsar-rest-api); ':memory:' "
             "keeps nothing after a stop")
    add("--max-output", type=byte_count, default=MAX_OUTPUT, metavar="BYTES",
        help="output kept per task; beyond it the rest is dropped after a marker line "
             "(default: %(default)d, 32 MiB; suffixes K, M, G)")
    add("--shutdown-timeout", type=positive_seconds, default=SHUTDOWN_TIMEOUT, metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long to wait for running tasks before killing them "
             "(default: %(default)g); a second signal stops at once")
    add("--auth-provider", choices=("basic", "github"),
        help="require credentials: basic (one username and password) or github (GitHub "
             "tokens); default: none, the API is open")
    add("--auth-method", choices=("user", "org"),
        help="github only: user (default) allows the logins in --auth-username; org allows the "
             "members of the organisation named by --auth-username")
    add("--auth-username", metavar="NAME",
        help="basic: the username; github user: comma-separated GitHub logins; github org: the "
             "organisation")
    add("--auth-password", metavar="PASSWORD",
        help="basic: the password; github org: the server's own GitHub token for the membership "
             "check (default: the client's). Shows in ps: prefer --auth-password-file or the "
             "%s environment variable" % PASSWORD_VARIABLE)
    add("--auth-password-file", metavar="FILE", help="file holding --auth-password")
    add("--github-api", metavar="URL", help="GitHub API (default: %s; GitHub Enterprise: "
                                            "https://HOST/api/v3)" % GITHUB_API)
    add("--max-connections", type=positive_count, default=MAX_CONNECTIONS, metavar="N",
        help="client connections at once; at the limit the oldest that has shown no working "
             "credentials makes room, else more get 503 (default: %(default)d)")
    add("--max-tasks", type=positive_count, default=MAX_TASKS, metavar="N",
        help="tasks running at once; more are refused with 429, or wait with queue=true "
             "(default: %(default)d)")
    add("--allow-concurrent", action="store_true",
        help="allow several tasks of one app and environment at once (default: one, since two "
             "deploys at once corrupt releases)")
    add("--allow-action", action="append", default=[], metavar="PATTERN",
        help="only run actions matching this shell-style pattern (deploy, deploy:*); repeatable; "
             "shell and invoke stay refused")
    add("--keep-days", type=positive_count, default=KEEP_DAYS, metavar="DAYS",
        help="remove ended tasks and their output from the history once they are this old "
             "(default: %(default)d)")
    add("--keep-tasks", type=positive_count, default=KEEP_TASKS, metavar="N",
        help="keep at most the newest N tasks in the history (default: %(default)d)")
    add("--version", action="version", version="%(prog)s " + __version__)
    return parser


def parse_args(argv):
    """Settings from the command line, or StartupError saying what is wrong."""
    settings = build_parser().parse_args(argv, namespace=Settings())
    if settings.pulsar_cli == "v1" and settings.config_branch:
        raise StartupError("--config-branch: pulsar 1.x (--pulsar-cli v1) has no branch option: "
                           "leave --config-branch out")
    if settings.config_branch and not settings.config_repo:
        raise StartupError("--config-branch needs --config-repo")
    if settings.no_ssl and (settings.ssl_cert or settings.ssl_key or settings.ssl_pfx):
        raise StartupError("--no-ssl cannot be combined with --ssl-cert, --ssl-key or --ssl-pfx")
    if not settings.ssl_pfx and bool(settings.ssl_cert) != bool(settings.ssl_key):
        raise StartupError("--ssl-cert and --ssl-key go together: give both, or --ssl-pfx")
    for flag in ("ssl_cert", "ssl_key", "ssl_pfx"):
        check_readable("--" + flag.replace("_", "-"), getattr(settings, flag))
    for pattern in settings.allow_action:
        check_pattern(pattern)
    handed, origin = handed_over_password(os.environ)
    environ = dict(os.environ)
    if origin == "command line":
        settings.auth_password = handed
    elif origin == "environment":
        environ[PASSWORD_VARIABLE] = handed
    settings.authenticator = authenticator_from(settings, environ)
    settings.password_in_argv = settings.auth_password is not None
    settings.auth_password = None       # the authenticator has it; nothing else needs it
    settings.tls_passphrase = None
    if settings.ssl_passphrase:
        settings.tls_passphrase = read_secret("--ssl-passphrase", settings.ssl_passphrase)
    settings.db = settings.db or default_db()
    # Keepers and tasks run in folders of their own: a relative path must mean what it meant
    # where the server was started; and one history has one name, whatever links lead to it,
    # so that its lock keeps a second server off it.
    if settings.db != ":memory:":
        settings.db = os.path.realpath(settings.db)
    if os.sep in settings.pulsar_bin:
        settings.pulsar_bin = os.path.abspath(settings.pulsar_bin)
    if settings.config_repo and os.path.exists(settings.config_repo):
        settings.config_repo = os.path.abspath(settings.config_repo)
    return settings


def authenticator_from(settings, environ):
    """OpenAccess, BasicLogin or GitHubLogin from the --auth-* flags; StartupError for a flag
    that means nothing for the chosen provider and method, saying what was probably meant."""
    provider, method = settings.auth_provider, settings.auth_method
    given = [flag for flag, value in (
        ("--auth-method", method), ("--auth-username", settings.auth_username),
        ("--auth-password", settings.auth_password),
        ("--auth-password-file", settings.auth_password_file),
        ("--github-api", settings.github_api)) if value is not None]
    if provider is None:
        if given:
            raise StartupError("%s mean(s) nothing without --auth-provider; did you mean "
                               "--auth-provider basic (or github)?" % ", ".join(given))
        return OpenAccess()
    if settings.auth_password is not None and settings.auth_password_file is not None:
        raise StartupError("give --auth-password or --auth-password-file, not both")
    password = settings.auth_password
    if settings.auth_password_file is not None:
        password = read_secret("--auth-password-file", settings.auth_password_file)
    from_flags = password is not None
    if password is None:
        password = environ.get(PASSWORD_VARIABLE) or None
    if not settings.auth_username:
        raise StartupError("--auth-provider %s needs --auth-username (%s)" % (provider, {
            "basic": "the username", "github": "GitHub logins, or the organisation with "
                                               "--auth-method org"}[provider]))
    if provider == "basic":
        for flag, value in (("--auth-method", method), ("--github-api", settings.github_api)):
            if value is not None:
                raise StartupError("%s is for --auth-provider github, not basic" % flag)
        if ":" in settings.auth_username:
            raise StartupError("--auth-username %r: HTTP Basic cannot carry a ':' in a username"
                               % settings.auth_username)
        if not password:
            raise StartupError("--auth-provider basic needs a password: --auth-password-file "
                               "FILE, the %s environment variable, or --auth-password"
                               % PASSWORD_VARIABLE)
        return BasicLogin(settings.auth_username, password)
    if (method or "user") == "user" and from_flags:
        raise StartupError("--auth-password means nothing with --auth-provider github and "
                           "--auth-method user; did you mean --auth-provider basic, or "
                           "--auth-method org (where it is the server's own GitHub token)?")
    api = settings.github_api or GITHUB_API
    parts = urllib.parse.urlsplit(api)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StartupError("--github-api must be an https:// URL, got %r" % api)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise StartupError("--github-api %s: every token would cross the network in clear "
                           "text; use https:// (http:// is for a GitHub on this host only)" % api)
    names = [name.strip() for name in settings.auth_username.split(",") if name.strip()]
    if method == "org":
        if len(names) != 1:
            raise StartupError("--auth-method org takes one organisation in --auth-username")
        return GitHubLogin(api, "org", names, server_token=password)
    return GitHubLogin(api, "user", names)


@functools.lru_cache(maxsize=1024)     # asked about each request's address
def is_loopback(host):
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


def check_pattern(pattern):
    if not re.fullmatch(r"[A-Za-z0-9_:.*?\[\]!-]{1,128}", pattern):
        raise StartupError("--allow-action %r: a pattern is a Capistrano task name with * ? [ ]"
                           % pattern)
    return pattern


def default_db():
    folder = state_dir()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as error:
        raise StartupError("cannot create %s for the task history (or give --db): %s"
                           % (folder, error.strerror or error))
    return os.path.join(folder, "tasks.sqlite3")


def check_readable(flag, path):
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise StartupError("%s: cannot read %s: %s" % (flag, path, error.strerror or error))


def read_secret(flag, path):
    """A passphrase or a password: the first line of a file (UTF-8, without its line end;
    anything after it is ignored)."""
    try:
        with open(path, encoding="utf-8") as source:
            line = source.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise StartupError("%s: cannot read %s: %s" % (flag, path, error))
    if not line:
        raise StartupError("%s: the first line of %s is empty; it must hold the secret" % (
            flag, path))
    return line


def log_thread_exceptions(arguments):
    """threading.excepthook: a thread's exception goes to the log, not to a raw traceback on
    standard error that a log reader never sees."""
    logger.error("thread %s failed", arguments.thread.name if arguments.thread else "?",
                 exc_info=(arguments.exc_type, arguments.exc_value, arguments.exc_traceback))


def restart_without_the_password(argv):
    """A password given in the environment or on the command line shows in /proc/PID/environ
    and /proc/PID/cmdline for as long as the process lives, whatever os.environ says later, and
    every task runs as the same user: start the server again (the same process, exec) without
    it, handing it over on a pipe.  Returns only when there is nothing to hide."""
    environ, rest, secret, origin = dict(os.environ), [], None, None
    if PASSWORD_VARIABLE in environ:
        secret, origin = environ.pop(PASSWORD_VARIABLE), "environment"
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--auth-password":
            secret, origin = next(arguments, ""), "command line"
        elif argument.startswith("--auth-password="):
            secret, origin = argument.partition("=")[2], "command line"
        else:
            rest.append(argument)
    if secret is None or len(secret.encode("utf-8")) > MAX_BODY:
        return
    read_end, write_end = os.pipe()
    os.write(write_end, secret.encode("utf-8"))
    os.close(write_end)
    os.set_inheritable(read_end, True)
    environ[PASSWORD_HANDOVER] = "%d:%s" % (read_end, origin)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + rest, environ)


def handed_over_password(environ):
    """(the password restart_without_the_password handed over, where it came from) or
    (None, None)."""
    handover = environ.pop(PASSWORD_HANDOVER, None)
    if not handover:
        return None, None
    fd, _, origin = handover.partition(":")
    with os.fdopen(int(fd), "rb") as pipe:
        return pipe.read().decode("utf-8"), origin


def main(argv=None):
    """Start the server from command-line arguments; the process exit code."""
    settings = None
    threading.excepthook = log_thread_exceptions
    if argv is None:
        restart_without_the_password(sys.argv[1:])
    try:
        settings = parse_args(sys.argv[1:] if argv is None else argv)
        configure_logging(settings.log_dir)
        return serve(settings)
    except StartupError as error:
        if settings and settings.log_dir and logger.handlers:
            logger.error("cannot start: %s", error)
        print("pulsar_rest_api.py: error: %s" % error, file=sys.stderr)
        return 2
    except SystemExit as done:          # --help and --version
        return done.code


# ---------------------------------------------------------------- appendix A: the web page

# GET / serves one page, with its script and style from this server only (no inline code, so
# that the Content-Security-Policy can forbid everything else).  Everything the page shows is set
# as text, never as HTML.

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pulsar-rest-api</title>
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <h1>pulsar-rest-api</h1>
  <p id="connection" role="status"></p>
</header>
<main>
  <section id="side">
    <form id="start-form">
      <h2>Start a task</h2>
      <label>App <input name="app" list="known-apps" required maxlength="64" pattern="[A-Za-z0-9][A-Za-z0-9._\-]*" autocapitalize="off" spellcheck="false"></label>
      <label>Environment <input name="env" list="known-envs" required maxlength="64" pattern="[A-Za-z0-9][A-Za-z0-9._\-]*" autocapitalize="off" spellcheck="false"></label>
      <datalist id="known-apps"></datalist>
      <datalist id="known-envs"></datalist>
      <p id="apps-note" class="note"></p>
      <label>Action <input name="action" required maxlength="128" pattern="[A-Za-z0-9][A-Za-z0-9_:.\-]*" value="deploy" autocapitalize="off" spellcheck="false"></label>
      <label class="check"><input type="checkbox" name="queue"> Wait in line if the app is busy</label>
      <button type="submit">Start</button>
      <p id="start-error" class="error" role="alert"></p>
    </form>
    <h2>Tasks</h2>
    <ul id="task-list" aria-live="polite"></ul>
  </section>
  <section id="task" hidden>
    <h2 id="task-title"></h2>
    <p id="task-facts"></p>
    <p id="task-outcome"></p>
    <p class="buttons">
      <button id="kill" type="button">Kill</button>
      <button id="rerun" type="button">Run again</button>
      <a href="#">Close</a>
    </p>
    <p id="task-error" class="error" role="alert"></p>
    <pre id="output" tabindex="0" aria-label="Output"></pre>
  </section>
</main>
</body>
</html>
"""

PAGE_CSS = r""":root { color-scheme: light dark; --fg: #1d2329; --bg: #fbfbfc; --muted: #5f6b76; --line: #d7dce1;
  --panel: #ffffff; --accent: #1f6feb; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --bg: #0d1117; --muted: #8d96a0;
  --line: #30363d; --panel: #161b22; --accent: #4493f8; --ok: #3fb950; --bad: #f85149; --warn: #d29922; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; align-items: baseline; gap: 1em; padding: .6em 1em; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.15em; margin: 0; }
h2 { font-size: 1em; margin: 0 0 .5em; }
#connection { margin: 0; color: var(--warn); font-size: .9em; }
main { display: grid; grid-template-columns: minmax(16em, 22em) 1fr; gap: 1em; padding: 1em; }
@media (max-width: 760px) { main { grid-template-columns: 1fr; } #task { order: -1; } }
form, #task { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: .8em 1em; }
form { margin-bottom: 1em; }
label { display: block; margin-bottom: .5em; font-size: .9em; color: var(--muted); }
label input:not([type]) { display: block; width: 100%; margin-top: .15em; padding: .35em .5em; font: inherit;
  color: var(--fg); background: var(--bg); border: 1px solid var(--line); border-radius: 5px; }
label.check { color: var(--fg); }
button { font: inherit; padding: .35em .9em; border-radius: 5px; border: 1px solid var(--line);
  background: var(--bg); color: var(--fg); cursor: pointer; }
button[type=submit] { background: var(--accent); border-color: var(--accent); color: #fff; }
button:disabled { opacity: .5; cursor: default; }
.error { color: var(--bad); margin: .4em 0 0; min-height: 1.2em; }
#task-list { list-style: none; margin: 0; padding: 0; }
#task-list a { display: grid; grid-template-columns: auto minmax(0, 1fr) auto; gap: .1em .6em; padding: .45em .6em;
  border-bottom: 1px solid var(--line); color: inherit; text-decoration: none; }
#task-list a:hover, #task-list a[aria-current] { background: var(--panel); }
.id { color: var(--muted); }
.what { overflow-wrap: anywhere; }
.status { white-space: nowrap; }
.note { color: var(--muted); font-size: .85em; margin: .3em 0 0; }
#task-outcome { margin: 0 0 .5em; overflow-wrap: anywhere; }
.when { grid-column: 2 / 4; color: var(--muted); font-size: .85em; }
.status { font-size: .8em; font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
.status-running, .status-queued { color: var(--accent); }
.status-finished { color: var(--ok); }
.status-failed, .status-lost { color: var(--bad); }
.status-killed { color: var(--warn); }
#task-facts { color: var(--muted); margin: 0 0 .5em; }
.buttons { display: flex; gap: .6em; align-items: center; margin: 0; }
.buttons a { margin-left: auto; color: var(--accent); }
#output { margin: .6em 0 0; padding: .7em; min-height: 10em; max-height: 72vh; overflow: auto;
  background: #0d1117; color: #e6edf3; border-radius: 6px; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace;
  white-space: pre-wrap; overflow-wrap: anywhere; }
#output .b { font-weight: bold; } #output .d { opacity: .7; } #output .i { font-style: italic; }
#output .u { text-decoration: underline; } #output .s { text-decoration: line-through; }
#output .u.s { text-decoration: underline line-through; }
"""

PAGE_JS = r""""use strict";
// The page of pulsar-rest-api: a live list of tasks, a task whose output follows live, a form to
// start one. Everything shown is set as text (output is untrusted), never as HTML.

const ENDED = ["finished", "failed", "killed", "lost"];
const STATUSES = ["queued", "running"].concat(ENDED);
const $ = (id) => document.getElementById(id);
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function call(method, path, body) {
  const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || response.status + " " + response.statusText);
  return data;
}

function connection(problem) {
  $("connection").textContent = problem ? "Connection problem: " + problem + " (retrying)" : "";
}

function statusBadge(status) {
  const badge = document.createElement("span");
  badge.textContent = status;
  badge.className = "status" + (STATUSES.includes(status) ? " status-" + status : "");
  return badge;
}

function when(task) {
  const created = new Date(task.createdAt);
  const started = task.startedAt ? new Date(task.startedAt) : created;
  let text = created.toLocaleString();
  if (started - created >= 1000) {
    text += " · waited " + seconds(started - created) + " s in line";
  }
  if (task.finishedAt) {
    text += " · " + (task.startedAt ? "ran " : "") + seconds(new Date(task.finishedAt) - started)
      + " s";
  }
  return text;
}

function seconds(milliseconds) {
  return Math.round(milliseconds / 100) / 10;
}

// ---- the list: /tasks?version=V answers when a task comes, changes status or goes

let shownTask = null;

function renderList(tasks) {
  const list = $("task-list");
  list.replaceChildren(...tasks.map((task) => {
    const link = document.createElement("a");
    link.href = "#task/" + task.id;
    if (task.id === shownTask) link.setAttribute("aria-current", "true");
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = "#" + task.id;
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = task.app + " / " + task.env + " · " + task.action;
    const time = document.createElement("span");
    time.className = "when";
    time.textContent = when(task);
    link.append(id, what, statusBadge(task.status), time);
    const item = document.createElement("li");
    item.append(link);
    return item;
  }));
}

async function followList() {
  let version = null;
  for (;;) {
    try {
      const data = await call("GET", "/tasks?limit=50" + (version === null ? "" : "&version=" + version));
      version = data.version;
      renderList(data.tasks);
      connection("");
    } catch (error) {
      connection(error.message);
      await pause(2000);
    }
  }
}

// ---- one task: /task/ID/state?version=V&offset=N returns only what is new

let following = null;

function renderTask(task) {
  $("task-title").textContent = "#" + task.id + " " + task.app + " / " + task.env + " · " + task.action;
  const facts = $("task-facts");
  facts.replaceChildren(statusBadge(task.status), document.createTextNode(
    " · " + when(task) + (task.exitCode === null ? "" : " · exit code " + task.exitCode)
    + (task.pid === null ? "" : " · pid " + task.pid)));
  $("task-outcome").textContent = task.outcome || "";
  $("kill").disabled = ENDED.includes(task.status);
}

// ---- output as a terminal shows it: colours (SGR) become styles, a carriage return rewrites
// its line; every other escape sequence and control character is dropped.

const TOKEN = new RegExp(
  "(\x1b(?:\\[([0-?]*)[ -/]*([@-~])|\\][^\x07\x1b]*(?:\x07|\x1b\\\\)|[PX^_][^\x1b]*\x1b\\\\|[ -/]*[0-OQ-WYZ\\\\`-~]))"
  + "|(\x1b(?:\\[[0-?]*[ -/]*|\\][^\x07\x1b]*\x1b?|[PX^_][^\x1b]*\x1b?|[ -/]*)$)"
  + "|([\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069])"
  + "|([^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]+)", "g");
const PALETTE = ["#484f58", "#ff7b72", "#3fb950", "#d29922", "#58a6ff", "#bc8cff", "#39c5cf", "#b1bac4",
  "#6e7681", "#ffa198", "#56d364", "#e3b341", "#79c0ff", "#d2a8ff", "#56d4dd", "#ffffff"];

function colour256(n) {
  if (n < 16) return PALETTE[n];
  if (n >= 232) { const v = 8 + (n - 232) * 10; return "rgb(" + v + "," + v + "," + v + ")"; }
  const level = (c) => (c ? 55 + c * 40 : 0);
  n -= 16;
  return "rgb(" + level(Math.floor(n / 36)) + "," + level(Math.floor(n / 6) % 6) + "," + level(n % 6) + ")";
}

class Terminal {
  constructor(element) {
    this.element = element;
    this.reset();
  }

  reset() {
    this.element.replaceChildren();
    this.done = document.createElement("span");      // finished lines
    this.line = document.createElement("span");      // the line being written
    this.element.append(this.done, this.line);
    this.pending = "";        // an escape sequence cut at the end of the last piece
    this.style = {};          // fg, bg, b, d, i, u, s
    this.runs = [];           // the current line: [{text, style}]
    this.length = 0;          // its length, and the cursor, in characters (not UTF-16 units)
    this.column = 0;
  }

  write(text, final) {
    text = this.pending + text;
    this.pending = "";
    const finished = document.createDocumentFragment();
    for (const match of text.matchAll(TOKEN)) {
      if (match[1] !== undefined) {
        if (match[3] === "m") this.sgr(match[2]);
      } else if (match[4] !== undefined) {
        if (!final && match[4].length <= 4096) this.pending = match[4];
      } else if (match[5] !== undefined) {
        const control = match[5];
        if (control === "\n") { this.finishLine(finished); }
        else if (control === "\r") { this.column = 0; }
        else if (control === "\b") { this.column = Math.max(0, this.column - 1); }
        else if (control === "\t") { this.put("\t"); }
      } else {
        this.put(match[6]);
      }
    }
    this.done.append(finished);
    this.line.replaceChildren(...this.runs.map((run) => this.node(run)));
  }

  sgr(text) {
    // A new style object: the runs written so far keep theirs.
    const params = text === "" ? [0] : text.split(";").map((part) => Number(part) || 0);
    let style = Object.assign({}, this.style);
    for (let i = 0; i < params.length; i++) {
      const p = params[i];
      if (p === 0) style = {};
      else if (p === 1) style.b = true;
      else if (p === 2) style.d = true;
      else if (p === 3) style.i = true;
      else if (p === 4) style.u = true;
      else if (p === 9) style.s = true;
      else if (p === 22) { delete style.b; delete style.d; }
      else if (p === 23) delete style.i;
      else if (p === 24 || p === 21) delete style.u;
      else if (p === 29) delete style.s;
      else if (p >= 30 && p <= 37) style.fg = PALETTE[p - 30];
      else if (p >= 90 && p <= 97) style.fg = PALETTE[p - 82];
      else if (p === 39) delete style.fg;
      else if (p >= 40 && p <= 47) style.bg = PALETTE[p - 40];
      else if (p >= 100 && p <= 107) style.bg = PALETTE[p - 92];
      else if (p === 49) delete style.bg;
      else if (p === 38 || p === 48) {
        const key = p === 38 ? "fg" : "bg";
        if (params[i + 1] === 5 && i + 2 < params.length) {
          style[key] = colour256(params[i + 2] & 255);
          i += 2;
        } else if (params[i + 1] === 2 && i + 4 < params.length) {
          style[key] = "rgb(" + params.slice(i + 2, i + 5).map((c) => c & 255).join(",") + ")";
          i += 4;
        } else {
          break;
        }
      }
    }
    this.style = style;
  }

  put(text) {
    // Write at the cursor: append at the end of the line, or overwrite what a carriage
    // return or a backspace went back over.
    const style = this.style;
    const chars = Array.from(text);
    if (this.column >= this.length) {
      const last = this.runs[this.runs.length - 1];
      if (last && last.style === style) last.text += text;
      else this.runs.push({ text, style });
      this.length += chars.length;
      this.column = this.length;
      return;
    }
    const cells = [];
    for (const run of this.runs) for (const char of run.text) cells.push([char, run.style]);
    for (const char of chars) cells[this.column++] = [char, style];
    this.runs = [];
    for (const [char, cellStyle] of cells) {
      const last = this.runs[this.runs.length - 1];
      if (last && last.style === cellStyle) last.text += char;
      else this.runs.push({ text: char, style: cellStyle });
    }
    this.length = cells.length;
  }

  finishLine(into) {
    for (const run of this.runs) into.append(this.node(run));
    into.append("\n");
    this.runs = [];
    this.length = 0;
    this.column = 0;
  }

  node(run) {
    const style = run.style;
    if (!Object.keys(style).length) return document.createTextNode(run.text);
    const span = document.createElement("span");
    span.textContent = run.text;
    const classes = ["b", "d", "i", "u", "s"].filter((name) => style[name]);
    if (classes.length) span.className = classes.join(" ");
    if (style.fg) span.style.color = style.fg;
    if (style.bg) span.style.backgroundColor = style.bg;
    return span;
  }
}

let terminal = null;

function appendOutput(text, final) {
  const output = $("output");
  const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 8;
  terminal.write(text, final);
  if (atBottom) output.scrollTop = output.scrollHeight;
}

async function followTask(id) {
  const me = { id, version: 0, offset: 0 };
  following = me;
  shownTask = id;
  $("task").hidden = false;
  $("task-error").textContent = "";
  terminal = new Terminal($("output"));
  while (following === me) {
    try {
      const data = await call("GET", "/task/" + id + "/state?version=" + me.version + "&offset=" + me.offset);
      if (following !== me || !data.changed) continue;
      const task = data.task;
      appendOutput(task.output, ENDED.includes(task.status));
      me.version = task.version;
      me.offset = task.outputLength;
      renderTask(task);
      if (ENDED.includes(task.status)) return;
    } catch (error) {
      if (following !== me) return;
      $("task-error").textContent = error.message;
      if (error.message.startsWith("no task")) return;
      if (error.message.startsWith("offset")) {   // the output was cut short by a crash: reread
        me.version = 0;
        me.offset = 0;
        terminal.reset();
      }
      await pause(2000);
    }
  }
}

// ---- the apps and environments pulsar knows, offered by the form (GET /apps)

let knownApps = [];

async function loadApps() {
  try {
    knownApps = (await call("GET", "/apps")).apps;
    $("known-apps").replaceChildren(...knownApps.map((app) => new Option(app.name)));
    offerEnvironments();
    $("apps-note").textContent = "";
  } catch (error) {
    $("apps-note").textContent = "Applications cannot be listed: " + error.message;
  }
}

function offerEnvironments() {
  const app = knownApps.find((known) => known.name === $("start-form").elements.app.value);
  $("known-envs").replaceChildren(...(app ? app.envs : []).map((env) => new Option(env)));
}

function route() {
  const match = /^#task\/(\d+)$/.exec(location.hash);
  following = null;
  if (match) {
    followTask(Number(match[1]));
  } else {
    shownTask = null;
    $("task").hidden = true;
  }
}

async function act(button, path) {
  button.disabled = true;
  $("task-error").textContent = "";
  try {
    return await call("POST", path);
  } catch (error) {
    $("task-error").textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("start-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const button = form.querySelector("button");
    button.disabled = true;
    $("start-error").textContent = "";
    try {
      const path = "/" + encodeURIComponent(form.elements.app.value) + "/" + encodeURIComponent(form.elements.env.value);
      const reply = await call("POST", path, { action: form.elements.action.value, queue: form.elements.queue.checked });
      location.hash = "#task/" + reply.taskId;
    } catch (error) {
      $("start-error").textContent = error.message;
    } finally {
      button.disabled = false;
    }
  });
  $("kill").addEventListener("click", () => act($("kill"), "/task/" + shownTask + "/kill"));
  $("rerun").addEventListener("click", async () => {
    const reply = await act($("rerun"), "/task/" + shownTask + "/rerun");
    if (reply) location.hash = "#task/" + reply.taskId;
  });
  $("start-form").elements.app.addEventListener("input", offerEnvironments);
  window.addEventListener("hashchange", route);
  route();
  followList();
  loadApps();
});
"""

PAGE_SECURITY = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self'; form-action 'self'; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]


# ---------------------------------------------------------------- appendix B: the keeper

# Each task runs under a keeper, which this program makes: started once with the server as
# `python3 -I -S -c LOADER` in a session of its own, it reads itself from standard input
# (keeper_command), then becomes the factory (KeeperFactory): for each order the server sends
# (the task's folder, the kill grace, how many bytes of output to keep, pulsar's command line)
# it forks a keeper, writes the `keeper` file that names it, lets it go, and answers "PID TOKEN"
# (or "! WHY").  The keeper takes a session of its own, moves into the task's folder, starts
# pulsar in a process group of its own (in work/, empty, with PULSAR_REST_API_TASK=FOLDER in its
# environment), copies pulsar's output into the file `output` (up to `keep` bytes) and rings the
# doorbell FIFO `bell` after each piece, ends what pulsar leaves in the session, writes how it
# all ended to `ended`, and rings "!".  It needs nothing from the server or the factory once let
# go: a server that dies, stops or is replaced changes nothing for the task, and the next server
# finds the files.  Kill: SIGTERM to the keeper.
KEEPER = r'''
import ctypes, errno, os, select, sys, time     # no more: each costs every task
import _signal as signal        # without the enums of `signal`: 5 ms less CPU per task

def as_json(value):
    """JSON of a dict of numbers, booleans, None and text (the json module costs an import)."""
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (as_json(key), as_json(item))
                                  for key, item in value.items())
    if isinstance(value, str):
        return '"%s"' % "".join(char if " " <= char < "\x7f" and char not in '"\\'
                                else "\\u%04x" % ord(char) for char in value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    return repr(value)


def note(text):
    """Say something in keeper.log; a full disk must not end the keeper (and pulsar with it)."""
    try:
        os.write(2, text.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass


def write_json(name, value, folder=None):
    """Write a file of the task's folder whole, into its .tmp file first: one made ahead, so
    that the room it needs is there on a disk that has filled up since.  OSError if it
    cannot."""
    path = os.path.join(folder or FOLDER, name)
    data = as_json(value).encode()
    out = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(out, data, 0)
        os.ftruncate(out, len(data))
    finally:
        os.close(out)
    os.replace(path + ".tmp", path)


def make_room(name, size):
    """Reserve `size` bytes for a file write_json will write; False if the disk is full (a
    file system that cannot reserve is no reason not to run)."""
    try:
        out = os.open(os.path.join(FOLDER, name + ".tmp"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(out, 0, size)
        finally:
            os.close(out)
    except OSError as problem:
        note("cannot reserve room for %s: %s" % (name, problem))
        return problem.errno not in (errno.ENOSPC, errno.EDQUOT)
    return True


def ring(sound=b"."):
    try:
        os.write(bell, sound)
    except OSError:             # full: the server has rings enough to read
        pass


def session_members():
    """The live processes of this session but the keeper (a /proc scan: for kills only)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                with open("/proc/%s/stat" % entry, "rb") as source:
                    fields = source.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if int(fields[3]) == me and fields[0] not in (b"Z", b"X"):
                found.append(int(entry))
    return found


def signal_session(number):
    """Signal every process of the session; note the pulsar run folders they use first."""
    for pid in session_members():
        places = []
        try:
            places.append(os.readlink("/proc/%d/cwd" % pid))
            with open("/proc/%d/cmdline" % pid, "rb") as source:
                places += source.read().decode("utf-8", "replace").split("\0")
            for fd in os.listdir("/proc/%d/fd" % pid):      # a folder being copied into
                places.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
        for place in places:
            run_folders.update(run_folders_in(place))
        try:
            os.kill(pid, number)
        except OSError:
            pass


def run_folders_in(place):
    """The pulsar 1.x run folders (~/.pulsar/tmp/run-TIME) a path or a command line names."""
    found, start = [], place.find("/.pulsar/tmp/run-")
    while start >= 0:
        begin = max(place.rfind(sign, 0, start) for sign in " =:'\"") + 1
        end = start + len("/.pulsar/tmp/run-")
        while end < len(place) and (place[end].isdigit() or place[end] == "."):
            end += 1
        if place[begin:begin + 1] == "/" and place[end:end + 1] in ("", "/", " "):
            found.append(place[begin:end])
        start = place.find("/.pulsar/tmp/run-", end)
    return found


def reap():
    """Reap what has exited, noting how pulsar ended; True while a child is left."""
    global status
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if pid == pulsar:
            status = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)


def something_left():
    """True while a process of the session is left; without a /proc scan when none is."""
    children = reap()
    if subreaper and not children:
        return False
    try:
        os.killpg(pulsar, 0)
        return True             # pulsar's group has members
    except OSError:
        return bool(session_members())


def remove_run_folders():
    """pulsar 1.x leaves its run folder when it is killed: remove what this task's used."""
    import shutil, stat
    for folder in run_folders:
        try:
            info = os.lstat(folder)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(folder, ignore_errors=True)
            note("removed %s, which pulsar leaves behind when killed" % folder)


# -- the factory: it forks a keeper for each order the server sends

def read_exactly(count):
    """`count` bytes of standard input (read as the program was), or None at its end: the
    server stopped or died."""
    data = sys.stdin.buffer.read(count)
    return data if len(data) == count else None


def next_order():
    """The server's next order, or None once the server has gone: its length in 10 digits,
    then NUL-terminated fields (the task's folder, the kill grace, how many bytes of output to
    keep, pulsar's command line)."""
    head = read_exactly(10)
    fields = read_exactly(int(head)) if head else None
    return fields.split(b"\0")[:-1] if fields else None


def start_token(pid):
    """What names a process across restarts of the server: the boot's id and its start time
    (as the server's process_start_token has it); None without /proc."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as source:
            boot = source.read().strip()
        with open("/proc/%d/stat" % pid, "rb") as source:
            return "%s:%s" % (boot, source.read().rpartition(b")")[2].split()[19].decode())
    except OSError:
        return None


def reply(text):
    """Answer the server; once it has gone there is nobody to fork for."""
    try:
        os.write(1, text.replace("\n", " ").encode("utf-8", "replace") + b"\n")
    except OSError:
        sys.exit(0)


def reap_keepers(number=None, frame=None):
    """Reap the keepers that have exited (the factory's SIGCHLD handler)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def fork_keeper(order):
    """Fork the keeper of an order.  In the keeper: its doorbell, once the factory has let it
    go.  In the factory: None, once the keeper has been named and let go; OSError if that
    cannot be done.  The factory opens the doorbell for the keeper, so that the doorbell
    reports the keeper's exit whenever it comes."""
    folder, fds = os.fsdecode(order[0]), []
    try:
        fds.append(os.open(os.path.join(folder, "bell"), os.O_RDWR | os.O_NONBLOCK))
        fds.extend(os.pipe())
        pid = os.fork()
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    bell, go_r, go_w = fds
    if pid == 0:
        return wait_to_be_let_go(bell, go_r, go_w)
    os.close(go_r)
    os.close(bell)
    name_and_let_go(pid, folder, go_w)
    return None


def wait_to_be_let_go(bell, go_r, go_w):
    """In a keeper just forked: leave the factory's pipes to the server, and wait until the
    factory lets it go; its doorbell.  It exits if it is not let go."""
    try:            # whatever happens, a keeper never goes back to the factory's loop
        os.setsid()             # a session of its own, whose id is the keeper's pid
        # A signal to the factory's group meant the factory: drop it (SIGTERM is blocked, so
        # one that comes from now on waits for the keeper's handler).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(go_w)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(null, fd)
        os.close(null)
        if os.read(go_r, 1) != b".":
            os._exit(0)         # the factory died, or could not name it
        os.close(go_r)
        return bell
    except BaseException:
        os._exit(1)


def name_and_let_go(pid, folder, go_w):
    """Write the `keeper` file that names a keeper, then let it go and tell the server: the
    folder names every keeper that may act.  OSError, the keeper killed before it did
    anything, if it cannot be named."""
    try:
        token = start_token(pid)
        write_json("keeper", {"pid": pid, "start": token}, folder)
        os.write(go_w, b".")
    except OSError:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(go_w)
    reply("%d %s" % (pid, token or "-"))


def run_factory():
    """Fork a keeper for each order until the server goes; return (order, doorbell) in each
    keeper.  SIGTERM stays blocked (the server started the factory with it blocked): only the
    end of its standard input ends the factory, and the keepers start with it blocked."""
    signal.signal(signal.SIGCHLD, reap_keepers)
    for number in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(number, signal.SIG_IGN)
    while True:
        order = next_order()
        if order is None:
            sys.exit(0)
        # Not reaped before its start time is read: SIGCHLD waits (the keeper unblocks it).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            bell = fork_keeper(order)
        except (OSError, IndexError) as problem:
            reply("! %s" % problem)
            bell = None
        if bell is not None:
            return order, bell
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


# -- the keeper

order, bell = run_factory()
asked = []
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGTERM, lambda number, frame: asked.append(number))
signal.signal(signal.SIGCHLD, lambda number, frame: None)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGCHLD})
try:        # what pulsar's processes leave behind becomes ours to wait for (Linux)
    subreaper = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
except (OSError, AttributeError):
    subreaper = False
folder, GRACE, KEEP, argv = order[0], float(order[1]), int(order[2]), order[3:]
os.chdir(folder)
log = os.open("keeper.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.dup2(log, 2)
null = os.open(os.devnull, os.O_RDWR)
me, FOLDER = os.getpid(), os.getcwd()
output = os.open("output", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
read_end, write_end = os.pipe()
os.makedirs("work", exist_ok=True)
os.chdir("work")                # pulsar's working folder: empty, and its own
defaults = [signal.SIGPIPE, signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD,
            signal.SIGXFSZ]
status, killed, error, run_folders = None, False, None, set()
environment = dict(os.environ)
environment["PULSAR_REST_API_TASK"] = FOLDER    # marks all pulsar starts as this task's
try:
    if asked:                   # killed before it started
        raise InterruptedError("killed before it started")
    if not (make_room("started", 4096) and make_room("ended", 65536)):
        raise OSError("the disk is full: there would be no room to record how it ends")
    pulsar = os.posix_spawn(argv[0], argv, environment, file_actions=[
        (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, write_end, 1),
        (os.POSIX_SPAWN_DUP2, write_end, 2)], setpgroup=0, setsigdef=defaults, setsigmask=())
except InterruptedError:
    pulsar, killed = None, True
except OSError as problem:
    pulsar, error = None, "could not start pulsar (%s): %s" % (os.fsdecode(argv[0]),
                                                                problem.strerror or problem)
os.close(write_end)
try:
    write_json("started", {"pid": pulsar, "at": time.time(), "error": error})
except OSError as problem:
    note("cannot write started: %s" % problem)
ring()
def take(data):
    """Keep a piece of output: in the file (up to KEEP bytes), and its end in `last`."""
    global kept, written, last, KEEP
    written += len(data)
    last = data[-4096:] if len(data) >= 4096 else (last + data)[-4096:]
    if kept < KEEP:
        try:
            kept += os.write(output, data[:KEEP - kept])
        except OSError as problem:      # a full disk: keep reading, or pulsar would block
            KEEP = kept
            note("cannot write the output: %s" % problem)
    ring()


def read_what_is_there():
    """Read the pipe until it is empty for now; False at its end."""
    while select.select([read_end], [], [], 0)[0]:
        data = os.read(read_end, 65536)
        if not data:
            return False
        take(data)
    return True


kept = written = 0
last = said_last = b""
reading, deadline, drain_until, exited_at = True, None, None, None
while pulsar is not None:
    if asked and status is None and not killed:
        killed = True                   # the kill came before pulsar ended by itself
        signal_session(signal.SIGTERM)
        deadline = time.monotonic() + GRACE
    if deadline is not None and time.monotonic() >= deadline:
        signal_session(signal.SIGKILL)
        deadline = time.monotonic() + 1.0
    left = something_left()
    if status is not None and exited_at is None:
        exited_at = time.time()
        # pulsar's last words decide how the task ended: what it wrote before it exited is in
        # the pipe now; what comes later (a child told to stop, say) must not count.
        reading = reading and read_what_is_there()
        said_last = last
        if left and deadline is None:   # pulsar is done: end what it left in its session
            signal_session(signal.SIGTERM)
            deadline = time.monotonic() + GRACE
    if status is not None and not left:
        if not reading:
            break
        # A process that left the session may still hold the pipe: read for a moment more.
        drain_until = drain_until or time.monotonic() + 1.0
        if time.monotonic() >= drain_until:
            break
    waits = [wake_r] + ([read_end] if reading else [])
    moments = [moment - time.monotonic() for moment in (deadline, drain_until) if moment]
    ready, _, _ = select.select(waits, [], [], max(0.0, min(moments)) if moments else None)
    if wake_r in ready:
        os.read(wake_r, 4096)
    if read_end in ready:
        data = os.read(read_end, 65536)
        if not data:
            reading = False
            continue
        take(data)
if killed:
    remove_run_folders()
end = {"exit": status, "killed": killed, "exited": exited_at, "ended": time.time(),
       "written": written, "kept": kept,
       "last": (said_last if exited_at else last).decode("latin-1"), "error": error}
waited = False
while True:
    try:
        write_json("ended", end)
        break
    except OSError as problem:
        if pulsar is None:      # nothing ran: there is no end worth waiting for room for
            note("cannot write ended: %s" % problem)
            break
        if not waited:
            note("cannot write ended (trying again every second): %s" % problem)
        waited = True
        time.sleep(1)
ring(b"!")                      # the end is written: no need to wait for the exit
os._exit(0)     # at once: tearing down an interpreter forked from the factory costs ~5 ms
'''

KEEPER_PROGRAM = KEEPER.encode()


if __name__ == "__main__":
    sys.exit(main())
