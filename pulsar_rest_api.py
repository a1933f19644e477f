#!/usr/bin/env python3
"""pulsar-rest-api: an HTTPS API that runs pulsar deploy tasks on this host.

A person or a chat bot starts a task with `POST /:app/:env` and an `action`; the server runs
`pulsar APP ENV ACTION` in its own process group, keeps what it prints, and lets clients read it,
follow it with a long poll, and kill it.  One file, Python 3.8+ standard library only.

Run:   python3 pulsar_rest_api.py --port 8001          (then: curl -k https://HOST:8001/...)
Try:   python3 pulsar_rest_api.py --pulsar-bin echo    (tasks just echo their arguments)

Endpoints (JSON everywhere; every error is {"error": "..."}):

  POST /:app/:env           action (form field, JSON {"action": ...} or query string; `task` is an
                            alias) -> 200 {"taskId": N, "url": ".../task/N"}
                            400 bad input, 411 chunked body, 413 body over 64 KiB, 415 body type
  GET  /task/:id            -> 200 the task (below); ?offset=N keeps only output from character N
  GET  /task/:id/state      long poll -> 200 {"changed": true, "task": {...}} or {"changed": false}
                            after the poll timeout.  ?version=V and ?offset=N: see "Following" below.
  GET|POST /task/:id/kill   -> 200 the task once its process group is gone; 409 if it already ended
  anything else             404 unknown path, 405 (with Allow) wrong method, 404 unknown task

  A task: {"id", "app", "env", "action", "status", "exitCode", "pid", "createdAt", "finishedAt",
           "version", "outputOffset", "outputLength", "output"}
  status: running | finished (exit 0) | failed (non-zero exit, a signal, or pulsar could not start:
  the output says why) | killed.  exitCode is null while running and when a signal ended pulsar.
  Times are ISO 8601 UTC.  version goes up by one on every change (new output, new status).

Following a task without missing anything: keep the last `version` and `outputLength` you saw and
pass them back:  GET /task/7/state?version=V&offset=N  answers at once if the task has moved past
them (or has ended), otherwise when it next changes; its `output` then holds only the characters
from N on.  Start with version=0&offset=0, stop when status is no longer `running`.

Threading: ThreadingHTTPServer gives each connection a thread, which does its own TLS handshake.
TaskStore's Condition guards every task; changes notify_all, long polls wait_for a predicate.
Each task has two threads: one reads its output pipe, one waits for pulsar and ends its group.

Security: every name is checked against a strict pattern before anything runs (pulsar 1.x passes
the action through a shell; pulsar 0.3 expands globs in app names); the Capistrano tasks `shell`
and `invoke` are refused; pulsar runs from an argument list, never a shell.  TLS 1.2+ only.
Slow or silent clients are dropped after --request-timeout and never hold up anyone else.
"""

import argparse
import codecs
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import logging.handlers
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

# ---------------------------------------------------------------- constants and defaults

DEFAULT_PORT = 8001
DEFAULT_HOST = "0.0.0.0"
POLL_TIMEOUT = 30.0        # seconds; the original API's value
KILL_GRACE = 5.0           # seconds between SIGTERM and SIGKILL for a task's process group
REQUEST_TIMEOUT = 10.0     # seconds for a TLS handshake, and for a request from first byte to last
IDLE_TIMEOUT = 60.0        # seconds a keep-alive connection may wait for its next request
SEND_TIMEOUT = 30.0        # seconds to write one response to a client that has stopped reading
SHUTDOWN_POLL = 0.05       # seconds; how soon the accept loop notices a stop
OUTPUT_DRAIN = 1.0         # seconds to wait for output held open by a process that left the group
MAX_BODY = 64 * 1024       # bytes; a task request is a few dozen
MAX_FIELDS = 20            # query or form fields in one request
READ_SIZE = 64 * 1024      # bytes per read from a task's output pipe
OUTPUT_CHUNK = 16 * 1024   # characters; small reads are merged up to this size
LOG_NAME = "pulsar-rest-api.log"
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ACTION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:.-]{0,127}")
REFUSED_ACTIONS = frozenset({"shell", "invoke"})   # Capistrano tasks that run any command
COUNT_PATTERN = re.compile(r"[0-9]{1,15}")
HOST_PATTERN = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")

RUNNING, FINISHED, FAILED, KILLED = "running", "finished", "failed", "killed"
ENDED = frozenset({FINISHED, FAILED, KILLED})

logger = logging.getLogger("pulsar-rest-api")


