"""Tests for pulsar_rest_api.py, run against the real server.

Every test talks to the server the way a user does: the real command line in a subprocess, real TLS
with the development certificate in ssl/, and http.client or raw sockets as the client.  pulsar is
a fake written into tmp_path (FAKE_PULSAR below); the ACTION it is given chooses what it does, for
example `out-3.err-2.exit-4`.  Timing is controlled with FIFO gates the fake blocks on and with the
server's own long polls; nothing sleeps to synchronise.

Servers are shared where a test needs no isolation: SharedServers starts one server for each set
of flags the first time a test asks for it and keeps it for the module (shared_server, with
--kill-grace 0.5, serves the plain API tests; shared_server_with(*flags) the tests of a flag), and
each test keeps to app and env names of its own.  A test that counts from zero, stops, signals,
crashes or restarts its server, reads its whole log or task list, or leaves state behind that
another test would see starts a dedicated server (start_server).  After each test no process may
be left that mentions the test's directories, and no task of a shared server may still run; every
server must exit 0 on SIGTERM without a traceback in its log or on its console (unless the test
crashed it on purpose with SIGKILL).

Tests of the task history start a second server on the first one's --db; the SQLite file is read
directly (read-only) only to learn when output has reached the disk, and written directly only to
leave a row there as a crashed or older server could have (insert_task), while no server runs.

Tests of --auth-provider github point the server (--github-api) at FakeGitHub, a small HTTP server
in a thread of this process that knows a few tokens and one organisation, records every request it
gets (so a test can tell what was cached and which token asked), and can fail or go away on demand.
Clients at other addresses of 127.0.0.0/8 (127.0.0.2, ...) stand for other hosts.

The web page is also loaded in real headless Chromium (the test is skipped where there is no
`chromium`), driven with the DevTools protocol over a pipe; Chromium runs in a session of its own
and must leave no process behind.

Run: python3 -m pytest -q
"""

import atexit
import base64
import collections
import contextlib
import datetime
import fcntl
import functools
import hashlib
import http.client
import json
import logging
import os
import py_compile
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import types
import urllib.parse
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


# --- Constants --------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "pulsar_rest_api.py"
# How the suite starts the server: without site-packages (-S), since the standard library is all
# it may use (an import from elsewhere fails here), and ~30 ms sooner on machines whose site runs
# .pth hooks; and from its bytecode, compiled once (see compiled_script): Python compiles a script
# it is given at every start, ~50 ms of CPU, which ~200 starts make seconds of the suite.  The
# tests of the script copied alone start it the README's way, `python3 FILE`.
SERVER_PYTHON = (sys.executable, "-S")
README_PYTHON = (sys.executable,)
DEV_CERT = HERE / "ssl" / "cert.pem"
DEV_KEY = HERE / "ssl" / "key.pem"
LOG_NAME = "pulsar-rest-api.log"

TIMEOUT = 10          # seconds; deadline for anything that should happen quickly
RECHECK = 0.01        # seconds between two checks of a condition in wait_until
SHARED_GRACE = 0.5    # --kill-grace of the shared server
SHORT_POLL = 0.5      # --poll-timeout where a test waits for a long poll to run out
SHORT_REQUEST = 0.5   # --request-timeout where a test waits for a slow client to be dropped

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
MAX_BODY = 65536

LISTENING = re.compile(r"listening on (https?)://([0-9.]+):(\d+)/")
FINGERPRINT = re.compile(r"SHA-256 fingerprint ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})")
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
TASK_KEYS = {"id", "app", "env", "action", "status", "exitCode", "pid", "createdAt", "startedAt",
             "finishedAt", "version", "outputOffset", "outputLength", "output", "outcome"}
CLI_ERROR_PREFIX = "pulsar_rest_api.py: error:"
SUMMARY_KEYS = TASK_KEYS - {"output", "outputOffset"}    # an item of GET /tasks
LIVE = ("queued", "running")                            # statuses of a task that has not ended
LOST_NOTE = "the server stopped while this task ran"
KEEPER_MARK = b"pulsar-rest-api-keeper"     # the last argument of every keeper's command line
DROPPED = "[pulsar-rest-api: the output passed %d bytes; the rest is dropped]\n"
VERSION_LINE = re.compile(r"pulsar-rest-api (\S+) listening on ")
# What the fake prints for its steps `unicode` and `flood-N` (see FAKE_PULSAR).
UNICODE_LINE = "z\u00fcrich \u20ac \U0001f600 \u65e5\u672c\n"   # 2-, 3- and 4-byte characters
FLOOD_LINE = "%06d " + "\u00fc" * 500 + "\n"                    # 1008 UTF-8 bytes
FLOOD_LINES = 1040                                             # lines per block, about 1 MiB

# What the fake prints for its step `ansi`: colours a terminal may show, a progress line
# rewritten with carriage returns, then what a terminal must never get from a task: a window
# title, a clipboard write, a screen clear and cursor move, concealed text, a line that reads as
# the server's closing line (twice: as the server writes it, and in fullwidth letters with a
# zero-width space), a backspace; and a colour left on at the end.
ANSI_OUTPUT = (
    b"\x1b[1;31mred bold\x1b[0m plain \x1b[38;5;208morange\x1b[39m\n"
    b"\x1b]0;window title\x07\x1b]52;c;c2VjcmV0\x07\x1b[2J\x1b[H\x1b[8mconcealed\x1b[0m\n"
    b"progress 10%\rprogress 50%\rprogress 100%\n"
    b"[pulsar-rest-api: task 1 finished, exit code 0]\n"
    b"\xef\xbc\xbb\xe2\x80\x8bpulsar-rest-api: TASK 1 finished]\n"
    b"back\x08\x08ok\n"
    b"\x1b[32mstill green")
# ... and what a terminal gets of it from /stream and /output: only colours pass, a carriage
# return ends a line, and the lines that read as the closing line are marked as the task's.
ANSI_FOR_TERMINALS = (
    "\x1b[1;31mred bold\x1b[0m plain \x1b[38;5;208morange\x1b[39m\n"
    "concealed\x1b[0m\n"
    "progress 10%\nprogress 50%\nprogress 100%\n"
    "\x1b[0m(printed by the task) [pulsar-rest-api: task 1 finished, exit code 0]\n"
    "\x1b[0m(printed by the task) \uff3b\u200bpulsar-rest-api: TASK 1 finished]\n"
    "backok\n"
    "\x1b[32mstill green")
UNSAFE_FOR_TERMINALS = ("\x1b]", "\x1b[2J", "\x1b[H", "\x1b[8m", "\x08", "window title")

# Credentials.  Each is distinctive, so that finding it in a log or an answer means it leaked.
PASSWORD = "s3cret-Horse-91"
PASSWORD_VARIABLE = "PULSAR_REST_API_PASSWORD"
REALM = 'Basic realm="pulsar-rest-api"'
ALICE_TOKEN = "gho_alice_6f1c2a9e"      # GitHub login alice, a member of acme
BOB_TOKEN = "gho_bob_0d8e7b13"          # bob, not a member
CAROL_TOKEN = "gho_carol_5a4f9c27"      # carol, not a member
UNKNOWN_TOKEN = "gho_nobody_77e2b0c4"   # not a token GitHub knows
SERVER_TOKEN = "ghs_server_3b6d1e85"    # the server's own token (a bot account)
GITHUB_LOGINS = {ALICE_TOKEN: "alice", BOB_TOKEN: "bob", CAROL_TOKEN: "carol",
                 SERVER_TOKEN: "deploy-bot"}
