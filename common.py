"""What every stage script shares: how it starts and ends (flags checked when parsed, one sentence
and exit 1 for a user's mistake, 130 on Ctrl-C), files replaced atomically, run folders locked (and
--resume's check that a run's flags did not change), and the one progress line.

Nothing here knows about models or tokens; every other file of ours may import it.
"""
import argparse
import math
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path


SEED = 1337  # every stage's default --seed: one number, so runs of different stages repeat alike


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag value, missing file); the message is one sentence."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """-h shows each flag's default once, and keeps an epilog's example commands on their own lines.

    Not "(default: None)": a flag without a default says in its help what happens without it; and
    not after a help text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default is None or "default" in help.lower():
            return help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with two house rules: every -h shows the defaults, and a bad flag raises UserError
    (one line on stderr and exit 1, through run_stage) instead of printing the usage and exiting 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see: python {self.prog} --help)")


def _number_flag(convert, test, wanted: str):
    """An argparse type: text -> number, refused (naming the flag, through argparse) unless test holds."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value
    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _number_flag(int, lambda v: v >= 1, "a whole number of at least 1")


non_negative_int = _number_flag(int, lambda v: v >= 0, "a whole number of at least 0")


positive_float = _number_flag(float, lambda v: v > 0, "a finite number above 0")


non_negative_float = _number_flag(float, lambda v: v >= 0, "a finite number of at least 0")


unit_interval = _number_flag(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def clock(seconds: float) -> str:
    """A duration as h:mm:ss, for progress lines' ETAs and run times."""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def describe_os_error(e: OSError) -> str:
    """An OSError as a short phrase that names the file: 'out/x: Permission denied'."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or type(e).__name__}"


def is_main_process() -> bool:
    """Whether this process prints and writes the shared files: the only one, or rank 0 under torchrun
    (distributed.Processes.is_main says the same once the processes are set up)."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(main, parse_args) -> None:
    """Run a stage script, main(parse_args()), and end it the one way every stage ends.

    A UserError (a bad flag, a missing file) or an OSError (a disk full, a folder not writable) prints
    one line, `error: <sentence>`, and exits 1, never a traceback; Ctrl-C exits 130, as does a run
    whose result says it was interrupted (after saving what it had). Under torchrun only rank 0
    prints: every process meets the same error. Anything else is a bug and keeps its traceback."""
    is_main = is_main_process()
    try:
        result = main(parse_args())
    except UserError as e:
        sys.exit(f"error: {' '.join(str(e).split())}" if is_main else 1)
    except BrokenPipeError:  # the reader went away (`| head`): not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        sys.exit(f"error: {describe_os_error(e)}" if is_main else 1)
    except KeyboardInterrupt:
        if is_main:
            print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, dict) and result.get("interrupted"):
        sys.exit(130)  # the shell's convention for "stopped by Ctrl-C"