# ---------------------------------------------------------------- errors

class HTTPError(Exception):
    """An error answered to the client as {"error": message}; any layer may raise it."""

    def __init__(self, status, message, headers=(), close=False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)
        self.close = close          # the connection cannot be reused (e.g. an unread body)


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
    if value.lower() in REFUSED_ACTIONS:
        raise HTTPError(400, "action %r is refused: the Capistrano tasks shell and invoke run "
                             "arbitrary commands" % value)
    return value


def parse_count(name, value):
    """A whole number >= 0 given as a query parameter, or HTTPError 400."""
    if not isinstance(value, str) or not COUNT_PATTERN.fullmatch(value):
        raise HTTPError(400, "%s must be a whole number (0 or more); got %s" % (name, quoted(value)))
    return int(value)


def quoted(value, limit=80):
    """A client-supplied value made safe and short enough to echo in a message or a log line."""
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return "'%s'" % (text[:limit] + ("..." if len(text) > limit else ""))


def utc_iso(timestamp):
    """ISO 8601 in UTC with milliseconds, as JSON clients expect: 2026-11-28T11:38:54.123Z."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- the domain: tasks

class Output:
    """A task's output: text that only grows, kept in chunks so that reading from an offset costs
    only what is read, and appending costs only what is appended."""

    def __init__(self):
        self._chunks = []
        self._starts = []       # character offset of each chunk
        self.length = 0

    def append(self, text):
        if not text:
            return
        if self._chunks and len(self._chunks[-1]) + len(text) <= OUTPUT_CHUNK:
            self._chunks[-1] += text
        else:
            self._starts.append(self.length)
            self._chunks.append(text)
        self.length += len(text)

    def since(self, offset):
        """The text from character `offset` to the end."""
        if offset >= self.length:
            return ""
        first = self._chunk_index(offset)
        return "".join(self._chunks[first:])[offset - self._starts[first]:]

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

    Fields change only through TaskStore, under its lock.  `version` counts changes so that a
    client can say which state it has seen; `process` is the running TaskProcess, if any.
    """

    def __init__(self, task_id, app, env, action, created_at):
        self.id = task_id
        self.app, self.env, self.action = app, env, action
        self.status = RUNNING
        self.exit_code = None
        self.pid = None
        self.created_at = created_at
        self.finished_at = None
        self.output = Output()
        self.version = 1
        self.process = None

    @property
    def ended(self):
        return self.status in ENDED

    def has_moved_past(self, version, offset):
        """True when the task holds something a client at (version, offset) has not seen."""
        return (self.ended
                or (version is not None and version != self.version)
                or (offset is not None and self.output.length > offset))

    def check_offset(self, offset):
        if offset is not None and offset > self.output.length:
            raise HTTPError(400, "offset %d is past the end of the output (%d characters)"
                            % (offset, self.output.length))

    def to_json(self, offset=0):
        self.check_offset(offset)
        return {
            "id": self.id, "app": self.app, "env": self.env, "action": self.action,
            "status": self.status, "exitCode": self.exit_code, "pid": self.pid,
            "createdAt": utc_iso(self.created_at), "finishedAt": utc_iso(self.finished_at),
            "version": self.version, "outputOffset": offset, "outputLength": self.output.length,
            "output": self.output.since(offset),
        }