GITHUB_MEMBERS = {("acme", "alice"), ("acme", "deploy-bot")}
SECRETS = (PASSWORD, ALICE_TOKEN, BOB_TOKEN, CAROL_TOKEN, UNKNOWN_TOKEN, SERVER_TOKEN)
NO_PROXY = {"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}     # the fake GitHub is local

TEXT = "text/plain; charset=utf-8"
EVENTS = {"Accept": "text/event-stream"}

# Metrics read by the tests, as /metrics names them.
TASKS_STARTED = "pulsar_rest_api_tasks_started_total"
TASKS_FINISHED = 'pulsar_rest_api_tasks_finished_total{status="finished"}'
TASKS_FAILED = 'pulsar_rest_api_tasks_finished_total{status="failed"}'
TASKS_RUNNING = "pulsar_rest_api_tasks_running"
DURATION_ALL = 'pulsar_rest_api_task_duration_seconds_bucket{le="+Inf"}'
DURATION_COUNT = "pulsar_rest_api_task_duration_seconds_count"
REQUESTS_200 = 'pulsar_rest_api_http_requests_total{code="200"}'
REQUESTS_404 = 'pulsar_rest_api_http_requests_total{code="404"}'
WAITERS = "pulsar_rest_api_long_poll_waiters"
CONNECTIONS = "pulsar_rest_api_open_connections"


# --- Small helpers ----------------------------------------------------------------------------

def wait_until(predicate, timeout=TIMEOUT, what="condition"):
    """Re-check predicate until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))
        time.sleep(RECHECK)  # the re-check interval of this helper, not a synchronisation


def exit_status(proc, timeout):
    """The exit status of a Popen once it has exited, or None if it still runs after timeout
    seconds.  A thread blocks in waitpid, so that the exit is seen at once: Popen.wait(timeout)
    polls, and sees it up to 50 ms late."""
    waiter = threading.Thread(target=proc.wait, name="wait-%d" % proc.pid, daemon=True)
    waiter.start()
    waiter.join(timeout)
    return proc.returncode


def timed(call):
    """(call(), the seconds it took)."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def unique(prefix="t"):
    """A fresh name valid as app, env, gate or pids name."""
    return prefix + uuid.uuid4().hex[:12]


def fingerprint_of(der):
    return ":".join("%02X" % byte for byte in hashlib.sha256(der).digest())


def pem_fingerprint(path):
    return fingerprint_of(ssl.PEM_cert_to_DER_cert(Path(path).read_text()))


def logged_fingerprint(log_text):
    match = FINGERPRINT.search(log_text)
    assert match, "no SHA-256 fingerprint line in the log:\n" + log_text
    return match.group(1)


def parse_utc(text):
    """Parse an ISO 8601 UTC time ending in Z (any number of fraction digits)."""
    assert isinstance(text, str) and ISO_UTC.fullmatch(text), "not ISO 8601 UTC: %r" % (text,)
    whole, _, fraction = text[:-1].partition(".")
    moment = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S")
    moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment + datetime.timedelta(seconds=float("0." + fraction) if fraction else 0)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (state, parent, ...), or None."""
    try:
        with open("/proc/%s/stat" % pid) as source:
            return source.read().rpartition(")")[2].split()
    except OSError:
        return None


def is_gone(pid):
    """True when pid no longer runs: absent from /proc, or a zombie waiting to be reaped."""
    fields = proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def are_gone(pids):
    """{role: whether that process is gone} for {role: pid}."""
    return {role: is_gone(pid) for role, pid in pids.items()}


def processes_mentioning(marks, spared):
    """{pid: cmdline} of live processes whose command line or environment contains a mark, but
    the spared servers and the keeper factory each of them keeps for the next task."""
    marks = [mark.encode() for mark in marks]
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read()
            with open("/proc/%s/environ" % entry, "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if (any(mark in cmdline or mark in environ for mark in marks)
                and not keeper_factory_of_one(entry, spared)):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode("utf-8", "replace")
    return found


def keeper_factory_of_one(pid, servers):
    """True when pid is the keeper factory of one of the servers: their child that runs the
    keeper program in no task's folder."""
    fields = proc_stat(pid)
    try:
        parent = int(fields[1])
        with open("/proc/%s/cmdline" % pid, "rb") as source:
            keeper = KEEPER_MARK in source.read().split(b"\0")
        waiting = os.readlink("/proc/%s/cwd" % pid) == "/"
    except (OSError, ValueError, TypeError):
        return False
    return parent in servers and keeper and waiting


def assert_no_process_left(marks, spared=()):
    """Fail (after killing them) if processes mentioning marks outlive a short deadline."""
    spared = set(spared) | {os.getpid()}
    try:  # a task that has just ended may still be exiting
        wait_until(lambda: not processes_mentioning(marks, spared), timeout=5,
                   what="processes of this test to exit")
    except AssertionError:
        pass
    left = processes_mentioning(marks, spared)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes left behind: %r" % left


# --- The fake pulsar --------------------------------------------------------------------------

FAKE_PULSAR = r'''#!{python} -S
"""Fake pulsar: runs the steps of its last argument, ACTION, e.g. out-3.err-2.exit-4.

Steps are separated by '.', a step's argument follows '-':
  out-N, err-N, mix-N   N numbered lines to stdout, to stderr, or alternately; flushed one by one
  chatty-N              N numbered lines to stdout as fast as possible
  gate-NAME             print "gate NAME", then block until a line arrives on FIFO $FAKE_DIR/NAME
  quietgate-NAME        the same without printing anything
  child-NAME            start a sleeping grandchild in this process group, write both pids to
                        $FAKE_DIR/NAME.pids, print "child NAME", wait for the grandchild
  ignoreterm            ignore SIGTERM from now on (children started later inherit it)
  hang                  sleep forever
  utf8split             "a\u20acb\n" with the euro sign split across two writes 0.3 s apart
  badbytes              b"ok \xff\xfe end\n"
  unicode               "z\u00fcrich \u20ac \U0001f600 \u65e5\u672c\n"
  partial               "no newline", without a newline at its end
  nul                   "a\0bcdef\n", with a NUL character
  html                  "<b>not bold</b>\n", which a page must show as text
  flood-N               N blocks of 1040 lines "%06d " + 500 x "\u00fc" (1008 bytes a line, about
                        1 MiB a block), one write per block
  ansi                  colours, a carriage-return progress line, and what a terminal must
                        never get (ANSI_OUTPUT below)
  succeed, fail1x       what pulsar 1.x prints last on success, or on failure (with the task's
                        own app, environment and action)
  say-WORD              WORD on a line of its own
  tee-NAME              from now on, also append everything printed to $FAKE_DIR/NAME.printed
  quick-N               N numbered lines written as fast as possible, 1000 a write
  runfolder             make a pulsar 1.x run folder $FAKE_DIR/home/.pulsar/tmp/run-TIME/cap,
                        work in it, and print "run folder PATH"
  runfolderfd           the same, but only hold it open (as Ruby copying into it does)
  lateline, lategroup   leave a child that prints pulsar 1.x's success line once pulsar has
                        gone: when told to stop, or 0.3 s later from a group of its own
  nulafter, thorerror   a NUL on a line; Thor's complaint about pulsar's command line
  othergroup-NAME       start a sleeping child in a process group of its own (as GNU timeout
                        does), write both pids to $FAKE_DIR/NAME.pids, print "other group NAME"
  lineends              "a\rb\fc\u2028d\ne\nf": one line ended by \n, then two
  emojirewrite          three emoji, a carriage return, two emoji and a red x over them, then a
                        right-to-left override
  exit-N                exit with status N
  signal-N              send itself signal N
  anything else         print argv as JSON
Each run first appends {argv, pid, pgid, sid, cwd, cwd_entries, fds, env} as one JSON line to
$FAKE_DIR/invocations.jsonl.  `--version` prints $FAKE_PULSAR_VERSION (default: no version)
and exits $FAKE_PULSAR_VERSION_EXIT (default 0).  `list ...` (pulsar 1.x's list of apps) sleeps
the seconds in $FAKE_DIR/apps.sleep, prints $FAKE_DIR/apps.txt, and appends its argv to
$FAKE_DIR/lists.jsonl.  Neither is a
task, so neither is recorded as an invocation.
"""
import json, os, signal, subprocess, sys, time

FAKE_DIR = os.environ["FAKE_DIR"]
OUT, ERR = sys.stdout.buffer, sys.stderr.buffer


TEE = []     # the file the step tee-NAME opened: a copy of everything printed after it
HELD = []    # file descriptors a step keeps open


def new_run_folder():
    """A new pulsar 1.x run folder, named by the time as pulsar names it; one that a task
    started in the same instant made is not taken."""
    while True:
        folder = os.path.join(FAKE_DIR, "home", ".pulsar", "tmp", "run-%.7f" % time.time())
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            pass


def emit(stream, data):
    data = data if isinstance(data, bytes) else data.encode()
    stream.write(data)
    stream.flush()
    for copy in TEE:
        copy.write(data)
        copy.flush()


def fd_target(fd):
    try:
        return os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        return None


def record_invocation():
    record = {"argv": sys.argv, "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
              "cwd": os.getcwd(), "cwd_entries": sorted(os.listdir(".")),
              "fds": [fd_target(fd) for fd in (0, 1, 2)], "env": dict(os.environ)}
    path = os.path.join(FAKE_DIR, "invocations.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def run(action):
    for index, step in enumerate(action.split(".")):
        name, _, arg = step.partition("-")
        if name in ("out", "err", "mix"):
            for i in range(1, int(arg) + 1):
                to_err = name == "err" or (name == "mix" and i % 2 == 0)
                emit(ERR if to_err else OUT, "%s %d\n" % ("err" if to_err else "out", i))
        elif name == "chatty":
            for i in range(1, int(arg) + 1):
                emit(OUT, "step %d line %05d\n" % (index, i))
        elif name == "quick":     # N lines in blocks of 1000, each block one write
            for start in range(0, int(arg), 1000):
                emit(OUT, "".join("quick line %07d\n" % i
                                  for i in range(start + 1, min(start + 1000, int(arg)) + 1)))
        elif name in ("gate", "quietgate"):
            if name == "gate":
                emit(OUT, "gate %s\n" % arg)
            with open(os.path.join(FAKE_DIR, arg), "rb") as gate:
                gate.readline()
        elif name == "child":
            child = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(600)"])
            path = os.path.join(FAKE_DIR, arg + ".pids")
            with open(path + ".tmp", "w") as f:
                json.dump({"fake": os.getpid(), "child": child.pid}, f)
            os.rename(path + ".tmp", path)
            emit(OUT, "child %s\n" % arg)
            child.wait()
        elif name == "ignoreterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif name == "hang":
            while True:
                time.sleep(3600)
        elif name == "utf8split":
            emit(OUT, b"a\xe2\x82")
            time.sleep(0.3)
            emit(OUT, b"\xacb\n")
        elif name == "badbytes":
            emit(OUT, b"ok \xff\xfe end\n")
        elif name == "unicode":
            emit(OUT, "z\u00fcrich \u20ac \U0001f600 \u65e5\u672c\n")
        elif name == "partial":
            emit(OUT, "no newline")
        elif name == "nul":
            emit(OUT, b"a\0bcdef\n")
        elif name == "html":
            emit(OUT, "<b>not bold</b>\n")
        elif name == "flood":
            block = "".join("%06d " % i + "\u00fc" * 500 + "\n" for i in range(1040)).encode()
            for _ in range(int(arg)):
                OUT.write(block)
            OUT.flush()
        elif name == "ansi":
            emit(OUT, ANSI_OUTPUT)
        elif name in ("succeed", "fail1x"):
            app, env, task = sys.argv[-3:]
            emit(OUT, "Executed task %s for %s on %s!\n" % (task, app, env) if name == "succeed"
                 else "Failed to execute task %s for %s on %s.\nCommand failed with status (1): "
                      "[cap]\n" % (task, app, env))
        elif name == "say":
            emit(OUT, arg + "\n")
        elif name == "othergroup":    # as GNU timeout does: a child in a group of its own
            code = "import os, time\nos.setpgid(0, 0)\ntime.sleep(600)\n"
            child = subprocess.Popen([sys.executable, "-S", "-c", code, FAKE_DIR])
            path = os.path.join(FAKE_DIR, arg + ".pids")
            with open(path + ".tmp", "w") as f:
                json.dump({"fake": os.getpid(), "child": child.pid}, f)
            os.rename(path + ".tmp", path)
            emit(OUT, "other group %s\n" % arg)
        elif name == "lineends":
            emit(OUT, "a\rb\x0cc\u2028d\ne\nf")
        elif name == "nulafter":
            emit(OUT, b"\0\n")
        elif name == "thorerror":
            emit(ERR, 'ERROR: "pulsar help" was called with arguments ["a", "b"]\n')
        elif name == "emojirewrite":
            emit(OUT, "\U0001f600\U0001f600\U0001f600\r\U0001f600\U0001f600\x1b[31mx\x1b[0m "
                      "\u202eevil\u202c\n")
        elif name in ("lateline", "lategroup"):
            # A child prints pulsar 1.x's success line once pulsar has gone: when it is told
            # to stop (lateline), or a moment later from a group of its own (lategroup).
            app, env, task = sys.argv[-3:]
            line = "Executed task %s for %s on %s!" % (task, app, env)
            code = ("import os, signal, sys, time\n"
                    "def say(*_):\n    print(%r, flush=True)\n    sys.exit(0)\n" % line
                    + ("os.setpgid(0, 0)\ntime.sleep(0.3)\nsay()\n" if name == "lategroup"
                       else "signal.signal(signal.SIGTERM, say)\ntime.sleep(60)\n"))
            subprocess.Popen([sys.executable, "-S", "-c", code, FAKE_DIR])
        elif name == "runfolderfd":
            folder = new_run_folder()
            HELD.append(os.open(folder, os.O_RDONLY))     # copying into it, as Ruby's cp_r does
            emit(OUT, "run folder %s\n" % folder)
        elif name == "tee":
            TEE.append(open(os.path.join(FAKE_DIR, arg + ".printed"), "ab"))
        elif name == "cutescape":
            emit(OUT, b"\x1b[1;3")
        elif name == "halfclosing":
            emit(OUT, "[pulsar-rest")
        elif name == "otherhalf":
            emit(OUT, "-api: task 7 finished]\n")
        elif name == "runfolder":
            folder = new_run_folder()
            os.makedirs(os.path.join(folder, "cap"))
            os.chdir(os.path.join(folder, "cap"))
            emit(OUT, "run folder %s\n" % folder)
        elif name == "exit":
            sys.exit(int(arg))
        elif name == "signal":
            os.kill(os.getpid(), int(arg))
            while True:
                time.sleep(3600)
        else:
            emit(OUT, json.dumps(sys.argv) + "\n")


ANSI_OUTPUT = {ansi!r}
if sys.argv[1:] == ["--version"]:     # the server asks at start; not a task
    emit(OUT, os.environ.get("FAKE_PULSAR_VERSION", "fake pulsar, no version") + "\n")
    sys.exit(int(os.environ.get("FAKE_PULSAR_VERSION_EXIT", "0")))
if sys.argv[1:2] == ["list"]:
    with open(os.path.join(FAKE_DIR, "lists.jsonl"), "a") as lists:
        lists.write(json.dumps(sys.argv) + "\n")
    if os.path.exists(os.path.join(FAKE_DIR, "apps.sleep")):   # as a slow clone would be
        with open(os.path.join(FAKE_DIR, "apps.sleep")) as source:
            time.sleep(float(source.read()))
    if os.path.exists(os.path.join(FAKE_DIR, "apps.txt")):
        with open(os.path.join(FAKE_DIR, "apps.txt")) as source:
            emit(OUT, source.read())
    sys.exit(0)
record_invocation()
run(sys.argv[-1])
'''


class FakePulsar:
    """The fake pulsar script in its own directory (its FAKE_DIR) and what it recorded there."""

    def __init__(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.path = directory / "pulsar"
        self.path.write_text(FAKE_PULSAR.replace("{python}", sys.executable)
                             .replace("{ansi!r}", repr(ANSI_OUTPUT)))
        self.path.chmod(0o755)
        self.gates = []

    def invocations(self):
        """One dict per run of the fake, in start order."""
        path = self.dir / "invocations.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def runs_for(self, word):
        """The runs whose arguments include word (an app, env or action name), in start order."""
        return [run for run in self.invocations() if word in run["argv"]]

    def actions_run_for(self, word):
        """The ACTION (last argument) of each run whose arguments include word, in start order."""
        return [run["argv"][-1] for run in self.runs_for(word)]

    def invocation_for(self, app):
        runs = self.runs_for(app)
        assert len(runs) == 1, "expected one run of pulsar for %s, got %r" % (app, runs)
        return runs[0]

    def pids(self, name):
        """The {"fake": pid, "child": pid} written by the step child-NAME."""
        return json.loads((self.dir / (name + ".pids")).read_text())

    def gate(self):
        """A new Gate in this directory; the action step is gate-<gate.name>."""
        gate = Gate(self.dir)
        self.gates.append(gate)
        return gate

    def close_gates(self):
        while self.gates:
            self.gates.pop().close()


class Gate:
    """A FIFO the fake pulsar blocks on (step gate-NAME) until release() is called.

    The test holds the FIFO open read-write from the start, so the fake's open() never blocks and
    the line written by release() waits in the FIFO until the fake reads it.  Closing the gate
    (at teardown) gives the fake end-of-file, which lets it go on as well.
    """

    def __init__(self, directory):
        self.name = unique("gate")
        self.path = directory / self.name
        os.mkfifo(str(self.path))
        self._fd = os.open(str(self.path), os.O_RDWR)

    @property
    def line(self):
        """The line the fake prints when it reaches this gate, before it blocks."""
        return "gate %s\n" % self.name

    def release(self):
        os.write(self._fd, b"go\n")

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


ProcessTree = collections.namedtuple("ProcessTree", "task_id line pids")


def start_process_tree(client, fake, steps="", env=None):
    """A task whose fake pulsar runs steps, then starts a grandchild and waits for it: a
    ProcessTree of the task id, the line the fake printed once both ran, and {role: pid}."""
    name = unique("tree")
    task_id = client.create(unique("app"), env or unique("env"), steps + "child-" + name)
    line = "child %s\n" % name
    client.wait_output(task_id, line)
    return ProcessTree(task_id, line, fake.pids(name))


# --- The fake GitHub API ----------------------------------------------------------------------

class FakeGitHub:
    """A stand-in for the GitHub API on 127.0.0.1:0, served by a daemon thread.

    GET /user with `Authorization: token T` answers 200 {"login": ...} for the tokens in `logins`
    and 401 for any other; GET /orgs/ORG/members/LOGIN answers 204 for a member (`members` holds
    (org, login) pairs) and 404 for anyone else.  Every request is recorded as (path,
    Authorization header) before it is answered.  Setting `failing` to a status makes every
    answer that status; stop() closes the port, so that GitHub cannot be reached at all.
    `hold` (an Event) keeps every answer back until it is set; `redirect_to` answers 302 to that
    URL; `garbage` answers bytes that are not HTTP; `trickle` sends its answer a byte every that
    many seconds.
    """

    def __init__(self, logins, members):
        self.logins = dict(logins)
        self.members = set(members)
        self.failing = None
        self.hold = None
        self.redirect_to = None
        self.garbage = False
        self.trickle = None
        self._requests = []
        self._lock = threading.Lock()
        self._httpd = FakeGitHubServer(("127.0.0.1", 0), FakeGitHubHandler)
        self._httpd.fake = self
        self.url = "http://127.0.0.1:%d" % self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="fake-github", daemon=True)
        self._thread.start()

    @property
    def requests(self):
        """[(path, Authorization header)] in the order they arrived."""
        with self._lock:
            return list(self._requests)

    def record(self, path, authorization):
        with self._lock:
            self._requests.append((path, authorization))

    def stop(self):
        if self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(TIMEOUT)
            self._thread = None


class FakeGitHubServer(ThreadingHTTPServer):
    """A thread per request.  The server under test may ask a dozen things at once: with the
    default backlog of 5 the kernel drops the rest of the connections, and each is retried only
    a second later."""

    daemon_threads = True
    request_queue_size = 64


class FakeGitHubHandler(BaseHTTPRequestHandler):
    """The routes of FakeGitHub; answers are JSON, as GitHub's are."""

    MEMBERSHIP = re.compile(r"/orgs/([^/]+)/members/([^/]+)")

    def do_GET(self):
        fake = self.server.fake
        authorization = self.headers.get("Authorization")
        fake.record(self.path, authorization)
        scheme, _, token = (authorization or "").partition(" ")
        caller = fake.logins.get(token) if scheme.lower() == "token" else None
        membership = self.MEMBERSHIP.fullmatch(self.path)
        if fake.hold is not None:
            fake.hold.wait(TIMEOUT)
        if fake.trickle:
            try:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"login\": \"x\"}":
                    time.sleep(fake.trickle)    # the trickle itself, not a synchronisation
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            except OSError:
                pass                            # the server gave up on it: as it should
        elif fake.garbage:
            self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
        elif fake.redirect_to:
            self.send_response(302)
            self.send_header("Location", fake.redirect_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif fake.failing:
            self.answer(fake.failing, {"message": "Server Error"})
        elif caller is None:
            self.answer(401, {"message": "Bad credentials"})
        elif self.path == "/user":
            self.answer(200, {"login": caller, "id": 1})
        elif membership and membership.groups() in fake.members:
            self.answer(204, None)
        else:
            self.answer(404, {"message": "Not Found"})

    def answer(self, status, payload):
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass        # the records are the log


# --- The server and a client for it -----------------------------------------------------------

class Server:
    """One pulsar_rest_api.py process started with the real command line."""

    def __init__(self, workdir, fake, args=(), env=None, script=None, pulsar_bin=None,
                 launcher=(), python=SERVER_PYTHON):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.fake = fake
        self.log_path = workdir / "log" / LOG_NAME
        self.console_path = workdir / "console.txt"
        command = list(launcher) + list(python) + [
            str(script or compiled_script()), "--host", "127.0.0.1", "--port", "0",
            "--pulsar-bin", str(pulsar_bin or fake.path),
            "--log-dir", str(workdir / "log"), "--db", str(workdir / "tasks.sqlite3"),
            "--shutdown-timeout", "1"] + [str(arg) for arg in args]
        full_env = dict(os.environ, FAKE_DIR=str(fake.dir))
        full_env.update(env or {})
        with open(str(self.console_path), "wb") as console:
            self.proc = subprocess.Popen(command, cwd=str(workdir), env=full_env,
                                         stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self.proc.poll() is not None or LISTENING.search(self.log()),
                       what="the 'listening on' log line")
            match = LISTENING.search(self.log())
            assert match, "server exited with %s before listening:\n%s\n%s" % (
                self.proc.returncode, self.console(), self.log())
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.scheme, self.host, self.port = match.group(1), match.group(2), int(match.group(3))
        self.context = ssl.create_default_context(cafile=str(DEV_CERT))
        self.crashed = False

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console(self):
        return self.console_path.read_text(errors="replace")

    def client(self, context=None, headers=None, source=None):
        return Client(self.scheme, self.host, self.port, context or self.context, headers,
                      source)

    def send_signal(self, sig=signal.SIGTERM):
        """Send sig to the server unless it has exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM):
        """Signal the server (unless it has exited) and return its exit status."""
        self.send_signal(sig)
        return self.wait_exit()

    def wait_exit(self, timeout=TIMEOUT):
        """The exit status once the server ends; fail (killing it) after timeout."""
        status = exit_status(self.proc, timeout)
        if status is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server still running after %s s" % timeout)
        return status

    def crash(self):
        """SIGKILL the server, as a crash or the OOM killer would; its tasks keep running."""
        self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        self.crashed = True

    def peak_rss_mib(self):
        """The server's peak resident memory so far (VmHWM), in MiB."""
        with open("/proc/%d/status" % self.proc.pid) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc/%d/status" % self.proc.pid)

    def stop_cleanly(self):
        """Stop with SIGTERM; it must exit 0 and no traceback may be in its log or console."""
        self.send_signal()
        self.assert_exits_cleanly()

    def assert_exits_cleanly(self):
        """Wait for the exit of a server already told to stop: status 0, and no traceback."""
        status = self.wait_exit()
        assert status == 0, "server exited with %s:\n%s" % (status, self.console())
        self.assert_no_traceback()

    def assert_no_traceback(self):
        assert "Traceback" not in self.log(), self.log()
        assert "Traceback" not in self.console(), self.console()


def stop_all_cleanly(servers):
    """SIGTERM every server that has not crashed, all at once, then check that each exits 0
    without a traceback; fail naming every problem."""
    running = [server for server in servers if not server.crashed]
    for server in running:
        server.send_signal()
    problems = []
    for server in running:
        try:
            server.assert_exits_cleanly()
        except AssertionError as error:
            problems.append(str(error))
    assert not problems, "\n".join(problems)


class SharedServers:
    """The servers that tests share, one for each set of flags, each started when a test first
    asks for it and stopped once the module's tests are done.

    They all run the one fake pulsar in the shared folder, so a test that uses one keeps to apps
    and envs of its own (unique()), and after each test none of their tasks may still run.  A
    test that counts from zero, stops, signals or restarts the server, reads its whole log or
    list, or leaves state behind that another test would see (a rotated log, failed logins)
    starts a server of its own with start_server instead.
    """

    def __init__(self, workdir):
        self.workdir = workdir
        self.fake = FakePulsar(workdir / "fake")
        self._servers = {}

    @property
    def mark(self):
        """What the command line or environment of every process they start contains."""
        return str(self.workdir) + os.sep

    def get(self, *flags, pulsar_bin=None, env=None):
        """The shared server started with these flags (and --pulsar-bin, environment)."""
        key = (tuple(str(flag) for flag in flags), str(pulsar_bin),
               tuple(sorted((env or {}).items())))
        if key not in self._servers:
            workdir = self.workdir / ("server%d" % len(self._servers))
            self._servers[key] = Server(workdir, self.fake, flags, env=env, pulsar_bin=pulsar_bin)
        return self._servers[key]

    def pids(self):
        return {server.proc.pid for server in self._servers.values()}

    def stop_all(self):
        self.fake.close_gates()
        stop_all_cleanly(list(self._servers.values()))


class Reply:
    """A complete HTTP response: status, headers and body."""

    def __init__(self, response, body, local_port=None):
        self.local_port = local_port    # the client's port, as the server logs it
        self.status = response.status
        self.headers = response.msg
        self.body = body
        self.will_close = response.will_close

    @property
    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Reply %s %r>" % (self.status, self.body[:300])


class Client:
    """http.client requests to one server, one connection per request unless told otherwise.

    headers are sent with every request (credentials, say); source is the local address to
    connect from (any of 127.0.0.0/8), so that a test can be two clients at two addresses.
    """

    def __init__(self, scheme, host, port, context, headers=None, source=None):
        self.scheme, self.host, self.port, self.context = scheme, host, port, context
        self.headers = dict(headers or {})
        self.source = source

    def connection(self, timeout=TIMEOUT):
        source = (self.source, 0) if self.source else None
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.context, source_address=source)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout,
                                          source_address=source)

    def request(self, method, path, body=None, content_type=None, headers=None, chunked=False,
                declared_length=None, timeout=TIMEOUT):
        """Send one request on a fresh connection and read the whole response.

        chunked sends body with Transfer-Encoding: chunked; declared_length sends only the headers,
        announcing a body of that many bytes.
        """
        headers = dict(self.headers, **(headers or {}))
        if isinstance(body, str):
            body = body.encode("utf-8")
        if content_type:
            headers["Content-Type"] = content_type
        conn = self.connection(timeout)
        try:
            if declared_length is not None:
                conn.putrequest(method, path)
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.putheader("Content-Length", str(declared_length))
                conn.endheaders()
            elif chunked:
                # Headers and the whole chunked body in one write, so that a server answering
                # after the headers alone does not make this client fail while still sending.
                conn.putrequest(method, path)
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders(b"%X\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            else:
                conn.request(method, path, body=body, headers=headers)
            local_port = conn.sock.getsockname()[1]
            response = conn.getresponse()
            return Reply(response, response.read(), local_port)
        finally:
            conn.close()

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def get_each(self, paths, timeout=TIMEOUT):
        """GET each path in turn on one kept-alive connection; the replies.  For reading many
        offsets, where a TLS handshake for each would cost more than the reads."""
        conn = self.connection(timeout)
        try:
            replies = []
            for path in paths:
                conn.request("GET", path, headers=self.headers)
                response = conn.getresponse()
                replies.append(Reply(response, response.read(), conn.sock.getsockname()[1]))
            return replies
        finally:
            conn.close()

    def create(self, app, env, action):
        """POST a form with the action and return the new task id."""
        reply = self.request("POST", "/%s/%s" % (app, env),
                             body=urllib.parse.urlencode({"action": action}), content_type=FORM)
        assert reply.status == 200, reply
        return reply.json["taskId"]

    def queue(self, app, env, action):
        """POST a form with the action and queue=true; the new task id, which must be queued."""
        reply = self.request("POST", "/%s/%s" % (app, env), content_type=FORM,
                             body=urllib.parse.urlencode({"action": action, "queue": "true"}))
        assert reply.status == 200 and reply.json["status"] == "queued", reply
        return reply.json["taskId"]

    def task(self, task_id, offset=None):
        path = "/task/%d" % task_id + ("" if offset is None else "?offset=%d" % offset)
        reply = self.get(path)
        assert reply.status == 200, reply
        return reply.json

    def kill(self, task_id, method="POST"):
        return self.request(method, "/task/%d/kill" % task_id)

    def wait_for(self, task_id, predicate, what, timeout=TIMEOUT):
        """Long-poll the task until predicate(task) holds; return that task."""
        deadline = time.monotonic() + timeout
        version = 0
        while True:
            reply = self.get("/task/%d/state?version=%d" % (task_id, version))
            assert reply.status == 200, reply
            if reply.json["changed"]:
                task = reply.json["task"]
                version = task["version"]
                if predicate(task):
                    return task
                assert task["status"] in LIVE, "task ended before %s: %r" % (what, task)
            assert time.monotonic() < deadline, "timed out waiting for " + what

    def wait_ended(self, task_id, timeout=TIMEOUT):
        return self.wait_for(task_id, lambda task: task["status"] not in LIVE, "its end", timeout)

    def follow(self, task_id, timeout=TIMEOUT):
        """Follow the task to its end as a client should, receiving only new output each time;
        (its last state, the whole output)."""
        deadline = time.monotonic() + timeout
        version, offset, pieces = 0, 0, []
        while True:
            reply = self.get("/task/%d/state?version=%d&offset=%d" % (task_id, version, offset))
            assert reply.status == 200, reply
            if reply.json["changed"]:
                task = reply.json["task"]
                pieces.append(task["output"])
                version, offset = task["version"], task["outputLength"]
                if task["status"] not in LIVE:
                    return task, "".join(pieces)
            assert time.monotonic() < deadline, "timed out following task %d" % task_id

    def listing(self, query=""):
        """GET /tasks?query, which must answer 200; its JSON."""
        reply = self.get("/tasks" + ("?" + query if query else ""))
        assert reply.status == 200, reply
        return reply.json

    def listed_ids(self, query=""):
        return [task["id"] for task in self.listing(query)["tasks"]]

    def metrics(self):
        """GET /metrics parsed: {"name{labels}": value}."""
        reply = self.get("/metrics")
        assert reply.status == 200, reply
        assert reply.headers["Content-Type"].startswith("text/plain"), reply.headers
        values = {}
        for line in reply.body.decode("utf-8").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def wait_output(self, task_id, text, timeout=TIMEOUT):
        return self.wait_for(task_id, lambda task: text in task["output"], "output %r" % text,
                             timeout)

    def wait_at_gate(self, task_id, gate, timeout=TIMEOUT):
        """Wait until the task's fake has printed that it waits at gate; that state of the task."""
        return self.wait_output(task_id, gate.line, timeout)


def served(client, path="/health"):
    """The reply if the server answers 200 now, else None (refused or dropped): a predicate."""
    try:
        reply = client.get(path)
    except (OSError, http.client.HTTPException):
        return None
    return reply if reply.status == 200 else None


def metrics_when(client, condition):
    """The metrics if condition(metrics) holds, else None: a predicate for wait_until."""
    values = client.metrics()
    return values if condition(values) else None


def created_task_of(client, app):
    """The id of the one task of app, once it is listed: a predicate for wait_until."""
    ids = client.listed_ids("app=" + app)
    return ids[0] if ids else None


def send_waiting_create(api, app, gate, action):
    """Send POST /APP/prod?action=...&wait=true on a connection of its own and wait until its
    task has reached the gate; (connection, task id), the reply still to come."""
    conn = api.connection()
    conn.request("POST", "/%s/prod?action=%s&wait=true" % (app, action))
    task_id = wait_until(lambda: created_task_of(api, app), what="the task to be created")
    api.wait_at_gate(task_id, gate)
    return conn, task_id


def send_refused(client, case, app, env):
    """Send the request of a case of REFUSED (in the tests of refused requests), with app and
    env in place of APP and ENV; the reply."""
    _, _, path, content_type, body, options = case
    path = path.replace("APP", app).replace("ENV", env)
    return client.request("POST", path, body=body, content_type=content_type, **options)


def wait_until_stopping(client):
    """The 503 reply of /health once the server says it is stopping."""
    def stopping():
        reply = client.get("/health")
        return reply if reply.status == 503 else None
    return wait_until(stopping, what="/health to say stopping")


def log_lines(server, pattern, since=0):
    """Lines of the server's log (from character `since` on) in which the regular expression
    pattern is found.  A long-lived server reuses client ports: pass the log's length at the
    start of a test to see only that test's lines."""
    return [line for line in server.log()[since:].splitlines() if re.search(pattern, line)]


def logged_version(server):
    match = VERSION_LINE.search(server.log())
    assert match, server.log()
    return match.group(1)


def task_at_gate(start_server, fake, tmp_path, steps="gate-%s", *flags):
    """A server on a history file in tmp_path with a task held at a gate (`steps` name it with
    %s): (db, server, client, gate, the task's id, the task as it stood at the gate)."""
    db = tmp_path / "history.sqlite3"
    server = start_server("--db", db, *flags)
    client = server.client()
    gate = fake.gate()
    task_id = client.create(unique("app"), "prod", steps % gate.name)
    return db, server, client, gate, task_id, client.wait_at_gate(task_id, gate)


def keeper_pid_of(db, task_id):
    """The pid of the keeper a task's folder names."""
    return json.loads((Path(str(db) + ".tasks") / str(task_id) / "keeper").read_text())["pid"]


def insert_task(db, app, action, status, exit_code=None, finished=False, version=1, pid=None,
                process_start=None, created=None):
    """Write a task of app and env prod into the history file of a stopped server, as a crashed
    or older server could have left it; its id."""
    now = created or time.time()
    with contextlib.closing(sqlite3.connect(str(db))) as conn:
        with conn:
            return conn.execute(
                "INSERT INTO tasks (app, env, action, status, exit_code, pid, process_start, "
                "created_at, finished_at, started_by, version, output_length) "
                "VALUES (?, 'prod', ?, ?, ?, ?, ?, ?, ?, '127.0.0.1:40000', ?, 0)",
                (app, action, status, exit_code, pid, process_start, now,
                 now if finished else None, version)).lastrowid


def process_start_token(pid):
    """What the server records to know a process again: boot id and start time."""
    with open("/proc/sys/kernel/random/boot_id") as source:
        boot = source.read().strip()
    return "%s:%s" % (boot, proc_stat(pid)[19])


class CliRun:
    """The server's command line, expected to end by itself (an error, --help), started in a
    folder of its own; result() waits for it.  Several can run side by side."""

    def __init__(self, directory, fake, args, env=None, script=None, python=SERVER_PYTHON):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.args = directory, args
        self.command = list(python) + [
            str(script or compiled_script()), "--host", "127.0.0.1", "--port", "0",
            "--pulsar-bin", str(fake.path), "--log-dir", str(directory / "cli-log"),
            "--db", str(directory / "cli.sqlite3")] + [str(arg) for arg in args]
        full_env = dict(os.environ, FAKE_DIR=str(fake.dir))
        full_env.update(env or {})
        with open(str(directory / "stdout.txt"), "wb") as out:
            with open(str(directory / "stderr.txt"), "wb") as err:
                self.proc = subprocess.Popen(self.command, cwd=str(directory), env=full_env,
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.deadline = time.monotonic() + TIMEOUT
        self.timed_out = False

    def wait(self):
        """Wait for the exit, killing it if it has not exited TIMEOUT s after its start."""
        if exit_status(self.proc, max(0, self.deadline - time.monotonic())) is None:
            self.proc.kill()
            self.proc.wait()
            self.timed_out = True

    def result(self):
        """Its CompletedProcess (text output); fail if it had to be killed."""
        self.wait()
        assert not self.timed_out, "%s did not exit within %s s (did it start serving?)" % (
            self.args, TIMEOUT)
        output = [(self.directory / name).read_text(errors="replace")
                  for name in ("stdout.txt", "stderr.txt")]
        return subprocess.CompletedProcess(self.command, self.proc.returncode, *output)


def run_cli(directory, fake, args, env=None, script=None, python=SERVER_PYTHON):
    """Run the server's command line expected to end by itself; return the CompletedProcess."""
    return CliRun(directory, fake, args, env, script, python).result()


def run_side_by_side(directory, runs):
    """Start the command lines of runs, {name: (args, env)}, all at once, each in a folder of
    its own under directory, and wait for them all; {name: CliRun}.  One after the other they
    would each cost a start of Python in turn."""
    fake = FakePulsar(directory / "fake")
    started = {}
    try:
        for name, (args, env) in runs.items():
            started[name] = CliRun(directory / name, fake, args, env)
    finally:
        for run in started.values():
            run.wait()
    return started


def one_error_line(result):
    """The one line a command line that cannot work prints, which must exit non-zero without a
    traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode > 0, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def make_bad_db(tmp_path, kind):
    """A --db path the server cannot use, of the given kind."""
    if kind == "missing-folder":
        return tmp_path / "no-such-folder" / "tasks.sqlite3"
    if kind == "directory":
        path = tmp_path / "a-directory"
        path.mkdir()
        return path
    path = tmp_path / "tasks.sqlite3"
    if kind == "garbage-file":
        path.write_bytes(b"this is not an SQLite database \xff\xfe\x00\n" * 100)
    elif kind == "newer-schema":       # as a later version of the server would leave it
        with contextlib.closing(sqlite3.connect(str(path))) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA user_version = 99")
    return path


COMPILED_PREFIX = "pulsar-rest-api-compiled-"
COMPILING = threading.Lock()        # servers start from two threads as the session starts


def compiled_script():
    """The server's bytecode, compiled once for the session, in a folder of its own with the
    development certificate beside it (ssl/) as the script has it; Python runs it as it would
    the script."""
    with COMPILING:
        return compile_script_once()


@functools.lru_cache(maxsize=None)
def compile_script_once():
    for stale in Path(tempfile.gettempdir()).glob(COMPILED_PREFIX + "*"):
        owner = stale.name[len(COMPILED_PREFIX):].partition("-")[0]
        if owner.isdigit() and is_gone(owner):     # a session that was killed left it
            shutil.rmtree(str(stale), ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="%s%d-" % (COMPILED_PREFIX, os.getpid())))
    atexit.register(shutil.rmtree, str(folder), True)
    compiled = folder / (SCRIPT.stem + ".pyc")
    py_compile.compile(str(SCRIPT), cfile=str(compiled), doraise=True)
    (folder / "ssl").symlink_to(HERE / "ssl")
    return compiled


def copy_script_alone(tmp_path):
    """A copy of the server script in a folder of its own, without ssl/ beside it; its path."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(str(SCRIPT), str(alone / SCRIPT.name))
    return alone / SCRIPT.name


# --- Raw TLS exchanges ------------------------------------------------------------------------

def tcp_connection(server, timeout=TIMEOUT):
    """A plain TCP socket connected to the server's port (no TLS handshake is started)."""
    return socket.create_connection((server.host, server.port), timeout=timeout)


@contextlib.contextmanager
def tls_connection(server, context=None, timeout=TIMEOUT):
    """A TLS socket connected to the server, its handshake done; the server's own trust unless
    another context is given.  Every raw exchange below opens its socket here."""
    with tcp_connection(server, timeout) as raw:
        with (context or server.context).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            yield tls


def read_reply(tls):
    """Parse one HTTP response from a TLS socket."""
    response = http.client.HTTPResponse(tls)
    response.begin()
    return Reply(response, response.read())


def read_until_closed(tls):
    """Every byte received until the server closes the connection."""
    received = b""
    while True:
        chunk = tls.recv(65536)
        if not chunk:
            return received
        received += chunk


def raw_exchange(server, data):
    """Send raw bytes over TLS and parse the one response that comes back."""
    with tls_connection(server) as tls:
        tls.sendall(data)
        return read_reply(tls)


def exchange_until_closed(server, data):
    """Send raw bytes over TLS and return everything received until the server closes."""
    with tls_connection(server) as tls:
        tls.sendall(data)
        return read_until_closed(tls)


def raw_get(server, path, headers=()):
    """Every byte the server sends for GET path on a connection it is asked to close; for
    replies whose framing itself is under test."""
    request = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1", "Connection: close"] + list(headers)
    return exchange_until_closed(server, ("\r\n".join(request) + "\r\n\r\n").encode("latin-1"))


def request_with_header_lines(lines):
    """GET /health with exactly these header lines (Host and Connection: close included)."""
    head = ["GET /health HTTP/1.1", "Host: 127.0.0.1", "Connection: close"] + lines
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def unasked_reply(server, timeout=TIMEOUT):
    """Connect over TLS, send nothing, and parse the one response the server sends anyway;
    (the reply, whether the server then closed the connection)."""
    with tls_connection(server, timeout=timeout) as tls:
        return read_reply(tls), closed_by_peer(tls, timeout)


def served_certificate(server, context=None):
    """(DER certificate, TLS version) the server presents to a client with this context."""
    with tls_connection(server, context) as tls:
        return tls.getpeercert(binary_form=True), tls.version()


def closed_by_peer(sock, timeout):
    """Wait up to timeout for the peer to close sock (or send anything); True if it did."""
    sock.settimeout(timeout)
    try:
        sock.recv(1024)
    except socket.timeout:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


def unverified_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def refused_connections(conn):
    """pulsar_rest_api_refused_connections_total, asked on a connection already let in."""
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    return int(re.search(r"^pulsar_rest_api_refused_connections_total (\d+)$", text, re.M).group(1))


# --- Following a task live: plain text, streams, events ---------------------------------------

def end_line(task_id, status, exit_code, outcome=None):
    """The last line of a plain-text stream, saying how the task ended and why; the fake pulsar
    runs in the classic form, where the exit code decides."""
    if outcome is None:
        outcome = "pulsar exited with code %s" % exit_code
    return "[pulsar-rest-api: task %d %s, exit code %s: %s]\n" % (task_id, status, exit_code,
                                                                 outcome)


def open_stream(client, path, headers=None):
    """(connection, response) of a GET whose headers have arrived and whose body is left to read
    as it comes; the caller closes the connection."""
    conn = client.connection()
    try:
        conn.request("GET", path, headers=dict(client.headers, **(headers or {})))
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


def read_event(response):
    """The next Server-Sent Event as {field: value} (comment lines skipped); {} once the stream
    has ended."""
    fields = {}
    while True:
        line = response.readline()
        if not line:
            return fields
        line = line.decode("utf-8").rstrip("\n")
        if not line:
            if fields:
                return fields
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = fields[name] + "\n" + value if name in fields else value


def read_events_until(response, done):
    """Events up to and including the first for which done(events so far) holds."""
    events = []
    while not events or not done(events):
        event = read_event(response)
        assert event, "the stream ended after %r" % events
        events.append(event)
    return events


def output_texts(events):
    return "".join(json.loads(event["data"])["text"] for event in events
                   if event.get("event") == "output")


def assert_text_reply(reply, text, size, status):
    """A text/plain reply of GET /task/N/output: the body and its three X- headers."""
    assert reply.status == 200, reply
    assert reply.headers["Content-Type"] == TEXT, reply.headers
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert reply.body.decode("utf-8") == text
    assert reply.headers["X-Text-Size"] == str(size), reply.headers
    assert reply.headers["X-More-Data"] == ("false" if status not in LIVE else "true")
    assert reply.headers["X-Task-Status"] == status
    assert_not_cached_and_not_sniffed(reply)


# --- Answers, credentials and secrets ---------------------------------------------------------

def assert_json_error(reply, status):
    assert reply.status == status, reply
    body = reply.json
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in body["error"], body


def assert_refused_login(reply, status=401):
    """A JSON error that asks for credentials (401 with the Basic challenge) or refuses them."""
    assert_json_error(reply, status)
    if status == 401:
        assert reply.headers["WWW-Authenticate"] == REALM, reply.headers


def assert_not_cached_and_not_sniffed(reply):
    assert reply.headers["Cache-Control"] == "no-store", (reply, reply.headers.items())
    assert reply.headers["X-Content-Type-Options"] == "nosniff", (reply, reply.headers.items())


def basic_auth(user, password):
    """The Authorization header of HTTP Basic, as curl -u USER:PASSWORD sends it."""
    pair = ("%s:%s" % (user, password)).encode("utf-8")
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def bearer_auth(token):
    return {"Authorization": "Bearer " + token}


def basic_login(tmp_path, source):
    """(flags, environment) for a server that lets alice in with PASSWORD, taken from `source`:
    a file (ending in a newline, as echo writes it), the environment variable, or the flag."""
    flags = ["--auth-provider", "basic", "--auth-username", "alice"]
    if source == "file":
        path = tmp_path / "password.txt"
        path.write_text(PASSWORD + "\n")
        return flags + ["--auth-password-file", path], {}
    if source == "environment":
        return flags, {PASSWORD_VARIABLE: PASSWORD}
    return flags + ["--auth-password", PASSWORD], {}


def start_github_server(start_server, github, *flags):
    return start_server("--auth-provider", "github", "--github-api", github.url, *flags,
                        env=NO_PROXY)


def leaked_secrets(text):
    """The secrets (passwords, tokens) that appear in text."""
    return [secret for secret in SECRETS if secret in text]


def reply_text(reply):
    """Status line fields, headers and body of a reply as one text, to search for secrets."""
    return "%d\n%s\n%s" % (reply.status, reply.headers, reply.body.decode("utf-8", "replace"))


def process_environment(pid):
    """{name: value} of a live process, from /proc/PID/environ."""
    with open("/proc/%d/environ" % pid, "rb") as source:
        entries = source.read().split(b"\0")
    return dict(entry.decode("utf-8", "replace").partition("=")[::2] for entry in entries if entry)


# --- Headless Chromium ------------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven with the DevTools protocol over a pipe (--remote-debugging-pipe):
    it reads commands from its fd 3 and writes replies to its fd 4, each a JSON object ended by a
    NUL byte.  Its environment carries a path of the test (`mark`), which every process it starts
    inherits, so that they can all be found: by close(), and by the check for processes left
    behind."""

    FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--ignore-certificate-errors"]

    def __init__(self, workdir):
        workdir.mkdir()
        self.mark = str(workdir) + os.sep
        self.console_path = workdir / "console.txt"
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # Its ends first go above 9, so that putting them on 3 and 4 cannot overwrite either.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, replies_write)]
        os.close(commands_read)
        os.close(replies_write)

        def onto_3_and_4():
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        try:
            with open(str(self.console_path), "wb") as console:
                self.proc = subprocess.Popen(
                    [shutil.which("chromium")] + self.FLAGS + [
                        "--user-data-dir=%s" % (workdir / "profile"), "--remote-debugging-pipe",
                        "about:blank"],
                    env=dict(os.environ, PULSAR_TEST_MARK=self.mark),
                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                    preexec_fn=onto_3_and_4, close_fds=False, start_new_session=True)
        except BaseException:
            os.close(self._commands)
            os.close(self._replies)
            raise
        finally:
            for fd in ends:
                os.close(fd)
        self._buffer = b""
        self._last_id = 0

    def console(self):
        return self.console_path.read_text(errors="replace")

    def call(self, method, params=None, session=None, timeout=TIMEOUT):
        """Send a command and return its result; DevToolsError if it failed."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode("utf-8") + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next_message(deadline, method)
            if reply.get("id") == self._last_id:     # anything else is an event: not needed
                if "error" in reply:
                    raise DevToolsError("%s: %s" % (method, reply["error"]))
                return reply.get("result", {})

    def evaluate(self, session, expression):
        """The value of a JavaScript expression in the page; DevToolsError if it threw."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session)
        if "exceptionDetails" in result:
            raise DevToolsError("%s threw: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def _next_message(self, deadline, method):
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._replies], [], [], remaining)[0]:
                raise AssertionError("Chromium did not answer %s in time:\n%s"
                                     % (method, self.console()))
            data = os.read(self._replies, 65536)
            if not data:
                raise AssertionError("Chromium closed its DevTools pipe:\n" + self.console())
            self._buffer += data
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message.decode("utf-8"))

    def close(self):
        """Browser.close, then wait for Chromium and everything it started to exit (killing
        them after a deadline); True if they all exited by themselves."""
        try:
            self.call("Browser.close", timeout=5)
        except (AssertionError, DevToolsError, OSError):
            pass            # it may exit before it answers
        by_itself = exit_status(self.proc, TIMEOUT) is not None
        try:
            wait_until(lambda: not processes_mentioning([self.mark], {os.getpid()}), timeout=5,
                       what="Chromium's processes to exit")
        except AssertionError:
            by_itself = False
        for pid in processes_mentioning([self.mark], {os.getpid()}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()        # nothing if it has exited already
        self.proc.wait()
        os.close(self._commands)
        os.close(self._replies)
        return by_itself


class DevToolsError(Exception):
    """A DevTools command that failed, or JavaScript that threw."""


def page_ready(browser, session):
    """True once the page has loaded with its script (False while it is still navigating)."""
    try:
        return browser.evaluate(session, "location.protocol === 'https:' && "
                                         "document.readyState === 'complete' && "
                                         "!!document.querySelector('#start-form')")
    except DevToolsError:
        return False        # between two documents there is no context to evaluate in


# --- Fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_servers(tmp_path_factory):
    """The module's SharedServers; each must stop cleanly, leaving no process behind."""
    servers = SharedServers(tmp_path_factory.mktemp("shared"))
    try:
        yield servers
    finally:
        try:
            servers.stop_all()
        finally:
            assert_no_process_left([servers.mark])


@pytest.fixture
def shared_server_with(shared_servers):
    """shared_server_with(*flags, pulsar_bin=, env=) is the shared server with those flags."""
    return shared_servers.get


@pytest.fixture(scope="module")
def shared_server(shared_servers):
    """The server of the plain API tests: default flags but --kill-grace 0.5."""
    return shared_servers.get("--kill-grace", SHARED_GRACE)


@pytest.fixture
def api(shared_server):
    return shared_server.client()


@pytest.fixture
def shared_fake(shared_servers):
    """The fake pulsar of every shared server; its gates are closed after each test."""
    return shared_servers.fake


@pytest.fixture
def pulsarless_server(shared_servers):
    """The shared server whose pulsar was removed once the server had started (a start needs
    one), so that every task fails at once."""
    vanishing = shared_servers.workdir / "vanishing" / "pulsar"
    if not vanishing.parent.exists():
        vanishing.parent.mkdir()
        shutil.copy(str(shared_servers.fake.path), str(vanishing))
    server = shared_servers.get(pulsar_bin=vanishing)
    if vanishing.exists():
        vanishing.unlink()
    return server


@pytest.fixture
def shared_login_server(shared_servers):
    """shared_login_server(source="file") is the shared server that lets alice in with PASSWORD
    taken from source (see basic_login).  Its failed-login brake counts across the tests that
    share it (10 failures from 127.0.0.1 within a minute refuse that address): a test may fail a
    few logins there, and a test that needs more starts a server of its own."""
    def get(source="file"):
        flags, env = basic_login(shared_servers.workdir, source)
        return shared_servers.get(*flags, env=env)
    return get


@pytest.fixture(scope="module")
def ended_task(shared_server):
    """Id of a task on the shared server that printed out 1..3 and finished."""
    client = shared_server.client()
    task_id = client.create(unique("app"), unique("env"), "out-3")
    client.wait_ended(task_id)
    return task_id


@pytest.fixture
def fake(tmp_path):
    fake = FakePulsar(tmp_path / "fake")
    yield fake
    fake.close_gates()


@pytest.fixture
def start_server(tmp_path, fake):
    """start_server(*flags, env=, script=, pulsar_bin=, launcher=, python=) starts a dedicated
    server for one test."""
    servers = []

    def start(*args, **kwargs):
        server = Server(tmp_path / ("server%d" % len(servers)), fake, args, **kwargs)
        servers.append(server)
        return server

    yield start
    fake.close_gates()
    stop_all_cleanly(servers)


@pytest.fixture(autouse=True)
def no_process_left_behind(tmp_path, shared_servers):
    """After each test, nothing it started may still run (servers, pulsar, grandchildren), and
    no task of a shared server either: only the shared servers themselves go on."""
    yield
    shared_servers.fake.close_gates()
    assert_no_process_left([str(tmp_path) + os.sep, shared_servers.mark], shared_servers.pids())


@pytest.fixture
def github():
    """A FakeGitHub that knows GITHUB_LOGINS and GITHUB_MEMBERS; stopped after the test."""
    fake = FakeGitHub(GITHUB_LOGINS, GITHUB_MEMBERS)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def cli_error_runs(tmp_path_factory, tls_files):
    """{id: CliRun} of every command line in CLI_ERRORS (in the tests of the command line), run
    side by side while a port is held busy for the case that needs one."""
    directory = tmp_path_factory.mktemp("cli-errors")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        files = dict(tls_files, missing=directory / "missing.pem")
        files["busy-port"] = busy.getsockname()[1]
        runs = run_side_by_side(directory, {
            case_id: (make_args(files), None) for case_id, make_args in CLI_ERRORS})
    yield runs
    assert_no_process_left([str(directory) + os.sep])


@pytest.fixture(scope="module")
def flag_error_runs(tmp_path_factory):
    """{id: CliRun} of every command line in AUTH_CLI_ERRORS, run side by side, with
    PULSAR_REST_API_PASSWORD set empty."""
    directory = tmp_path_factory.mktemp("flag-errors")
    yield run_side_by_side(directory, {
        case_id: (args, {PASSWORD_VARIABLE: ""}) for case_id, args, _ in AUTH_CLI_ERRORS})
    assert_no_process_left([str(directory) + os.sep])


@pytest.fixture(scope="module")
def bad_db_runs(tmp_path_factory):
    """{kind: (--db path, its bytes before or None, CliRun)} for each kind of BAD_DBS, run side
    by side."""
    directory = tmp_path_factory.mktemp("bad-dbs")
    paths = {}
    for kind in BAD_DBS:
        folder = directory / ("db-" + kind)
        folder.mkdir()
        paths[kind] = make_bad_db(folder, kind)
    before = {kind: path.read_bytes() if path.is_file() else None for kind, path in paths.items()}
    runs = run_side_by_side(directory, {kind: (["--db", path], None)
                                        for kind, path in paths.items()})
    yield {kind: (paths[kind], before[kind], runs[kind]) for kind in BAD_DBS}
    assert_no_process_left([str(directory) + os.sep])


@pytest.fixture(scope="session")
def realpulsar(tmp_path_factory):
    """The REALPULSAR_* variables of the realpulsar kit: from the environment (CI runs the
    kit's setup first), or from running its setup here; the tests that need it are skipped,
    saying why, where it cannot be set up (no kit, not Debian, no packages)."""
    names = ("REALPULSAR_BIN", "REALPULSAR_CONF", "REALPULSAR_HOME", "REALPULSAR035_BIN",
             "REALPULSAR035_CONF", "REALPULSAR035_HOME", "REALPULSAR_DEPLOY")
    if all(os.environ.get(name) for name in names):
        return {name: os.environ[name] for name in names}
    kit = Path(os.environ.get("REALPULSAR_KIT", HERE.parent / "shared" / "realpulsar"))
    if not (kit / "setup").is_file():
        pytest.skip("the realpulsar kit is not at %s (set REALPULSAR_KIT)" % kit)
    directory = tmp_path_factory.mktemp("realpulsar")
    result = subprocess.run(["bash", str(kit / "setup"), str(directory)], capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        pytest.skip("the realpulsar kit cannot be set up here: %s"
                    % (result.stderr.strip().splitlines() or ["no output"])[-1])
    found = dict(re.findall(r"^export (REALPULSAR\w+)=(\S+)", result.stdout, re.MULTILINE))
    return {name: found[name] for name in names}


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A certificate for 127.0.0.1 with an encrypted key, the same as PKCS#12, passphrase files."""
    directory = tmp_path_factory.mktemp("tls")
    files = {name: directory / name for name in (
        "cert.pem", "key.pem", "bundle.p12", "key-pass.txt", "pfx-pass.txt", "wrong-pass.txt",
        "garbage.pem")}
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-keyout", str(files["key.pem"]), "-out", str(files["cert.pem"]), "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-passout", "pass:key-secret"],
        check=True, capture_output=True, timeout=TIMEOUT)
    subprocess.run(
        ["openssl", "pkcs12", "-export", "-in", str(files["cert.pem"]),
         "-inkey", str(files["key.pem"]), "-passin", "pass:key-secret",
         "-out", str(files["bundle.p12"]), "-passout", "pass:pfx-secret"],
        check=True, capture_output=True, timeout=TIMEOUT)
    files["key-pass.txt"].write_text("key-secret")
    files["pfx-pass.txt"].write_text("pfx-secret")
    files["wrong-pass.txt"].write_text("not-the-secret")
    files["garbage.pem"].write_text("this is not a certificate\n")
    return files


# --- Creating tasks ---------------------------------------------------------------------------

def test_create_returns_increasing_ids_status_and_url_built_from_host_header(api, shared_server,
                                                                           shared_fake):
    gate = shared_fake.gate()
    app = unique("app")
    first = api.request("POST", "/%s/%s" % (app, unique("env")), body="action=gate-" + gate.name,
                        content_type=FORM)
    second = api.request("POST", "/%s/%s" % (app, unique("env")), body="action=deploy",
                         content_type=FORM, headers={"Host": "localhost:%d" % shared_server.port})
    gate.release()

    assert first.status == 200 and second.status == 200, (first, second)
    assert set(first.json) == set(second.json) == {"taskId", "url", "status"}
    assert first.json["status"] == "running"    # held by its gate until after the reply
    first_id, second_id = first.json["taskId"], second.json["taskId"]
    assert isinstance(first_id, int) and first_id >= 1
    assert second_id == first_id + 1
    assert first.json["url"] == "https://127.0.0.1:%d/task/%d" % (shared_server.port, first_id)
    assert second.json["url"] == "https://localhost:%d/task/%d" % (shared_server.port, second_id)
    for task_id in (first_id, second_id):
        assert api.wait_ended(task_id)["status"] == "finished"


@pytest.mark.parametrize("how", ["form", "json", "query"])
@pytest.mark.parametrize("field", ["action", "task"])
def test_action_is_accepted_as_form_json_or_query_under_either_name(api, shared_fake, how, field):
    app, env = unique("app"), unique("env")
    path, body, content_type = "/%s/%s" % (app, env), None, None
    if how == "form":
        body, content_type = urllib.parse.urlencode({field: "deploy:now"}), FORM
    elif how == "json":
        body, content_type = json.dumps({field: "deploy:now"}), JSON
    else:
        path += "?%s=deploy:now" % field

    reply = api.request("POST", path, body=body, content_type=content_type)

    assert reply.status == 200, reply
    task = api.wait_ended(reply.json["taskId"])
    assert (task["app"], task["env"], task["action"]) == (app, env, "deploy:now")
    assert shared_fake.invocation_for(app)["argv"][1:] == [app, env, "deploy:now"]


def test_names_and_body_at_their_size_limits_are_accepted(api):
    app, env, action = "a" * 64, unique("e") + "e" * 51, "x" * 128
    padded = json.dumps({"action": "deploy"}).encode()
    padded += b" " * (MAX_BODY - len(padded))

    longest = api.request("POST", "/%s/%s?action=%s" % (app, env, action))
    largest = api.request("POST", "/%s/%s" % (unique("app"), unique("env")), body=padded,
                          content_type=JSON)

    assert longest.status == 200, longest
    assert largest.status == 200, largest
    task = api.wait_ended(longest.json["taskId"])
    assert (task["app"], task["env"], task["action"]) == (app, env, action)
    api.wait_ended(largest.json["taskId"])


# --- Refused requests -------------------------------------------------------------------------

# Requests POST /APP/ENV refuses: (id, status, path, content type, body, extra request options).
# APP and ENV in the path are replaced by fresh valid names.
REFUSED = [
    ("missing-action", 400, "/APP/ENV", None, None, {}),
    ("empty-json-object", 400, "/APP/ENV", JSON, '{}', {}),
    ("empty-action", 400, "/APP/ENV?action=", None, None, {}),
    ("shell", 400, "/APP/ENV?action=shell", None, None, {}),
    ("invoke", 400, "/APP/ENV", FORM, "action=invoke", {}),
    ("Shell-in-json", 400, "/APP/ENV", JSON, '{"action": "Shell"}', {}),
    ("INVOKE-as-task", 400, "/APP/ENV?task=INVOKE", None, None, {}),
    ("star", 400, "/APP/ENV?action=%2A", None, None, {}),
    ("comma", 400, "/APP/ENV", FORM, "action=a%2Cb", {}),
    ("trailing-newline", 400, "/APP/ENV", FORM, "action=deploy%0A", {}),
    ("trailing-newline-in-query", 400, "/APP/ENV?action=deploy%0A", None, None, {}),
    ("leading-dash-action", 400, "/APP/ENV?action=-x", None, None, {}),
    ("action-129-chars", 400, "/APP/ENV?action=" + "a" * 129, None, None, {}),
    ("app-dot-dot-slash", 400, "/..%2Fx/ENV?action=deploy", None, None, {}),
    ("app-dot-dot", 400, "/../ENV?action=deploy", None, None, {}),
    ("app-65-chars", 400, "/" + "a" * 65 + "/ENV?action=deploy", None, None, {}),
    ("env-65-chars", 400, "/APP/" + "e" * 65 + "?action=deploy", None, None, {}),
    ("app-leading-dash", 400, "/-x/ENV?action=deploy", None, None, {}),
    ("app-encoded-slash", 400, "/my%2Fapp/ENV?action=deploy", None, None, {}),
    ("env-encoded-newline", 400, "/APP/prod%0A?action=deploy", None, None, {}),
    ("app-invalid-utf8", 400, "/app%FF/ENV?action=deploy", None, None, {}),
    ("query-invalid-utf8", 400, "/APP/ENV?action=%FF", None, None, {}),
    ("form-invalid-utf8", 400, "/APP/ENV", FORM, "action=%FF", {}),
    ("json-invalid-utf8", 400, "/APP/ENV", JSON, b'{"action": "\xff"}', {}),
    ("bad-json", 400, "/APP/ENV", JSON, '{"action": ', {}),
    ("json-array", 400, "/APP/ENV", JSON, '["deploy"]', {}),
    ("json-number-action", 400, "/APP/ENV", JSON, '{"action": 1}', {}),
    ("json-null-action", 400, "/APP/ENV", JSON, '{"action": null}', {}),
    ("json-list-action", 400, "/APP/ENV", JSON, '{"action": ["deploy"]}', {}),
    ("action-twice-in-form", 400, "/APP/ENV", FORM, "action=deploy&action=deploy", {}),
    ("action-twice-in-query", 400, "/APP/ENV?action=deploy&action=deploy", None, None, {}),
    ("action-twice-in-json", 400, "/APP/ENV", JSON, '{"action": "deploy", "action": "x"}', {}),
    ("action-in-query-and-form", 400, "/APP/ENV?action=deploy", FORM, "action=deploy", {}),
    ("action-in-query-and-json", 400, "/APP/ENV?action=deploy", JSON, '{"action": "deploy"}', {}),
    ("action-and-task", 400, "/APP/ENV?action=deploy&task=deploy", None, None, {}),
    ("action-and-task-in-json", 400, "/APP/ENV", JSON, '{"action": "deploy", "task": "x"}', {}),
    ("unknown-form-field", 400, "/APP/ENV", FORM, "action=deploy&force=1", {}),
    ("unknown-json-field", 400, "/APP/ENV", JSON, '{"action": "deploy", "force": true}', {}),
    ("unknown-query-field", 400, "/APP/ENV?action=deploy&force=1", None, None, {}),
    ("chunked-body", 411, "/APP/ENV", FORM, "action=deploy", {"chunked": True}),
    ("body-over-64-KiB", 413, "/APP/ENV", FORM, None, {"declared_length": MAX_BODY + 1}),
    ("multipart", 415, "/APP/ENV", "multipart/form-data; boundary=xyz",
     '--xyz\r\nContent-Disposition: form-data; name="action"\r\n\r\ndeploy\r\n--xyz--\r\n', {}),
    ("text-plain", 415, "/APP/ENV", "text/plain", "action=deploy", {}),
]


@pytest.mark.parametrize("case", REFUSED, ids=[case[0] for case in REFUSED])
def test_refused_create_answers_json_error_and_starts_nothing(api, shared_fake, case):
    env = unique("env")

    reply = send_refused(api, case, unique("app"), env)

    assert_json_error(reply, case[1])
    assert shared_fake.actions_run_for(env) == []


def test_ids_start_at_one_and_refused_requests_neither_use_an_id_nor_start_pulsar(
        start_server, fake):
    client = start_server().client()
    app, env = unique("app"), unique("env")

    first = client.create(app, env, "deploy")
    statuses = [send_refused(client, case, app, env).status for case in REFUSED]
    client.wait_ended(first)                # one task at a time on app/env
    second = client.create(app, env, "deploy")
    client.wait_ended(second)

    assert statuses == [case[1] for case in REFUSED]
    assert (first, second) == (1, 2)
    assert [run["argv"][1:] for run in fake.invocations()] == [[app, env, "deploy"]] * 2


REFUSED_ALIASES = ["shell:", "shell::", "invoke:", "rake:shell", "rake:rake:invoke", "SHELL:",
                   "rake::Invoke"]


def test_actions_that_resolve_to_shell_or_invoke_are_refused_but_a_namespaced_shell_runs(
        api, shared_fake):
    env = unique("env")

    refused = [api.request("POST", "/%s/%s?action=%s" % (unique("app"), env, action))
               for action in REFUSED_ALIASES]
    refused_runs = shared_fake.actions_run_for(env)
    app = unique("app")
    namespaced = api.request("POST", "/%s/prod?action=deploy:shell" % app)
    task = api.wait_ended(namespaced.json["taskId"]) if namespaced.status == 200 else None

    for action, reply in zip(REFUSED_ALIASES, refused):
        assert_json_error(reply, 400)
        assert "refused" in reply.json["error"], (action, reply)
    assert refused_runs == []
    assert namespaced.status == 200, namespaced
    assert (task["action"], task["status"]) == ("deploy:shell", "finished")
    assert shared_fake.invocation_for(app)["argv"][1:] == [app, "prod", "deploy:shell"]


def test_task_paths_are_never_a_create(api, shared_fake, ended_task):
    app, env = unique("app"), unique("env")
    before = api.create(app, env, "deploy")
    api.wait_ended(before)      # one task at a time per app and env

    posted = api.request("POST", "/task/%d" % ended_task, body="action=deploy", content_type=FORM)
    after = api.create(app, env, "deploy")

    assert_json_error(posted, 405)
    assert posted.headers["Allow"] == "GET"
    assert after == before + 1
    api.wait_ended(after)
    assert shared_fake.actions_run_for(env) == ["deploy", "deploy"]


def test_percent_encoded_task_path_is_the_task_route_and_never_an_app_named_task(api,
                                                                                 shared_fake):
    action = unique("x")

    reply = api.request("POST", "/%%74ask/prod?action=%s" % action)

    assert_json_error(reply, 405)
    assert reply.headers["Allow"] == "GET"
    assert shared_fake.actions_run_for(action) == []


# --- Routing and the shape of every response --------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/index.html"),
    ("GET", "/nope"),
    ("POST", "/a/b/c"),
    ("GET", "/task"),
    ("GET", "/task/abc"),
    ("GET", "/task/0"),
    ("GET", "/task/-1"),
    ("GET", "/task/99999"),
    ("GET", "/task/abc/state"),
    ("GET", "/task/99999/state"),
    ("GET", "/task/99999/kill"),
    ("POST", "/task/99999/kill"),
    ("GET", "/task/99999/nope"),
])
def test_unknown_route_or_task_answers_404(api, method, path):
    assert_json_error(api.request(method, path), 404)


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/task/ID", {"GET"}),
    ("PUT", "/task/ID", {"GET"}),
    ("POST", "/task/ID/state", {"GET"}),
    ("DELETE", "/task/ID/kill", {"GET", "POST"}),
    ("PUT", "/APP/ENV", {"POST"}),
    ("GET", "/APP/ENV", {"POST"}),
    ("DELETE", "/APP/ENV", {"POST"}),
])
def test_known_path_with_wrong_method_answers_405_with_allow(api, ended_task, method, path,
                                                             allowed):
    path = path.replace("ID", str(ended_task)).replace("APP", unique("app"))
    reply = api.request(method, path.replace("ENV", unique("env")))

    assert_json_error(reply, 405)
    assert {m.strip() for m in reply.headers["Allow"].split(",")} == allowed