def refuse_changed_flags(saved: dict, args: argparse.Namespace, must_match: tuple[str, ...], folder: Path,
                         otherwise: str, more: tuple[str, ...] = ()) -> None:
    """--resume's check: UserError naming every flag of must_match whose value in the saved run's flags
    differs from this command's (plus `more`, other differences a stage found), and what to do instead."""
    changed = [f"--{name.replace('_', '-')} {saved[name]} (now {getattr(args, name)})"
               for name in must_match if name in saved and saved[name] != getattr(args, name)]
    changed += list(more)
    if changed:
        raise UserError(f"--resume: the run in {folder} used {', '.join(changed)}; repeat the run's flags to resume "
                        f"it, or {otherwise}")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write data to path through a temporary file and a rename: a crash leaves the old file or the
    new one, never half of one. Text is written as UTF-8."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def writable_folder(path: str | Path, flag: str = "--out-dir") -> Path:
    """Create the folder if needed and check that files can be written in it, before any work starts;
    UserError naming the flag otherwise (a run should not find out after an hour of training)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not a writable folder ({e.strerror or e}); name another one") from None
    return path


class RunLock:
    """A run folder's lock, held while a run writes there: a second run into the same folder stops at
    once, naming the running one, instead of interleaving its files with the first run's.

    The lock is an OS file lock (flock) on OUT_DIR/.lock, which the OS drops when its process dies,
    so a lock left by a killed run is simply taken over; the file records who holds it, for messages,
    and is removed when the run ends normally. A run that fails leaves no empty run folder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.file = None

    def __enter__(self) -> "RunLock":
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"cannot create the lock {self.path} ({e.strerror or e})") from None
        self.file.seek(0)
        previous = self.file.read().strip()
        if not _try_lock(self.file):
            self.file.close()
            self.file = None
            holder = f" ({previous})" if previous else ""
            raise UserError(f"{self.path.parent} is in use by another run{holder}; wait for it to finish, stop it, "
                            f"or choose another --out-dir")
        if previous:
            print(f"note: taking over {self.path}, left by a run that ended without releasing it ({previous})",
                  file=sys.stderr)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {_hostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                        f"{' '.join(sys.argv)}")
        self.file.flush()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # released properly: nothing left behind to report
            self.file.close()  # closing drops the OS lock
            self.file = None
            if exc_type is not None:  # a run that failed before writing anything leaves no empty folder behind
                try:
                    self.path.parent.rmdir()  # only ever removes an empty folder
                except OSError:
                    pass


def _try_lock(file) -> bool:
    """Take an exclusive, non-blocking OS lock on an open file; False if another process holds it."""
    try:
        import fcntl
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


def _hostname() -> str:
    import socket
    return socket.gethostname()


class ProgressLine:
    """One status line on stderr, rewritten in place at most every `interval` seconds.

    Shows done / total, percent and the rate: in MB for unit "MB" (done and total count bytes), else
    in whole `unit`s (windows, questions); `extra` appends a stage-specific note (e.g. tokens)."""

    def __init__(self, label: str, total: int | None = None, interval: float = 0.5, unit: str = "MB"):
        self.label, self.total, self.interval, self.unit = label, total, interval, unit
        self.start = self.last = time.perf_counter()
        self.done, self.extra, self.shown = 0, "", False

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        self.done, self.extra = done, extra
        now = time.perf_counter()
        if force or now - self.last >= self.interval:
            self.last, self.shown = now, True
            rate = done / max(now - self.start, 1e-9)
            percent = f" ({100 * done / max(self.total, 1):3.0f}%)" if self.total else ""
            if self.unit == "MB":
                total = f" / {self.total / 1e6:.1f} MB{percent}" if self.total else " MB"
                figures = f"{done / 1e6:9.1f}{total} {rate / 1e6:7.1f} MB/s"
            else:
                total = f" / {self.total:,}{percent}" if self.total else ""
                figures = f"{done:,}{total} {self.unit} ({rate:.1f}/s)"
            print(f"\r{self.label}: {figures} {extra}", end="", file=sys.stderr, flush=True)

    def count(self, done: int, total: int) -> None:
        """update() as a callback that reports (done, total): the line ends once all is done."""
        self.total = total
        self.update(done)
        if done == total and self.shown:
            self.close()

    def close(self) -> None:
        self.update(self.done, self.extra, force=True)
        print(file=sys.stderr)


def writable_file(path: Path, flag: str) -> Path:
    """Check, before any work, that a file can be written at path (creating its folder); UserError
    naming the flag otherwise."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written ({e.strerror or e}); choose another place") from None
    return path


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int) -> str:
    """Two texts in two columns of width characters each, wrapped."""
    columns = [[title] + textwrap.wrap(text, width) for title, text in zip(titles, (left, right))]
    rows = max(len(c) for c in columns)
    return "\n".join(f"  {a:<{width}}  | {b}" for a, b in zip(*(c + [""] * (rows - len(c)) for c in columns)))