class TaskStore:
    """Every task, by id, and the Condition that guards them.

    The Condition's lock guards the dict, the id counter and every field of every Task.  Every
    change calls notify_all; waiters use wait_for(predicate, timeout), so no change is missed
    between two waits.  Nothing else touches the dict.
    """

    def __init__(self, clock=time.time):
        self._changed = threading.Condition()
        self._tasks = {}
        self._last_id = 0
        self._clock = clock

    def create(self, app, env, action):
        with self._changed:
            self._last_id += 1
            task = Task(self._last_id, app, env, action, self._clock())
            self._tasks[task.id] = task
            self._changed.notify_all()
            return task

    def view(self, task_id, offset=0):
        """The task as JSON, taken under the lock so that its fields agree with each other."""
        with self._changed:
            return self._find(task_id).to_json(offset)

    def wait_for_change(self, task_id, version, offset, timeout):
        """The task as JSON once it has moved past (version, offset), or None after `timeout`.

        Without a version the client has seen the task as it is now: wait for its next change.
        """
        with self._changed:
            task = self._find(task_id)
            task.check_offset(offset)
            if version is None:
                version = task.version
            if not self._changed.wait_for(lambda: task.has_moved_past(version, offset), timeout):
                return None
            return task.to_json(offset or 0)

    def wait_until_ended(self, task_id, timeout):
        """The task as JSON once it has ended, or as it is after `timeout`."""
        with self._changed:
            task = self._find(task_id)
            self._changed.wait_for(lambda: task.ended, timeout)
            return task.to_json()

    def process_to_kill(self, task_id):
        """The running process of a task, or HTTPError 409 if the task has ended."""
        with self._changed:
            task = self._find(task_id)
            if task.ended or task.process is None:
                raise HTTPError(409, "task %d has already ended (%s); there is nothing to kill"
                                % (task.id, task.status))
            return task.process

    def running(self):
        with self._changed:
            return [task for task in self._tasks.values() if not task.ended]

    def add_output(self, task, text):
        with self._changed:
            if text and not task.ended:
                task.output.append(text)
                task.version += 1
                self._changed.notify_all()

    def attach(self, task, process):
        with self._changed:
            task.process = process
            task.pid = process.pid

    def end(self, task, status, exit_code):
        with self._changed:
            task.status = status
            task.exit_code = exit_code
            task.finished_at = self._clock()
            task.process = None
            task.version += 1
            self._changed.notify_all()

    def _find(self, task_id):
        task = self._tasks.get(task_id)
        if task is None:
            raise HTTPError(404, "no task %d" % task_id)
        return task


# ---------------------------------------------------------------- the domain: running pulsar

@dataclasses.dataclass(frozen=True)
class PulsarCommand:
    """How pulsar is invoked: `classic` is pulsar 0.x, `v1` is pulsar 1.x (`pulsar task ...`)."""

    binary: str = "pulsar"
    form: str = "classic"
    conf_repo: str = None
    conf_branch: str = None

    def argv(self, app, env, action):
        if self.form == "v1":
            repo = ["--conf-repo", self.conf_repo] if self.conf_repo else []
            return [self.binary, "task"] + repo + [app, env, action]
        repo = []
        if self.conf_repo:
            repo = ["--conf-repo", self.conf_repo, "--conf-branch", self.conf_branch or "master"]
        return [self.binary] + repo + [app, env, action]


class TaskProcess:
    """pulsar running for one task, in a session and process group of its own.

    One thread reads the merged stdout/stderr pipe as it arrives; another waits for pulsar to exit
    without reaping it (os.waitid with WNOWAIT), so that its pid, and with it the group id, cannot be
    reused while the group is being signalled.  When pulsar exits, whatever it left in its group
    gets SIGTERM, then SIGKILL after the grace period; only then is pulsar reaped.
    """

    def __init__(self, argv, env, kill_grace, on_output, on_end):
        self._argv = argv
        self._env = env
        self._kill_grace = kill_grace
        self._on_output = on_output
        self._on_end = on_end
        self._lock = threading.Lock()       # guards signalling against reaping
        self._reaped = False
        self._popen = None
        self._reader = None
        self._kill_timer = None
        self._exited = False
        self.kill_requested = False

    @property
    def pid(self):
        return self._popen.pid

    def spawn(self):
        """Start pulsar; OSError if it cannot be started."""
        self._popen = subprocess.Popen(
            self._argv, env=self._env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, bufsize=0)

    def follow(self):
        """Start the threads that read pulsar's output and wait for it to end."""
        self._reader = threading.Thread(target=self._read_output, daemon=True,
                                        name="output-%d" % self.pid)
        self._reader.start()
        threading.Thread(target=self._supervise, daemon=True, name="wait-%d" % self.pid).start()

    def terminate(self):
        """SIGTERM to the whole group now, SIGKILL after the grace period."""
        with self._lock:
            if self._reaped or self.kill_requested or self._exited:
                return                  # ending already: _supervise signals what is left
            self.kill_requested = True
            self._signal_group(signal.SIGTERM)
            self._kill_timer = threading.Timer(self._kill_grace, self._kill_group)
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def _kill_group(self):
        with self._lock:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig):
        # Called with the lock held: once pulsar is reaped its pid may name someone else's group.
        if self._reaped:
            return
        try:
            os.killpg(self._popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _read_output(self):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pipe = self._popen.stdout
        try:
            while True:
                data = os.read(pipe.fileno(), READ_SIZE)
                self._on_output(decoder.decode(data, final=not data))
                if not data:
                    break
        finally:
            pipe.close()

    def _supervise(self):
        wait_for_exit_keeping_pid(self._popen.pid)
        with self._lock:
            self._exited = True
            self._signal_group(signal.SIGTERM)      # anything pulsar left behind
        self._reader.join(self._kill_grace)
        with self._lock:
            self._signal_group(signal.SIGKILL)
        wait_for_empty_group(self._popen.pid, OUTPUT_DRAIN)
        with self._lock:
            returncode = self._popen.wait()
            self._reaped = True
            if self._kill_timer:
                self._kill_timer.cancel()
        self._reader.join(OUTPUT_DRAIN)
        if self._reader.is_alive():
            logger.warning("pid %d: a process outside its group still holds its output open; "
                           "not waiting for it", self.pid)
        self._on_end(returncode)


def wait_for_exit_keeping_pid(pid):
    """Block until `pid` exits, leaving it a zombie so its pid (and group id) stay reserved."""
    if hasattr(os, "waitid"):
        while True:
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                return
            except ChildProcessError:
                return
            except InterruptedError:
                continue
    # Without waitid (macOS) the caller reaps at once; the group is signalled only before that.


def wait_for_empty_group(pgid, timeout):
    """Wait until no live process is left in a group (Linux /proc; elsewhere return at once).

    A process that got SIGKILL closes its files a moment before it is gone; the task counts as
    ended only once it is.  Nothing notifies us of another parent's child dying, so this re-checks.
    """
    deadline = time.monotonic() + timeout
    while group_has_live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.005)