def test_head_is_answered_405_without_a_body(shared_server, ended_task):
    request = ("HEAD /task/{0} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
               "GET /task/{0} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    received = exchange_until_closed(shared_server, request.format(ended_task).encode())

    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), head
    # Whatever follows the HEAD answer's headers is the next response, not a body.
    assert rest == b"" or rest.startswith(b"HTTP/1.1 200 "), rest[:200]


def test_every_response_is_json_with_content_length_no_store_and_nosniff(api, ended_task):
    hanging = api.create(unique("app"), unique("env"), "hang")
    replies = [
        api.request("POST", "/%s/%s?action=deploy" % (unique("app"), unique("env"))),
        api.get("/task/%d" % ended_task),
        api.get("/task/%d/state" % ended_task),
        api.kill(hanging),
        api.kill(hanging),
        api.request("POST", "/%s/%s?action=shell" % (unique("app"), unique("env"))),
        api.get("/nope"),
        api.request("DELETE", "/task/%d" % ended_task),
        api.request("POST", "/a/b", body="action=x", content_type=FORM, chunked=True),
        api.request("POST", "/a/b", content_type=FORM, declared_length=MAX_BODY + 1),
        api.request("POST", "/a/b", body="action=x", content_type="text/plain"),
    ]
    api.wait_ended(replies[0].json["taskId"])

    assert [reply.status for reply in replies] == [
        200, 200, 200, 200, 409, 400, 404, 405, 411, 413, 415]
    for reply in replies:
        assert reply.headers["Content-Type"].startswith("application/json"), reply
        assert reply.headers["Content-Length"] == str(len(reply.body)), reply
        assert_not_cached_and_not_sniffed(reply)
        assert isinstance(reply.json, dict), reply


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"POST /a/b HTTP/1.1\r\nHost: x\r\nContent-Type: " + FORM.encode()
    + b"\r\nContent-Length: abc\r\nConnection: close\r\n\r\naction=deploy",
    b"POST /a/b HTTP/1.1\r\nHost: x\r\nContent-Type: " + FORM.encode()
    + b"\r\nContent-Length: -5\r\nConnection: close\r\n\r\naction=deploy",
    b"GET /task/1?offset=1&offset=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
], ids=["garbage-request-line", "non-numeric-length", "negative-length", "offset-twice"])
def test_malformed_request_gets_a_json_4xx_not_a_500(shared_server, ended_task, request_bytes):
    reply = raw_exchange(shared_server, request_bytes)

    assert 400 <= reply.status < 500, reply
    assert_json_error(reply, reply.status)


REFUSED_AND_LOGGED = [
    # A CR inside a field, a folded field, a space before the colon: servers and proxies that
    # read them otherwise can be made to disagree about where a request ends (RFC 9112).
    ("bare-cr", b"POST /APP/prod?action=deploy HTTP/1.1\r\nHost: x\rContent-Length: 5\r\n"
                b"Content-Length: 0\r\n\r\n", 400, "malformed header line"),
    ("folded", b"POST /APP/prod?action=deploy HTTP/1.1\r\nHost: x\r\n Content-Length: 5\r\n"
               b"Content-Length: 0\r\n\r\n", 400, "malformed header line"),
    ("space-before-colon", b"POST /APP/prod?action=deploy HTTP/1.1\r\nHost : x\r\n"
                           b"Content-Length: 0\r\n\r\n", 400, "malformed header line"),
    # What curl sends with a big body: refused before the body comes, logged like any other.
    ("expect-100", b"POST /APP/prod HTTP/1.1\r\nHost: x\r\nContent-Type: " + FORM.encode()
                   + b"\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n",
     413, "the body is 99999999 bytes; the limit is 65536"),
    ("shell", b"POST /APP/prod?action=shell HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
     400, "action 'shell' is refused"),
]


@pytest.mark.parametrize("request_bytes, status, why",
                         [case[1:] for case in REFUSED_AND_LOGGED],
                         ids=[case[0] for case in REFUSED_AND_LOGGED])
def test_a_refused_request_starts_nothing_and_its_log_line_says_why(
        shared_server, shared_fake, request_bytes, status, why):
    app, log_start = unique("app"), len(shared_server.log())
    with tls_connection(shared_server) as tls:
        port = tls.getsockname()[1]
        tls.sendall(request_bytes.replace(b"APP", app.encode()))
        reply = read_reply(tls)
    about_it = wait_until(lambda: log_lines(shared_server, r"127\.0\.0\.1:%d " % port,
                                            since=log_start), what="the request's log line")

    assert_json_error(reply, status)
    assert why in reply.json["error"]
    assert len(about_it) == 1 and re.search(
        r"127\.0\.0\.1:%d POST '/%s/prod[^']*' %d \d+ \d+ms: .*%s" % (
            port, app, status, re.escape(why)), about_it[0]), about_it
    assert shared_fake.actions_run_for(app) == []


def test_keep_alive_serves_several_requests_on_one_connection(api, ended_task):
    conn = api.connection()
    try:
        conn.request("GET", "/task/%d" % ended_task)
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        local_address = sock.getsockname()
        conn.request("POST", "/%s/%s?action=deploy" % (unique("app"), unique("env")))
        second = conn.getresponse()
        created = json.loads(second.read().decode())
        conn.request("GET", "/task/%d" % ended_task)
        third = conn.getresponse()
        third.read()

        assert (first.status, second.status, third.status) == (200, 200, 200)
        assert not first.will_close and not second.will_close
        assert conn.sock is sock and sock.getsockname() == local_address
    finally:
        conn.close()
    api.wait_ended(created["taskId"])


# --- Task status and output -------------------------------------------------------------------

def test_finished_task_reports_exit_code_zero_pid_and_utc_times(api, shared_fake):
    app, env = unique("app"), unique("env")
    before = datetime.datetime.now(datetime.timezone.utc)
    task_id = api.create(app, env, "out-2")

    api.wait_ended(task_id)
    task = api.task(task_id)

    assert TASK_KEYS <= set(task)
    assert (task["id"], task["app"], task["env"], task["action"]) == (task_id, app, env, "out-2")
    assert (task["status"], task["exitCode"]) == ("finished", 0)
    assert task["output"] == "out 1\nout 2\n"
    assert (task["outputOffset"], task["outputLength"]) == (0, 12)
    assert task["pid"] == shared_fake.invocation_for(app)["pid"]
    created, finished = parse_utc(task["createdAt"]), parse_utc(task["finishedAt"])
    slack = datetime.timedelta(seconds=2)
    assert before - slack <= created <= finished
    assert finished <= datetime.datetime.now(datetime.timezone.utc) + slack


def test_nonzero_exit_makes_task_failed_with_that_exit_code(api):
    task_id = api.create(unique("app"), unique("env"), "out-1.exit-3")

    task = api.wait_ended(task_id)

    assert (task["status"], task["exitCode"], task["output"]) == ("failed", 3, "out 1\n")
    parse_utc(task["finishedAt"])


def test_task_ended_by_a_foreign_signal_is_failed_with_null_exit_code(api):
    task_id = api.create(unique("app"), unique("env"), "out-1.signal-9")

    task = api.wait_ended(task_id)

    assert (task["status"], task["exitCode"], task["output"]) == ("failed", None, "out 1\n")


def test_pulsar_that_cannot_start_gives_a_failed_task_saying_so(pulsarless_server):
    client = pulsarless_server.client()

    reply = client.request("POST", "/%s/prod?action=deploy" % unique("app"))

    assert reply.status == 200, reply
    task = client.wait_ended(reply.json["taskId"])
    assert (task["status"], task["exitCode"], task["pid"], task["startedAt"]) == (
        "failed", None, None, None)
    assert "could not start" in task["output"]
    parse_utc(task["finishedAt"])


def test_running_task_shows_its_output_so_far(api, shared_fake):
    gate = shared_fake.gate()
    app = unique("app")
    task_id = api.create(app, unique("env"), "out-2.gate-%s.out-1" % gate.name)

    api.wait_at_gate(task_id, gate)
    running = api.task(task_id)
    gate.release()
    ended = api.wait_ended(task_id)

    assert running["status"] == "running"
    assert (running["exitCode"], running["finishedAt"]) == (None, None)
    assert running["output"] == "out 1\nout 2\n" + gate.line
    assert running["pid"] == shared_fake.invocation_for(app)["pid"]
    assert ended["status"] == "finished"
    assert ended["output"] == running["output"] + "out 1\n"
    assert ended["version"] > running["version"] >= 1


def test_pulsar_runs_in_its_own_session_with_null_stdin_and_one_output_pipe(
        api, shared_server, shared_fake):
    app, env = unique("app"), unique("env")
    task_id = api.create(app, env, "deploy")

    task = api.wait_ended(task_id)
    run = shared_fake.invocation_for(app)

    assert run["argv"] == [str(shared_fake.path), app, env, "deploy"]
    assert task["output"] == json.dumps(run["argv"]) + "\n"
    # A process group of its own, in a session of its own (its keeper's), not the server's.
    assert run["pid"] == run["pgid"] == task["pid"]
    assert run["sid"] not in (run["pid"], os.getsid(shared_server.proc.pid), os.getsid(0))
    assert run["fds"][0] == "/dev/null"
    assert run["fds"][1] == run["fds"][2] and run["fds"][1].startswith("pipe:")
    # Its own empty working folder (pulsar 0.x reads a config.ru there), gone once it ended.
    folders = shared_server.workdir / "tasks.sqlite3.tasks"
    assert os.path.realpath(run["cwd"]) == os.path.realpath(str(folders / str(task_id) / "work"))
    assert run["cwd_entries"] == []
    wait_until(lambda: not (folders / str(task_id)).exists(),
               what="the task's folder to go once the history holds all of it")


@pytest.mark.parametrize("flags, expected", [
    (["--config-repo", "git@example.com:conf.git"],
     ["--conf-repo", "git@example.com:conf.git", "--conf-branch", "master"]),
    (["--config-repo", "git@example.com:conf.git", "--config-branch", "staging"],
     ["--conf-repo", "git@example.com:conf.git", "--conf-branch", "staging"]),
    (["--pulsar-cli", "v1"], ["task"]),
    (["--pulsar-cli", "v1", "--config-repo", "/srv/conf"], ["task", "--conf-repo", "/srv/conf"]),
], ids=["classic-repo", "classic-repo-branch", "v1", "v1-repo"])
def test_pulsar_command_line_follows_cli_flavour_and_config_flags(shared_server_with, flags,
                                                                  expected):
    server = shared_server_with(*flags)
    client, fake = server.client(), server.fake
    app, env = unique("app"), unique("env")

    client.wait_ended(client.create(app, env, "deploy"))

    assert fake.invocation_for(app)["argv"] == [str(fake.path)] + expected + [app, env, "deploy"]


def test_stdout_and_stderr_are_merged_in_order(api):
    task_id = api.create(unique("app"), unique("env"), "mix-6.err-1.out-1")

    task = api.wait_ended(task_id)

    assert task["output"] == "out 1\nerr 2\nout 3\nerr 4\nout 5\nerr 6\nerr 1\nout 1\n"


def test_offset_returns_output_from_that_character_on(api):
    task_id = api.create(unique("app"), unique("env"), "out-3")
    api.wait_ended(task_id)

    tail = api.task(task_id, offset=6)
    end = api.task(task_id, offset=18)
    beyond = api.get("/task/%d?offset=19" % task_id)

    assert (tail["outputOffset"], tail["outputLength"], tail["output"]) == (6, 18, "out 2\nout 3\n")
    assert (end["outputOffset"], end["output"]) == (18, "")
    assert_json_error(beyond, 400)


def test_character_split_across_two_writes_arrives_intact(api):
    task_id = api.create(unique("app"), unique("env"), "utf8split")

    task = api.wait_ended(task_id)
    tail = api.task(task_id, offset=1)

    assert (task["output"], task["outputLength"]) == ("a\u20acb\n", 4)
    assert tail["output"] == "\u20acb\n"


def test_invalid_utf8_bytes_become_replacement_characters(api):
    task = api.wait_ended(api.create(unique("app"), unique("env"), "badbytes"))

    assert task["output"] == "ok \ufffd\ufffd end\n"
    assert task["status"] == "finished"


def test_output_with_a_nul_character_reads_back_from_every_offset_live_and_after_a_restart(
        start_server, fake, tmp_path):
    db, first, client, gate, task_id, _ = task_at_gate(start_server, fake, tmp_path,
                                                       "nul.gate-%s.out-1")
    live = "a\0bcdef\n" + gate.line

    def read_back(client, length):
        offsets = range(length + 1)
        as_json = client.get_each(["/task/%d?offset=%d" % (task_id, offset) for offset in offsets])
        as_text = client.get_each(["/task/%d/output?offset=%d" % (task_id, offset)
                                   for offset in offsets])
        return dict(zip(offsets, zip(as_json, as_text)))

    while_live = read_back(client, len(live))
    gate.release()
    client.wait_ended(task_id)
    whole = live + "out 1\n"
    ended = read_back(client, len(whole))
    first.stop_cleanly()
    restarted = read_back(start_server("--db", db).client(), len(whole))

    for text, replies in ((live, while_live), (whole, ended), (whole, restarted)):
        for offset, (as_json, as_text) in replies.items():
            assert as_json.status == 200 and as_text.status == 200, (offset, as_json, as_text)
            assert as_json.json["output"] == text[offset:], offset
            # As text for a terminal: the NUL, a control character, is left out.
            assert as_text.body.decode("utf-8") == text[offset:].replace("\0", ""), offset
            assert as_json.json["outputLength"] == len(text)


# --- pulsar's versions, how a task's end is judged, and the apps pulsar knows -----------------

V1 = {"FAKE_PULSAR_VERSION": "1.1.0"}      # the fake answers --version as pulsar 1.1.0 does


@pytest.mark.parametrize("version, form", [
    ("1.1.0", ["task"]), ("2.0.1", ["task"]), ("0.3.5", []), (None, [])])
def test_the_command_line_form_follows_the_version_pulsar_names(shared_server_with, version,
                                                                 form):
    env = {"FAKE_PULSAR_VERSION": version} if version else {}
    server = shared_server_with(env=env)
    client, fake = server.client(), server.fake
    app, env_name = unique("app"), unique("env")

    client.wait_ended(client.create(app, env_name, "deploy"))

    assert fake.invocation_for(app)["argv"][1:] == form + [app, env_name, "deploy"]
    assert client.get("/health").json["pulsar"] == version
    if version:
        assert log_lines(server, r"INFO pulsar %s, %s form: tasks run: " % (
            re.escape(version), "v1" if form else "classic"))
    else:
        assert log_lines(server, r"WARNING .*pulsar --version names no pulsar version: tasks "
                                 r"run in the classic form: ")


# pulsar set-ups that cannot work: (id, flags, environment, what the one line must mention).
PULSAR_CLI_ERRORS = [
    ("pulsar-1.0", [], {"FAKE_PULSAR_VERSION": "1.0.2"}, ["1.0.2", "upgrade", "task"]),
    ("classic-with-1.1", ["--pulsar-cli", "classic"], V1, ["classic", "1.1.0", "v1"]),
    ("v1-with-0.3", ["--pulsar-cli", "v1"], {"FAKE_PULSAR_VERSION": "0.3.5"}, ["v1", "0.3.5"]),
    ("branch-with-1.1", ["--config-repo", "R", "--config-branch", "X"], V1,
     ["--config-branch", "1.1.0"]),
    ("missing-pulsar", ["--pulsar-bin", "/nonexistent/pulsar"], {}, ["/nonexistent/pulsar",
                                                                     "gem install pulsar"]),
    ("version-fails", [], {"FAKE_PULSAR_VERSION": "can't find gem pulsar",
                           "FAKE_PULSAR_VERSION_EXIT": "1"},
     ["--version failed (exit code 1", "can't find gem pulsar", "--pulsar-cli classic"]),
]


@pytest.fixture(scope="module")
def pulsar_error_runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pulsar-errors")
    runs = run_side_by_side(directory, {case_id: (flags, env)
                                        for case_id, flags, env, _ in PULSAR_CLI_ERRORS})
    yield runs
    assert_no_process_left([str(directory) + os.sep])


@pytest.mark.parametrize("case_id, words", [(case[0], case[3]) for case in PULSAR_CLI_ERRORS])
def test_a_pulsar_that_cannot_work_as_set_up_is_a_one_line_start_up_error(pulsar_error_runs,
                                                                          case_id, words):
    line = one_error_line(pulsar_error_runs[case_id].result())

    assert line.startswith(CLI_ERROR_PREFIX), line
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize("action, status, outcome", [
    ("out-1.succeed", "finished", "pulsar reported success: Executed task out-1.succeed for "),
    ("succeed.say-more", "failed", "without its success line"),
    ("out-1.fail1x", "failed", "pulsar reported failure: Failed to execute task out-1.fail1x "),
    ("out-2", "failed", "it printed last: 'out 2'"),
    ("partial", "failed", "it printed last: 'no newline'"),
    ("succeed.exit-3", "failed", "pulsar exited with code 3"),
    ("succeed.nulafter", "finished", "pulsar reported success: "),
    # What a child prints once pulsar has gone is not pulsar's last word.
    ("lateline.fail1x", "failed", "pulsar reported failure: Failed to execute task "),
    ("lategroup.fail1x", "failed", "pulsar reported failure: Failed to execute task "),
    ("lateline.succeed", "finished", "pulsar reported success: "),
])
def test_pulsar_1x_exits_0_so_only_its_success_line_as_its_last_word_makes_a_task_finished(
        shared_server_with, action, status, outcome):
    server = shared_server_with(env=V1)
    client = server.client()
    app, env = unique("app"), unique("env")

    task = client.wait_ended(client.create(app, env, action))
    stream = client.get("/task/%d/stream" % task["id"]).body.decode()
    listed = client.listing("app=" + app)["tasks"][0]

    assert (task["status"], listed["status"], listed["outcome"]) == (
        status, status, task["outcome"])
    assert outcome in task["outcome"], task["outcome"]
    assert stream.endswith(end_line(task["id"], status, task["exitCode"], task["outcome"]))
    assert log_lines(server, r"INFO task %d %s \(exit code %s\) after .*: %s" % (
        task["id"], status, task["exitCode"], re.escape(task["outcome"])))


def test_pulsar_1x_run_in_the_classic_form_by_mistake_still_fails_what_it_says_failed(api):
    thor = api.wait_ended(api.create(unique("app"), unique("env"), "thorerror"))
    pulsar = api.wait_ended(api.create(unique("app"), unique("env"), "fail1x"))

    assert (thor["status"], thor["exitCode"]) == ("failed", 0)
    assert thor["outcome"] == ('pulsar exited with code 0 but reported failure: ERROR: '
                               '"pulsar help" was called with arguments ["a", "b"]')
    assert (pulsar["status"], pulsar["exitCode"]) == ("failed", 0)
    assert "but reported failure: Failed to execute task fail1x" in pulsar["outcome"]


def test_relative_pulsar_and_repository_paths_mean_what_they_meant_where_the_server_started(
        start_server, fake, tmp_path):
    (tmp_path / "conf").mkdir()
    server = start_server("--config-repo", "../conf", pulsar_bin="../fake/pulsar")
    client = server.client()
    app = unique("app")

    task = client.wait_ended(client.create(app, "prod", "deploy"))

    assert task["status"] == "finished"
    assert fake.invocation_for(app)["argv"][1:3] == ["--conf-repo", str(tmp_path / "conf")]


def test_the_success_line_counts_even_past_max_output(start_server):
    server = start_server("--max-output", "64K", env=V1)
    client = server.client()

    task = client.wait_ended(client.create(unique("app"), "prod", "flood-1.succeed"))

    assert task["output"].endswith(DROPPED % (64 * 1024))
    assert (task["status"], task["exitCode"]) == ("finished", 0), task["outcome"]


def test_a_failed_deploy_is_failed_in_the_metrics_and_in_the_history_after_a_restart(
        start_server, tmp_path):
    db = tmp_path / "history.sqlite3"
    server = start_server("--db", db, env=V1)
    client = server.client()
    failed = client.wait_ended(client.create(unique("app"), "prod", "fail1x"))
    finished = client.wait_ended(client.create(unique("app"), "prod", "succeed"))
    metrics = client.metrics()
    server.stop_cleanly()
    again = start_server("--db", db, env=V1).client()

    assert metrics['pulsar_rest_api_tasks_finished_total{status="failed"}'] == 1
    assert metrics['pulsar_rest_api_tasks_finished_total{status="finished"}'] == 1
    assert again.task(failed["id"]) == failed
    assert again.task(finished["id"]) == finished


def test_a_killed_task_leaves_no_pulsar_run_folder_and_another_tasks_stays(api, shared_fake):
    killed = api.create(unique("app"), unique("env"), "runfolder.hang")
    running_gate = shared_fake.gate()
    kept = api.create(unique("app"), unique("env"), "runfolder.gate-%s" % running_gate.name)
    folders = {}
    for task_id in (killed, kept):
        line = api.wait_output(task_id, "run folder ")["output"]
        folders[task_id] = Path(re.search(r"run folder (\S+)", line).group(1))
    assert all(folder.is_dir() for folder in folders.values())

    reply = api.kill(killed)
    running_gate.release()
    api.wait_ended(kept)

    assert reply.status == 200 and reply.json["status"] == "killed", reply
    assert not folders[killed].exists()
    assert folders[kept].is_dir()       # it ended by itself: pulsar removes its own folder
    shutil.rmtree(str(folders[kept]))


def test_a_killed_task_leaves_no_run_folder_it_only_held_open(api, shared_fake):
    task_id = api.create(unique("app"), unique("env"), "runfolderfd.hang")
    line = api.wait_output(task_id, "run folder ")["output"]
    folder = Path(re.search(r"run folder (\S+)", line).group(1))

    reply = api.kill(task_id)

    assert reply.status == 200 and reply.json["status"] == "killed", reply
    assert not folder.exists()


def test_pulsar_is_told_to_keep_thor_and_bundler_deprecations_to_itself(api, shared_fake):
    app = unique("app")
    api.wait_ended(api.create(app, unique("env"), "deploy"))

    environment = shared_fake.invocation_for(app)["env"]

    assert environment["THOR_SILENCE_DEPRECATION"] == "1"
    assert environment["BUNDLE_SILENCE_DEPRECATIONS"] == "true"


def apps_listed(server, text):
    """Make the fake's `list` print text."""
    (server.fake.dir / "apps.txt").write_text(text)


def lists_run(server):
    path = server.fake.dir / "lists.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_apps_lists_what_pulsar_knows_once_and_again_when_a_task_names_an_unknown_pair(
        start_server, fake):
    (fake.dir / "apps.txt").write_text("\x1b[36mblog\x1b[0m: production, staging\n")
    server = start_server("--config-repo", "file:///srv/conf", env=V1)
    client = server.client()

    first = client.get("/apps")
    second = client.get("/apps")
    listed_once = len(lists_run(server))
    apps_listed(server, "blog: production, staging\nshop: production\n")
    client.wait_ended(client.create("shop", "production", "deploy"))
    wait_until(lambda: len(lists_run(server)) == 2, what="a second listing")
    third = wait_until(lambda: (lambda reply: reply if len(reply.json["apps"]) == 2 else None)(
        client.get("/apps")), what="the new list to be served")

    assert first.status == 200, first
    assert first.json["apps"] == [{"name": "blog", "envs": ["production", "staging"]}]
    parse_utc(first.json["listedAt"])
    assert second.json == first.json and listed_once == 1
    assert lists_run(server)[0][1:] == ["list", "--conf-repo", "file:///srv/conf"]
    assert third.json["apps"][1] == {"name": "shop", "envs": ["production"]}


def test_apps_says_why_it_cannot_list_and_tasks_still_start(start_server, fake):
    (fake.dir / "apps.txt").write_text(
        "Failed to list application and environments.\n"
        "Command failed with status (128): [git clone --quiet --depth 1 file:///nonexi...]\n")
    server = start_server(env=V1)
    client = server.client()
    classic = start_server().client()       # no pulsar-utils beside this fake

    failing = client.get("/apps")
    task = client.wait_ended(client.create(unique("app"), "prod", "succeed"))
    cannot = classic.get("/apps")

    assert_json_error(failing, 503)
    assert "Command failed with status (128)" in failing.json["error"]
    assert task["status"] == "finished"
    assert_json_error(cannot, 501)
    assert "pulsar-utils" in cannot.json["error"]


def test_apps_lists_once_for_many_requests_while_it_cannot_list_and_once_for_many_tasks(
        start_server, fake):
    (fake.dir / "apps.txt").write_text("Failed to list application and environments.\n")
    server = start_server(env=V1)
    client = server.client()

    failing = run_side_by_side_requests(client, ["/apps"] * 6)
    listed_for_requests = len(lists_run(server))
    apps_listed(server, "blog: production\nbad name: x\nshop: production, <img>\n"
                        "warning: this is not an app\n")
    client.get("/apps")         # still the failure: it is kept for a while
    (fake.dir / "apps.sleep").write_text("0.5")
    ids = [client.create(unique("app"), "prod", "out-1") for _ in range(6)]
    for task_id in ids:
        client.wait_ended(task_id)
    wait_until(lambda: len(lists_run(server)) >= 2, what="a listing for the unknown pairs")

    assert {reply.status for reply in failing} == {503}
    assert listed_for_requests == 1
    # One for the requests; for the six tasks, one listing, and one more for those that came
    # while it ran.
    assert len(lists_run(server)) <= 3


