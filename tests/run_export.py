#!/usr/bin/env python3
"""Runs export.py on every case of a tests/make_malformed.py list, for test_all.c to check.

  python3 tests/run_export.py build/malformed/cases.txt

export.py is imported once and each case runs in a fork()ed child, exactly as
`python3 export.py ARGS` would (an uncaught exception prints its traceback and exits 1), at a
fraction of an interpreter's start-up cost: some 150 cases take about a second. Before each
case its output folder is emptied. A case whose EXPECT is `midway:HOW:...` is disturbed while it
writes: HOW = sigint (Ctrl-C) or sigterm sends that signal to it at its 20th conversion call,
fsize lets no file grow past 200000 bytes (a write fails as on a full disk).
One tab-separated line per case on stdout:

  NAME  EXPECT  OUT  STATUS  STDOUT_BYTES  STDERR_LINES  TRACEBACK  FIRST_LINE  LAST_LINE

STATUS is the exit status, or -N when signal N ended the child (a child still running after
30 s is ended by SIGALRM: a hang). TRACEBACK is 1 when stderr holds "Traceback". Standard
library only.
"""
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export  # noqa: E402  (after the path is set)

HANG_SECONDS = 30


def disturb(how):
    """In the child, before export.py runs: arrange the disturbance of a `midway:HOW:` case."""
    if how == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return
    sig, convert, calls = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[how], export.convert, [0]
    # Ctrl-C as at a terminal: a shell's background job (make test &) starts with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler, so the signal would do nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def convert_then_signal(*args):
        calls[0] += 1
        if calls[0] == 20:
            os.kill(os.getpid(), sig)
        return convert(*args)
    export.convert = convert_then_signal


def run_in_child(args, expect, out, err):
    """In the forked child: export.py's main() with args, stdout/stderr to the files out/err."""
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    signal.alarm(HANG_SECONDS)
    if expect.startswith("midway:"):
        disturb(expect.split(":")[1])
    sys.argv = ["export.py"] + args
    code = 0
    try:
        export.main()
    except SystemExit as e:  # as the interpreter does: None -> 0, an int, else print it and 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_case(args, expect):
    """-> (status, stdout bytes, stderr text) of export.py run with args."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()  # or the child would write our buffered lines a second time
        pid = os.fork()
        if pid == 0:
            run_in_child(args, expect, out, err)
        _, status = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(status)  # -N for signal N
        out.seek(0)
        err.seek(0)
        return status, out.read(), err.read().decode("utf-8", "replace")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/run_export.py CASES_FILE")
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for name, expect, out_dir, args in cases:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        status, stdout, stderr = run_case(shlex.split(args), expect)
        lines = [line.replace("\t", " ") for line in stderr.splitlines()] or [""]  # "\r" ends a line too
        print("\t".join([name, expect, out_dir, str(status), str(len(stdout)), str(len(stderr.splitlines())),
                         str(int("Traceback" in stderr)), lines[0], lines[-1]]))


if __name__ == "__main__":
    main()