def group_has_live_members(pgid):
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as source:
                stat = source.read()
        except OSError:
            continue                    # gone while we looked
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


class TaskRunner:
    """Starts pulsar for each new task, and ends task process groups when asked."""

    def __init__(self, store, command, kill_grace=KILL_GRACE, env=None):
        self._store = store
        self._command = command
        self._kill_grace = kill_grace
        self._env = dict(os.environ if env is None else env)
        self._starting = threading.Lock()     # a task is created and attached, or stop_all waits
        self._stopping = False

    def start(self, app, env, action, requested_by="-"):
        """Create the task and start pulsar for it; a pulsar that cannot start fails the task."""
        with self._starting:
            if self._stopping:
                raise HTTPError(503, "the server is stopping; no new tasks")
            return self._start(app, env, action, requested_by)

    def _start(self, app, env, action, requested_by):
        task = self._store.create(app, env, action)
        argv = self._command.argv(app, env, action)
        process = TaskProcess(argv, self._env, self._kill_grace,
                              on_output=lambda text: self._store.add_output(task, text),
                              on_end=lambda code: self._ended(task, process, code))
        try:
            process.spawn()
        except OSError as error:
            logger.error("task %d: could not start %s: %s", task.id, argv[0], error)
            self._store.add_output(task, "could not start pulsar (%s): %s\n" % (argv[0], error))
            self._store.end(task, FAILED, None)
            return task
        self._store.attach(task, process)
        process.follow()
        logger.info("task %d started by %s: %s %s %s (pid %d)",
                    task.id, requested_by, app, env, action, process.pid)
        return task

    def kill(self, task_id, requested_by="-"):
        """End a running task's process group; the task as JSON once it has ended."""
        process = self._store.process_to_kill(task_id)
        logger.info("task %d: kill requested by %s", task_id, requested_by)
        process.terminate()
        return self._store.wait_until_ended(task_id, self._kill_grace + OUTPUT_DRAIN + 2)

    def stop_all(self):
        """Refuse new tasks, kill every running one and wait for their groups to end."""
        with self._starting:
            self._stopping = True
        tasks = self._store.running()
        for task in tasks:
            process = task.process
            if process:
                process.terminate()
        for task in tasks:
            self._store.wait_until_ended(task.id, self._kill_grace + OUTPUT_DRAIN + 2)

    def _ended(self, task, process, returncode):
        if process.kill_requested:
            status = KILLED
        elif returncode == 0:
            status = FINISHED
        else:
            status = FAILED
        exit_code = returncode if returncode >= 0 else None
        self._store.end(task, status, exit_code)
        how = "signal %d" % -returncode if returncode < 0 else "exit code %d" % returncode
        logger.info("task %d %s (%s) after %.1f s", task.id, status, how,
                    task.finished_at - task.created_at)


# ---------------------------------------------------------------- transport: TLS helpers

def state_dir(environ=os.environ):
    """Where this server keeps per-user state: $XDG_STATE_HOME/pulsar-rest-api, or ~/.local/state/..."""
    base = environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pulsar-rest-api")