def run_side_by_side_requests(client, paths):
    """GET each path, all at once, each on a connection of its own; the replies in order."""
    replies = [None] * len(paths)

    def get(index):
        replies[index] = client.get(paths[index])

    threads = [threading.Thread(target=get, args=(index,)) for index in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    return replies


def test_apps_lists_only_names_a_task_could_be_started_with(start_server, fake):
    (fake.dir / "apps.txt").write_text("blog: production\nbad name: x\nshop: production, <img>\n"
                                       "warning: this is not an app\nweb: staging\n")
    client = start_server(env=V1).client()

    apps = client.get("/apps").json["apps"]

    assert apps == [{"name": "blog", "envs": ["production"]}, {"name": "web", "envs": ["staging"]}]


def test_config_branch_with_a_plain_folder_and_pulsar_0x_is_a_start_up_warning(start_server,
                                                                               tmp_path):
    server = start_server("--config-repo", tmp_path, "--config-branch", "other",
                          env={"FAKE_PULSAR_VERSION": "0.3.5"})
    by_url = start_server("--config-repo", "file://%s" % tmp_path, "--config-branch", "other",
                          env={"FAKE_PULSAR_VERSION": "0.3.5"})

    assert log_lines(server, r"WARNING --config-branch other is ignored: .* give it as "
                             r"file://%s " % re.escape(str(tmp_path)))
    assert not log_lines(by_url, "--config-branch")


# --- Killing ----------------------------------------------------------------------------------

def test_kill_ends_the_whole_process_tree_and_a_second_kill_is_409(api, shared_fake):
    task_id, _, pids = start_process_tree(api, shared_fake)

    killed, took = timed(lambda: api.kill(task_id, method="POST"))
    gone = are_gone(pids)
    again = api.kill(task_id, method="GET")

    assert killed.status == 200, killed
    assert killed.json["id"] == task_id
    assert (killed.json["status"], killed.json["exitCode"]) == ("killed", None)
    parse_utc(killed.json["finishedAt"])
    assert gone == {"fake": True, "child": True}
    assert took < SHARED_GRACE + 2
    assert_json_error(again, 409)
    assert api.task(task_id)["status"] == "killed"


def test_kill_escalates_to_sigkill_when_sigterm_is_ignored(api, shared_fake):
    task_id, _, pids = start_process_tree(api, shared_fake, "ignoreterm.")

    killed, took = timed(lambda: api.kill(task_id, method="GET"))

    assert killed.status == 200, killed
    assert (killed.json["status"], killed.json["exitCode"]) == ("killed", None)
    assert are_gone(pids) == {"fake": True, "child": True}
    assert SHARED_GRACE * 0.8 <= took < SHARED_GRACE + 2


def test_kill_of_an_ended_task_is_409_and_changes_nothing(api, ended_task):
    before = api.task(ended_task)

    reply = api.kill(ended_task)

    assert_json_error(reply, 409)
    assert api.task(ended_task) == before


# --- Long poll --------------------------------------------------------------------------------

def test_poll_returns_new_output_when_the_task_changes(api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "out-1.gate-%s.out-2" % gate.name)
    before = api.wait_at_gate(task_id, gate)

    conn = api.connection()
    try:
        conn.request("GET", "/task/%d/state?version=%d" % (task_id, before["version"]))
        gate.release()
        response = conn.getresponse()
        body = json.loads(response.read().decode())
    finally:
        conn.close()

    assert response.status == 200
    assert body["changed"] is True
    task = body["task"]
    assert task["version"] > before["version"]
    assert task["outputLength"] > before["outputLength"]
    assert task["output"].startswith(before["output"])
    assert task["output"][len(before["output"]):] in ("out 1\n", "out 1\nout 2\n")
    api.wait_ended(task_id)


def test_poll_returns_at_once_when_the_task_has_ended(api, ended_task):
    final = api.task(ended_task)

    replies, took = timed(lambda: [
        api.get("/task/%d/state?version=%d" % (ended_task, final["version"])),
        api.get("/task/%d/state?version=%d&offset=%d"
                % (ended_task, final["version"], final["outputLength"])),
        api.get("/task/%d/state" % ended_task)])

    assert [reply.status for reply in replies] == [200, 200, 200]
    assert [reply.json["changed"] for reply in replies] == [True, True, True]
    assert replies[0].json["task"] == final
    assert replies[1].json["task"]["output"] == ""
    assert took < 3  # the shared server's poll timeout is 30 s


def test_poll_returns_at_once_when_version_or_offset_is_behind(api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "out-2.gate-" + gate.name)
    now = api.wait_at_gate(task_id, gate)
    version, length = now["version"], now["outputLength"]

    (old_version, old_offset), took = timed(lambda: (
        api.get("/task/%d/state?version=%d" % (task_id, version - 1)),
        api.get("/task/%d/state?offset=%d" % (task_id, length - 2))))
    gate.release()
    api.wait_ended(task_id)

    assert old_version.json["changed"] is True
    assert old_version.json["task"]["output"] == now["output"]
    assert old_offset.json["changed"] is True
    assert old_offset.json["task"]["outputOffset"] == length - 2
    assert old_offset.json["task"]["output"] == now["output"][-2:]
    assert took < 3  # the shared server's poll timeout is 30 s


def test_poll_answers_unchanged_after_the_poll_timeout(shared_server_with):
    server = shared_server_with("--poll-timeout", SHORT_POLL)
    client = server.client()
    gate = server.fake.gate()
    task_id = client.create(unique("app"), unique("env"), "gate-" + gate.name)
    now = client.wait_at_gate(task_id, gate)

    reply, took = timed(lambda: client.get("/task/%d/state?version=%d&offset=%d"
                                           % (task_id, now["version"], now["outputLength"])))
    gate.release()
    client.wait_ended(task_id)

    assert reply.status == 200
    assert reply.json == {"changed": False}
    assert 0.9 * SHORT_POLL <= took < SHORT_POLL + 2


def test_follow_loop_misses_nothing_and_receives_only_new_output(api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"),
                         "chatty-1000.gate-%s.chatty-1000" % gate.name)
    expected = ("".join("step 0 line %05d\n" % i for i in range(1, 1001))
                + gate.line
                + "".join("step 2 line %05d\n" % i for i in range(1, 1001)))

    version, offset, pieces, released = 0, 0, [], False
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, "follow loop did not see the end"
        reply = api.get("/task/%d/state?version=%d&offset=%d" % (task_id, version, offset))
        assert reply.status == 200, reply
        if not reply.json["changed"]:
            continue
        task = reply.json["task"]
        assert task["outputOffset"] == offset
        assert len(task["output"]) == task["outputLength"] - offset
        assert task["version"] > version
        pieces.append(task["output"])
        version, offset = task["version"], task["outputLength"]
        if not released and gate.line in "".join(pieces):
            gate.release()
            released = True
        if task["status"] != "running":
            break

    assert "".join(pieces) == expected
    assert len([piece for piece in pieces if piece]) >= 2
    assert api.task(task_id)["output"] == expected


@pytest.mark.parametrize("query", [
    "version=abc", "version=-1", "version=1.5", "offset=x", "offset=-1", "since=3",
    "version=1&verbose=1"])
def test_state_rejects_bad_version_offset_or_unknown_parameter(api, ended_task, query):
    assert_json_error(api.get("/task/%d/state?%s" % (ended_task, query)), 400)


# --- Following live: plain-text output, streams, events ---------------------------------------

def test_output_is_plain_text_from_an_offset_with_its_size_more_data_and_status_in_headers(
        api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "unicode.gate-%s.out-1" % gate.name)
    running = UNICODE_LINE + gate.line
    api.wait_at_gate(task_id, gate)

    whole = api.get("/task/%d/output" % task_id)
    from_offset = api.get("/task/%d/output?offset=3" % task_id)     # characters, not bytes
    at_end = api.get("/task/%d/output?offset=%d" % (task_id, len(running)))
    gate.release()
    api.wait_ended(task_id)
    ended = api.get("/task/%d/output?offset=0" % task_id)

    assert_text_reply(whole, running, len(running), "running")
    assert_text_reply(from_offset, running[3:], len(running), "running")
    assert_text_reply(at_end, "", len(running), "running")
    assert_text_reply(ended, running + "out 1\n", len(running) + 6, "finished")


def test_output_wait_returns_once_new_output_arrives_and_at_once_for_an_ended_task(
        api, shared_fake, ended_task):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "out-1.gate-%s.out-2" % gate.name)
    now = api.wait_at_gate(task_id, gate)
    length = now["outputLength"]

    conn = api.connection()
    try:
        conn.request("GET", "/task/%d/output?offset=%d&wait=1" % (task_id, length))
        waiting = wait_until(lambda: metrics_when(api, lambda m: m[WAITERS] == 1),
                             what="the output request to wait")
        gate.release()
        response = conn.getresponse()
        arrived = Reply(response, response.read())
    finally:
        conn.close()
    api.wait_ended(task_id)
    ended, took = timed(lambda: api.get("/task/%d/output?offset=18&wait=1" % ended_task))

    assert waiting[WAITERS] == 1
    assert arrived.status == 200, arrived
    assert arrived.body.decode("utf-8") in ("out 1\n", "out 1\nout 2\n")
    assert int(arrived.headers["X-Text-Size"]) == length + len(arrived.body)
    assert_text_reply(ended, "", 18, "finished")
    assert took < 3     # the shared server's poll timeout is 30 s


def test_output_tail_gives_the_last_lines_and_bad_or_conflicting_queries_are_refused(
        api, ended_task):
    last_two = api.get("/task/%d/output?tail=2" % ended_task)
    more_than_all = api.get("/task/%d/output?tail=5" % ended_task)
    refused = [api.get("/task/%d/output?%s" % (ended_task, query)) for query in (
        "tail=2&offset=0", "tail=2&wait=1", "tail=0", "tail=-1", "offset=19", "offset=x",
        "since=3")]
    unknown = api.get("/task/99999/output")

    assert_text_reply(last_two, "out 2\nout 3\n", 18, "finished")
    assert_text_reply(more_than_all, "out 1\nout 2\nout 3\n", 18, "finished")
    for reply in refused:
        assert_json_error(reply, 400)
    assert_json_error(unknown, 404)


def test_stream_sends_output_as_it_comes_in_one_chunked_reply_ending_with_how_the_task_ended(
        api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "out-1.gate-%s.out-2" % gate.name)

    conn, response = open_stream(api, "/task/%d/stream" % task_id)
    try:
        first = response.readline()
        seen = first
        while b"gate " not in seen:     # the task now waits at its gate
            line = response.readline()
            assert line, "the stream ended early: %r" % seen
            seen += line
        running = api.task(task_id)["status"]
        gate.release()
        rest = response.read()
    finally:
        conn.close()

    assert response.status == 200
    assert response.getheader("Content-Type") == TEXT
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    assert (first, running) == (b"out 1\n", "running")
    assert (seen + rest).decode("utf-8") == "out 1\ngate %s\nout 1\nout 2\n%s" % (
        gate.name, end_line(task_id, "finished", 0))


def test_stream_ends_with_the_exit_code_of_a_failed_task_on_a_line_of_its_own_from_an_offset(
        api, ended_task):
    failed = api.create(unique("app"), unique("env"), "out-1.exit-3")
    partial = api.create(unique("app"), unique("env"), "out-1.partial")
    api.wait_ended(failed)
    api.wait_ended(partial)

    failed_stream = api.get("/task/%d/stream" % failed)
    partial_stream = api.get("/task/%d/stream" % partial)
    from_offset = api.get("/task/%d/stream?offset=6" % ended_task)

    assert failed_stream.headers["Content-Type"] == TEXT
    assert failed_stream.body.decode() == "out 1\n" + end_line(failed, "failed", 3)
    assert partial_stream.body.decode() == "out 1\nno newline\n" + end_line(partial, "finished", 0)
    assert from_offset.body.decode() == "out 2\nout 3\n" + end_line(ended_task, "finished", 0)


@pytest.mark.parametrize("accept", ["text", "events"])
def test_stream_of_an_unknown_task_or_from_past_the_end_is_one_json_error_not_a_stream(
        shared_server, ended_task, accept):
    headers = ["Accept: text/event-stream"] if accept == "events" else []

    for path, status in (("/task/99999/stream", 404),
                         ("/task/%d/stream?offset=19" % ended_task, 400)):
        received = raw_get(shared_server, path, headers)
        head, _, body = received.partition(b"\r\n\r\n")

        assert head.startswith(b"HTTP/1.1 %d " % status), received
        assert b"Transfer-Encoding" not in head, received
        assert list(json.loads(body.decode("utf-8"))) == ["error"], received


def test_stream_of_a_task_killed_while_followed_ends_with_exit_code_none(api):
    task_id = api.create(unique("app"), unique("env"), "out-1.hang")

    conn, response = open_stream(api, "/task/%d/stream" % task_id)
    try:
        first = response.readline()
        killed = api.kill(task_id)
        rest = response.read()
    finally:
        conn.close()

    assert killed.status == 200, killed
    assert first == b"out 1\n"
    assert re.fullmatch(re.escape(end_line(task_id, "killed", "none", "killed by "))[:-4]
                        + r"127\.0\.0\.1:\d+\]\n", rest.decode("utf-8")), rest


def test_http_1_0_stream_comes_unchunked_and_ends_with_the_connection(api, shared_server,
                                                                      ended_task):
    received = exchange_until_closed(
        shared_server, b"GET /task/%d/stream HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % ended_task)
    head, _, body = received.partition(b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert body == (api.task(ended_task)["output"]
                    + end_line(ended_task, "finished", 0)).encode()


def test_event_stream_sends_status_output_and_end_and_resumes_from_last_event_id_exactly(
        api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "unicode.out-1.gate-%s.out-2" % gate.name)
    path = "/task/%d/stream" % task_id

    conn, first = open_stream(api, path, EVENTS)
    try:        # leave once the gate line has come, as a browser that loses its connection
        before = read_events_until(first, lambda events: "gate " in output_texts(events))
    finally:
        conn.close()
    last_id = [event["id"] for event in before if "id" in event][-1]
    conn, second = open_stream(api, path, dict(EVENTS, **{"Last-Event-ID": last_id}))
    try:
        resumed = read_events_until(second, lambda events: len(events) == 2)
        gate.release()
        resumed += read_events_until(second, lambda events: events[-1].get("event") == "end")
        after_end = read_event(second)
    finally:
        conn.close()
    final = api.task(task_id)

    for response in (first, second):
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        assert response.getheader("Transfer-Encoding") == "chunked"
    for events in (before, resumed):
        assert events[0] == {"retry": "3000"}
        assert events[1]["event"] == "status" and "id" not in events[1]
        assert json.loads(events[1]["data"])["status"] == "running"
    outputs = [event for event in before + resumed if event.get("event") == "output"]
    offset = 0
    for event in outputs:
        data = json.loads(event["data"])
        assert set(data) == {"offset", "text"}, data
        assert data["offset"] == offset and data["text"], (event, offset)
        offset += len(data["text"])
        assert event["id"] == str(offset), event
    assert json.loads(resumed[2]["data"])["offset"] == int(last_id)
    assert output_texts(before) + output_texts(resumed) == final["output"]
    assert final["output"] == UNICODE_LINE + "out 1\ngate %s\nout 1\nout 2\n" % gate.name
    assert [event["event"] for event in resumed[-1:]] == ["end"]
    end = json.loads(resumed[-1]["data"])
    assert "output" not in end
    del final["output"], final["outputOffset"], end["outputOffset"]
    assert end == final and end["status"] == "finished"
    assert after_end == {}


def test_client_that_leaves_mid_stream_costs_nothing_afterwards(api, shared_server, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "out-1.gate-%s.out-1" % gate.name)
    api.wait_at_gate(task_id, gate)
    log_start = len(shared_server.log())

    with tls_connection(shared_server) as tls:
        port = tls.getsockname()[1]
        tls.sendall(b"GET /task/%d/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % task_id)
        received = b""
        while b"out 1\n" not in received:
            data = tls.recv(65536)
            assert data, received
            received += data
    settled = wait_until(lambda: metrics_when(api, lambda m: m[CONNECTIONS] == 1
                                              and m[WAITERS] == 0),
                         timeout=5, what="the stream's connection to be closed and forgotten")
    about_it = log_lines(shared_server, r"127\.0\.0\.1:%d\b" % port, since=log_start)
    gate.release()
    ended = api.wait_ended(task_id)

    assert received.startswith(b"HTTP/1.1 200 "), received
    assert (settled[CONNECTIONS], settled[WAITERS]) == (1, 0)
    assert len(about_it) == 1 and "dropped" in about_it[0], about_it
    assert "Traceback" not in shared_server.log()
    assert (ended["status"], ended["output"]) == ("finished", "out 1\ngate %s\nout 1\n" % gate.name)


def test_terminals_get_colours_but_no_other_control_sequence_and_no_lookalike_closing_line(api):
    task_id = api.create(unique("app"), unique("env"), "ansi")
    task = api.wait_ended(task_id)

    stream = api.get("/task/%d/stream" % task_id).body.decode("utf-8")
    text = api.get("/task/%d/output" % task_id)
    tail = api.get("/task/%d/output?tail=3" % task_id).body.decode("utf-8")

    assert task["output"] == ANSI_OUTPUT.decode("utf-8")       # the JSON keeps it as printed
    assert stream == ANSI_FOR_TERMINALS + "\x1b[0m\n" + end_line(task_id, "finished", 0)
    assert text.body.decode("utf-8") == ANSI_FOR_TERMINALS
    assert text.headers["X-Text-Size"] == str(task["outputLength"])
    assert tail == "\n".join(ANSI_FOR_TERMINALS.split("\n")[-3:])     # its last 3 lines
    for unsafe in UNSAFE_FOR_TERMINALS:
        assert unsafe not in stream + text.body.decode("utf-8") + tail, unsafe


@pytest.mark.parametrize("first_half, second_half, shown", [
    ("cutescape", "say-1mred", "\x1b[1;31mred\n"),
    ("halfclosing", "otherhalf",
     "\x1b[0m(printed by the task) [pulsar-rest-api: task 7 finished]\n"),
], ids=["escape-sequence", "closing-line"])
def test_output_of_a_running_task_holds_back_what_the_next_read_may_still_complete(
        api, shared_fake, first_half, second_half, shown):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"),
                         "say-before.%s.quietgate-%s.%s" % (first_half, gate.name, second_half))
    printed = {"cutescape": "\x1b[1;3", "halfclosing": "[pulsar-rest"}[first_half]
    api.wait_output(task_id, "before\n" + printed)

    running = api.get("/task/%d/output" % task_id)
    held_at = int(running.headers["X-Text-Size"])
    gate.release()
    api.wait_ended(task_id)
    rest = api.get("/task/%d/output?offset=%d" % (task_id, held_at))

    assert running.body.decode() == "before\n"
    assert held_at == len("before\n")
    assert rest.body.decode() == shown


# --- Waiting for the end, running again, and the list's long poll -----------------------------

def test_create_with_wait_true_answers_when_the_task_ends_with_the_whole_task(
        api, shared_server, shared_fake):
    gate = shared_fake.gate()
    app = unique("app")
    conn, task_id = send_waiting_create(api, app, gate, "out-1.gate-%s.out-2" % gate.name)
    try:
        answered_early = log_lines(shared_server, r" POST '/%s/prod" % app)    # logged once sent
        gate.release()
        response = conn.getresponse()
        reply = Reply(response, response.read())
    finally:
        conn.close()
    task = api.task(task_id)

    assert not answered_early, "the reply came while the task still ran"
    assert reply.status == 200, reply
    assert set(reply.json) == {"taskId", "url", "status", "task"}, reply
    assert reply.json["taskId"] == task_id
    assert reply.json["url"] == "https://127.0.0.1:%d/task/%d" % (shared_server.port, task_id)
    assert reply.json["status"] == "finished"
    assert reply.json["task"] == task
    assert set(task) == TASK_KEYS
    assert task["output"] == "out 1\ngate %s\nout 1\nout 2\n" % gate.name


def test_client_leaving_while_waiting_for_its_task_leaves_the_task_running_to_its_end(
        api, shared_server, shared_fake):
    gate = shared_fake.gate()
    app = unique("app")
    log_start = len(shared_server.log())
    conn, task_id = send_waiting_create(api, app, gate, "gate-%s.out-1" % gate.name)
    try:
        port = conn.sock.getsockname()[1]
    finally:
        conn.close()
    noticed = wait_until(lambda: log_lines(shared_server, r"INFO 127\.0\.0\.1:%d: " % port,
                                           since=log_start),
                         timeout=5, what="the server to notice the client left")
    running = api.task(task_id)
    gate.release()
    ended = api.wait_ended(task_id)

    assert len(noticed) == 1 and "dropped" in noticed[0], noticed
    assert running["status"] == "running"
    assert (ended["status"], ended["output"]) == ("finished", "gate %s\nout 1\n" % gate.name)
    assert shared_fake.actions_run_for(app) == ["gate-%s.out-1" % gate.name]


def test_rerun_starts_a_new_task_with_the_same_app_env_and_action(api, shared_server,
                                                                   shared_fake):
    app, env = unique("app"), unique("env")
    first = api.create(app, env, "out-1")
    api.wait_ended(first)

    reply = api.request("POST", "/task/%d/rerun" % first)
    rerun = api.wait_ended(reply.json["taskId"]) if reply.status == 200 else None

    assert reply.status == 200, reply
    assert set(reply.json) == {"taskId", "url", "status"}
    assert reply.json["taskId"] > first
    assert reply.json["url"] == "https://127.0.0.1:%d/task/%d" % (shared_server.port,
                                                                  reply.json["taskId"])
    assert (rerun["app"], rerun["env"], rerun["action"]) == (app, env, "out-1")
    assert (rerun["status"], rerun["output"]) == ("finished", "out 1\n")
    assert [run["argv"][1:] for run in shared_fake.runs_for(app)] == [[app, env, "out-1"]] * 2


def test_rerun_is_refused_while_the_pair_is_busy_and_waits_in_line_with_queue_true(
        api, shared_fake):
    gate = shared_fake.gate()
    app, env = unique("app"), unique("env")
    holder = api.create(app, env, "gate-%s.out-1" % gate.name)
    api.wait_at_gate(holder, gate)

    busy = api.request("POST", "/task/%d/rerun" % holder)
    queued = api.request("POST", "/task/%d/rerun?queue=true" % holder)
    gate.release()
    api.wait_ended(holder)
    rerun = queued.json["taskId"]
    api.wait_at_gate(rerun, gate)     # it runs, and waits at the same gate
    gate.release()
    ended = api.wait_ended(rerun)

    assert busy.status == 409, busy
    assert busy.json["taskId"] == holder
    assert queued.status == 200, queued
    assert queued.json["status"] == "queued"
    assert (ended["status"], ended["action"]) == ("finished", "gate-%s.out-1" % gate.name)
    assert shared_fake.actions_run_for(app) == ["gate-%s.out-1" % gate.name] * 2


def test_rerun_of_an_unknown_task_is_404_by_get_405_and_cross_site_403(api, shared_fake,
                                                                        ended_task):
    app = api.task(ended_task)["app"]

    unknown = api.request("POST", "/task/99999/rerun")
    by_get = api.get("/task/%d/rerun" % ended_task)
    cross_site = api.request("POST", "/task/%d/rerun" % ended_task,
                             headers={"Sec-Fetch-Site": "cross-site"})

    assert_json_error(unknown, 404)
    assert_json_error(by_get, 405)
    assert by_get.headers["Allow"] == "POST"
    assert_json_error(cross_site, 403)
    assert shared_fake.actions_run_for(app) == ["out-3"]      # the ended task's run alone


def test_rerun_refuses_an_action_that_a_create_would_refuse(start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    start_server("--db", db).stop_cleanly()
    # As a server before the fix for `rake:shell` could have recorded it.
    old = insert_task(db, "shop", "rake:shell", "finished", exit_code=0, finished=True, version=2)
    server = start_server("--db", db, "--allow-action", "rake:*")

    reply = server.client().request("POST", "/task/%d/rerun" % old)

    assert_json_error(reply, 400)
    assert fake.invocations() == []


def test_task_list_with_version_answers_at_once_if_behind_else_on_a_change_or_the_timeout(
        start_server, fake):
    client = start_server("--poll-timeout", SHORT_POLL).client()
    gate = fake.gate()
    app = unique("app")
    version = client.listing()["version"]

    behind, behind_took = timed(lambda: client.listing("version=%d" % (version + 1000)))
    conn = client.connection()
    try:
        conn.request("GET", "/tasks?version=%d" % version)
        task_id = client.create(app, "prod", "gate-" + gate.name)
        created = json.loads(conn.getresponse().read().decode())
        conn.request("GET", "/tasks?version=%d" % created["version"])
        gate.release()
        changed = json.loads(conn.getresponse().read().decode())
    finally:
        conn.close()
    unchanged, unchanged_took = timed(lambda: client.listing("version=%d" % changed["version"]))

    assert behind["version"] == version and behind_took < SHORT_POLL / 2
    assert created["version"] > version
    assert [(task["id"], task["status"]) for task in created["tasks"]] == [(task_id, "running")]
    assert changed["version"] > created["version"]
    assert [(task["id"], task["status"]) for task in changed["tasks"]] == [(task_id, "finished")]
    assert unchanged["version"] == changed["version"]
    assert unchanged["tasks"] == changed["tasks"]
    assert 0.9 * SHORT_POLL <= unchanged_took < SHORT_POLL + 2


def test_task_list_long_poll_refuses_a_bad_limit_at_once_not_after_the_poll_timeout(
        shared_server_with):
    client = shared_server_with("--poll-timeout", SHORT_POLL).client()
    version = client.listing()["version"]

    reply, took = timed(lambda: client.get("/tasks?version=%d&limit=0" % version))

    assert_json_error(reply, 400)
    assert took < SHORT_POLL / 2, (
        "a bad request was refused only after the poll timeout (%.2f s)" % took)


# --- Task history across restarts -------------------------------------------------------------

def test_the_lists_version_goes_up_across_a_restart_so_a_page_polling_it_sees_the_change(
        start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db)
    client = first.client()
    for _ in range(3):
        client.wait_ended(client.create(unique("app"), "prod", "out-1"))
    seen = client.listing()["version"]
    first.stop_cleanly()

    second = start_server("--db", db, "--poll-timeout", "5")
    client = second.client()
    task_id = client.create(unique("app"), "prod", "out-1")
    client.wait_ended(task_id)
    poll, took = timed(lambda: client.get("/tasks?version=%d" % seen))

    assert poll.status == 200 and poll.json["version"] > seen
    assert task_id in [task["id"] for task in poll.json["tasks"]]
    assert took < 2             # at once: the list has changed since `seen`


def test_history_survives_a_restart_character_for_character_and_ids_go_on(start_server,
                                                                           tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db)
    client = first.client()
    app = unique("app")
    finished = client.create(app, "prod", "unicode.badbytes.chatty-1200")
    failed = client.create(app, "stage", "out-2.exit-3")     # an env each: they run at once
    killed = client.create(app, "test", "out-1.hang")
    client.wait_output(killed, "out 1\n")
    kill = client.kill(killed)
    client.wait_ended(finished)
    client.wait_ended(failed)
    before = {task_id: client.task(task_id) for task_id in (finished, failed, killed)}
    first.stop_cleanly()

    second = start_server("--db", db)
    client = second.client()
    after = {task_id: client.task(task_id) for task_id in (finished, failed, killed)}
    full = after[finished]["output"]
    offsets = [0, 1, 2, 7, 8, 9, 10, 11, 13, 14, 17, 21, len(full) - 1, len(full)]
    tails = {offset: client.task(finished, offset) for offset in offsets}
    beyond = client.get("/task/%d?offset=%d" % (finished, len(full) + 1))
    listed = client.listing("app=" + app)["tasks"]
    next_id = client.create(app, "prod", "out-1")
    client.wait_ended(next_id)

    assert kill.status == 200, kill
    assert after == before
    assert [after[task_id]["status"] for task_id in (finished, failed, killed)] == [
        "finished", "failed", "killed"]
    assert [after[task_id]["exitCode"] for task_id in (finished, failed, killed)] == [0, 3, None]
    assert full == (UNICODE_LINE + "ok \ufffd\ufffd end\n"
                    + "".join("step 2 line %05d\n" % i for i in range(1, 1201)))
    assert after[failed]["output"] == "out 1\nout 2\n"
    assert after[killed]["output"] == "out 1\n"
    for offset, tail in tails.items():
        assert (tail["outputOffset"], tail["outputLength"]) == (offset, len(full)), offset
        assert tail["output"] == full[offset:], offset
    assert_json_error(beyond, 400)
    assert [task["id"] for task in listed] == [killed, failed, finished]
    for task in listed:
        expected = dict(after[task["id"]])
        del expected["output"], expected["outputOffset"]
        assert task == expected
    assert next_id == killed + 1


def test_a_task_an_older_server_left_running_is_lost_and_its_processes_ended_at_restart(
        start_server, tmp_path):
    db = tmp_path / "history.sqlite3"
    start_server("--db", db).stop_cleanly()
    # What a server older than keepers left when it died: pulsar was its child, in a group of
    # its own, and the history has its pid and start time.
    orphan = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(600)",
                               str(tmp_path) + os.sep], start_new_session=True)  # the mark
    app = unique("app")
    task_id = insert_task(db, app, "deploy", "running", pid=orphan.pid,
                          process_start=process_start_token(orphan.pid))

    server = start_server("--db", db)
    task = server.client().task(task_id)
    status = exit_status(orphan, TIMEOUT)

    assert (task["status"], task["exitCode"]) == ("lost", None)
    assert LOST_NOTE in task["output"].splitlines()[-1]
    assert "were still running and have been killed" in task["outcome"]
    assert status == -signal.SIGTERM
    assert len(log_lines(server, r"WARNING .*task %d\b.* is lost" % task_id)) == 1, server.log()


def test_a_task_an_older_server_left_keeps_the_output_it_had_stored_when_it_is_found_lost(
        start_server, tmp_path):
    db = tmp_path / "history.sqlite3"
    start_server("--db", db).stop_cleanly()
    # An older server wrote a running task's output to the history as it came, then died.
    before_the_crash = "printed before the crash\n" * 20
    task_id = insert_task(db, unique("app"), "deploy", "running", pid=2 ** 22 + 1,
                          process_start="gone")
    with contextlib.closing(sqlite3.connect(str(db))) as history, history:
        history.execute("INSERT INTO output (task_id, start, text) VALUES (?, 0, ?)",
                        (task_id, before_the_crash))
        history.execute("UPDATE tasks SET output_length = ? WHERE id = ?",
                        (len(before_the_crash), task_id))

    first = start_server("--db", db)
    shown = first.client().task(task_id)
    first.stop_cleanly()
    stored = start_server("--db", db).client().task(task_id)

    assert shown["status"] == "lost"
    assert shown["output"].startswith(before_the_crash)
    assert LOST_NOTE in shown["output"].splitlines()[-1]
    assert stored["output"] == shown["output"]


def test_a_task_found_queued_at_start_takes_its_turn_in_line(start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    start_server("--db", db).stop_cleanly()
    app = unique("app")
    queued = insert_task(db, app, "out-1", "queued")

    server = start_server("--db", db)
    task = server.client().wait_ended(queued)

    assert (task["status"], task["output"]) == ("finished", "out 1\n")
    assert fake.actions_run_for(app) == ["out-1"]
    assert log_lines(server, r"INFO task %d is back in line" % queued)


def test_memory_db_serves_tasks_and_the_log_says_nothing_is_kept(start_server):
    server = start_server("--db", ":memory:")
    client = server.client()

    task = client.wait_ended(client.create(unique("app"), "prod", "out-1"))
    read_again = client.task(task["id"])
    listed = client.listed_ids()

    assert (task["status"], task["output"]) == ("finished", "out 1\n")
    assert read_again == task
    assert listed == [task["id"]]
    notes = log_lines(server, r"nothing is kept")
    assert len(notes) == 1 and ":memory:" in notes[0], server.log()
    assert sorted(path.name for path in server.workdir.iterdir()) == ["console.txt", "log"]


# --- Deploys outlive the server: crashes, hand-overs, keepers ---------------------------------
#
# Each task runs under a keeper, in a session of its own: the server's death (SIGKILL here, as
# a crash or the OOM killer) touches nothing of it, and the next server on the same history
# takes it over.  The fake tees what it prints into a file of its own (tee-NAME), so that what
# the server shows can be compared with what was printed, byte for byte.

def printed(fake, name):
    path = fake.dir / (name + ".printed")
    return path.read_bytes().decode("utf-8") if path.exists() else ""


def test_a_version_never_goes_back_though_the_last_ones_before_a_crash_were_not_recorded(
        start_server, fake, tmp_path):
    db, first, client, gate, task_id, before = task_at_gate(start_server, fake, tmp_path,
                                                            "out-3.gate-%s.out-1")
    first.crash()
    # As if it had died before its last changes were recorded (they are written 20 ms late).
    with contextlib.closing(sqlite3.connect(str(db))) as history, history:
        history.execute("UPDATE tasks SET version = 2, output_length = 0 WHERE id = ?",
                        (task_id,))

    second = start_server("--db", db)
    client = second.client()
    adopted = client.task(task_id)
    gate.release()
    ended = client.wait_ended(task_id)

    assert adopted["output"] == before["output"]
    assert adopted["version"] > before["version"]       # "goes up on every change"
    assert ended["version"] > adopted["version"]


def test_a_task_goes_on_untouched_when_the_server_dies_and_the_next_server_follows_it_on(
        start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db)
    client = first.client()
    gate, go = fake.gate(), fake.gate()
    slow = client.create(unique("app"), "prod", "tee-slow.out-2.gate-%s.out-3" % gate.name)
    fast = client.create(unique("app"), "prod", "tee-fast.out-1.gate-%s.quick-300000.out-1"
                         % go.name)
    client.wait_at_gate(slow, gate)
    client.wait_at_gate(fast, go)
    before = client.task(slow)
    pids = {run["argv"][-1]: run["pid"] for run in fake.invocations()}

    go.release()
    first.crash()                           # while the fast one prints as fast as it can
    alive_after_crash = [not is_gone(pid) for pid in pids.values()]
    second = start_server("--db", db)
    client = second.client()
    adopted = client.task(slow)
    conn, stream = open_stream(client, "/task/%d/stream" % slow)
    gate.release()
    fast_end = client.wait_ended(fast, timeout=30)
    slow_end = client.wait_ended(slow)
    streamed = stream.read().decode("utf-8")
    conn.close()

    assert alive_after_crash == [True, True]
    assert (adopted["status"], adopted["pid"]) == ("running", before["pid"])
    assert adopted["output"] == before["output"] == "out 1\nout 2\n" + gate.line
    assert adopted["version"] >= before["version"]
    assert (slow_end["status"], slow_end["exitCode"]) == ("finished", 0)
    assert slow_end["output"] == printed(fake, "slow") == before["output"] + "out 1\nout 2\nout 3\n"
    assert streamed == slow_end["output"] + end_line(slow, "finished", 0)
    assert (fast_end["status"], fast_end["exitCode"]) == ("finished", 0)
    assert fast_end["output"] == printed(fake, "fast")
    assert fast_end["output"].endswith("quick line 0300000\nout 1\n")
    assert log_lines(second, r"INFO task %d .* taken over from an earlier server" % slow)
    second.assert_no_traceback()


def test_a_task_that_ended_while_no_server_ran_shows_its_real_end(start_server, fake, tmp_path):
    db, first, client, gate, task_id, _ = task_at_gate(start_server, fake, tmp_path,
                                                       "tee-gone.out-1.gate-%s.err-2.exit-3")

    keeper = keeper_pid_of(db, task_id)
    first.crash()
    gate.release()
    # The keeper records the end once all of the task has ended: after pulsar has exited.
    wait_until(lambda: is_gone(keeper), what="the task to end while no server runs")
    ended_by = time.time()
    second = start_server("--db", db)
    task = second.client().wait_ended(task_id)

    assert (task["status"], task["exitCode"]) == ("failed", 3)
    assert task["outcome"] == "pulsar exited with code 3"
    assert task["output"] == printed(fake, "gone") == "out 1\n" + gate.line + "err 1\nerr 2\n"
    assert parse_utc(task["finishedAt"]).timestamp() <= ended_by
    wait_until(lambda: not (Path(str(db) + ".tasks") / str(task_id)).exists(),
               what="its folder to go once the history has it")


# End records a damaged disk (or a hand) may leave, none of which a keeper writes.
UNREADABLE_ENDS = {
    "cut-short": '{"exit": 0, "killed": fal',
    "wrong-types": '{"exit": "0", "killed": false, "ended": 1.5e9, "last": "done", "error": null}',
    "exit-out-of-range": '{"exit": 99999999999999999999999, "killed": false, "ended": 1.5e9, '
                         '"last": "", "error": null}',
    "time-out-of-range": '{"exit": 0, "killed": false, "ended": -1e20, "last": "", '
                         '"error": null}',
    "no-exit-and-no-reason": '{"exit": null, "killed": false, "ended": 1.5e9, "last": "", '
                             '"error": null}',
    "fields-missing": '{"killed": false, "ended": 1.5e9, "last": ""}',
}


def test_an_end_record_that_cannot_be_read_ends_the_task_lost_saying_so(start_server, fake,
                                                                         tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db)
    gate = fake.gate()
    ids = {kind: first.client().create(unique("app"), "prod", "out-1.gate-%s" % gate.name)
           for kind in UNREADABLE_ENDS}
    for task_id in ids.values():
        first.client().wait_at_gate(task_id, gate)
    folders = {kind: Path(str(db) + ".tasks") / str(task_id) for kind, task_id in ids.items()}
    keepers = [keeper_pid_of(db, task_id) for task_id in ids.values()]

    first.crash()
    gate.close()                    # end-of-file lets every one of them go on
    wait_until(lambda: all(map(is_gone, keepers)), what="the keepers to end while no server runs")
    for kind, record in UNREADABLE_ENDS.items():
        (folders[kind] / "ended").write_text(record)    # as a damaged disk might leave it
    second = start_server("--db", db)
    tasks = {kind: second.client().wait_ended(task_id) for kind, task_id in ids.items()}
    listed = {task["id"]: task["status"] for task in second.client().listing()["tasks"]}
    second.stop_cleanly()           # the history has them: a third server shows them the same
    third = start_server("--db", db).client()

    for kind, task in tasks.items():
        assert task["status"] == "lost", (kind, task)
        assert "how the task ended" in task["outcome"] and "cannot be read" in task["outcome"]
        assert task["output"].startswith("out 1\n" + gate.line), (kind, task)
        assert listed[task["id"]] == third.task(task["id"])["status"] == "lost", kind


def test_a_history_of_the_first_schema_is_carried_forward_whole(start_server, tmp_path):
    db = tmp_path / "history.sqlite3"
    created = int(time.time()) - 60     # recent: retention keeps it
    with contextlib.closing(sqlite3.connect(str(db))) as conn:     # as the first server left it
        conn.executescript("""
            CREATE TABLE tasks (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                app TEXT NOT NULL, env TEXT NOT NULL, action TEXT NOT NULL,
                status TEXT NOT NULL, exit_code INTEGER, pid INTEGER, process_start TEXT,
                created_at REAL NOT NULL, finished_at REAL, started_by TEXT,
                version INTEGER NOT NULL, output_length INTEGER NOT NULL);
            CREATE TABLE output (task_id INTEGER NOT NULL, start INTEGER NOT NULL,
                text TEXT NOT NULL, PRIMARY KEY (task_id, start)) WITHOUT ROWID;
            INSERT INTO tasks VALUES (1, 'shop', 'prod', 'deploy', 'failed', 3, 4321, NULL,
                %d.5, %d.25, '127.0.0.1:40000', 7, 6);
            INSERT INTO output VALUES (1, 0, 'out 1\n');
            PRAGMA user_version = 1;""" % (created, created + 12))
    client = start_server("--db", db).client()
    old = client.task(1)
    new = client.wait_ended(client.create(unique("app"), "prod", "out-1"))

    assert {key: old[key] for key in ("status", "exitCode", "output", "outcome", "startedAt")} == {
        "status": "failed", "exitCode": 3, "output": "out 1\n", "outcome": None,
        "startedAt": None}
    assert (parse_utc(old["createdAt"]).timestamp(), parse_utc(old["finishedAt"]).timestamp()) \
        == (created + 0.5, created + 12.25)
    assert new["id"] == 2 and new["startedAt"] is not None
    with contextlib.closing(sqlite3.connect(str(db))) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4


@contextlib.contextmanager
def history_locked(db):
    """Hold the history's write lock, as another program writing to it would."""
    connection = sqlite3.connect(str(db), isolation_level=None, timeout=0)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def test_what_was_started_queued_or_killed_while_the_history_was_locked_survives_a_crash(
        start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db)
    client = first.client()
    app, other = unique("app"), unique("app")
    first_gate, second_gate, other_gate = fake.gate(), fake.gate(), fake.gate()
    running = client.create(app, "prod", "say-first.gate-%s" % first_gate.name)
    client.wait_at_gate(running, first_gate)
    with history_locked(db):    # no start waits for it; the history gets nothing of these
        queued = client.queue(app, "prod", "say-second.gate-%s" % second_gate.name)
        dropped = client.queue(app, "prod", "say-dropped")
        started = client.create(other, "prod", "say-other.gate-%s" % other_gate.name)
        killed = client.kill(dropped)
        first_gate.release()
        client.wait_at_gate(queued, second_gate)    # it left the line as the first one ended
        client.wait_at_gate(started, other_gate)
        first.crash()
    second = start_server("--db", db)
    client = second.client()
    after_restart = {task_id: client.task(task_id)["status"] for task_id in (queued, started)}
    second_gate.release()
    other_gate.release()
    ended = {task_id: client.wait_ended(task_id) for task_id in (running, queued, dropped,
                                                                  started)}
    newest = client.create(unique("app"), "prod", "out-1")

    assert killed.status == 200 and killed.json["status"] == "killed", killed
    assert after_restart == {queued: "running", started: "running"}
    assert [ended[task_id]["status"] for task_id in (running, queued, dropped, started)] == [
        "finished", "finished", "killed", "finished"]
    assert ended[queued]["output"] == "second\n" + second_gate.line
    assert ended[started]["output"] == "other\n" + other_gate.line
    # Each ran once, the killed one never, and no id was given twice.
    assert fake.actions_run_for(app) == ["say-first.gate-%s" % first_gate.name,
                                         "say-second.gate-%s" % second_gate.name]
    assert len(fake.runs_for(other)) == 1
    assert newest > max(running, queued, dropped, started)
    second.assert_no_traceback()


NON_REAPING_PARENT = r'''
import ctypes, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)     # PR_SET_CHILD_SUBREAPER: the server's orphans
subprocess.run(sys.argv[1:])                # come here once it dies, and are never reaped
time.sleep(600)
'''


def test_a_keeper_that_died_unreaped_while_no_server_ran_is_lost_and_its_task_ended(
        start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    parent = tmp_path / "non_reaping_parent.py"
    parent.write_text(NON_REAPING_PARENT)
    first = start_server("--db", db, launcher=[sys.executable, str(parent)])
    tree = start_process_tree(first.client(), fake, env="prod")
    server_pid = int(Path(str(db) + ".lock").read_text())
    keeper_pid = json.loads((Path(str(db) + ".tasks") / str(tree.task_id) / "keeper")
                            .read_text())["pid"]

    os.kill(server_pid, signal.SIGKILL)
    wait_until(lambda: is_gone(server_pid), what="the server to die")
    os.kill(keeper_pid, signal.SIGKILL)     # it stays a zombie: its new parent never reaps
    wait_until(lambda: is_gone(keeper_pid), what="the keeper to die")
    second = start_server("--db", db)
    task = second.client().wait_ended(tree.task_id)
    wait_until(lambda: all(are_gone(tree.pids).values()), what="the task's processes to end")
    first.crash()                           # the parent, and with it the zombie

    assert task["status"] == "lost"
    assert "ended without recording how the task ended" in task["outcome"]
    second.assert_no_traceback()


def test_a_dead_keepers_leftovers_are_the_processes_of_its_session_that_carry_its_mark(
        tmp_path):
    folder = server_module.TaskFolder(str(tmp_path), 7)
    mark = {"PULSAR_REST_API_TASK": folder.path}
    # A session whose leader has gone, left with one process of the task and one stranger.
    code = ("import json, os, subprocess, sys\n"
            "os.setsid()\n"
            "sleep = [sys.executable, '-S', '-c', 'import time; time.sleep(600)']\n"
            "ours = subprocess.Popen(sleep, env=dict(os.environ, **json.loads(sys.argv[1])),\n"
            "                        stdout=subprocess.DEVNULL)\n"
            "stranger = subprocess.Popen(sleep, stdout=subprocess.DEVNULL)\n"
            "print(json.dumps([os.getpid(), ours.pid, stranger.pid]), flush=True)\n")
    leader = subprocess.run([sys.executable, "-S", "-c", code, json.dumps(mark)],
                            stdout=subprocess.PIPE, text=True, timeout=TIMEOUT)
    leader_pid, ours, stranger = json.loads(leader.stdout)
    # A live process that now has a dead keeper's pid, leading a session with the mark.
    reused = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(600)"],
                              env=dict(os.environ, **mark), start_new_session=True)
    try:
        found = server_module.leftovers_of(types.SimpleNamespace(pid=leader_pid,
                                                                 folder=folder))
        under_a_live_pid = server_module.leftovers_of(types.SimpleNamespace(pid=reused.pid,
                                                                            folder=folder))
    finally:
        for pid in (ours, stranger, reused.pid):
            os.kill(pid, signal.SIGKILL)
        reused.wait()

    assert found == [ours]
    assert under_a_live_pid == []


def test_a_full_disk_ends_no_deploy_and_its_end_is_still_recorded(tmp_path, fake):
    folder = tmp_path / "task"
    folder.mkdir()
    os.mkfifo(str(folder / "bell"))
    for name in ("output", "keeper.log"):       # every write to these fails, as on a full disk
        os.symlink("/dev/full", str(folder / name))
    order = [str(folder), "1", str(1 << 20), str(fake.path), "blog", "prod",
             "tee-full.quick-200000.exit-3"]

    factory = subprocess.run(
        server_module.keeper_command(), stdout=subprocess.PIPE,
        input=server_module.KEEPER_PROGRAM + server_module.keeper_order(order),
        env=dict(os.environ, FAKE_DIR=str(fake.dir)), timeout=TIMEOUT)
    keeper = int(factory.stdout.split()[0])
    wait_until(lambda: is_gone(keeper), what="the keeper to end")
    ended = json.loads((folder / "ended").read_text())

    assert factory.returncode == 0
    assert (ended["exit"], ended["killed"], ended["kept"]) == (3, False, 0)
    assert ended["written"] == len(printed(fake, "full").encode()) > 1 << 20


def held_line(start_server, fake, tmp_path):
    """A server on a history file in tmp_path whose app has a task held at a gate, so that
    what is queued behind it waits: (db, server, client, app, gate, the holder's id)."""
    db = tmp_path / "history.sqlite3"
    server = start_server("--db", db)
    client = server.client()
    app, gate = unique("app"), fake.gate()
    return db, server, client, app, gate, client.create(app, "prod", "gate-" + gate.name)


def test_a_queued_task_killed_when_its_folder_cannot_take_a_new_file_stays_killed(
        start_server, fake, tmp_path):
    db, first, client, app, gate, holder = held_line(start_server, fake, tmp_path)
    queued = client.queue(app, "prod", "say-never")
    (Path(str(db) + ".tasks") / str(queued) / "dropped.tmp").mkdir()  # no file can be made

    killed = client.kill(queued)
    first.crash()
    second = start_server("--db", db)
    client = second.client()
    gate.release()
    ends = [client.wait_ended(task_id) for task_id in (holder, queued)]

    assert killed.status == 200 and killed.json["status"] == "killed", killed
    assert [task["status"] for task in ends] == ["finished", "killed"]
    assert fake.actions_run_for(app) == ["gate-" + gate.name]


def test_a_queued_task_starts_when_it_leaves_the_line_and_the_history_keeps_when(
        start_server, fake, tmp_path):
    db, server, client, app, gate, holder = held_line(start_server, fake, tmp_path)
    queued = client.queue(app, "prod", "out-1")
    waiting = client.task(queued)
    released_at = time.time()
    gate.release()
    ended = client.wait_ended(queued)
    server.stop_cleanly()
    stored = start_server("--db", db).client().task(queued)

    created, started, finished = (parse_utc(ended[key]).timestamp()
                                  for key in ("createdAt", "startedAt", "finishedAt"))
    assert (waiting["status"], waiting["startedAt"]) == ("queued", None)
    assert created < released_at <= started + 0.001 <= finished + 0.001   # (ms in the answer)
    assert stored["startedAt"] == ended["startedAt"]


def test_a_keeper_that_its_folder_cannot_name_never_runs_and_its_task_fails_saying_why(
        start_server, fake, tmp_path):
    db, server, client, app, gate, holder = held_line(start_server, fake, tmp_path)
    queued = client.queue(app, "prod", "say-never")
    (Path(str(db) + ".tasks") / str(queued) / "keeper.tmp").mkdir()   # no file can be made

    gate.release()
    task = client.wait_ended(queued)

    assert task["status"] == "failed", task
    assert task["outcome"].startswith("could not start pulsar's keeper: ")
    assert "Is a directory" in task["outcome"]
    assert fake.actions_run_for(app) == ["gate-" + gate.name]
    assert client.wait_ended(client.create(app, "prod", "out-1"))["status"] == "finished"


def test_what_a_crash_leaves_between_a_tasks_turn_and_its_keeper_is_told_truly(
        start_server, fake, tmp_path):
    db, first, client, app, gate, holder = held_line(start_server, fake, tmp_path)
    turn_came = client.queue(app, "prod", "say-second")
    behind = client.queue(app, "prod", "say-third")
    wait_until(lambda: history_statuses(db).get(behind) == "queued", what="the history")
    first.crash()
    # As if the server had died just after the second task's turn came: the history says it
    # runs, but its keeper never got its order.  And a task whose keeper never got its order.
    with contextlib.closing(sqlite3.connect(str(db))) as history, history:
        history.execute("UPDATE tasks SET status = 'running' WHERE id = ?", (turn_came,))
    never = Path(str(db) + ".tasks") / str(behind + 1)
    never.mkdir()
    os.mkfifo(str(never / "bell"))
    (never / "task").write_text(json.dumps({
        "id": behind + 1, "app": unique("app"), "env": "prod", "action": "say-never",
        "createdAt": time.time(), "startedBy": "127.0.0.1:1", "queued": False}))
    (never / "keeper").write_text(json.dumps({"pid": 2 ** 22 + 1, "start": "gone"}))

    second = start_server("--db", db)
    client = second.client()
    gate.release()
    ends = [client.wait_ended(task_id) for task_id in (holder, turn_came, behind, behind + 1)]

    assert [task["status"] for task in ends] == ["finished", "finished", "finished", "killed"]
    assert fake.actions_run_for(app) == ["gate-" + gate.name, "say-second", "say-third"]
    assert "did not run" in ends[3]["outcome"]


def history_statuses(db):
    """{id: status} of the tasks in the history file."""
    with contextlib.closing(sqlite3.connect(str(db))) as history:
        return dict(history.execute("SELECT id, status FROM tasks"))


def test_names_in_the_task_folder_that_are_not_task_ids_are_left_alone(start_server, tmp_path):
    db = tmp_path / "history.sqlite3"
    folders = Path(str(db) + ".tasks")
    folders.mkdir()
    for name in ("\u00b2", "9223372036854775807", "notes", "0"):
        (folders / name).mkdir()

    server = start_server("--db", db)
    client = server.client()
    first = client.wait_ended(client.create(unique("app"), "prod", "out-1"))

    others = sorted(["\u00b2", "9223372036854775807", "notes", "0", "factory"])   # (its own)
    wait_until(lambda: sorted(path.name for path in folders.iterdir()) == others,
               what="the task's folder to go once the history has it, and only that one")

    assert first["id"] == 1 and first["status"] == "finished"
    assert history_statuses(db) == {1: "finished"}
    server.assert_no_traceback()


def test_a_keepers_command_line_is_one_short_line_in_ps(start_server, fake, tmp_path):
    db, _, client, gate, task_id, _ = task_at_gate(start_server, fake, tmp_path)
    keeper = keeper_pid_of(db, task_id)
    command_line = Path("/proc/%d/cmdline" % keeper).read_bytes().split(b"\0")[:-1]
    gate.release()
    client.wait_ended(task_id)

    assert command_line[-1] == KEEPER_MARK
    assert all(b"\n" not in part for part in command_line)
    assert len(b" ".join(command_line)) < 200 + len(sys.executable), command_line


def test_an_adopted_task_can_be_killed_whole(start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db)
    tree = start_process_tree(first.client(), fake, "out-1.", env="prod")

    first.crash()
    second = start_server("--db", db)
    client = second.client()
    killed = client.kill(tree.task_id)

    assert killed.status == 200 and killed.json["status"] == "killed", killed
    assert killed.json["outcome"].startswith("killed by 127.0.0.1:")
    assert are_gone(tree.pids) == {"fake": True, "child": True}


def test_sigusr1_stops_at_once_and_leaves_running_and_queued_tasks_to_the_next_server(
        start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db, "--shutdown-timeout", "600")
    client = first.client()
    gate = fake.gate()
    app = unique("app")
    running = client.create(app, "prod", "tee-run.out-1.gate-%s.out-1" % gate.name)
    queued = client.queue(app, "prod", "out-2")
    client.wait_at_gate(running, gate)

    first.send_signal(signal.SIGUSR1)
    status = exit_status(first.proc, TIMEOUT)
    second = start_server("--db", db)
    client = second.client()
    while_waiting = client.task(queued)
    gate.release()
    ran = client.wait_ended(running)
    then = client.wait_ended(queued)

    assert status == 0
    assert log_lines(first, r"INFO SIGUSR1: stopping at once; 1 running task\(s\) go on")
    assert while_waiting["status"] == "queued"
    assert (ran["status"], ran["output"]) == ("finished", printed(fake, "run"))
    assert (then["status"], then["output"]) == ("finished", "out 1\nout 2\n")
    assert fake.actions_run_for(app) == ["tee-run.out-1.gate-%s.out-1" % gate.name, "out-2"]


def test_a_second_server_on_the_same_history_refuses_to_start_and_touches_nothing(
        start_server, fake, tmp_path):
    db, first, client, gate, task_id, _ = task_at_gate(start_server, fake, tmp_path,
                                                       "out-1.gate-%s.out-1")

    link = tmp_path / "elsewhere.sqlite3"
    link.symlink_to(db)

    refused = run_cli(tmp_path / "second", fake, ["--db", db])
    refused_through_a_link = run_cli(tmp_path / "third", fake, ["--db", link])
    still = client.task(task_id)
    gate.release()
    ended = client.wait_ended(task_id)

    for run in (refused, refused_through_a_link):
        line = one_error_line(run)
        assert "is in use by another server (pid %d)" % first.proc.pid in line, line
    assert still["status"] == "running"
    assert (ended["status"], ended["output"]) == ("finished", "out 1\n" + gate.line + "out 1\n")


def test_a_task_whose_keeper_is_killed_is_lost_and_nothing_of_it_runs_on(api, shared_fake,
                                                                       shared_server):
    tree = start_process_tree(api, shared_fake, "out-1.")
    session = os.getsid(tree.pids["fake"])      # its keeper's

    os.kill(session, signal.SIGKILL)
    task = api.wait_ended(tree.task_id)

    assert (task["status"], task["exitCode"]) == ("lost", None)
    assert ("its keeper (pid %d) ended without recording how the task ended" % session
            in task["outcome"])
    wait_until(lambda: all(are_gone(tree.pids).values()),
               what="what was left of its session to be ended")


def keeper_factory_of(server):
    """The pid of the server's keeper factory: its child that runs the keeper program."""
    factories = [pid for pid in processes_where_parent_is(server.proc.pid)
                 if keeper_factory_of_one(str(pid), {server.proc.pid})]
    assert len(factories) == 1, factories
    return factories[0]


def processes_where_parent_is(parent):
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()
            and (proc_stat(entry) or [None, None])[1] == str(parent)]


def test_a_task_whose_keeper_is_killed_from_outside_says_so(start_server, fake, tmp_path):
    db, _, client, gate, task_id, _ = task_at_gate(start_server, fake, tmp_path)
    keeper = keeper_pid_of(db, task_id)

    os.kill(keeper, signal.SIGTERM)         # an operator's kill, not a request
    task = client.wait_ended(task_id)

    assert task["status"] == "killed"
    assert task["outcome"] == "killed by a signal to its keeper from outside the server"


def test_a_keeper_factory_that_died_is_started_again_and_its_keepers_run_on(start_server,
                                                                           fake):
    server = start_server()
    client = server.client()
    gate = fake.gate()
    running = client.create(unique("app"), "prod", "gate-%s.out-1" % gate.name)
    client.wait_at_gate(running, gate)
    factory = keeper_factory_of(server)

    os.kill(factory, signal.SIGKILL)
    wait_until(lambda: is_gone(factory), what="the factory to die")
    after = client.create(unique("app"), "prod", "out-2")
    gate.release()

    assert client.wait_ended(after)["output"] == "out 1\nout 2\n"
    assert client.wait_ended(running)["status"] == "finished"
    assert keeper_factory_of(server) != factory


def test_signals_to_the_factorys_group_reach_no_keeper_it_starts(start_server, fake):
    server = start_server()
    client = server.client()
    group = os.getpgid(keeper_factory_of(server))
    stop = threading.Event()

    def signal_the_group():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGTERM)

    thread = threading.Thread(target=signal_the_group, daemon=True)
    thread.start()
    try:
        ids = [client.create(unique("app"), "prod", "out-1") for _ in range(10)]
        ends = [client.wait_ended(task_id)["status"] for task_id in ids]
    finally:
        stop.set()
        thread.join()

    assert ends == ["finished"] * 10      # (before the fix, 4 in 10 were killed)


def bytes_waiting_for(pid, fd):
    """How many bytes wait unread in the pipe that is file descriptor fd of process pid."""
    pipe = os.open("/proc/%d/fd/%d" % (pid, fd), os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(pipe)


def test_a_stalled_factory_an_earlier_server_left_is_ended_before_its_orders_can_run(
        start_server, fake, tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db, "--shutdown-timeout", "1")
    factory = keeper_factory_of(first)
    wait_until(lambda: bytes_waiting_for(factory, 0) == 0, what="the factory to read its program")
    os.kill(factory, signal.SIGSTOP)
    app = unique("app")
    asked = InBackground(lambda: first.client().request("POST", "/%s/prod?action=out-1" % app))
    try:
        wait_until(lambda: bytes_waiting_for(factory, 0) > 0,
                   what="the order to wait in the stalled factory's pipe")
        first.crash()
        second = start_server("--db", db)
        task = second.client().wait_ended(1)
    finally:
        with contextlib.suppress(OSError):
            os.kill(factory, signal.SIGCONT)
        with contextlib.suppress(Exception):
            asked.result()

    assert is_gone(factory)
    assert task["status"] == "killed" and "did not run" in task["outcome"], task
    assert log_lines(second, "ending the keeper factory \\(pid %d\\)" % factory)
    assert fake.actions_run_for(app) == []


def test_the_task_queued_behind_a_lost_one_starts_only_once_all_of_the_lost_one_has_ended(
        api, shared_fake):
    app = unique("app")
    lost = api.create(app, "prod", "ignoreterm.say-lost.hang")
    api.wait_output(lost, "lost\n")
    queued = api.queue(app, "prod", "say-next")
    stubborn = shared_fake.runs_for(app)[0]["pid"]      # pulsar, which ignores SIGTERM

    os.kill(os.getsid(stubborn), signal.SIGKILL)        # its keeper

    def lost_one_gone():
        assert not shared_fake.runs_for(app)[1:], "the next task started while the lost one ran"
        return is_gone(stubborn)

    wait_until(lost_one_gone, what="the lost task's pulsar to be ended")
    ends = [api.wait_ended(task_id) for task_id in (lost, queued)]

    assert [task["status"] for task in ends] == ["lost", "finished"]
    assert ends[1]["output"] == "next\n"


# --- Reliability: the server's own faults ------------------------------------------------------

def test_kill_and_the_end_of_a_task_end_every_process_of_its_session_whatever_its_group(
        api, shared_fake):
    killed = api.create(unique("app"), unique("env"), "othergroup-k.hang")
    api.wait_output(killed, "other group k\n")
    ended = api.create(unique("app"), unique("env"), "othergroup-e.out-1")
    api.wait_output(ended, "other group e\n")

    reply = api.kill(killed)
    finished = api.wait_ended(ended)

    assert reply.status == 200 and reply.json["status"] == "killed", reply
    assert finished["status"] == "finished"
    for name in ("k", "e"):
        wait_until(lambda: all(are_gone(shared_fake.pids(name)).values()),
                   what="the task's child in a group of its own (%s) to be ended" % name)


def test_a_kill_racing_a_natural_exit_never_shows_an_exit_0_as_killed(api):
    answers = []
    for _ in range(20):
        task_id = api.create(unique("app"), unique("env"), "exit-0")
        answers.append((api.kill(task_id), api.wait_ended(task_id)))

    for reply, task in answers:
        if reply.status == 200:
            assert reply.json["status"] == task["status"] == "killed", (reply, task)
            assert task["exitCode"] != 0, task
        else:
            assert_json_error(reply, 409)
            assert (task["status"], task["exitCode"]) == ("finished", 0), task


def test_the_line_holds_at_most_100_tasks_and_refuses_more_with_429(start_server, fake):
    client = start_server("--max-tasks", "1").client()
    gate = fake.gate()
    app = unique("app")
    running = client.create(app, "prod", "gate-%s.out-1" % gate.name)
    client.wait_at_gate(running, gate)

    queued = [client.queue(app, "prod", "out-1") for _ in range(100)]
    refused = client.request("POST", "/%s/prod?action=out-1&queue=true" % app)
    other = client.request("POST", "/%s/stage?action=out-1&queue=true" % app)

    assert len(queued) == 100
    assert_json_error(refused, 429)
    assert "100 tasks wait in line" in refused.json["error"]
    assert refused.headers["Retry-After"]
    assert_json_error(other, 429)          # the limit is the server's, not a pair's


def test_tail_reads_lines_ended_by_a_newline_only_live_and_from_the_history(api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "lineends.gate-%s" % gate.name)
    api.wait_at_gate(task_id, gate)
    live = api.get("/task/%d/output?tail=2" % task_id).body.decode()
    gate.release()
    api.wait_ended(task_id)
    stored = {count: api.get("/task/%d/output?tail=%d" % (task_id, count)).body.decode()
              for count in (1, 2, 3)}

    # The \r, form feed and line separator end no line; on a terminal the \r ends its line.
    assert live == "e\nfgate %s\n" % gate.name
    assert stored[1] == "fgate %s\n" % gate.name
    assert stored[2] == "e\nfgate %s\n" % gate.name
    assert stored[3] == "a\nb" + "c\u2028d\ne\nfgate %s\n" % gate.name


@pytest.mark.parametrize("path", ["/task/%d/state", "/task/%d/output?wait=1",
                                  "/tasks?version=%d"], ids=["state", "output", "list"])
def test_a_long_poll_whose_client_left_frees_its_thread_and_connection_within_seconds(
        start_server, fake, path):
    server = start_server()     # its poll timeout is 30 s
    client = server.client()
    gate = fake.gate()
    task_id = client.create(unique("app"), "prod", "gate-%s" % gate.name)
    client.wait_at_gate(task_id, gate)
    version = client.listing()["version"] if path.startswith("/tasks") else task_id

    with tls_connection(server) as tls:
        tls.sendall(b"GET " + (path % version).encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: metrics_when(client, lambda m: m[CONNECTIONS] == 2),
                   what="the long poll to be waiting")
    settled = wait_until(lambda: metrics_when(client, lambda m: m[CONNECTIONS] == 1
                                              and m[WAITERS] == 0),
                         timeout=3, what="the long poll's connection to be closed")
    gate.release()
    client.wait_ended(task_id)

    assert (settled[CONNECTIONS], settled[WAITERS]) == (1, 0)


def test_an_open_server_never_refuses_parallel_requests_as_failed_logins(api):
    replies = run_side_by_side_requests(api, ["/tasks"] * 40)

    assert sorted(reply.status for reply in replies) == [200] * 40


# Runs the server as a subreaper, as PID 1 of a container would be: every orphan below it
# becomes its child.  (The attribute survives the exec.)
AS_A_SUBREAPER = [sys.executable, "-S", "-c", "import ctypes, os, sys; "
                  "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0); os.execv(sys.argv[1], sys.argv[1:])"]


def zombie_children(pid):
    return [child for child in os.listdir("/proc") if child.isdigit()
            and (lambda fields: fields and int(fields[1]) == pid and fields[0] == "Z")(
                proc_stat(child))]


def test_a_server_that_inherits_orphans_reaps_them(start_server, fake):
    server = start_server(launcher=AS_A_SUBREAPER)
    client = server.client()
    tree = start_process_tree(client, fake, "out-1.")
    keeper = os.getsid(tree.pids["fake"])

    os.kill(keeper, signal.SIGKILL)     # its processes become the server's: it ends and reaps them
    task = client.wait_ended(tree.task_id)
    wait_until(lambda: all(are_gone(tree.pids).values()), what="the task's processes to end")

    assert task["status"] == "lost"
    wait_until(lambda: not zombie_children(server.proc.pid), timeout=5,
               what="the server to reap what it inherited")


def test_the_history_keeps_the_newest_tasks_and_the_recent_days_and_metrics_say_its_size(
        start_server, tmp_path):
    db = tmp_path / "history.sqlite3"
    first = start_server("--db", db)
    client = first.client()
    ids = [client.create(unique("app"), "prod", "out-1") for _ in range(5)]
    for task_id in ids:
        client.wait_ended(task_id)
    first.stop_cleanly()
    old = insert_task(db, unique("app"), "deploy", "finished", exit_code=0, finished=True,
                      created=time.time() - 100 * 86400)

    second = start_server("--db", db, "--keep-tasks", "4", "--keep-days", "30")
    client = second.client()
    wait_until(lambda: client.get("/task/%d" % ids[1]).status == 404,
               what="the oldest tasks to be trimmed")
    metrics = client.metrics()

    assert [client.get("/task/%d" % task_id).status for task_id in ids] == [404, 404, 200, 200,
                                                                            200]
    assert client.get("/task/%d" % old).status == 404      # among the newest 4, but too old
    assert metrics["pulsar_rest_api_history_tasks"] == 3
    assert metrics["pulsar_rest_api_history_bytes"] > 0
    assert log_lines(second, r"INFO removed \d+ task\(s\) older than 30 days")


# --- Output limit and memory ------------------------------------------------------------------

def test_output_past_max_output_is_dropped_after_a_marker_and_the_task_runs_to_its_end(
        shared_server_with):
    client = shared_server_with("--max-output", "64K").client()
    task_id = client.create(unique("app"), "prod", "flood-4.out-1")

    last, followed = client.follow(task_id)
    task = client.task(task_id)
    output = task["output"]
    marker = DROPPED % 65536
    kept = output[:-len(marker)]
    flood = "".join(FLOOD_LINE % i for i in range(FLOOD_LINES))

    assert (task["status"], task["exitCode"]) == ("finished", 0)
    assert followed == output
    assert output.endswith("\n" + marker)
    assert 65536 - 4 <= len(kept.encode("utf-8")) <= 65536
    assert flood.startswith(kept[:-1])     # kept[-1] is the newline that ends it before the marker
    assert "\ufffd" not in output
    assert task["outputLength"] == len(output)


def test_server_memory_stays_bounded_while_a_task_prints_512_mib(start_server, record_property):
    limit_mib, slack_mib = 32, 100    # the default --max-output, and what the server may add
    server = start_server()
    client = server.client()
    idle = server.peak_rss_mib()
    task_id = client.create(unique("app"), "prod", "flood-512")

    last, followed = client.follow(task_id, timeout=60)
    peak = server.peak_rss_mib()      # printed, kept, written to the history, followed
    marker = DROPPED % (limit_mib * 1024 * 1024)
    tail = client.task(task_id, offset=last["outputLength"] - len(marker))
    client.task(task_id)              # the whole kept output in one answer: reported, not bounded
    peak_after_full_read = server.peak_rss_mib()
    record_property("server_peak_rss_mib", round(peak, 1))
    record_property("server_peak_rss_mib_after_full_read", round(peak_after_full_read, 1))
    print("\nserver peak RSS (VmHWM), default --max-output %d MiB, a task printing 512 MiB: "
          "%.1f MiB idle, %.1f MiB once it ended, %.1f MiB after one GET of the whole task"
          % (limit_mib, idle, peak, peak_after_full_read))

    assert (last["status"], last["exitCode"]) == ("finished", 0)
    assert tail["output"] == marker
    assert len(followed.encode("utf-8")) - len(marker) <= limit_mib * 1024 * 1024
    assert peak < limit_mib + slack_mib, "peak RSS %.1f MiB" % peak


# --- Listing tasks ----------------------------------------------------------------------------

def test_task_list_is_newest_first_without_output_and_filters_by_app_env_and_status(api,
                                                                                  shared_fake):
    app, env_x, env_y = unique("app"), unique("env"), unique("env")
    first = api.create(app, env_x, "out-1")
    api.wait_ended(first)       # one task at a time per app and env
    failed = api.create(app, env_x, "out-1.exit-3")
    api.wait_ended(failed)
    other_env = api.create(app, env_y, "out-1")
    api.wait_ended(other_env)
    gate = shared_fake.gate()
    running = api.create(app, env_x, "gate-" + gate.name)
    api.wait_at_gate(running, gate)

    everything = api.listing("app=" + app)
    by_env = api.listed_ids("env=" + env_x)
    by_app_and_env = api.listed_ids("app=%s&env=%s" % (app, env_y))
    by_status = {status: api.listed_ids("app=%s&status=%s" % (app, status))
                 for status in ("queued", "running", "finished", "failed", "killed", "lost")}
    finished_in_x = api.listed_ids("app=%s&env=%s&status=finished" % (app, env_x))
    other_app = api.listing("app=" + unique("app"))
    gate.release()
    api.wait_ended(running)
    ended = api.task(failed)

    assert [task["id"] for task in everything["tasks"]] == [running, other_env, failed, first]
    assert everything["next"] is None
    for task in everything["tasks"]:
        assert set(task) == SUMMARY_KEYS, task
    live = everything["tasks"][0]
    assert (live["status"], live["exitCode"], live["finishedAt"]) == ("running", None, None)
    assert live["outputLength"] == len(gate.line)
    del ended["output"], ended["outputOffset"]
    assert everything["tasks"][2] == ended
    assert by_env == [running, failed, first]
    assert by_app_and_env == [other_env]
    assert by_status == {"queued": [], "running": [running], "finished": [other_env, first],
                         "failed": [failed], "killed": [], "lost": []}
    assert finished_in_x == [first]
    assert (other_app["tasks"], other_app["next"]) == ([], None)


def test_task_list_pages_follow_the_next_link_until_it_is_null(api):
    app, env = unique("app"), unique("env")
    ids = []
    for _ in range(5):          # one after the other: one task at a time per app and env
        ids.append(api.create(app, env, "out-1"))
        api.wait_ended(ids[-1])

    pages, query = [], "app=%s&limit=2" % app
    while query is not None and len(pages) < 10:
        page = api.listing(query)
        pages.append(page)
        query = page["next"] and urllib.parse.urlsplit(page["next"]).query
    before = api.listed_ids("app=%s&before=%d" % (app, ids[2]))

    newest_first = ids[::-1]
    assert [[task["id"] for task in page["tasks"]] for page in pages] == [
        newest_first[0:2], newest_first[2:4], newest_first[4:]]
    for page, last in zip(pages[:2], (ids[3], ids[1])):
        assert page["next"].startswith("/tasks?"), page["next"]
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(page["next"]).query) == {
            "app": [app], "limit": ["2"], "before": [str(last)]}
    assert pages[-1]["next"] is None
    assert before == [ids[1], ids[0]]


def test_task_list_holds_50_by_default_and_up_to_500_when_asked(pulsarless_server):
    client = pulsarless_server.client()
    app = unique("app")
    ids = []
    conn = client.connection()
    try:
        for _ in range(51):         # each fails as its keeper finds no pulsar
            conn.request("POST", "/%s/prod?action=deploy&wait=true" % app)
            response = conn.getresponse()
            assert response.status == 200
            ids.append(json.loads(response.read().decode())["taskId"])
    finally:
        conn.close()

    default = client.listing("app=" + app)
    most = client.listing("app=%s&limit=500" % app)
    one = client.listing("app=%s&limit=1" % app)

    newest_first = ids[::-1]
    assert [task["id"] for task in default["tasks"]] == newest_first[:50]
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(default["next"]).query) == {
        "app": [app], "limit": ["50"], "before": [str(newest_first[49])]}
    assert [task["id"] for task in most["tasks"]] == newest_first
    assert most["next"] is None
    assert [task["id"] for task in one["tasks"]] == newest_first[:1]
    assert {task["status"] for task in most["tasks"]} == {"failed"}


@pytest.mark.parametrize("query", [
    "limit=501", "limit=0", "limit=-1", "limit=x", "limit=1.5", "status=done", "status=Running",
    "before=x", "before=-3", "app=..", "app=", "env=a%2Fb", "sort=id", "limit=5&limit=6", "output=1"])
def test_task_list_rejects_bad_limit_status_or_unknown_parameter(api, query):
    assert_json_error(api.get("/tasks?" + query), 400)


# --- Health and metrics -----------------------------------------------------------------------