DEV_CERT_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = pulsar.local
O = pulsar-rest-api self-signed certificate
[ext]
subjectAltName = DNS:*.pulsar.local, DNS:pulsar.local, DNS:localhost, IP:127.0.0.1, IP:::1
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def self_signed_pair(folder):
    """(cert, key) paths in `folder`, made once with the openssl command and reused afterwards."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    if os.path.isfile(cert) and os.path.isfile(key):
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
            out.write(DEV_CERT_CONFIG)
        run_openssl([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                     "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3660", "-config", config,
                     "-keyout", key + ".new", "-out", cert + ".new"], "make a certificate")
        os.chmod(key + ".new", 0o600)
        os.replace(key + ".new", key)
        os.replace(cert + ".new", cert)
        os.remove(config)
    except OSError as error:
        raise StartupError("cannot make a self-signed certificate in %s: %s" % (folder, error))
    logger.info("made a self-signed certificate in %s", folder)
    return cert, key


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
    """SHA-256 of the first certificate in a PEM file, as AA:BB:... (what browsers show)."""
    try:
        with open(cert_file, encoding="ascii", errors="replace") as source:
            text = source.read()
        end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(text[text.index("-----BEGIN CERTIFICATE-----"):end])
    except (OSError, ValueError) as error:
        raise StartupError("cannot read a certificate from %s: %s" % (cert_file, error))
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


# ---------------------------------------------------------------- transport: the request handler

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


class RequestHandler(BaseHTTPRequestHandler):
    """One connection: TLS handshake, then requests routed through ROUTES, errors as JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "pulsar-rest-api/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True      # headers and body leave in one write, without a 40 ms stall

    # -- connection

    def setup(self):
        super().setup()
        self.rfile.close()              # replaced by a reader that enforces a whole-request deadline
        self._reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, READ_SIZE)

    def handle(self):
        try:
            if isinstance(self.connection, ssl.SSLSocket) and not self._handshake():
                return
            self.close_connection = False
            while not self.close_connection:
                self.handle_one_request()
        except (ConnectionError, ssl.SSLError, socket.timeout) as error:
            logger.info("%s: connection dropped: %s", self.peer, describe_socket_error(error))

    def _handshake(self):
        deadline = time.monotonic() + self.server.request_timeout
        self.connection.settimeout(self.server.request_timeout)
        try:
            first = socket.socket.recv(self.connection, 1, socket.MSG_PEEK)
            if not first:
                logger.info("%s: closed before a TLS hello", self.peer)
                return False
            if first.isalpha():
                self._answer_plain_http()
                return False
            self.connection.settimeout(max(0.001, deadline - time.monotonic()))
            self.connection.do_handshake()      # the timeout bounds the whole handshake
            return True
        except socket.timeout:
            logger.info("%s: no TLS handshake within %g s; dropped", self.peer,
                        self.server.request_timeout)
        except (ssl.SSLError, OSError) as error:
            logger.info("%s: TLS handshake failed: %s", self.peer, describe_socket_error(error))
        return False

    def _answer_plain_http(self):
        """A plain-HTTP request on the TLS port gets a hint instead of a silent close."""
        body = b"This server speaks HTTPS: use https:// (curl -k https://HOST:PORT/...).\n"
        socket.socket.sendall(     # beneath TLS, as plain bytes
            self.connection, b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        logger.info("%s: plain HTTP on the TLS port; answered 400", self.peer)

    def handle_one_request(self):
        self._reader.deadline = time.monotonic() + IDLE_TIMEOUT
        if not self.rfile.peek(1):      # the client closed a keep-alive connection
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + self.server.request_timeout
        self._started = time.monotonic()
        super().handle_one_request()

    @property
    def peer(self):
        host, port = self.client_address[:2]
        return "%s:%s" % (host, port)

    # -- requests: every method goes through the route table

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self):
        try:
            path, _, query = self.path.partition("?")
            body = self._read_body()
            handler, arguments = find_route(self.command, path)
            self.fields = request_fields(query, body, self.headers.get_content_type()
                                         if self.headers.get("Content-Type") else None)
            handler(self, **arguments)
        except HTTPError as error:
            self.close_connection = self.close_connection or error.close
            self.send_json(error.status, {"error": error.message}, error.headers)
        except (ConnectionError, socket.timeout, ssl.SSLError):
            raise                       # the client went away: handle() logs one line
        except Exception:
            incident = uuid.uuid4().hex[:12]
            logger.exception("internal error %s in %s %s", incident, self.command, quoted(self.path))
            self.close_connection = True
            self.send_json(500, {"error": "internal error", "id": incident})

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
        # A body that would be refused is refused before the client sends it.
        try:
            self._content_length()
        except HTTPError as error:
            self.close_connection = True
            self.send_json(error.status, {"error": error.message})
            return False
        return super().handle_expect_100()

    # -- the endpoints (ROUTES, below the class, says which path and method reach each)

    def create_task(self, app, env):
        self._allow_fields("action", "task")
        action = self._one_field("action", "task")
        task = self.server.runner.start(check_name("app", app), check_name("env", env),
                                        check_action(action), requested_by=self.peer)
        self.send_json(200, {"taskId": task.id, "url": self._absolute_url("/task/%d" % task.id)})

    def read_task(self, task_id):
        self._allow_fields("offset")
        self.send_json(200, self.server.store.view(task_id, self._count_field("offset") or 0))

    def poll_task(self, task_id):
        self._allow_fields("version", "offset")
        task = self.server.store.wait_for_change(task_id, self._count_field("version"),
                                                 self._count_field("offset"),
                                                 self.server.poll_timeout)
        self.send_json(200, {"changed": True, "task": task} if task else {"changed": False})

    def kill_task(self, task_id):
        self._allow_fields()
        self.send_json(200, self.server.runner.kill(task_id, requested_by=self.peer))

    # -- request fields: from the query string and a form or JSON body, each name once

    def _allow_fields(self, *allowed):
        for name in self.fields:
            if name not in allowed:
                raise HTTPError(400, "unknown parameter %s (this endpoint takes: %s)"
                                % (quoted(name), ", ".join(allowed) or "none"))

    def _one_field(self, name, *aliases):
        values = [value for key in (name,) + aliases for value in self.fields.get(key, [])]
        if not values:
            raise HTTPError(400, "%s is required, e.g. curl -k -d %s=deploy %s"
                            % (name, name, self._absolute_url(self.path.partition("?")[0])))
        if len(values) > 1:
            raise HTTPError(400, "give %s once (as %s, in the query string or the body)"
                            % (name, " or ".join((name,) + aliases)))
        return values[0]

    def _count_field(self, name):
        values = self.fields.get(name, [])
        if len(values) > 1:
            raise HTTPError(400, "give %s once" % name)
        return parse_count(name, values[0]) if values else None

    def _absolute_url(self, path):
        scheme = "https" if self.server.tls else "http"
        host = self.headers.get("Host", "")
        if not HOST_PATTERN.fullmatch(host):
            address = self.connection.getsockname()
            host = ("[%s]:%d" if ":" in address[0] else "%s:%d") % address[:2]
        return "%s://%s%s" % (scheme, host, path)

    # -- responses: every one goes through send_bytes

    def send_json(self, status, payload, headers=()):
        body = (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")
        self.send_bytes(status, body, "application/json", headers)

    def send_bytes(self, status, body, content_type, headers=()):
        lines = ["HTTP/1.1 %d %s" % (status, self.responses.get(status, ("",))[0]),
                 "Server: " + self.version_string(),
                 "Date: " + self.date_time_string(),
                 "Content-Type: " + content_type,
                 "Content-Length: %d" % len(body),
                 "Cache-Control: no-store",
                 "X-Content-Type-Options: nosniff"]
        lines += ["%s: %s" % header for header in headers]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._reader.deadline = None
        self.connection.settimeout(SEND_TIMEOUT)
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self._log_request(status, len(body))

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (bad request line, headers too long, unknown method) as JSON.
        self.close_connection = True
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _log_request(self, status, size):
        started = getattr(self, "_started", None)
        elapsed = (time.monotonic() - started) * 1000 if started else 0
        logger.info("%s %s %s %d %d %.0fms", self.peer, self.command or "-",
                    quoted(getattr(self, "path", "-"), 200), status, size, elapsed)

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):
        logger.info("%s: %s", self.peer, format % args)