def test_health_says_ok_with_the_running_count_and_version(start_server, fake):
    server = start_server()
    client = server.client()
    gate = fake.gate()

    idle = client.get("/health")
    task_id = client.create(unique("app"), "prod", "gate-" + gate.name)
    client.wait_at_gate(task_id, gate)
    busy = client.get("/health")
    gate.release()
    client.wait_ended(task_id)
    done = client.get("/health")
    with_parameter = client.get("/health?verbose=1")
    posted = client.request("POST", "/health")

    version = logged_version(server)
    assert (idle.status, busy.status, done.status) == (200, 200, 200)
    assert idle.headers["Content-Type"].startswith("application/json")
    assert idle.json == {"status": "ok", "running": 0, "version": version, "pulsar": None}
    assert busy.json == {"status": "ok", "running": 1, "version": version, "pulsar": None}
    assert done.json == idle.json
    assert_json_error(with_parameter, 400)
    assert_json_error(posted, 405)


def test_metrics_follow_tasks_requests_long_polls_and_connections(start_server, fake):
    client = start_server().client()
    # Only the scrape's own connection is open once earlier ones have been closed.
    idle = wait_until(lambda: metrics_when(client, lambda m: m[CONNECTIONS] == 1),
                      what="one open connection")
    gate = fake.gate()
    task_id = client.create(unique("app"), "prod", "gate-%s.out-1" % gate.name)
    now = client.wait_at_gate(task_id, gate)

    poll = client.connection()
    try:
        poll.request("GET", "/task/%d/state?version=%d" % (task_id, now["version"]))
        polling = wait_until(
            lambda: metrics_when(client, lambda m: m[WAITERS] == 1 and m[CONNECTIONS] == 2),
            what="the long poll to be counted")
        gate.release()
        answered = json.loads(poll.getresponse().read().decode())
    finally:
        poll.close()
    client.wait_ended(task_id)
    failed = client.wait_ended(client.create(unique("app"), "prod", "exit-3"))
    missing = client.get("/task/99999")
    # A task's end is counted just after it is announced to its watchers: wait for both counts.
    done = wait_until(lambda: metrics_when(client, lambda m: (
        m[WAITERS] == 0 and m[CONNECTIONS] == 1 and m.get(REQUESTS_404) == 1
        and m[DURATION_COUNT] == 2)),
        what="the poll and its connection to end, and both tasks to be counted")

    assert (idle[TASKS_STARTED], idle[TASKS_RUNNING], idle[WAITERS]) == (0, 0, 0)
    assert DURATION_COUNT in idle and TASKS_FINISHED not in idle
    assert (polling[TASKS_STARTED], polling[TASKS_RUNNING]) == (1, 1)
    assert answered["changed"] is True
    assert failed["status"] == "failed"
    assert_json_error(missing, 404)
    assert (done[TASKS_STARTED], done[TASKS_RUNNING]) == (2, 0)
    assert (done[TASKS_FINISHED], done[TASKS_FAILED]) == (1, 1)
    assert (done[DURATION_ALL], done[DURATION_COUNT]) == (2, 2)
    assert done[REQUESTS_200] > polling[REQUESTS_200] > idle.get(REQUESTS_200, 0)


# --- Stopping the server, and signals ---------------------------------------------------------

def test_sigterm_lets_a_running_task_finish_while_reads_are_still_answered(start_server, fake,
                                                                           tmp_path):
    db = tmp_path / "history.sqlite3"
    server = start_server("--db", db, "--shutdown-timeout", "30")
    client = server.client()
    gate = fake.gate()
    app = unique("app")
    task_id = client.create(app, "prod", "out-1.gate-%s.out-2" % gate.name)
    before = client.wait_at_gate(task_id, gate)

    server.send_signal(signal.SIGTERM)
    health = wait_until_stopping(client)
    read = client.get("/task/%d" % task_id)
    polled = client.get("/task/%d/state?version=0&offset=0" % task_id)
    refused = client.request("POST", "/%s/prod?action=deploy" % app)
    waited_for_the_task = server.proc.poll() is None
    gate.release()
    status = server.wait_exit()
    after = start_server("--db", db).client().task(task_id)

    assert health.json == {"status": "stopping", "running": 1, "version": logged_version(server),
                           "pulsar": None}
    assert read.status == 200, read
    assert (read.json["status"], read.json["output"]) == ("running", before["output"])
    assert polled.status == 200, polled
    assert polled.json["changed"] is True and polled.json["task"]["status"] == "running"
    assert_json_error(refused, 503)
    assert waited_for_the_task
    assert status == 0, server.console()
    assert (after["status"], after["exitCode"]) == ("finished", 0)
    assert after["output"] == "out 1\ngate %s\nout 1\nout 2\n" % gate.name
    assert fake.actions_run_for(app) == ["out-1.gate-%s.out-2" % gate.name]
    server.assert_no_traceback()


def test_sigterm_kills_a_task_still_running_after_the_shutdown_timeout(start_server, fake,
                                                                      tmp_path):
    db = tmp_path / "history.sqlite3"
    server = start_server("--db", db, "--shutdown-timeout", "0.5")
    client = server.client()
    task_id, child_line, pids = start_process_tree(client, fake)

    status, took = timed(lambda: server.stop(signal.SIGTERM))
    gone = are_gone(pids)
    after = start_server("--db", db).client().task(task_id)

    assert status == 0, server.console()
    assert 0.45 <= took < 3
    assert gone == {"fake": True, "child": True}
    assert (after["status"], after["exitCode"]) == ("killed", None)
    assert after["output"] == child_line
    server.assert_no_traceback()


def test_second_sigint_stops_at_once_even_a_task_that_ignores_sigterm(start_server, fake,
                                                                      tmp_path):
    db = tmp_path / "history.sqlite3"
    server = start_server("--db", db, "--shutdown-timeout", "60", "--kill-grace", "0.5")
    client = server.client()
    task_id, _, pids = start_process_tree(client, fake, "ignoreterm.")

    started = time.monotonic()
    server.send_signal(signal.SIGINT)
    wait_until_stopping(client)
    server.send_signal(signal.SIGINT)
    status = server.wait_exit()
    took = time.monotonic() - started
    gone = are_gone(pids)
    after = start_server("--db", db).client().task(task_id)

    assert status == 0, server.console()
    assert took < 5         # --shutdown-timeout is 60 s
    assert gone == {"fake": True, "child": True}
    assert (after["status"], after["exitCode"]) == ("killed", None)
    server.assert_no_traceback()


def test_sighup_is_logged_as_ignored_and_the_server_goes_on_serving(start_server):
    server = start_server()

    server.send_signal(signal.SIGHUP)
    ignored = wait_until(lambda: log_lines(server, r"SIGHUP ignored"), what="the SIGHUP log line")
    health = server.client().get("/health")

    assert len(ignored) == 1, ignored
    assert server.proc.poll() is None
    assert (health.status, health.json["status"]) == (200, "ok")


# --- Command line -----------------------------------------------------------------------------

CLI_ERRORS = [
    ("key-without-cert", lambda f: ["--ssl-key", DEV_KEY]),
    ("cert-without-key", lambda f: ["--ssl-cert", DEV_CERT]),
    ("missing-cert", lambda f: ["--ssl-cert", f["missing"], "--ssl-key", DEV_KEY]),
    ("missing-key", lambda f: ["--ssl-cert", DEV_CERT, "--ssl-key", f["missing"]]),
    ("cert-not-a-certificate", lambda f: ["--ssl-cert", f["garbage.pem"], "--ssl-key", DEV_KEY]),
    ("missing-pfx", lambda f: ["--ssl-pfx", f["missing"], "--ssl-passphrase", f["pfx-pass.txt"]]),
    ("missing-pfx-passphrase-file",
     lambda f: ["--ssl-pfx", f["bundle.p12"], "--ssl-passphrase", f["missing"]]),
    ("missing-key-passphrase-file",
     lambda f: ["--ssl-cert", f["cert.pem"], "--ssl-key", f["key.pem"],
                "--ssl-passphrase", f["missing"]]),
    ("wrong-key-passphrase",
     lambda f: ["--ssl-cert", f["cert.pem"], "--ssl-key", f["key.pem"],
                "--ssl-passphrase", f["wrong-pass.txt"]]),
    ("wrong-pfx-passphrase",
     lambda f: ["--ssl-pfx", f["bundle.p12"], "--ssl-passphrase", f["wrong-pass.txt"]]),
    ("branch-with-v1",
     lambda f: ["--config-repo", "R", "--config-branch", "X", "--pulsar-cli", "v1"]),
    ("branch-without-repo", lambda f: ["--config-branch", "X"]),
    ("port-70000", lambda f: ["--port", "70000"]),
    ("port-abc", lambda f: ["--port", "abc"]),
    ("poll-timeout-negative", lambda f: ["--poll-timeout", "-1"]),
    ("poll-timeout-zero", lambda f: ["--poll-timeout", "0"]),
    ("kill-grace-negative", lambda f: ["--kill-grace", "-1"]),
    ("port-in-use", lambda f: ["--port", f["busy-port"]]),
    ("unknown-flag", lambda f: ["--frobnicate"]),
]


@pytest.mark.parametrize("case_id", [case[0] for case in CLI_ERRORS])
def test_command_line_error_is_one_line_and_a_nonzero_exit(cli_error_runs, case_id):
    result = cli_error_runs[case_id].result()

    line = one_error_line(result)
    assert line.startswith(CLI_ERROR_PREFIX), line


# Access and limit flags that cannot work: (id, flags, what the one line must mention).
AUTH_CLI_ERRORS = [
    ("password-without-provider", ["--auth-password", PASSWORD], ["--auth-provider"]),
    ("basic-without-password", ["--auth-provider", "basic", "--auth-username", "alice"],
     ["--auth-password-file", PASSWORD_VARIABLE]),
    ("github-user-with-password",
     ["--auth-provider", "github", "--auth-username", "a", "--auth-password", PASSWORD],
     ["--auth-provider basic", "--auth-method org"]),
    ("org-method-with-basic",
     ["--auth-provider", "basic", "--auth-username", "alice", "--auth-password", PASSWORD,
      "--auth-method", "org"], ["--auth-method"]),
    ("github-without-username", ["--auth-provider", "github"], ["--auth-username"]),
    ("github-api-not-http",
     ["--auth-provider", "github", "--auth-username", "a", "--github-api", "ftp://x"],
     ["--github-api"]),
    ("max-tasks-zero", ["--max-tasks", "0"], ["--max-tasks"]),
    ("username-with-colon", ["--auth-provider", "basic", "--auth-username", "al:ice",
                             "--auth-password", PASSWORD], ["':'", "al:ice"]),
    ("github-api-in-clear", ["--auth-provider", "github", "--auth-username", "a",
                             "--github-api", "http://github.example.com/api/v3"],
     ["clear text", "https://"]),
    ("allow-action-with-a-space", ["--allow-action", "a b"], ["--allow-action"]),
]


@pytest.mark.parametrize("case_id, mentions", [(case[0], case[2]) for case in AUTH_CLI_ERRORS],
                         ids=[case[0] for case in AUTH_CLI_ERRORS])
def test_access_or_limit_flags_that_cannot_work_are_a_one_line_error_naming_the_fix(
        flag_error_runs, case_id, mentions):
    result = flag_error_runs[case_id].result()

    line = one_error_line(result)
    assert line.startswith(CLI_ERROR_PREFIX), line
    for mention in mentions:
        assert mention in line, line
    assert PASSWORD not in result.stdout + result.stderr


BAD_DBS = ["missing-folder", "garbage-file", "directory", "newer-schema"]    # see make_bad_db


@pytest.mark.parametrize("kind", BAD_DBS)
def test_unusable_db_is_a_one_line_error_naming_db_and_leaves_the_file_alone(bad_db_runs, kind):
    path, before, run = bad_db_runs[kind]

    result = run.result()

    line = one_error_line(result)
    assert line.startswith(CLI_ERROR_PREFIX), line
    assert "--db" in line, line
    if before is not None:
        assert path.read_bytes() == before
    if kind == "missing-folder":
        assert not path.parent.exists()


def test_help_exits_0_and_mentions_every_flag(tmp_path, fake):
    result = run_cli(tmp_path, fake, ["--help"])

    assert result.returncode == 0, result.stderr
    for flag in ("--host", "--port", "--pulsar-bin", "--pulsar-cli", "--config-repo",
                 "--config-branch", "--log-dir", "--ssl-cert", "--ssl-key", "--ssl-pfx",
                 "--ssl-passphrase", "--no-ssl", "--poll-timeout", "--kill-grace",
                 "--request-timeout", "--auth-provider", "--auth-method", "--auth-username",
                 "--auth-password", "--auth-password-file", "--github-api", "--max-connections",
                 "--max-tasks", "--allow-concurrent", "--allow-action", "--help"):
        assert flag in result.stdout, flag


# --- TLS: versions, certificates and keys -----------------------------------------------------

def test_tls_is_version_1_2_or_newer_and_older_clients_are_refused(api, shared_server):
    _, version = served_certificate(shared_server)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.create_default_context(cafile=str(DEV_CERT))
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so the client really offers TLS 1.1

    with pytest.raises(ssl.SSLError) as refused:
        served_certificate(shared_server, old)

    assert version in ("TLSv1.2", "TLSv1.3")
    assert refused.value.reason not in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE")
    assert_json_error(api.get("/task/99999"), 404)  # still serving


def test_logged_fingerprint_is_that_of_the_served_certificate(shared_server):
    der, _ = served_certificate(shared_server)

    assert logged_fingerprint(shared_server.log()) == fingerprint_of(der)
    assert fingerprint_of(der) == pem_fingerprint(DEV_CERT)


def test_script_alone_makes_a_self_signed_certificate_once_and_reuses_it(start_server, tmp_path):
    script = copy_script_alone(tmp_path)
    state = tmp_path / "state"
    cert, key = state / "pulsar-rest-api" / "cert.pem", state / "pulsar-rest-api" / "key.pem"

    first = start_server(script=script, env={"XDG_STATE_HOME": str(state)},
                         python=README_PYTHON)
    first_logged = logged_fingerprint(first.log())
    first_served, _ = served_certificate(first, unverified_context())
    cert_text = cert.read_text()
    first.stop_cleanly()
    second = start_server(script=script, env={"XDG_STATE_HOME": str(state)},
                          python=README_PYTHON)
    second_served, _ = served_certificate(second, unverified_context())

    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert first_logged == fingerprint_of(first_served) == pem_fingerprint(cert)
    assert logged_fingerprint(second.log()) == first_logged
    assert fingerprint_of(second_served) == first_logged
    assert cert.read_text() == cert_text


def test_script_alone_without_openssl_exits_with_a_hint(tmp_path, fake):
    script = copy_script_alone(tmp_path)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()

    result = run_cli(tmp_path, fake, [], script=script, python=README_PYTHON,
                     env={"XDG_STATE_HOME": str(tmp_path / "state"), "PATH": str(empty_bin)})

    line = one_error_line(result)
    assert "--ssl-cert" in line and "--no-ssl" in line, line


def test_pfx_is_served_and_leaves_no_temporary_pem_behind(start_server, tmp_path, tls_files):
    temp = tmp_path / "tmp"
    temp.mkdir()

    server = start_server("--ssl-pfx", tls_files["bundle.p12"],
                          "--ssl-passphrase", tls_files["pfx-pass.txt"], env={"TMPDIR": str(temp)})
    context = ssl.create_default_context(cafile=str(tls_files["cert.pem"]))
    served, _ = served_certificate(server, context)
    left_while_running = sorted(str(p) for p in temp.rglob("*"))
    reply = server.client(context).get("/task/1")
    server.stop_cleanly()

    assert fingerprint_of(served) == pem_fingerprint(tls_files["cert.pem"])
    assert logged_fingerprint(server.log()) == fingerprint_of(served)
    assert left_while_running == []
    assert sorted(str(p) for p in temp.rglob("*")) == []
    assert_json_error(reply, 404)


def test_encrypted_key_is_read_with_its_passphrase_file(shared_server_with, tls_files):
    server = shared_server_with("--ssl-cert", tls_files["cert.pem"],
                                "--ssl-key", tls_files["key.pem"],
                                "--ssl-passphrase", tls_files["key-pass.txt"])
    context = ssl.create_default_context(cafile=str(tls_files["cert.pem"]))

    served, _ = served_certificate(server, context)

    assert fingerprint_of(served) == pem_fingerprint(tls_files["cert.pem"])
    assert logged_fingerprint(server.log()) == fingerprint_of(served)


def test_no_ssl_serves_plain_http_and_warns_in_the_log(shared_server_with):
    server = shared_server_with("--no-ssl")
    client = server.client()

    reply = client.request("POST", "/%s/prod?action=deploy" % unique("app"))

    assert server.scheme == "http"
    assert any("WARNING" in line and "--no-ssl" in line for line in server.log().splitlines())
    assert reply.status == 200, reply
    assert reply.json["url"].endswith("//127.0.0.1:%d/task/%d" % (server.port,
                                                                  reply.json["taskId"]))
    assert client.wait_ended(reply.json["taskId"])["status"] == "finished"


# --- Logs -------------------------------------------------------------------------------------

def test_log_has_one_line_per_request_with_address_method_path_status_bytes_and_time(
        api, shared_server):
    app, env = unique("app"), unique("env")

    reply = api.request("POST", "/%s/%s?action=out-1" % (app, env))
    pattern = r"INFO 127\.0\.0\.1:%d POST '/%s/%s\?action=out-1' 200 %d \d+ms$" % (
        reply.local_port, app, env, len(reply.body))
    wait_until(lambda: log_lines(shared_server, pattern), what="the request's log line")
    api.wait_ended(reply.json["taskId"])

    assert reply.status == 200, reply
    assert len(log_lines(shared_server, "'/%s/%s" % (app, env))) == 1


def test_log_says_who_started_and_killed_each_task_and_how_it_ended(api, shared_server):
    app = unique("app")
    started = api.request("POST", "/%s/prod?action=out-1" % app)
    failing = api.request("POST", "/%s/stage?action=exit-3" % app)     # an env each: they run
    hanging = api.request("POST", "/%s/test?action=hang" % app)        # at once
    ids = [reply.json["taskId"] for reply in (started, failing, hanging)]
    api.wait_ended(ids[0])
    api.wait_ended(ids[1])
    killed = api.kill(ids[2])
    pid = api.task(ids[0])["pid"]

    expected = [
        r"INFO task %d started by 127\.0\.0\.1:%d: %s prod out-1 \(keeper pid \d+\)$"
        % (ids[0], started.local_port, app),
        r"INFO task %d: pulsar runs as pid %d$" % (ids[0], pid),
        r"INFO task %d finished \(exit code 0\) after \d+\.\d s: pulsar exited with code 0$"
        % ids[0],
        r"INFO task %d started by 127\.0\.0\.1:%d: %s stage exit-3 \(keeper pid \d+\)$"
        % (ids[1], failing.local_port, app),
        r"INFO task %d failed \(exit code 3\) after \d+\.\d s: pulsar exited with code 3$"
        % ids[1],
        r"INFO task %d: kill requested by 127\.0\.0\.1:%d$" % (ids[2], killed.local_port),
        r"INFO task %d killed \((signal|exit code) \d+\) after \d+\.\d s: killed by "
        r"127\.0\.0\.1:%d$" % (ids[2], killed.local_port),
    ]
    wait_until(lambda: all(log_lines(shared_server, pattern) for pattern in expected),
               what="every task event in the log")

    assert killed.status == 200, killed
    for pattern in expected:
        assert len(log_lines(shared_server, pattern)) == 1, pattern


def test_control_characters_in_the_request_method_are_escaped_in_the_log(shared_server):
    reply = raw_exchange(shared_server, b"G\x1bET /task/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Connection: close\r\n\r\n")
    logged = wait_until(lambda: log_lines(shared_server, r"G\\x1bET"),
                        what="the request in the log")

    assert 400 <= reply.status < 600 and reply.status != 500, reply
    assert list(reply.json) == ["error"]
    assert len(logged) == 1, logged
    assert "\x1b" not in shared_server.log()


def test_log_file_moved_away_by_logrotate_is_created_again_by_the_next_request(start_server):
    server = start_server()
    client = server.client()
    rotated = server.log_path.with_name(LOG_NAME + ".1")
    server.log_path.rename(rotated)

    reply = client.get("/task/4242")
    pattern = r"INFO 127\.0\.0\.1:%d GET '/task/4242' 404 \d+ \d+ms: no task 4242$" % (
        reply.local_port)
    wait_until(lambda: log_lines(server, pattern), what="the request's line in a new log file")

    assert_json_error(reply, 404)
    assert "/task/4242" not in rotated.read_text()
    assert LISTENING.search(rotated.read_text())
    assert not LISTENING.search(server.log())


# --- One task per app and environment, the line, and --max-tasks ------------------------------

def test_second_task_for_a_busy_pair_is_409_naming_the_task_that_holds_it(api, shared_fake):
    gate = shared_fake.gate()
    app, env = unique("app"), unique("env")
    first = api.request("POST", "/%s/%s?action=gate-%s" % (app, env, gate.name))
    holder = first.json["taskId"]
    held = api.wait_at_gate(holder, gate)

    busy = api.request("POST", "/%s/%s" % (app, env), body="action=out-2", content_type=FORM)
    other_env = api.create(app, unique("env"), "out-1")       # the app alone is not the lock
    gate.release()
    api.wait_ended(holder)
    api.wait_ended(other_env)

    assert busy.status == 409, busy
    assert isinstance(busy.json["error"], str) and str(holder) in busy.json["error"], busy
    assert {key: busy.json[key] for key in ("taskId", "action", "startedBy", "createdAt",
                                            "startedAt")} == {
        "taskId": holder, "action": "gate-" + gate.name,
        "startedBy": "127.0.0.1:%d" % first.local_port, "createdAt": held["createdAt"],
        "startedAt": held["startedAt"]}
    assert held["createdAt"] <= held["startedAt"]
    assert shared_fake.actions_run_for(env) == [
        "gate-" + gate.name]


@pytest.mark.parametrize("how", ["form", "json", "query"])
def test_queue_true_waits_in_line_and_starts_once_the_pair_is_free(api, shared_fake, how):
    gate = shared_fake.gate()
    app, env = unique("app"), unique("env")
    holder = api.create(app, env, "gate-" + gate.name)
    api.wait_at_gate(holder, gate)
    path, body, content_type = "/%s/%s" % (app, env), None, None
    if how == "form":
        body, content_type = "action=out-1&queue=true", FORM
    elif how == "json":
        body, content_type = json.dumps({"action": "out-1", "queue": True}), JSON
    else:
        path += "?action=out-1&queue=true"

    queued = api.request("POST", path, body=body, content_type=content_type)
    queued_id = queued.json["taskId"]
    waiting = api.task(queued_id)
    listed = api.listed_ids("app=%s&status=queued" % app)
    runs_while_waiting = shared_fake.actions_run_for(env)
    gate.release()
    ended = api.wait_ended(queued_id)
    runs = shared_fake.actions_run_for(env)

    assert queued.status == 200, queued
    assert queued.json == {"taskId": queued_id, "status": "queued",
                           "url": "https://127.0.0.1:%d/task/%d" % (api.port, queued_id)}
    assert (waiting["status"], waiting["pid"], waiting["exitCode"]) == ("queued", None, None)
    assert (waiting["finishedAt"], waiting["output"]) == (None, "")
    assert listed == [queued_id]
    assert runs_while_waiting == ["gate-" + gate.name]
    assert (ended["status"], ended["exitCode"], ended["output"]) == ("finished", 0, "out 1\n")
    assert runs == ["gate-" + gate.name, "out-1"]        # after the holder, never beside it
    assert api.task(holder)["status"] == "finished"


def test_two_queued_tasks_of_a_pair_start_one_after_the_other_in_order(shared_server_with):
    server = shared_server_with("--poll-timeout", SHORT_POLL)   # a stuck line fails in seconds
    client = server.client()
    holder_gate, first_gate = server.fake.gate(), server.fake.gate()
    app = unique("app")
    holder = client.create(app, "prod", "gate-" + holder_gate.name)
    client.wait_at_gate(holder, holder_gate)
    first = client.queue(app, "prod", "gate-" + first_gate.name)
    second = client.queue(app, "prod", "out-1")

    holder_gate.release()
    # Starting a task takes milliseconds: 3 s is plenty, and a line that is stuck fails fast.
    first_running = client.wait_at_gate(first, first_gate, timeout=3)
    second_meanwhile = client.task(second)
    first_gate.release()
    second_ended = client.wait_ended(second, timeout=3)
    first_ended = client.task(first)

    assert first_running["status"] == "running"
    assert second_meanwhile["status"] == "queued"
    assert first_ended["status"] == "finished"
    assert (second_ended["status"], second_ended["output"]) == ("finished", "out 1\n")
    assert server.fake.actions_run_for(app) == [
        "gate-" + holder_gate.name, "gate-" + first_gate.name, "out-1"]


def test_killing_a_queued_task_takes_it_out_of_the_line_and_it_never_runs(api, shared_fake):
    gate = shared_fake.gate()
    app, env = unique("app"), unique("env")
    holder = api.create(app, env, "gate-" + gate.name)
    api.wait_at_gate(holder, gate)
    queued = api.queue(app, env, "out-1")

    killed = api.kill(queued)
    read = api.task(queued)
    gate.release()
    api.wait_ended(holder)
    # This one waits behind anything still in line for the pair: once it has run, so has that.
    follow_up = api.request("POST", "/%s/%s?action=out-2&queue=true" % (app, env))
    after = api.wait_ended(follow_up.json["taskId"])

    assert killed.status == 200, killed
    assert (killed.json["id"], killed.json["status"]) == (queued, "killed")
    assert (killed.json["exitCode"], killed.json["pid"]) == (None, None)
    assert "removed from the line" in killed.json["output"].splitlines()[-1], killed.json
    assert killed.json["output"].endswith("\n")
    assert read["status"] == "killed"
    assert after["status"] == "finished"
    assert shared_fake.actions_run_for(env) == [
        "gate-" + gate.name, "out-2"]


def test_allow_concurrent_lets_two_tasks_of_one_pair_run_at_once(shared_server_with):
    server = shared_server_with("--allow-concurrent")
    client = server.client()
    gates = [server.fake.gate(), server.fake.gate()]
    app = unique("app")

    ids = [client.create(app, "prod", "gate-" + gate.name) for gate in gates]
    both = [client.wait_at_gate(task_id, gate)
            for task_id, gate in zip(ids, gates)]
    for gate in gates:
        gate.release()
    ended = [client.wait_ended(task_id) for task_id in ids]

    assert [task["status"] for task in both] == ["running", "running"]
    assert [task["status"] for task in ended] == ["finished", "finished"]


def test_a_queued_task_is_dropped_when_the_server_stops_and_never_runs(start_server, fake):
    server = start_server("--shutdown-timeout", "30")
    client = server.client()
    gate = fake.gate()
    app = unique("app")
    holder = client.create(app, "prod", "gate-" + gate.name)
    client.wait_at_gate(holder, gate)
    queued = client.queue(app, "prod", "out-1")

    server.send_signal(signal.SIGTERM)
    wait_until_stopping(client)
    dropped = client.task(queued)
    holder_meanwhile = client.task(holder)
    gate.release()
    status = server.wait_exit()

    assert (dropped["status"], dropped["exitCode"], dropped["pid"]) == ("killed", None, None)
    assert "the server stopped" in dropped["output"].splitlines()[-1], dropped
    assert holder_meanwhile["status"] == "running"
    assert status == 0, server.console()
    assert [run["argv"][-1] for run in fake.invocations()] == ["gate-" + gate.name]
    server.assert_no_traceback()


def test_max_tasks_refuses_one_more_with_429_or_queues_it_until_a_slot_frees(
        shared_server_with):
    server = shared_server_with("--max-tasks", 2)     # no other test runs tasks there
    client = server.client()
    gates = [server.fake.gate(), server.fake.gate()]
    running = [client.create(unique("app"), "prod", "gate-" + gate.name) for gate in gates]
    for task_id, gate in zip(running, gates):
        client.wait_at_gate(task_id, gate)
    app = unique("app")

    refused = client.request("POST", "/%s/prod?action=out-1" % app)
    queued = client.request("POST", "/%s/prod?action=out-1&queue=true" % app)
    waiting = client.task(queued.json["taskId"])
    runs_while_full = server.fake.actions_run_for(app)
    gates[0].release()
    ended = client.wait_ended(queued.json["taskId"])
    still_held = client.task(running[1])
    gates[1].release()
    client.wait_ended(running[1])

    assert_json_error(refused, 429)
    assert "--max-tasks" in refused.json["error"], refused
    assert (queued.status, queued.json["status"]) == (200, "queued"), queued
    assert waiting["status"] == "queued"
    assert runs_while_full == []
    assert (ended["status"], ended["output"]) == ("finished", "out 1\n")
    assert still_held["status"] == "running"      # the slot it took was the first one's
    assert client.task(running[0])["status"] == "finished"


# --- Access: HTTP Basic -----------------------------------------------------------------------

@pytest.mark.parametrize("source", ["file", "environment", "flag"])
def test_basic_login_lets_in_only_the_password_from_a_file_the_environment_or_the_flag(
        shared_login_server, source):
    server = shared_login_server(source)
    tasks = "/tasks?app=" + unique("app")       # a list of no tasks, whoever shares the server

    anonymous = server.client().get(tasks)
    wrong = server.client(headers=basic_auth("alice", PASSWORD + "x")).get(tasks)
    other_user = server.client(headers=basic_auth("mallory", PASSWORD)).get(tasks)
    as_bearer = server.client(headers=bearer_auth(PASSWORD)).get(tasks)
    right = server.client(headers=basic_auth("alice", PASSWORD)).get(tasks)

    for reply in (anonymous, wrong, other_user, as_bearer):
        assert_refused_login(reply, 401)
        assert_not_cached_and_not_sniffed(reply)
    assert right.status == 200, right
    assert right.json["tasks"] == []
    warnings = log_lines(server, r"WARNING .*--auth-password is in the shell's history")
    assert len(warnings) == (1 if source == "flag" else 0), server.log()
    assert leaked_secrets(server.log()) == []


def test_basic_login_is_required_on_every_route_but_health(start_server, fake, tmp_path):
    flags, env = basic_login(tmp_path, "file")
    server = start_server(*flags, env=env)
    alice = server.client(headers=basic_auth("alice", PASSWORD))
    gate = fake.gate()
    task_id = alice.create(unique("app"), "prod", "gate-" + gate.name)
    alice.wait_at_gate(task_id, gate)
    refused_app, allowed_app = unique("app"), unique("app")
    routes = [("POST", "/%s/prod?action=out-1" % refused_app), ("GET", "/task/%d" % task_id),
              ("GET", "/task/%d/state?version=0" % task_id), ("GET", "/task/%d/kill" % task_id),
              ("POST", "/task/%d/kill" % task_id), ("GET", "/tasks"), ("GET", "/metrics"),
              ("GET", "/apps")]

    anonymous = [server.client().request(method, path) for method, path in routes]
    mistaken = [server.client(headers=basic_auth("alice", "wrong-password")).request(method, path)
                for method, path in routes]      # 8 failures: under the 10 that earn a 429
    untouched = alice.task(task_id)
    health = server.client().get("/health")
    allowed = [alice.get("/task/%d" % task_id), alice.get("/task/%d/state?version=0" % task_id),
               alice.get("/tasks"), alice.get("/metrics"),
               alice.request("POST", "/%s/prod?action=out-1" % allowed_app),
               alice.kill(task_id, method="GET")]
    alice.wait_ended(allowed[4].json["taskId"])

    for reply in anonymous + mistaken:
        assert_refused_login(reply, 401)
        assert_not_cached_and_not_sniffed(reply)
    assert untouched["status"] == "running"
    assert fake.actions_run_for(refused_app) == []
    assert health.status == 200, health
    assert set(health.json) == {"status", "running", "version", "pulsar"}
    assert leaked_secrets(reply_text(health)) == []
    assert [reply.status for reply in allowed] == [200] * 6, allowed
    assert allowed[-1].json["status"] == "killed"


def test_log_names_who_made_each_request_start_and_kill_but_never_the_password(
        shared_login_server):
    server = shared_login_server("environment")
    alice = server.client(headers=basic_auth("alice", PASSWORD))
    gate = server.fake.gate()
    app = unique("app")
    started = alice.request("POST", "/%s/prod?action=gate-%s" % (app, gate.name))
    task_id = started.json["taskId"]
    running = alice.wait_at_gate(task_id, gate)

    pulsar_environment = process_environment(running["pid"])
    killed = alice.kill(task_id)
    refused = server.client(headers=basic_auth("alice", "wrong-password")).get("/tasks")
    replies = [started, killed, refused, alice.get("/task/%d" % task_id), alice.get("/tasks"),
               alice.get("/metrics"), server.client().get("/health")]
    expected = [
        r"INFO 127\.0\.0\.1:%d POST '/%s/prod\?action=gate-%s' 200 \d+ \d+ms user='alice'$"
        % (started.local_port, app, gate.name),
        r"INFO task %d started by alice \(127\.0\.0\.1:%d\): %s prod gate-%s \(keeper pid "
        r"\d+\)$" % (task_id, started.local_port, app, gate.name),
        r"INFO task %d: pulsar runs as pid %d$" % (task_id, running["pid"]),
        r"INFO task %d: kill requested by alice \(127\.0\.0\.1:%d\)$" % (task_id, killed.local_port),
        r"INFO 127\.0\.0\.1:%d POST '/task/%d/kill' 200 \d+ \d+ms user='alice'$"
        % (killed.local_port, task_id),
        r"INFO 127\.0\.0\.1:%d GET '/tasks' 401 \d+ \d+ms: %s$" % (
            refused.local_port, re.escape(refused.json["error"])),
    ]
    wait_until(lambda: all(log_lines(server, pattern) for pattern in expected),
               what="the requests, the start and the kill in the log")

    assert killed.status == 200, killed
    assert_refused_login(refused, 401)
    for pattern in expected:
        assert len(log_lines(server, pattern)) == 1, pattern
    assert PASSWORD_VARIABLE not in pulsar_environment
    assert PASSWORD not in "".join(pulsar_environment.values())
    assert pulsar_environment["FAKE_DIR"] == str(server.fake.dir)    # the rest is passed on
    assert pulsar_environment["PATH"] == os.environ["PATH"]
    for reply in replies:
        assert leaked_secrets(reply_text(reply)) == [], reply
    assert leaked_secrets(server.log() + server.console()) == []


def test_refused_login_on_a_kept_alive_connection_is_not_logged_as_the_previous_user(
        shared_login_server):
    server = shared_login_server()
    conn = server.client().connection()
    try:
        statuses = []
        for path, headers in (("/tasks", basic_auth("alice", PASSWORD)),
                              ("/task/4242", basic_auth("alice", "wrong-password")),
                              ("/task/4343", {})):     # this 401 closes the connection
            conn.request("GET", path, headers=headers)
            port = conn.sock.getsockname()[1]
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        conn.close()
    first = r"INFO 127\.0\.0\.1:%d GET '/tasks' 200 \d+ \d+ms user='alice'$" % port
    wait_until(lambda: log_lines(server, first) and log_lines(server, "'/task/4343' 401"),
               what="the three requests in the log")

    assert statuses == [200, 401, 401]
    for path in ("/task/4242", "/task/4343"):
        lines = log_lines(server, r"127\.0\.0\.1:%d GET '%s' 401 " % (port, path))
        assert len(lines) == 1 and not re.search(r"user=", lines[0]), lines


# --- Access: GitHub tokens --------------------------------------------------------------------

def test_github_token_of_a_listed_login_is_let_in_as_basic_or_bearer_and_others_are_refused(
        start_server, github):
    server = start_github_server(start_server, github, "--auth-username", "alice,bob")

    as_basic = server.client(headers=basic_auth(ALICE_TOKEN, "x-oauth-basic")).get("/tasks")
    as_bearer = server.client(headers=bearer_auth(BOB_TOKEN)).get("/tasks")
    not_listed = server.client(headers=bearer_auth(CAROL_TOKEN)).get("/tasks")
    not_a_token = server.client(headers=bearer_auth(UNKNOWN_TOKEN)).get("/tasks")
    asked = github.requests
    alice = server.client(headers=bearer_auth(ALICE_TOKEN))     # the same token, asked again
    again = alice.get("/tasks")
    started = alice.request("POST", "/%s/prod?action=out-1" % unique("app"))
    alice.wait_ended(started.json["taskId"])
    logged = [r"INFO task %d started by alice \(127\.0\.0\.1:%d\): " % (
        started.json["taskId"], started.local_port),
        r"INFO 127\.0\.0\.1:%d GET '/tasks' 200 \d+ \d+ms user='bob'$" % as_bearer.local_port]
    wait_until(lambda: all(log_lines(server, pattern) for pattern in logged),
               what="bob's request and alice's task in the log")

    assert (as_basic.status, as_bearer.status, again.status) == (200, 200, 200)
    assert_refused_login(not_listed, 403)
    assert "carol" in not_listed.json["error"]
    assert_refused_login(not_a_token, 401)
    assert asked == [("/user", "token " + token)
                     for token in (ALICE_TOKEN, BOB_TOKEN, CAROL_TOKEN, UNKNOWN_TOKEN)]
    assert github.requests == asked         # a yes is remembered: GitHub is not asked again
    assert started.status == 200, started
    assert leaked_secrets(server.log() + server.console()) == []


@pytest.mark.parametrize("failure", ["answers-500", "unreachable"])
def test_github_failing_answers_503_and_never_lets_a_request_through(start_server, fake, github,
                                                                     failure):
    server = start_github_server(start_server, github, "--auth-username", "alice")
    client = server.client(headers=bearer_auth(ALICE_TOKEN))
    if failure == "answers-500":
        github.failing = 500
    else:
        github.stop()
    app = unique("app")

    created = client.request("POST", "/%s/prod?action=out-1" % app)
    listed = client.get("/tasks")
    github.failing = None
    meanwhile = client.get("/tasks")

    for reply in (created, listed, meanwhile):
        assert_json_error(reply, 503)
        assert "GitHub" in reply.json["error"], reply
        assert reply.headers["Retry-After"] == "10", reply.headers
        assert_not_cached_and_not_sniffed(reply)
    assert fake.actions_run_for(app) == []
    # Its failure is kept for 10 s: GitHub is not asked once per request meanwhile, and the
    # answer is not a refusal of the token.
    assert len(github.requests) == (1 if failure == "answers-500" else 0)
    assert leaked_secrets(server.log() + server.console()) == []


@pytest.mark.parametrize("odd", ["redirect", "garbage"])
def test_github_redirect_or_garbage_is_503_and_the_token_goes_nowhere_else(start_server, github,
                                                                            odd):
    elsewhere = FakeGitHub(GITHUB_LOGINS, GITHUB_MEMBERS)
    try:
        server = start_github_server(start_server, github, "--auth-username", "alice")
        if odd == "redirect":
            github.redirect_to = elsewhere.url
        else:
            github.garbage = True

        reply = server.client(headers=bearer_auth(ALICE_TOKEN)).get("/tasks")
    finally:
        elsewhere.stop()

    assert_json_error(reply, 503)
    assert elsewhere.requests == []
    server.assert_no_traceback()


@pytest.mark.parametrize("checker", ["client-token", "server-token"])
def test_github_org_lets_in_members_only_asking_with_the_servers_token_when_it_has_one(
        start_server, tmp_path, github, checker):
    flags = ["--auth-method", "org", "--auth-username", "acme"]
    if checker == "server-token":
        token_file = tmp_path / "github-token.txt"
        token_file.write_text(SERVER_TOKEN + "\n")
        flags += ["--auth-password-file", token_file]
    server = start_github_server(start_server, github, *flags)

    member = server.client(headers=basic_auth(ALICE_TOKEN, "x-oauth-basic")).get("/tasks")
    outsider = server.client(headers=bearer_auth(CAROL_TOKEN)).get("/tasks")
    asked = github.requests
    member_again = server.client(headers=bearer_auth(ALICE_TOKEN)).get("/tasks")

    def asker(token):
        return "token " + (SERVER_TOKEN if checker == "server-token" else token)

    assert member.status == 200, member
    assert_refused_login(outsider, 403)
    assert asked == [("/user", "token " + ALICE_TOKEN),
                     ("/orgs/acme/members/alice", asker(ALICE_TOKEN)),
                     ("/user", "token " + CAROL_TOKEN),
                     ("/orgs/acme/members/carol", asker(CAROL_TOKEN))]
    assert member_again.status == 200, member_again
    assert github.requests == asked
    assert leaked_secrets(server.log() + server.console()) == []


# --- Access: the failed-login brake and cross-site requests -----------------------------------

def test_ten_wrong_logins_from_one_address_get_429_even_with_the_right_password_there_only(
        start_server, tmp_path):
    flags, env = basic_login(tmp_path, "file")
    server = start_server(*flags, env=env)
    right = basic_auth("alice", PASSWORD)

    # Requests without credentials are how every client starts: they are not failures.
    missing = [server.client(source="127.0.0.3").get("/tasks") for _ in range(12)]
    after_missing = server.client(source="127.0.0.3", headers=right).get("/tasks")
    wrong = [server.client(headers=basic_auth("alice", "guess-%d" % attempt)).get("/tasks")
             for attempt in range(10)]
    refused = server.client(headers=right).get("/tasks")
    elsewhere = server.client(source="127.0.0.2", headers=right).get("/tasks")

    for reply in missing + wrong:
        assert_refused_login(reply, 401)
    assert after_missing.status == 200, after_missing
    assert_json_error(refused, 429)
    assert_not_cached_and_not_sniffed(refused)
    assert 1 <= int(refused.headers["Retry-After"]) <= 61, refused.headers
    assert elsewhere.status == 200, elsewhere
    assert len(log_lines(server, r"WARNING 127\.0\.0\.1: 10 failed logins")) == 1, server.log()
    assert leaked_secrets(server.log()) == []


def test_parallel_guesses_with_distinct_tokens_count_against_the_brake_while_github_is_slow(
        start_server, github):
    server = start_github_server(start_server, github, "--auth-username", "alice")
    github.hold = threading.Event()
    replies = []

    def guess(number):
        token = "gho_guess_%04d" % number
        replies.append(server.client(headers=bearer_auth(token)).get("/tasks"))

    guessers = [threading.Thread(target=guess, args=(number,)) for number in range(20)]
    for guesser in guessers:
        guesser.start()
    try:
        wait_until(lambda: len(replies) == 10 and len(github.requests) >= 10,
                   what="10 guesses refused and 10 asking GitHub")
        asked_meanwhile = len(github.requests)
    finally:
        github.hold.set()
        for guesser in guessers:
            guesser.join(TIMEOUT)

    assert asked_meanwhile == 10
    assert sorted(reply.status for reply in replies) == [401] * 10 + [429] * 10
    assert len(github.requests) == 10


def test_parallel_requests_with_one_token_ask_github_once_and_good_ones_are_never_refused(
        start_server, github):
    server = start_github_server(start_server, github, "--auth-username", "alice")
    github.hold = threading.Event()
    replies = []

    def request(token):
        replies.append(server.client(headers=bearer_auth(token)).get("/tasks"))

    requests = [threading.Thread(target=request, args=(token,))
                for token in [ALICE_TOKEN] * 30 + [UNKNOWN_TOKEN] * 5]
    for thread in requests:
        thread.start()
    wait_until(lambda: len(github.requests) == 2, what="one question about each token")
    github.hold.set()
    for thread in requests:
        thread.join(TIMEOUT)

    assert len(github.requests) == 2
    assert sorted(reply.status for reply in replies) == [200] * 30 + [401] * 5


def test_cross_site_requests_may_not_start_or_kill_tasks_but_may_read_them(api, shared_server,
                                                                          shared_fake):
    gate = shared_fake.gate()
    app = unique("app")
    holder = api.create(app, unique("env"), "gate-" + gate.name)
    api.wait_at_gate(holder, gate)
    own = "https://127.0.0.1:%d" % shared_server.port       # http.client's Host is 127.0.0.1:PORT
    cross_site = {"Sec-Fetch-Site": "cross-site"}
    evil = {"Origin": "https://evil.example"}
    refused_env = unique("env")

    refused = [
        api.request("POST", "/%s/%s?action=out-1" % (app, refused_env), headers=cross_site),
        api.request("POST", "/%s/%s" % (app, refused_env), body="action=out-1",
                    content_type=FORM, headers=evil),
        api.request("GET", "/task/%d/kill" % holder, headers=cross_site),
        api.request("POST", "/task/%d/kill" % holder, headers=evil),
        api.request("GET", "/task/%d/kill" % holder, headers=dict(cross_site, Origin=own)),
    ]
    read = api.request("GET", "/task/%d" % holder, headers=dict(cross_site, **evil))
    polled = api.request("GET", "/task/%d/state?version=0" % holder, headers=cross_site)
    same_origin = {"Origin": own, "Sec-Fetch-Site": "same-origin"}
    started = api.request("POST", "/%s/%s?action=out-1" % (app, unique("env")), headers=same_origin)
    killed = api.request("GET", "/task/%d/kill" % holder, headers={"Origin": own})
    api.wait_ended(started.json["taskId"])

    for reply in refused:
        assert_json_error(reply, 403)
    assert shared_fake.actions_run_for(refused_env) == []
    assert (read.status, read.json["status"]) == (200, "running"), read
    assert (polled.status, polled.json["task"]["status"]) == (200, "running"), polled
    assert started.status == 200, started
    assert (killed.status, killed.json["status"]) == (200, "killed"), killed


def test_state_changes_from_another_page_of_the_same_site_or_a_bad_origin_are_refused(
        api, shared_server, shared_fake):
    gate = shared_fake.gate()
    holder = api.create(unique("app"), unique("env"), "gate-" + gate.name)
    api.wait_at_gate(holder, gate)
    own = "https://127.0.0.1:%d" % shared_server.port
    app, env = unique("app"), unique("env")

    refused = [     # an <img> on another port of this host is "same-site" and sends no Origin
        api.request("GET", "/task/%d/kill" % holder, headers={"Sec-Fetch-Site": "same-site"}),
        api.request("GET", "/task/%d/kill" % holder, headers={"Referer": "https://other.example/"}),
        api.request("POST", "/%s/%s?action=out-1" % (app, env), headers={"Origin": "http://["}),
        api.request("POST", "/%s/%s?action=out-1" % (app, env),
                    headers={"Referer": "https://127.0.0.1:1/page"}),
    ]
    typed = api.request("POST", "/%s/%s?action=out-1" % (app, unique("env")),
                        headers={"Sec-Fetch-Site": "none"})     # a URL typed in the address bar
    from_page = api.request("GET", "/task/%d/kill" % holder,
                            headers={"Sec-Fetch-Site": "same-origin", "Referer": own + "/"})
    api.wait_ended(typed.json["taskId"])

    for reply in refused:
        assert_json_error(reply, 403)
    assert shared_fake.actions_run_for(env) == []
    assert typed.status == 200, typed
    assert (from_page.status, from_page.json["status"]) == (200, "killed"), from_page
    assert "Traceback" not in shared_server.log()


# --- Keeping users in: what clients without credentials may hold, and the edges of access ----