# The route table: (path pattern, {method: handler}).  The first pattern that matches the path
# decides; a method it does not list gets 405 with Allow.  /task/... is never an app name.
ROUTES = (
    (re.compile(r"/task/(?P<task_id>[^/]*)"), {"GET": RequestHandler.read_task}),
    (re.compile(r"/task/(?P<task_id>[^/]*)/state"), {"GET": RequestHandler.poll_task}),
    (re.compile(r"/task/(?P<task_id>[^/]*)/kill"), {"GET": RequestHandler.kill_task,
                                                    "POST": RequestHandler.kill_task}),
    (re.compile(r"/(?P<app>[^/]*)/(?P<env>[^/]*)"), {"POST": RequestHandler.create_task}),
)


def find_route(method, path):
    """(handler, keyword arguments) for a request, or HTTPError 404/405."""
    for pattern, handlers in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if method not in handlers:
            allowed = ", ".join(sorted(handlers))
            raise HTTPError(405, "%s is not allowed here; use %s" % (method, allowed),
                            headers=[("Allow", allowed)])
        arguments = {name: path_segment(value) for name, value in match.groupdict().items()}
        if "task_id" in arguments:
            arguments["task_id"] = parse_task_id(arguments["task_id"])
        return handlers[method], arguments
    raise HTTPError(404, "no such endpoint: %s %s" % (method, quoted(path)))


def path_segment(raw):
    try:
        return urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the path is not valid UTF-8 once percent-decoded: %s" % quoted(raw))


def parse_task_id(text):
    if not COUNT_PATTERN.fullmatch(text) or int(text) == 0:
        raise HTTPError(404, "no task %s (task ids are whole numbers from 1)" % quoted(text))
    return int(text)


def request_fields(query, body, content_type):
    """{name: [values]} from the query string and a form or JSON body."""
    fields = {}
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
            fields.setdefault(name, []).append(value)
    return fields


def parse_form(text, where):
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


# ---------------------------------------------------------------- transport: the server

class PulsarServer(ThreadingHTTPServer):
    """The HTTP(S) server: accepts in one thread, and hands each connection, still before its TLS
    handshake, to a thread of its own."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, store, runner, tls=None, poll_timeout=POLL_TIMEOUT,
                 request_timeout=REQUEST_TIMEOUT):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.runner = runner
        self.tls = tls
        self.poll_timeout = poll_timeout
        self.request_timeout = request_timeout
        super().__init__(address, RequestHandler)

    def server_bind(self):
        # HTTPServer.server_bind also looks up our own name (getfqdn), which can stall on bad DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        sock, address = self.socket.accept()
        if self.tls:
            # No handshake here: a client that never sends a hello would stall every other.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request, client_address):
        logger.exception("unexpected error with %s:%s", *client_address[:2])


# ---------------------------------------------------------------- the command line

@dataclasses.dataclass
class Settings:
    """Everything the command line decides."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    command: PulsarCommand = PulsarCommand()
    log_dir: str = None
    tls: bool = True
    ssl_cert: str = None
    ssl_key: str = None
    ssl_pfx: str = None
    ssl_passphrase: str = None
    poll_timeout: float = POLL_TIMEOUT
    kill_grace: float = KILL_GRACE
    request_timeout: float = REQUEST_TIMEOUT


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
    add("--pulsar-cli", choices=("classic", "v1"), default="classic",
        help="classic: pulsar [--conf-repo R --conf-branch B] APP ENV ACTION (pulsar 0.x); "
             "v1: pulsar task [--conf-repo R] APP ENV ACTION (pulsar 1.x)")
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
    add("--version", action="version", version="%(prog)s " + __version__)
    return parser


def parse_args(argv):
    """Settings from the command line, or StartupError saying what is wrong."""
    options = build_parser().parse_args(argv)
    if options.pulsar_cli == "v1" and options.config_branch:
        raise StartupError("--config-branch: pulsar 1.x (--pulsar-cli v1) has no branch option; "
                           "leave --config-branch out")
    if options.config_branch and not options.config_repo:
        raise StartupError("--config-branch needs --config-repo")
    if options.no_ssl and (options.ssl_cert or options.ssl_key or options.ssl_pfx):
        raise StartupError("--no-ssl cannot be combined with --ssl-cert, --ssl-key or --ssl-pfx")
    if not options.ssl_pfx and bool(options.ssl_cert) != bool(options.ssl_key):
        raise StartupError("--ssl-cert and --ssl-key go together: give both, or --ssl-pfx")
    for flag in ("ssl_cert", "ssl_key", "ssl_pfx"):
        check_readable("--" + flag.replace("_", "-"), getattr(options, flag))
    passphrase = None
    if options.ssl_passphrase:
        passphrase = read_passphrase(options.ssl_passphrase)
    return Settings(
        host=options.host, port=options.port, log_dir=options.log_dir, tls=not options.no_ssl,
        command=PulsarCommand(options.pulsar_bin, options.pulsar_cli, options.config_repo,
                              options.config_branch),
        ssl_cert=options.ssl_cert, ssl_key=options.ssl_key, ssl_pfx=options.ssl_pfx,
        ssl_passphrase=passphrase, poll_timeout=options.poll_timeout,
        kill_grace=options.kill_grace, request_timeout=options.request_timeout)