def other_address():
    """An address of this host that is not loopback (the server caps and throttles only those),
    or a skip saying there is none."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))       # no packet is sent: only a route is chosen
        address = probe.getsockname()[0]
    except OSError:
        address = None
    finally:
        probe.close()
    if not address or address.startswith("127."):
        pytest.skip("this host has no address but loopback to come from")
    return address


def test_a_request_without_credentials_is_answered_and_its_connection_closed(start_server,
                                                                            tmp_path):
    flags, env = basic_login(tmp_path, "file")
    server = start_server(*flags, "--request-timeout", "0.5", env=env)
    with tls_connection(server) as anonymous:
        anonymous.sendall(b"GET /tasks HTTP/1.1\r\nHost: x\r\n\r\n")
        refused, anonymous_closed = read_reply(anonymous), closed_by_peer(anonymous, TIMEOUT)
    with tls_connection(server) as health:
        health.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        healthy, health_closed = read_reply(health), closed_by_peer(health, TIMEOUT)
    wrong = basic_auth("alice", "wrong-password")["Authorization"].encode()
    with tls_connection(server) as mistaken:
        mistaken.sendall(b"GET /tasks HTTP/1.1\r\nHost: x\r\nAuthorization: " + wrong +
                         b"\r\n\r\n")
        refused_login = read_reply(mistaken)
        (_, mistaken_idle) = timed(lambda: closed_by_peer(mistaken, TIMEOUT))
    right = basic_auth("alice", PASSWORD)["Authorization"].encode()
    with tls_connection(server) as user:
        user.sendall(b"GET /tasks HTTP/1.1\r\nHost: x\r\nAuthorization: " + right + b"\r\n\r\n")
        allowed, user_kept = read_reply(user), not closed_by_peer(user, 1)

    assert (refused.status, refused.headers["Connection"]) == (401, "close")
    assert anonymous_closed
    assert healthy.status == 200 and health_closed          # /health cannot hold a connection
    assert refused_login.status == 401
    assert mistaken_idle < 2                # no credentials that work: it may idle 0.5 s only
    assert allowed.status == 200 and user_kept      # a user keeps it (60 s), past 2 x 0.5 s


def test_clients_without_credentials_from_any_number_of_addresses_never_keep_a_user_out(
        start_server, tmp_path):
    flags, env = basic_login(tmp_path, "file")
    server = start_server(*flags, "--max-connections", "4", env=env)
    alice = server.client()
    silent = [tcp_connection(server) for _ in range(4)]     # as many as are allowed, no hello
    users, statuses = [], []
    try:
        for _ in range(4):          # each takes the place of the oldest silent connection
            users.append(alice.connection())
            users[-1].request("GET", "/tasks", headers=basic_auth("alice", PASSWORD))
            response = users[-1].getresponse()
            response.read()
            statuses.append(response.status)
        gave_way = [closed_by_peer(sock, TIMEOUT) for sock in silent]
        busy, _ = unasked_reply(server)     # every connection is a user's now: none gives way
    finally:
        for connection in silent + users:
            connection.close()

    assert statuses == [200] * 4
    assert gave_way == [True] * 4
    assert_json_error(busy, 503)
    assert log_lines(server, r"closed to make room for a new connection \(--max-connections\): "
                             r"it had shown no working credentials")


def test_one_address_holds_at_most_64_connections_and_others_still_get_in(start_server):
    address = other_address()
    server = start_server("--host", address, "--max-connections", "100")
    held = [socket.create_connection((address, server.port), timeout=TIMEOUT)
            for _ in range(64)]
    try:
        with socket.create_connection((address, server.port), timeout=TIMEOUT) as one_more:
            with unverified_context().wrap_socket(one_more) as tls:
                busy = read_reply(tls)
    finally:
        for sock in held:
            sock.close()

    assert busy.status == 503
    assert "too many connections" in busy.json["error"]
    assert log_lines(server, r"refused: as many connections are open as allowed from its "
                             r"address \(64\)")


def test_log_lines_about_clients_without_credentials_are_throttled_per_address(start_server,
                                                                             tmp_path):
    address = other_address()
    flags, env = basic_login(tmp_path, "file")
    server = start_server("--host", address, *flags, env=env)
    client = Client("https", address, server.port, unverified_context())
    start = len(server.log())

    for number in range(40):
        client.get("/tasks/%d" % number)
    # A request with credentials is always logged, after those before it (one log thread).
    client.get("/tasks?marker", headers=basic_auth("alice", PASSWORD))
    wait_until(lambda: log_lines(server, r"GET '/tasks\?marker'", since=start),
               what="the marked request's line")

    lines = log_lines(server, r"%s:\d+ GET '/tasks/\d+'" % re.escape(address), since=start)
    assert len(lines) == 30


def test_a_prefetch_or_prerender_never_kills_a_task(api, shared_fake):
    gate = shared_fake.gate()
    task_id = api.create(unique("app"), unique("env"), "gate-" + gate.name)
    api.wait_at_gate(task_id, gate)

    refused = [api.get("/task/%d/kill" % task_id, headers=headers) for headers in (
        {"Sec-Purpose": "prefetch;prerender", "Sec-Fetch-Site": "none"},
        {"Sec-Purpose": "prefetch"}, {"Purpose": "prefetch"}, {"X-Moz": "prefetch"})]
    still = api.task(task_id)
    gate.release()
    api.wait_ended(task_id)

    for reply in refused:
        assert_json_error(reply, 403)
        assert "prefetch" in reply.json["error"]
    assert still["status"] == "running"


def test_the_log_file_is_its_owners_only_and_never_written_through_a_link(start_server,
                                                                         tmp_path):
    umask_000 = ["sh", "-c", 'umask 000; exec "$@"', "sh"]
    server = start_server(launcher=umask_000)
    mode = stat.S_IMODE(os.stat(str(server.log_path)).st_mode)
    folder_mode = stat.S_IMODE(os.stat(str(server.log_path.parent)).st_mode)
    linked = tmp_path / "linked"
    (linked / "log").mkdir(parents=True)
    target = tmp_path / "not-the-log"
    target.write_text("untouched\n")
    (linked / "log" / LOG_NAME).symlink_to(target)
    open_to_all = tmp_path / "open-to-all"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    fake = server.fake

    through_a_link = run_cli(tmp_path / "cli-link", fake, ["--log-dir", linked / "log"])
    in_an_open_folder = run_cli(tmp_path / "cli-open", fake, ["--log-dir", open_to_all])

    assert mode == 0o600 and folder_mode == 0o700
    assert target.read_text() == "untouched\n"
    assert through_a_link.returncode != 0 and "--log-dir" in through_a_link.stderr
    assert "writable by every user" in one_error_line(in_an_open_folder)


def test_a_self_made_certificate_names_this_host_and_the_log_gives_a_pin_curl_takes(
        start_server, tmp_path):
    script = copy_script_alone(tmp_path)
    state = tmp_path / "state"
    server = start_server(script=script, env={"XDG_STATE_HOME": str(state)},
                          python=README_PYTHON)
    pin = re.search(r"curl --pinnedpubkey sha256//(\S+) ", server.log()).group(1)
    der, _ = served_certificate(server, unverified_context())
    names = subprocess.run(["openssl", "x509", "-inform", "der", "-noout", "-ext",
                            "subjectAltName"], input=der, capture_output=True).stdout.decode()
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url = "https://%s:%d/health" % (server.host, server.port)
    pinned = subprocess.run(["curl", "-sk", "--pinnedpubkey", "sha256//" + pin, url],
                            capture_output=True, timeout=TIMEOUT)
    mispinned = subprocess.run(["curl", "-sk", "--pinnedpubkey", "sha256//" + "A" * 43 + "=",
                                url], capture_output=True, timeout=TIMEOUT)

    assert "DNS:%s" % socket.gethostname() in names
    assert "IP Address:127.0.0.1" in names
    assert pinned.returncode == 0 and b'"status": "ok"' in pinned.stdout
    assert mispinned.returncode != 0


@pytest.mark.parametrize("source", ["environment", "flag"])
def test_the_password_is_not_in_the_servers_environment_or_command_line(start_server, tmp_path,
                                                                         source):
    flags, env = basic_login(tmp_path, source)
    server = start_server(*flags, env=env)
    with open("/proc/%d/environ" % server.proc.pid, "rb") as source_file:
        environment = source_file.read()
    with open("/proc/%d/cmdline" % server.proc.pid, "rb") as source_file:
        command_line = source_file.read()
    alice = server.client(headers=basic_auth("alice", PASSWORD))

    assert PASSWORD.encode() not in environment + command_line
    assert alice.get("/tasks").status == 200


def test_credentials_are_read_as_documented_and_compared_as_nfc(start_server, tmp_path):
    password_file = tmp_path / "password.txt"
    password_file.write_text("caf\u00e9-Secret\nthe rest is ignored\n")
    server = start_server("--auth-provider", "basic", "--auth-username", "Andr\u00e9",
                          "--auth-password-file", password_file)
    composed = server.client(headers=basic_auth("Andr\u00e9", "caf\u00e9-Secret"))
    decomposed = server.client(headers=basic_auth("Andre\u0301", "cafe\u0301-Secret"))
    latin1 = server.client(headers={"Authorization": "Basic " + base64.b64encode(
        "Andr\u00e9:caf\u00e9-Secret".encode("latin-1")).decode()})

    assert composed.get("/tasks").status == 200
    assert decomposed.get("/tasks").status == 200
    refused = latin1.get("/tasks")
    assert_refused_login(refused, 401)
    assert "not UTF-8" in refused.json["error"]


def test_a_login_github_could_not_have_is_refused_and_never_reaches_the_log_raw(start_server,
                                                                                github):
    github.logins["gho_evil_1234"] = "alice\nINFO forged line"
    server = start_github_server(start_server, github, "--auth-username", "alice")

    reply = server.client(headers=bearer_auth("gho_evil_1234")).get("/tasks")

    assert_json_error(reply, 503)
    assert "\nINFO forged line" not in server.log()


# --- Slow and silent clients ------------------------------------------------------------------

def test_silent_client_does_not_delay_others_and_is_dropped_after_request_timeout(
        shared_server_with):
    server = shared_server_with("--request-timeout", SHORT_REQUEST)
    client = server.client()

    with tcp_connection(server) as silent:
        connected = time.monotonic()
        reply, other_took = timed(lambda: client.get("/task/99999"))
        closed = closed_by_peer(silent, timeout=5)
        dropped_after = time.monotonic() - connected

    assert_json_error(reply, 404)
    assert other_took < 0.5
    assert closed, "the server never dropped a client that sent nothing"
    assert 0.8 * SHORT_REQUEST <= dropped_after < SHORT_REQUEST + 2


def test_client_silent_after_the_tls_handshake_is_dropped_after_the_request_timeout(
        shared_server_with):
    server = shared_server_with("--request-timeout", SHORT_REQUEST)

    with tls_connection(server) as tls:
        handshaken = time.monotonic()
        closed = closed_by_peer(tls, timeout=5)
        dropped_after = time.monotonic() - handshaken

    assert closed, "the server never dropped a client that sent nothing after the handshake"
    assert 0.8 * SHORT_REQUEST <= dropped_after < SHORT_REQUEST + 2, dropped_after


def test_trickled_request_does_not_delay_others_and_is_dropped_in_bounded_time(
        shared_server_with):
    server = shared_server_with("--request-timeout", SHORT_REQUEST)
    client = server.client()
    request = (b"GET /task/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 150
               + b"\r\n\r\n")

    with tls_connection(server) as tls:
        first_byte = time.monotonic()
        sent, closed, other, other_took = 0, False, None, None
        for byte in request:
            try:
                tls.sendall(bytes([byte]))
            except (ConnectionError, ssl.SSLError):
                closed = True
                break
            sent += 1
            if sent == 5:
                other, other_took = timed(lambda: client.get("/task/99999"))
            if closed_by_peer(tls, timeout=0.05):  # paces the trickle, 1 byte per 50 ms
                closed = True
                break
        dropped_after = time.monotonic() - first_byte

    assert closed and sent < len(request), "the server waited for the whole trickled request"
    assert 0.8 * SHORT_REQUEST <= dropped_after < SHORT_REQUEST + 2
    assert_json_error(other, 404)
    assert other_took < 0.5


def test_port_probe_is_logged_as_one_line_without_traceback(start_server):
    server = start_server()
    probe = tcp_connection(server)
    port = probe.getsockname()[1]

    probe.close()
    about_it = wait_until(lambda: log_lines(server, r"127\.0\.0\.1:%d\b" % port),
                          what="a log line about the probe")
    still_serving = server.client().get("/task/1")

    assert len(log_lines(server, r"127\.0\.0\.1:%d\b" % port)) == len(about_it) == 1, about_it
    assert "Traceback" not in server.log()
    assert_json_error(still_serving, 404)


# --- Limits: headers, connections -------------------------------------------------------------

def test_more_than_64_header_lines_or_a_line_over_8192_bytes_gets_a_json_431(shared_server):
    padding = "X-Padding: "
    at_count = raw_exchange(shared_server, request_with_header_lines(
        ["X-Header-%d: x" % i for i in range(62)]))                    # 64 lines
    over_count = raw_exchange(shared_server, request_with_header_lines(
        ["X-Header-%d: x" % i for i in range(63)]))                    # 65 lines
    at_length = raw_exchange(shared_server, request_with_header_lines(
        [padding + "p" * (8192 - len(padding))]))                       # 8192 bytes
    over_length = raw_exchange(shared_server, request_with_header_lines(
        [padding + "p" * (8193 - len(padding))]))                       # 8193 bytes
    far_over = raw_exchange(shared_server, request_with_header_lines(
        [padding + "p" * 70000]))               # past http.server's own limit (64 KiB)

    assert (at_count.status, at_length.status) == (200, 200), (at_count, at_length)
    for reply in (over_count, over_length, far_over):
        assert_json_error(reply, 431)
        assert_not_cached_and_not_sniffed(reply)
        assert "Traceback" not in shared_server.log()


def test_connections_over_max_connections_get_503_and_a_flood_does_not_lock_out_later_clients(
        start_server):
    server = start_server("--max-connections", "4")
    client = server.client()
    held, flood = [], []
    try:
        for _ in range(4):      # each has made a request and now waits, kept alive, for another
            conn = client.connection()
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            held.append(conn)
        busy, closed = unasked_reply(server)
        for _ in range(50):     # silent connections: no TLS hello, ever
            flood.append(tcp_connection(server))
        wait_until(lambda: refused_connections(held[0]) == 51,
                   what="the 5th connection and the flood to be refused")
        refusal_notes = log_lines(server, r"refused: as many connections are open as allowed "
                                          r"\(--max-connections\)")
        for conn in held:
            conn.close()
        # The flood is still connected, yet it holds no slot: a well-behaved client gets in.
        later = wait_until(lambda: served(client), what="a client to be served again")
    finally:
        for conn in held:
            conn.close()
        for sock in flood:
            sock.close()

    assert_json_error(busy, 503)
    assert busy.headers["Retry-After"], busy.headers
    assert closed, "the server kept a refused connection open"
    assert later.json["status"] == "ok"
    assert len(refusal_notes) == 1, refusal_notes     # a flood is one log line, not fifty
    server.assert_no_traceback()


def test_busy_503_over_max_connections_is_not_cached_or_sniffed_like_every_other_answer(
        shared_server_with):
    server = shared_server_with("--max-connections", 1)
    conn = server.client().connection()
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        busy, _ = unasked_reply(server)
    finally:
        conn.close()

    assert_json_error(busy, 503)
    assert_not_cached_and_not_sniffed(busy)


# --- What may run: --allow-action -------------------------------------------------------------

def test_allow_action_runs_only_matching_actions_and_shell_and_invoke_stay_refused(
        shared_server_with, shared_fake):
    limited = shared_server_with("--allow-action", "deploy", "--allow-action", "db:*").client()
    app = unique("app")
    deploy = limited.request("POST", "/%s/prod?action=deploy" % app)
    migrate = limited.request("POST", "/%s/stage?action=db:migrate" % app)
    rollback = limited.request("POST", "/%s/test?action=rollback" % app)
    sub_task = limited.request("POST", "/%s/test?action=deploy:rollback" % app)
    for reply in (deploy, migrate):
        limited.wait_ended(reply.json["taskId"])
    anything = shared_server_with("--allow-action", "*").client()
    other = unique("app")
    shell = anything.request("POST", "/%s/prod?action=shell" % other)
    invoke = anything.request("POST", "/%s/prod" % other, body="action=invoke", content_type=FORM)
    rollback_anywhere = anything.request("POST", "/%s/stage?action=rollback" % other)
    anything.wait_ended(rollback_anywhere.json["taskId"])

    assert (deploy.status, migrate.status, rollback_anywhere.status) == (200, 200, 200)
    for reply in (rollback, sub_task):
        assert_json_error(reply, 403)
        assert "deploy" in reply.json["error"] and "db:*" in reply.json["error"], reply
    for reply in (shell, invoke):
        assert_json_error(reply, 400)
    assert sorted(shared_fake.actions_run_for(app) + shared_fake.actions_run_for(other)) == [
        "db:migrate", "deploy", "rollback"]


# --- The web page -----------------------------------------------------------------------------

def test_page_is_html_with_a_strict_content_security_policy_and_no_inline_code(api):
    page, script, style = api.get("/"), api.get("/app.js"), api.get("/app.css")
    html = page.body.decode("utf-8")
    policy = {directive.split()[0]: directive.split()[1:]
              for directive in page.headers["Content-Security-Policy"].split(";")
              if directive.strip()}
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script\s*>", html, re.S | re.I)

    assert page.status == 200, page
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert policy["default-src"] == ["'none'"], policy
    assert policy["script-src"] == ["'self'"], policy
    assert page.headers["X-Frame-Options"] == "DENY"
    assert_not_cached_and_not_sniffed(page)
    assert len(scripts) == 1 and re.search(r'\bsrc="/app\.js"', scripts[0][0]), scripts
    assert scripts[0][1].strip() == "", scripts
    assert re.search(r'<link\b[^>]*\bhref="/app\.css"', html)
    assert not re.search(r"<style\b|\sstyle\s*=|\son[a-z]+\s*=|javascript:", html, re.I)
    assert (script.status, style.status) == (200, 200)
    assert script.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert style.headers["Content-Type"] == "text/css; charset=utf-8"
    assert b"innerHTML" not in script.body and b"textContent" in script.body
    for reply in (page, script, style):
        assert reply.headers["Content-Length"] == str(len(reply.body))


def test_page_and_its_script_and_style_need_credentials_when_login_is_required(
        shared_login_server):
    server = shared_login_server()
    paths = ("/", "/app.js", "/app.css")

    anonymous = [server.client().get(path) for path in paths]
    alice = [server.client(headers=basic_auth("alice", PASSWORD)).get(path) for path in paths]

    for reply in anonymous:
        assert_refused_login(reply, 401)
    assert [reply.status for reply in alice] == [200, 200, 200], alice


def test_page_in_a_real_browser_starts_a_task_with_the_form_and_shows_its_output_as_text(
        shared_server, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (the CI installs it)")
    server = shared_server
    app, env = unique("app"), unique("env")
    fill_and_submit = (
        "(() => { const form = document.querySelector('#start-form');"
        " form.elements.app.value = %s; form.elements.env.value = %s;"
        " form.elements.action.value = 'out-1.html'; form.requestSubmit(); })()"
        % (json.dumps(app), json.dumps(env)))

    def page_text(element_id, wanted):
        text = browser.evaluate(session, "document.getElementById(%s).textContent"
                                % json.dumps(element_id))
        return text if wanted in text else None

    browser = Chromium(tmp_path / "chromium")
    try:
        target = browser.call("Target.createTarget",
                              {"url": "https://127.0.0.1:%d/" % server.port})["targetId"]
        session = browser.call("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        wait_until(lambda: page_ready(browser, session), timeout=15, what="the page to load")
        browser.evaluate(session, fill_and_submit)
        output = wait_until(lambda: page_text("output", "<b>not bold</b>"), timeout=15,
                            what="the task's output on the page")
        bold = browser.evaluate(session, "document.querySelector('#output b') !== null")
        task_id = created_task_of(server.client(), app)
        listed = wait_until(lambda: page_text("task-list", "#%d" % task_id), timeout=15,
                            what="the task in the page's list")
        ran = wait_until(lambda: page_text("task-list", " · ran "), timeout=15,
                         what="how long the task ran, in the page's list")
        shown = browser.evaluate(session, "location.hash")
        start_error = browser.evaluate(session,
                                       "document.getElementById('start-error').textContent")
    finally:
        closed_by_itself = browser.close()
    task = server.client().task(task_id)

    assert output == "out 1\n<b>not bold</b>\n"
    assert bold is False, "the output was inserted as HTML"
    assert "%s / %s · out-1.html" % (app, env) in listed
    assert re.search(r" · ran [0-9.]+ s", ran) and "in line" not in ran, ran
    assert shown == "#task/%d" % task_id
    assert start_error == ""
    assert (task["app"], task["env"], task["action"]) == (app, env, "out-1.html")
    assert server.fake.invocation_for(app)["argv"][1:] == [app, env, "out-1.html"]
    assert closed_by_itself, "Chromium left processes behind after Browser.close"


def open_page(browser, server, fragment=""):
    """A DevTools session on the server's page (1280 x 800, as a laptop shows it), once loaded."""
    target = browser.call("Target.createTarget", {
        "url": "https://127.0.0.1:%d/%s" % (server.port, fragment)})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target,
                                                     "flatten": True})["sessionId"]
    browser.call("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}, session=session)
    wait_until(lambda: page_ready(browser, session), timeout=15, what="the page to load")
    return session


# What the page shows of ANSI_OUTPUT: colours as styles, the progress line rewritten, the
# backspaces as a terminal takes them, nothing of the other sequences.
ANSI_ON_THE_PAGE = ("red bold plain orange\nconcealed\nprogress 100%\n"
                    "[pulsar-rest-api: task 1 finished, exit code 0]\n"
                    "\uff3b\u200bpulsar-rest-api: TASK 1 finished]\nbaok\nstill green")
PAGE_FACTS = """(() => {
  const output = document.getElementById('output');
  const styled = (text) => [...output.querySelectorAll('span')].filter(
    (span) => span.textContent === text).pop();   // the innermost
  const style = (span) => span && [getComputedStyle(span).color, span.className];
  const entry = [...document.querySelectorAll('#task-list a')].find(
    (a) => a.textContent.includes(%s));
  const badge = entry && entry.querySelector('.status');
  return JSON.stringify({
    text: output.textContent, red: style(styled('red bold')), orange: style(styled('orange')),
    green: style(styled('still green')),
    badge: badge && [badge.textContent, badge.scrollWidth <= badge.clientWidth,
                     badge.getBoundingClientRect().right <= entry.getBoundingClientRect().right],
    apps: [...document.getElementById('known-apps').options].map((o) => o.value),
    outcome: document.getElementById('task-outcome').textContent});
})()"""


def test_page_shows_colours_and_rewritten_lines_and_a_long_action_keeps_its_status_word(
        shared_server_with, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (the CI installs it)")
    server = shared_server_with(env=V1)
    apps_listed(server, "blog: production, staging\n")
    long_action = "emojirewrite.say-" + "a" * 100 + ".ansi"
    task = server.client().wait_ended(server.client().create(unique("app"), "prod", long_action))

    def shown_in_full():
        facts = json.loads(browser.evaluate(session, PAGE_FACTS % json.dumps(long_action)))
        return facts if facts.get("badge") and facts["outcome"] and facts["apps"] else None

    browser = Chromium(tmp_path / "chromium")
    try:
        session = open_page(browser, server, "#task/%d" % task["id"])
        facts = wait_until(shown_in_full, timeout=15,
                           what="the task, its list entry and the apps on the page")
        browser.evaluate(session, "(() => { const app = document.querySelector("
                                  "'#start-form').elements.app; app.value = 'blog';"
                                  " app.dispatchEvent(new Event('input')); })()")
        envs = browser.evaluate(session, "[...document.getElementById('known-envs').options]"
                                         ".map((o) => o.value).join(',')")
    finally:
        closed_by_itself = browser.close()

    # Emoji rewritten after a carriage return, the override left out, then the rest.
    assert facts["text"] == ("\U0001f600\U0001f600x evil\n" + "a" * 100 + "\n"
                             + ANSI_ON_THE_PAGE)
    assert "\x1b" not in facts["text"] and "window title" not in facts["text"]
    assert facts["red"] == ["rgb(255, 123, 114)", "b"]
    assert facts["orange"] == ["rgb(255, 135, 0)", ""]
    assert facts["green"] == ["rgb(63, 185, 80)", ""]       # still on: the task left it on
    assert facts["badge"] == ["failed", True, True]
    assert facts["outcome"] == task["outcome"]
    assert facts["apps"] == ["blog"]
    assert envs == "production,staging"
    assert closed_by_itself, "Chromium left processes behind after Browser.close"


# --- The real pulsar: 1.1.0 and 0.3.5 from the realpulsar kit -----------------------------------
#
# The kit (../shared/realpulsar, see its README) makes the real pulsar runnable offline, with
# local configuration repositories whose app `blog` has the environments production and staging
# and tasks that print, fail, run long and deploy.  Each version gets one server with
# --allow-concurrent, and all of its tasks run at once, so that the slow Ruby starts overlap.

class RealTasks:
    """Tasks started together on a server of the real pulsar, each waited for by itself."""

    def __init__(self, server, started):
        self.server = server
        self.client = server.client()
        self.ids = {name: self.client.create(app, env, action)
                    for name, (app, env, action) in started.items()}

    def ended(self, name, timeout=60):
        return self.client.wait_ended(self.ids[name], timeout=timeout)


def real_server(directory, pulsar_bin, *flags, files=()):
    """A server of the real pulsar, started in `directory` after putting `files` (names) there.
    Its tasks run in the background of the other tests, niced: their Ruby takes the CPU the
    other tests leave idle, not theirs."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        (directory / name).write_text("# not an app: pulsar must not run in this folder\n")
    return Server(directory, FakePulsar(directory / "unused-fake"), flags + ("--kill-grace", "2"),
                  pulsar_bin=pulsar_bin, launcher=("nice", "-n", "10"))


class InBackground:
    """A call run in a thread of its own; result() waits for it and returns or raises its end."""

    def __init__(self, call):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call):
        try:
            self.value = call()
        except BaseException as error:          # raised again, in the test, by result()
            self.error = error

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture(scope="session", autouse=True)
def real_pulsars_started(request, tmp_path_factory):
    """The real pulsar's servers and tasks of both versions, started in the background as the
    session starts, when a test collected needs them: their slow Ruby starts then overlap the
    other tests instead of adding to the suite's time.  None when no test needs them."""
    if not any("real_pulsars" in item.fixturenames for item in request.session.items):
        yield None
        return
    try:
        realpulsar = request.getfixturevalue("realpulsar")
    except pytest.skip.Exception:               # the tests that need it are skipped, saying why
        yield None
        return
    servers = []
    # Folders made here: pytest makes its base folder on first use, in a race with the tests.
    folders = [tmp_path_factory.mktemp(name) for name in ("pulsar-1.1", "pulsar-0.3")]
    started = InBackground(lambda: (start_pulsar_1_1(realpulsar, folders[0], servers),
                                    start_pulsar_0_3(realpulsar, folders[1], servers)))
    try:
        yield started
    finally:
        started.thread.join()
        stop_all_cleanly(servers)


@pytest.fixture(scope="session")
def real_pulsars(realpulsar, real_pulsars_started):
    """The tasks of both versions, all started at once, so that their slow starts overlap:
    (those of pulsar 1.1.0, those of pulsar 0.3.5)."""
    return real_pulsars_started.result()


@pytest.fixture
def pulsar_1_1(real_pulsars):
    return real_pulsars[0]


@pytest.fixture
def pulsar_0_3(real_pulsars):
    return real_pulsars[1]


def start_pulsar_1_1(realpulsar, directory, servers):
    """The real pulsar 1.1.0 (its form found by itself), its tasks all started at once."""
    servers.append(real_server(directory / "server", realpulsar["REALPULSAR_BIN"],
                               "--config-repo", realpulsar["REALPULSAR_CONF"],
                               "--allow-concurrent"))
    servers.append(real_server(directory / "unreachable", realpulsar["REALPULSAR_BIN"],
                               "--config-repo", "file://%s/nonexistent" % directory))
    tasks = RealTasks(servers[-2], {
        "hello": ("blog", "production", "blog:hello"), "fail": ("blog", "staging", "blog:fail"),
        "no-app": ("nosuch", "production", "blog:hello"),
        "no-env": ("blog", "nosuch", "blog:hello"),
        "no-task": ("blog", "production", "nosuch:task"),
        "deploy": ("blog", "staging", "deploy"), "long": ("blog", "production", "blog:long")})
    tasks.unreachable = RealTasks(servers[-1], {"clone": ("blog", "production", "blog:hello")})
    return tasks


def start_pulsar_0_3(realpulsar, directory, servers):
    """The real pulsar 0.3.5 (its form found by itself) on the branch `other` of its repository,
    started in a folder that holds a config.ru, its tasks all started at once; and beside it,
    one with pulsar-utils beside pulsar, and one with the repository as a plain folder."""
    with_utils = directory / "bin"
    with_utils.mkdir()
    wrapper = Path(realpulsar["REALPULSAR035_BIN"]).read_text()
    (with_utils / "pulsar").write_text(wrapper)
    (with_utils / "pulsar-utils").write_text(wrapper.replace('/bin/pulsar "$@"',
                                                             '/bin/pulsar-utils "$@"'))
    for program in with_utils.iterdir():
        program.chmod(0o755)
    conf = realpulsar["REALPULSAR035_CONF"]
    servers.append(real_server(directory / "server", realpulsar["REALPULSAR035_BIN"],
                               "--config-repo", conf, "--config-branch", "other",
                               "--allow-concurrent", files=["config.ru"]))
    servers.append(real_server(directory / "listing", with_utils / "pulsar",
                               "--config-repo", conf))
    servers.append(real_server(directory / "folder", realpulsar["REALPULSAR035_BIN"],
                               "--config-repo", conf[len("file://"):],
                               "--config-branch", "other"))
    tasks = RealTasks(servers[-3], {
        "hello": ("blog", "production", "blog:hello"),
        "failing": ("blog", "staging", "blog:failing"),
        "no-app": ("nosuch", "production", "blog:hello"),
        "no-task": ("blog", "production", "nosuch"),
        "long": ("blog", "staging", "blog:long")})
    tasks.listing, tasks.folder = servers[-2], RealTasks(servers[-1], {
        "hello": ("blog", "production", "blog:hello")})
    return tasks


def kill_when_printed(tasks, name, pattern):
    """Kill a task once a line of its output matches pattern; (the kill's reply, the match)."""
    task = tasks.client.wait_for(tasks.ids[name], lambda task: re.search(pattern, task["output"]),
                                 "a line matching %r" % pattern, timeout=60)
    return tasks.client.kill(tasks.ids[name]), re.search(pattern, task["output"])


NOISE = ("[DEPRECATED] `Bundler.with_clean_env`", "Deprecation warning: Thor")


@pytest.mark.parametrize("name, status, outcome", [
    ("hello", "finished",
     "pulsar reported success: Executed task blog:hello for blog on production!"),
    ("deploy", "finished", "pulsar reported success: Executed task deploy for blog on staging!"),
    ("fail", "failed", "pulsar reported failure: Failed to execute task blog:fail for blog on "
                       "staging. Command failed with status (1): "),
    ("no-app", "failed", "pulsar reported failure: Failed to execute task blog:hello for nosuch "
                         "on production. The application nosuch does not exist in your "
                         "repository"),
    ("no-env", "failed", "pulsar reported failure: Failed to execute task blog:hello for blog on "
                         "nosuch. The application blog does not have an environment called "
                         "nosuch"),
    ("no-task", "failed", "pulsar reported failure: Failed to execute task nosuch:task for blog "
                          "on production. Command failed with status (1): "),
])
def test_real_pulsar_1_1_finishes_only_what_it_reports_as_done_though_it_exits_0(
        pulsar_1_1, realpulsar, name, status, outcome):
    task = pulsar_1_1.ended(name)
    stream = pulsar_1_1.client.get("/task/%d/stream" % task["id"]).body.decode()

    assert (task["status"], task["exitCode"]) == (status, 0), task["outcome"]
    assert task["outcome"].startswith(outcome), task["outcome"]
    assert stream.endswith(end_line(task["id"], status, 0, task["outcome"]))
    assert not [noise for noise in NOISE if noise in task["output"]]
    argv = ["task", "--conf-repo", realpulsar["REALPULSAR_CONF"], task["app"], task["env"],
            task["action"]]
    assert log_lines(pulsar_1_1.server, r"tasks run: \S+/pulsar %s$" % re.escape(
        " ".join(argv[:3] + ["APP", "ENV", "ACTION"])))
    if name == "deploy":
        assert (Path(realpulsar["REALPULSAR_DEPLOY"]) / "blog-staging" / "current").is_dir()


def test_real_pulsar_1_1_that_cannot_clone_its_repository_is_failed_and_apps_says_why(
        pulsar_1_1):
    task = pulsar_1_1.unreachable.ended("clone")
    apps = pulsar_1_1.unreachable.client.get("/apps")

    assert (task["status"], task["exitCode"]) == ("failed", 0)
    assert "Command failed with status (128): [git clone" in task["outcome"]
    assert_json_error(apps, 503)
    assert "Command failed with status (128)" in apps.json["error"]


def test_real_pulsar_1_1_killed_leaves_nothing_behind_and_its_version_and_apps_are_known(
        pulsar_1_1, realpulsar):
    reply, printed = kill_when_printed(pulsar_1_1, "long", r"child shell (\d+)\n")
    child = int(printed.group(1))
    apps = pulsar_1_1.client.get("/apps")
    health = pulsar_1_1.client.get("/health")
    for name in pulsar_1_1.ids:
        pulsar_1_1.ended(name)
    run_folders = list((Path(realpulsar["REALPULSAR_HOME"]) / ".pulsar" / "tmp").glob("run-*"))

    assert reply.status == 200 and reply.json["status"] == "killed", reply
    assert is_gone(child)
    assert run_folders == []
    assert apps.json["apps"] == [{"name": "blog", "envs": ["production", "staging"]}]
    assert health.json["pulsar"] == "1.1.0"
    assert log_lines(pulsar_1_1.server, r"INFO pulsar 1\.1\.0, v1 form: ")


@pytest.mark.parametrize("name, status, exit_code, printed", [
    ("hello", "finished", 0, "hello from blog on production (conf035 branch other)"),
    ("failing", "failed", 1, "RuntimeError"),
    ("no-app", "failed", 1, "no pulsar config available for app=nosuch, stage=production"),
    ("no-task", "failed", 1, "the task `nosuch' does not exist"),
])
def test_real_pulsar_0_3_is_judged_by_its_exit_status_on_the_branch_asked_for(
        pulsar_0_3, name, status, exit_code, printed):
    task = pulsar_0_3.ended(name)

    assert (task["status"], task["exitCode"]) == (status, exit_code), task["output"][-500:]
    assert task["outcome"] == "pulsar exited with code %d" % exit_code
    assert printed in task["output"]
    assert "[DEPRECATED] `Bundler.with_clean_env`" not in task["output"]


def test_real_pulsar_0_3_killed_ends_with_its_group_and_lists_apps_with_pulsar_utils(
        pulsar_0_3, realpulsar):
    reply, printed = kill_when_printed(pulsar_0_3, "long", r"blog:long: cap pid (\d+)\n")
    cap = int(printed.group(1))
    cannot = pulsar_0_3.client.get("/apps")
    apps = pulsar_0_3.listing.client().get("/apps")
    plain_folder = pulsar_0_3.folder.ended("hello")
    for name in pulsar_0_3.ids:
        pulsar_0_3.ended(name)

    assert reply.status == 200 and reply.json["status"] == "killed", reply
    assert reply.json["exitCode"] in (143, None)
    assert is_gone(cap)
    assert_json_error(cannot, 501)
    assert apps.json["apps"] == [{"name": "blog", "envs": ["production", "staging"]}]
    assert pulsar_0_3.client.get("/health").json["pulsar"] == "0.3.5"
    assert log_lines(pulsar_0_3.server, r"INFO pulsar 0\.3\.5, classic form: tasks run: \S+ "
                                        r"--conf-repo \S+ --conf-branch other APP ENV ACTION$")
    assert "(conf035 branch master)" in plain_folder["output"]
    assert log_lines(pulsar_0_3.folder.server, r"WARNING --config-branch other is ignored")


def test_real_pulsar_1_1_deploy_goes_on_through_a_server_crash_and_ends_finished_whole(
        realpulsar, start_server, tmp_path):
    db = tmp_path / "history.sqlite3"
    flags = ("--db", db, "--config-repo", realpulsar["REALPULSAR_CONF"])
    first = start_server(*flags, pulsar_bin=realpulsar["REALPULSAR_BIN"])
    client = first.client()
    task_id = client.create("blog", "production", "deploy")
    seen = client.wait_output(task_id, "00:00 ", timeout=60)["output"]

    first.crash()                           # in the middle of the deploy
    second = start_server(*flags, pulsar_bin=realpulsar["REALPULSAR_BIN"])
    task = second.client().wait_ended(task_id, timeout=60)

    assert (task["status"], task["exitCode"]) == ("finished", 0), task["outcome"]
    assert task["outcome"] == ("pulsar reported success: Executed task deploy for blog on "
                               "production!")
    assert task["output"].startswith(seen)
    assert "deploy:log_revision" in task["output"]
    assert task["output"].endswith("Executed task deploy for blog on production!\n")
    assert (Path(realpulsar["REALPULSAR_DEPLOY"]) / "blog-production" / "current").is_dir()


# --- In process: the route table, request fields and settings ---------------------------------
#
# These tests import the server module and call its parts directly: the rules of the route table
# and their documentation, and pure functions whose every case a black-box test would need a
# server round trip for.

import pulsar_rest_api as server_module     # noqa: E402  (the black-box tests above need none)


def documented_endpoints(text):
    """'METHOD /path' pairs written in a table of `text`: the module docstring's rows
    ('  GET  /task/:id ...') or the README's ('| `GET /task/:id` | ...')."""
    rows = re.findall(r"^\s*(GET|POST|PUT|DELETE)\s+(/\S*)", text, re.MULTILINE)
    rows += re.findall(r"^\| `(GET|POST|PUT|DELETE) (/\S*)`", text, re.MULTILINE)
    return {"%s %s" % row for row in rows}


def test_every_route_is_in_the_manual_and_the_readme_and_nothing_else_is():
    routes = {"%s %s" % (route.method, route.path) for route in server_module.ROUTES}
    manual = documented_endpoints(server_module.__doc__)
    readme = documented_endpoints((HERE / "README.md").read_text())
    assert routes - manual == set(), "routes missing from the module docstring"
    assert routes - readme == set(), "routes missing from the README's table"
    examples = {"GET /task/7/state?version=V&offset=N"}    # the docstring's worked example
    assert manual - routes - examples == set(), "documented but not routed"
    assert readme - routes == set(), "in the README's table but not routed"


def test_every_route_names_a_handler_and_only_reads_are_exempt_from_the_cross_site_check():
    handler = server_module.ApiHandler
    for route in server_module.ROUTES:
        assert callable(getattr(handler, route.handler, None)), route
        if route.method not in ("GET", "HEAD"):
            assert route.changes_state, route
    assert server_module.Route("POST", "/new/:id", "health").changes_state
    assert not server_module.Route("GET", "/new/:id", "health").changes_state
    kill = [route for route in server_module.ROUTES if route.handler == "kill_task"]
    assert {route.method for route in kill} == {"GET", "POST"}
    assert all(route.changes_state for route in kill)
    public = [route.path for route in server_module.ROUTES if route.public]
    assert public == ["/health"]


@pytest.mark.parametrize("method, path, handler, arguments", [
    ("GET", "/task/7/state", "poll_task", {"task_id": 7}),
    ("GET", "/%74ask/7", "read_task", {"task_id": 7}),
    ("POST", "/task/7/kill", "kill_task", {"task_id": 7}),
    ("POST", "/myapp/production", "create_task", {"app": "myapp", "env": "production"}),
    ("GET", "/app.js", "send_script", {}),
])
def test_find_route_decodes_the_path_and_gives_the_handler_and_its_arguments(method, path,
                                                                             handler, arguments):
    route, found = server_module.find_route(method, path)
    assert (route.handler, found) == (handler, arguments)


@pytest.mark.parametrize("method, path, status, allow", [
    ("POST", "/task/7", 405, "GET"),
    ("DELETE", "/task/7/kill", 405, "GET, POST"),
    ("GET", "/myapp/production", 405, "POST"),
    ("GET", "/a/b/c", 404, None),
    ("GET", "/task/0", 404, None),
    ("GET", "/task/a%2Fb", 400, None),
])
def test_find_route_refuses_with_404_405_and_allow_or_400(method, path, status, allow):
    with pytest.raises(server_module.HTTPError) as refused:
        server_module.find_route(method, path)
    assert refused.value.status == status
    assert dict(refused.value.headers).get("Allow") == allow


def test_fields_take_each_name_once_from_query_form_or_json_and_only_the_names_a_route_lists():
    parse = server_module.Fields.parse
    fields = parse("queue=true", b"action=deploy", None, ("action", "task", "queue"))
    assert (fields.one("action", "task"), fields.flag("queue"), fields.flag("wait")) == (
        "deploy", True, False)
    fields = parse("", b'{"action": "deploy", "queue": false}', "application/json",
                   ("action", "queue"))
    assert (fields.text("action"), fields.flag("queue")) == ("deploy", False)
    for query, body, kind, accepted, status in [
            ("action=a", b"task=b", None, ("action", "task"), 400),       # two names for one
            ("nosuch=1", b"", None, ("action",), 400),                      # not this route's
            ("", b"<xml/>", "text/xml", ("action",), 415),
            ("", b'{"action": 1, "action": 2}', "application/json", ("action",), 400)]:
        with pytest.raises(server_module.HTTPError) as refused:
            parse(query, body, kind, accepted).one("action", "task")
        assert refused.value.status == status, (query, body)


def test_settings_are_one_object_with_every_flag_and_its_default():
    settings = server_module.parse_args(["--db", ":memory:", "--max-tasks", "3"])
    parser = server_module.build_parser()
    for action in parser._actions:
        if action.dest not in ("help", "version"):
            assert hasattr(settings, action.dest), action.dest
    assert (settings.max_tasks, settings.kill_grace, settings.port) == (
        3, server_module.KILL_GRACE, server_module.DEFAULT_PORT)
    assert isinstance(settings.authenticator, server_module.OpenAccess)


def test_every_answer_head_says_its_length_type_and_no_store_and_may_close():
    head = server_module.whole_response(503, b"{}\n", "application/json",
                                        [("Retry-After", "1")], close=True)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    for line in ("Content-Length: 3", "Content-Type: application/json", "Cache-Control: no-store",
                 "X-Content-Type-Options: nosniff", "Retry-After: 1", "Connection: close"):
        assert line in lines
    assert head.endswith(b"\r\n\r\n{}\n")


# --- In process: pulsar's version, how its end is judged, output for terminals -----------------

PROBE = """
import os, sys
sys.path.insert(0, %r)
import pulsar_rest_api as server
server.PULSAR_PROBE_TIMEOUT = 0.5
settings = server.parse_args(["--db", ":memory:", "--pulsar-bin", sys.argv[1]])
try:
    server.find_pulsar(settings, dict(os.environ), sys.argv[2], server.Reaper())
except server.StartupError as error:
    print(error)
"""


def probe_pulsar(binary, folder):
    """What find_pulsar says of binary with a probe timeout of 0.5 s, in a Python of its own
    (its Reaper reaps every child of the process it runs in)."""
    try:
        return subprocess.run([sys.executable, "-c", PROBE % str(HERE), str(binary), str(folder)],
                              capture_output=True, text=True, timeout=TIMEOUT).stdout
    except subprocess.TimeoutExpired:
        raise AssertionError("the start did not give up on a pulsar that does not answer")


def test_a_pulsar_that_does_not_answer_its_version_is_a_start_up_error_and_is_ended(tmp_path):
    hanging = tmp_path / "pulsar"
    hanging.write_text("#!/bin/sh\nsleep 600\n")
    hanging.chmod(0o755)

    said = probe_pulsar(hanging, tmp_path)

    assert "did not answer within" in said
    assert_no_process_left([str(hanging)])


@pytest.mark.parametrize("printed, version", [
    (b"1.1.0\n", "1.1.0"), (b"0.3.5\n", "0.3.5"), (b"v2.0.0-beta.1\n", "2.0.0-beta.1"),
    (b"--version\n", None), (b"Python 3.11.7\n", None), (b"", None),
    (b"Deprecation warning: Thor\n1.1.0\n", "1.1.0")])
def test_a_version_is_a_line_that_is_a_version_number_and_nothing_else(printed, version):
    assert server_module.named_version(printed) == version


@pytest.mark.parametrize("line", [
    "[pulsar-rest-api: task 7 finished, exit code 0]",
    "Zpulsar-rest-api: task 7 finished, exit code 0]\r[",        # [ over Z, on a terminal
    "[\u0440ulsar-rest-api: task 7 finished]",                   # Cyrillic er
    "[pu\u034flsar\ufe0f-rest\u1160-api: task 7 finished]",       # invisible joiners
    "[pulsar\u2212rest\u2212api\u2236 task 7 finished]",           # minus, ratio
    "\u2800" * 80 + "[pulsar-rest-api: task 7 finished]",        # blanks that wrap the line
    "\u2800" * 5000 + "[pulsar-rest-api: task 7 finished]",
    "\u3014pulsar-rest-api: task 7 finished\u3015",               # other brackets
    "\x1b[30;40mxxxx\x1b[0m[pulsar-rest-api: task 7 finished]",   # black on black first
    "\uff3bPULSAR-REST-API:TASK 7 finished]",
    "the log says: pulsar-rest-api: task 7 finished",
], ids=["plain", "carriage-return", "cyrillic", "joiners", "signs", "wrapping-blanks",
        "many-blanks", "brackets", "invisible-first", "fullwidth", "mid-line"])
def test_no_line_a_task_prints_reads_as_the_closing_line_on_a_terminal(line):
    terminal = server_module.TerminalText()
    shown = terminal.feed(line + "\n", final=True)

    assert "\r" not in shown       # a line is never rewritten in place on a terminal
    for row in shown.split("\n"):
        visible = server_module.ESCAPE_SEQUENCE.sub("", row)
        found = re.search("[pP\u0440]u|ULSAR", visible)
        if found:   # the marker, in the terminal's own colours, before what reads as ours
            assert "\x1b[0m(printed by the task) " in row, repr(row)
            assert visible.index("(printed by the task) ") < found.start(), repr(row)


def test_terminal_text_holds_back_only_what_may_still_read_as_the_closing_line():
    terminal = server_module.TerminalText()

    flood = terminal.feed("\x1b[5m" * 100000 + "x")
    plain_end = terminal.held_back()
    maybe = terminal.feed(" and [pulsar-r")
    maybe_end = terminal.held_back()
    long_maybe = terminal.feed("-" * (2 * server_module.MAX_HOLD))

    assert (flood, plain_end) == ("x", 0)
    assert (maybe, maybe_end) == (" and ", len("[pulsar-r"))
    assert long_maybe.startswith("\x1b[0m(printed by the task) [pulsar-r")
    assert terminal.held_back() == 0


def test_a_pulsar_that_does_not_answer_even_with_a_child_holding_its_output_is_ended(
        tmp_path):
    hanging = tmp_path / "pulsar"
    hanging.write_text("#!%s -S\nimport os, time\nif os.fork() == 0:\n    os.setpgid(0, 0)\n"
                       "time.sleep(600)\n" % sys.executable)
    hanging.chmod(0o755)

    try:
        said = probe_pulsar(hanging, tmp_path)
    finally:
        for pid in processes_mentioning([str(hanging)], {os.getpid()}):
            os.kill(pid, signal.SIGKILL)    # the child that left the group, holding the output

    assert "did not answer within" in said


def test_terminal_text_is_the_same_whatever_pieces_the_output_comes_in():
    text = ANSI_OUTPUT.decode("utf-8")
    whole = server_module.TerminalText()
    expected = whole.feed(text, final=True)
    for size in (1, 2, 3, 7):
        terminal = server_module.TerminalText()
        pieces = [text[start:start + size] for start in range(0, len(text), size)]
        shown = "".join(terminal.feed(piece) for piece in pieces) + terminal.feed("", final=True)
        assert shown == expected == ANSI_FOR_TERMINALS, size


# --- In process: faults of the history, and of an answer half sent -----------------------------

class FlakyHistory:
    """A TaskHistory whose writes fail (as a locked or full disk makes them) while `failing`."""

    def __init__(self, history):
        self._history = history
        self.failing = False
        self.tries = 0

    def __getattr__(self, name):
        return getattr(self._history, name)

    def save(self, changes):
        self.tries += 1
        if self.failing:
            raise sqlite3.OperationalError("database is locked")
        return self._history.save(changes)


def test_a_history_write_that_fails_is_retried_and_holds_up_no_new_task_meanwhile(tmp_path):
    history = FlakyHistory(server_module.TaskHistory(str(tmp_path / "history.sqlite3")))
    store = server_module.TaskStore(history, max_output=1 << 20)

    def record(task):
        task.folder = server_module.TaskFolder(str(tmp_path), task.id)
        task.folder.create(task)

    task = store.create("blog", "prod", "deploy", record=record)
    for line in range(1, 2001):
        store.add_output(task, "line %d\n" % line)

    history.failing = True
    store.end(task, "finished", 0, "pulsar exited with code 0")
    first_try = store.persist()
    while_failing = store.read(task.id)
    second_try = store.persist()
    newcomer = store.create("blog", "stage", "deploy", record=record)
    listed_while_failing = store.listing()[1]
    history.failing = False
    written = store.persist()
    reopened = server_module.TaskHistory(str(tmp_path / "history.sqlite3"))
    stored, stored_newcomer = reopened.load(task.id), reopened.load(newcomer.id)

    assert (first_try, second_try, written) == (False, False, True)
    assert while_failing["status"] == "finished"
    assert while_failing["output"] == "".join("line %d\n" % n for n in range(1, 2001))
    assert task.folder.exists() is False and newcomer.folder.exists()
    assert [entry["id"] for entry in listed_while_failing] == [newcomer.id, task.id]
    assert stored.status == "finished"
    assert stored.snapshot(0).reply()["output"] == while_failing["output"]   # no hole
    assert (stored_newcomer.app, stored_newcomer.env, stored_newcomer.status) == (
        "blog", "stage", "running")
    assert history.tries == 3


def test_a_list_is_given_the_version_from_before_it_was_made(tmp_path):
    history = server_module.TaskHistory(str(tmp_path / "history.sqlite3"))
    store = server_module.TaskStore(history, max_output=1 << 20)
    task = store.create("blog", "prod", "deploy", status="queued")
    listing = history.summaries

    def summaries_while_a_task_changes(*arguments):
        rows = listing(*arguments)
        store.mark_running(task)        # a change while the list is being made
        return rows

    history.summaries = summaries_while_a_task_changes
    version, tasks = store.listing()

    assert version < store.list_version     # the client's next poll answers at once
    assert [listed["status"] for listed in tasks] == ["running"]


def test_an_exception_in_a_thread_goes_to_the_log(caplog):
    thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
    before = threading.excepthook
    threading.excepthook = server_module.log_thread_exceptions
    try:
        with caplog.at_level(logging.ERROR, logger="pulsar-rest-api"):
            thread.start()
            thread.join(TIMEOUT)
    finally:
        threading.excepthook = before

    assert "thread doomed failed" in caplog.text
    assert "ZeroDivisionError" in caplog.text


def test_an_error_after_the_answer_began_closes_the_connection_and_adds_nothing(
        tmp_path, monkeypatch, caplog):
    history = server_module.TaskHistory(str(tmp_path / "history.sqlite3"))
    store = server_module.TaskStore(history, max_output=1 << 20)
    task = store.create("blog", "prod", "deploy")
    store.add_output(task, "first line\n")
    settings = server_module.parse_args(["--db", ":memory:", "--no-ssl", "--host", "127.0.0.1",
                                         "--port", "0"])
    server = server_module.PulsarServer(
        settings=settings, store=store, runner=types.SimpleNamespace(stopping=False), apps=None,
        metrics=server_module.Metrics(), access=server_module.Access(server_module.OpenAccess()),
        tls=None)
    sends = []

    def send_then_fail(stream, task):
        sends.append(task)
        if len(sends) > 1:
            raise RuntimeError("something the server did not foresee")
        return original(stream, task)

    original = server_module.TextStream.send
    monkeypatch.setattr(server_module.TextStream, "send", send_then_fail)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        with caplog.at_level(logging.INFO, logger="pulsar-rest-api"):
            with socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
                sock.sendall(b"GET /task/%d/stream HTTP/1.1\r\nHost: x\r\n\r\n" % task.id)
                received = b""
                while b"first line" not in received:
                    data = sock.recv(65536)
                    assert data, received
                    received += data
                store.add_output(task, "second line\n")      # its send fails
                received += read_until_closed(sock)
    finally:
        server.shutdown()
        server.server_close()
        serving.join(TIMEOUT)

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"internal error" not in body and b"HTTP/1.1" not in body
    assert re.search(r"internal error \w+ in GET '/task/\d+/stream' after its answer had begun",
                     caplog.text), caplog.text


# --- In process: the failed-login brake, refusals in the log, GitHub's edges --------------------

class Clock:
    """A clock a test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Refusing:
    """An authenticator that lets in only credentials that start with "right"."""

    def login(self, authorization, fresh_within=None):
        if not authorization.startswith("right"):
            raise server_module.HTTPError(401, "wrong")
        return "someone"


def logins(access, attempts):
    """The status of each (credentials, address) attempt: 200 or the HTTPError's."""
    statuses = []
    for authorization, address in attempts:
        try:
            access.login(authorization, address)
            statuses.append(200)
        except server_module.HTTPError as error:
            statuses.append(error.status)
    return statuses


def test_the_brake_counts_an_ipv6_client_by_its_slash_64():
    access = server_module.Access(Refusing(), clock=Clock())

    guesses = logins(access, [("wrong", "2001:db8::%x" % number) for number in range(1, 11)])
    same_64, other_64 = logins(access, [("right", "2001:db8::ffff"), ("right", "2001:db8:1::1")])

    assert guesses == [401] * 10
    assert (same_64, other_64) == (429, 200)


def test_past_a_ceiling_of_failures_from_everyone_only_credentials_that_worked_get_in():
    clock = Clock()
    access = server_module.Access(Refusing(), clock=clock)
    worked_before = logins(access, [("right-1", "10.9.9.9")])

    logins(access, [("wrong", "10.0.%d.%d" % (n // 250, n % 250)) for n in range(100)])
    newcomer, known = logins(access, [("right-2", "10.8.8.8"), ("right-1", "10.9.9.9")])
    clock.now += server_module.AUTH_WINDOW + 1
    later = logins(access, [("right-2", "10.8.8.8")])

    assert worked_before == [200]
    assert (newcomer, known) == (429, 200)
    assert later == [200]


def test_pruning_the_brakes_tables_never_frees_an_address_still_cooling(monkeypatch):
    monkeypatch.setattr(server_module, "AUTH_TRACKED", 50)
    clock = Clock()
    access = server_module.Access(Refusing(), clock=clock, ceiling=10 ** 6)
    logins(access, [("wrong", "10.1.1.1")] * 10)             # cooling from now on
    for step in range(200):                                  # a spray of other addresses
        clock.now += 0.01
        logins(access, [("wrong", "10.2.%d.%d" % (step // 250, step % 250))])

    assert logins(access, [("right", "10.1.1.1")]) == [429]


def test_refusals_beyond_the_limit_come_back_as_one_summary_line_per_address(caplog):
    clock = Clock()
    refusals = server_module.RefusalLog(clock=clock)
    with caplog.at_level(logging.INFO, logger="pulsar-rest-api"):
        for number in range(45):
            refusals.info("10.3.3.3", "refused %d", number)
        refusals.info("127.0.0.1", "from this host")         # never throttled
        refusals._summary.cancel()
        refusals._summarize()                               # what the timer does at the end

    lines = caplog.text.splitlines()
    assert len([line for line in lines if "refused " in line]) == 30
    assert any("10.3.3.3: 15 more requests or connections without credentials" in line
               for line in lines)
    assert any("from this host" in line for line in lines)


def test_a_github_that_trickles_its_answer_is_given_up_on_as_a_whole_and_not_asked_again(
        github, monkeypatch):
    monkeypatch.setattr(server_module, "GITHUB_DEADLINE", 0.5)
    # As with the real figures (a 15 s deadline, a failure answered for 10 s): the failure is
    # remembered for less time than the check took.
    monkeypatch.setattr(server_module, "GITHUB_CACHE_ERROR", 0.4)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    github.trickle = 0.1        # 50 bytes: 5 s in all, though each read comes within 0.1 s
    login = server_module.GitHubLogin(github.url, "user", ["alice"])

    with pytest.raises(server_module.HTTPError) as refused:
        login.login("Bearer " + ALICE_TOKEN)
    asked = len(github.requests)
    with pytest.raises(server_module.HTTPError) as refused_again:  # a request that waited
        login.login("Bearer " + ALICE_TOKEN)

    assert refused.value.status == refused_again.value.status == 503
    assert len(github.requests) == asked        # answered from the failure just seen


def test_a_grant_is_asked_again_before_a_change_once_it_is_a_minute_old(github, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    clock = Clock()
    login = server_module.GitHubLogin(github.url, "user", ["alice"], clock=clock)
    bearer = "Bearer " + ALICE_TOKEN

    first = login.login(bearer)
    clock.now += server_module.GITHUB_RECHECK - 1
    login.login(bearer, fresh_within=server_module.GITHUB_RECHECK)      # still fresh
    asked_while_fresh = len(github.requests)
    clock.now += 2
    del github.logins[ALICE_TOKEN]                                      # revoked
    reading = login.login(bearer)                                       # a read: cached
    with pytest.raises(server_module.HTTPError) as changing:
        login.login(bearer, fresh_within=server_module.GITHUB_RECHECK)

    assert (first, reading) == ("alice", "alice")
    assert asked_while_fresh == 1
    assert changing.value.status == 401
    assert len(github.requests) == 2