def check_readable(flag, path):
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise StartupError("%s: cannot read %s: %s" % (flag, path, error.strerror or error))


def read_passphrase(path):
    try:
        with open(path, encoding="utf-8") as source:
            return source.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise StartupError("--ssl-passphrase: cannot read %s: %s" % (path, error))


def load_tls(settings):
    """(SSLContext, fingerprint) for the settings: pfx, cert/key, ssl/ beside us, or self-signed."""
    if settings.ssl_pfx:
        return pfx_tls_context(settings.ssl_pfx, settings.ssl_passphrase)
    if settings.ssl_cert:
        cert, key = settings.ssl_cert, settings.ssl_key
    else:
        bundled = os.path.join(SCRIPT_DIR, "ssl")
        if os.path.isfile(os.path.join(bundled, "cert.pem")):
            cert, key = os.path.join(bundled, "cert.pem"), os.path.join(bundled, "key.pem")
        else:
            cert, key = self_signed_pair(state_dir())
    return tls_context(cert, key, settings.ssl_passphrase), certificate_fingerprint(cert)


def configure_logging(log_dir):
    if log_dir:
        try:
            os.makedirs(log_dir, exist_ok=True)
            # WatchedFileHandler reopens the file when logrotate moves it away.
            handler = logging.handlers.WatchedFileHandler(os.path.join(log_dir, LOG_NAME))
        except OSError as error:
            raise StartupError("--log-dir: cannot write %s: %s" % (log_dir, error))
    else:
        handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s",
                                  "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def serve(settings):
    """Run the server until SIGTERM or SIGINT; the exit code."""
    tls, fingerprint = load_tls(settings) if settings.tls else (None, None)
    store = TaskStore()
    runner = TaskRunner(store, settings.command, settings.kill_grace)
    try:
        server = PulsarServer((settings.host, settings.port), store, runner, tls,
                              settings.poll_timeout, settings.request_timeout)
    except OSError as error:
        raise StartupError("cannot listen on %s:%d: %s" % (settings.host, settings.port,
                                                           error.strerror or error))
    announce(settings, server, fingerprint)
    stop = stop_signal_pipe()
    accepting = threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL,),
                                 name="accept", daemon=True)
    accepting.start()
    signum = wait_for_stop(stop)
    logger.info("%s: stopping; killing %d running task(s)", signal.Signals(signum).name,
                len(store.running()))
    server.shutdown()
    runner.stop_all()
    server.server_close()
    logger.info("stopped")
    return 0


def announce(settings, server, fingerprint):
    host, port = server.server_address[:2]
    scheme = "https" if settings.tls else "http"
    shown = "[%s]" % host if ":" in host else host
    logger.info("pulsar-rest-api %s listening on %s://%s:%d/", __version__, scheme, shown, port)
    if host in ("0.0.0.0", "::"):
        logger.info("reachable as %s://%s:%d/ on this host's addresses", scheme,
                    socket.gethostname(), port)
    if fingerprint:
        logger.info("TLS certificate SHA-256 fingerprint %s", fingerprint)
    else:
        logger.warning("TLS IS OFF (--no-ssl): requests and answers travel in clear text; use "
                       "this only behind a TLS-terminating proxy")
    argv = settings.command.argv("APP", "ENV", "ACTION")
    logger.info("tasks run: %s", " ".join(argv))
    if shutil.which(settings.command.binary) is None:
        logger.warning("%s is not an executable on PATH: tasks will fail until it is installed "
                       "(try --pulsar-bin echo)", settings.command.binary)


def stop_signal_pipe():
    """A pipe that SIGTERM and SIGINT write to; the main thread blocks reading it."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)      # the wakeup fd does the work
    return read_end


def wait_for_stop(read_end):
    while True:
        data = os.read(read_end, 1)
        if data and data[0] in (signal.SIGTERM, signal.SIGINT):
            return data[0]


def main(argv=None):
    """Start the server from command-line arguments; the process exit code."""
    settings = None
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


if __name__ == "__main__":
    sys.exit(main())
