"""Reading and writing the files the steps exchange: atomic writes (a step killed at any moment
leaves the old complete output or none), JSON and JSON Lines, content hashes of files and folders."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from rm_lib.errors import DataError, UserError

# Temporaries are named .<name>.<pid>@<host>.<random>.tmp: a later writer can tell that the one who
# made it is dead (a kill -9 runs no clean-up) and remove it. A pid is judged on its own host only.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
# (atomic_files keeps a replaced file as .<name>.<pid>@<host>.<random>.earlier until its set is in place)
_OWNER = re.compile(r"\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.\w+\.(?:tmp|earlier)$")


def _prefix(name: str) -> str:
    return f".{name}.{os.getpid()}@{HOST}."


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_stat(pid: int, field: int) -> int | None:
    """Field `field` of /proc/<pid>/stat, counted after the command's name (1: the parent's pid, 19: the
    start time); None where /proc does not say."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[field])
    except (OSError, IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc): tells it from a later process that
    got the same number. None where /proc does not say."""
    return process_stat(pid, 19)


def _stale(entry: str, unowned: bool) -> bool:
    owner = _OWNER.search(entry)
    if owner is None:  # an older rm_lib's name (a .old may be the only complete copy: atomic_dir clears it)
        return unowned and entry.endswith(".tmp")
    return owner["host"] == HOST and not alive(int(owner["pid"]))


def remove_stale(folder: str | Path, name: str | None = None, *, unowned: bool = False) -> list[Path]:
    """Remove the temporaries in `folder` (of output `name`, or of any) whose writer died. `unowned`
    also removes those that name no writer: only for a caller that knows none is alive (a step's lock)."""
    folder = Path(folder)
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    start = "." if name is None else f".{name}."
    removed = []
    for entry in entries:
        if entry.startswith(start) and _stale(entry, unowned):
            path = folder / entry
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed


# errors of the storage itself: raised by a write, they name no file, so the output they hit is named
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def storage_error(exc: BaseException, path: Path) -> OSError | None:
    """`exc` as an OSError naming `path` where it is the storage's failure that named no file (a write's
    ENOSPC or EFBIG; safetensors' error, which is no OSError, says "os error 28"); None for anything else."""
    if isinstance(exc, OSError):
        if exc.filename is None and exc.errno in STORAGE_ERRORS:
            return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
        return None
    said = re.search(r"os error (\d+)", str(exc))  # safetensors' (Rust's) way of naming it
    code = int(said.group(1)) if said else errno.ENOSPC if "No space left on device" in str(exc) else None
    if code in STORAGE_ERRORS:
        return OSError(code, os.strerror(code), str(path))
    return None


def folder_problem(path: str | Path) -> str | None:
    """Why a step cannot put its output folder at `path`, said before any work: a file is there, or a
    link to nothing. A link to a folder is written through (an output moved to another disk stays there)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"{path} is a link to {os.readlink(path)}, which does not exist: make that folder, or remove the link"
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder, and the step writes a folder there: move the file away"
    return None


def staging_problem(path: str | Path) -> str | None:
    """Why the folder where output `path` is staged (beside it, or beside its link's folder) takes no new
    folder, said before any work: a linked output under /scratch/$USER found it only after training."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    problem = unwritable_folder(target.parent)
    if problem is None:
        return None
    if target == path:
        return f"{path} cannot be written: {problem}"
    return (f"{path} is a link to {target}; the step builds its new folder beside that one and swaps it in, and "
            f"{problem}: link to a folder whose parent you may write in")


def _output_folder(path: Path) -> Path:
    """Where output folder `path` is written: its link's folder where it is a link."""
    problem = folder_problem(path)
    if problem:
        raise UserError(problem)
    return path.resolve() if path.is_symlink() else path


def _made_in(folder: Path, make: Any) -> Any:
    """`make()` (a temporary in `folder`), its failure naming `folder`, not a name that never came to be."""
    try:
        return make()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(folder)) from exc


def _temporary_sibling(path: Path) -> Path:
    """An empty file beside `path` that only the process which made it writes, after clearing the ones
    a killed writer of `path` left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    fd, tmp = _made_in(path.parent, lambda: tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp",
                                                             dir=path.parent))
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    # a link at `path` is replaced, never written through: DVC's cache.type=symlink links outputs to its cache
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, shared_mode(tmp))  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = storage_error(exc, path)
        if named is not None:
            raise named from exc
        raise


@contextlib.contextmanager
def atomic_files(*paths: str | Path, remove: Sequence[str | Path] = ()) -> Iterator[list[Any]]:
    """atomic_file for several paths that belong together (an output and its rejects): text handles on
    temporary siblings, which replace their paths only when the block succeeds, and together: where a
    replace fails, the paths replaced before it get their earlier files back. `remove`: files of the set
    this one has none of (an earlier run's rejects), removed with the replaces. Ctrl-C and SIGTERM wait
    until all is done (a Ctrl-C between two left an output beside another run's rejects)."""
    with contextlib.ExitStack() as cleanup:
        staged = []
        for path in map(Path, paths):
            tmp = _temporary_sibling(path)
            cleanup.callback(tmp.unlink, missing_ok=True)
            staged.append((path, tmp, cleanup.enter_context(open(tmp, "w", encoding="utf-8"))))
        yield [handle for _, _, handle in staged]
        for _, tmp, handle in staged:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.chmod(tmp, shared_mode(tmp))
        done: list[tuple[Path, Path | None]] = []  # replaced so far, with their earlier files kept aside

        def keep_aside(path: Path) -> Path | None:
            if not path.exists():
                return None
            earlier = path.with_name(f"{_prefix(path.name)}{uuid.uuid4().hex}.earlier")
            try:
                os.link(path, earlier)
            except OSError:  # a file system without hard links
                shutil.copy2(path, earlier)
            cleanup.callback(lambda: earlier.unlink(missing_ok=True))
            return earlier

        with _signals_held():
            try:
                for path, tmp, _ in staged:
                    earlier = keep_aside(path)
                    os.replace(tmp, path)
                    done.append((path, earlier))
                for path in map(Path, remove):
                    earlier = keep_aside(path)
                    path.unlink(missing_ok=True)
                    done.append((path, earlier))
            except BaseException:
                for path, earlier in done:
                    if earlier is None:
                        path.unlink(missing_ok=True)
                    else:
                        os.replace(earlier, path)
                raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces `path` whole when the block succeeds."""
    with atomic_dirs(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_dirs(*paths: str | Path) -> Iterator[list[Path]]:
    """atomic_dir for folders that belong together (a model and the records of its training run): each
    is staged whole, then all replace their paths one right after the other, with Ctrl-C and SIGTERM
    held until the last is in place, so an interrupted step leaves the earlier set, not a mix. A
    replace that fails puts back the folders replaced before it."""
    staged = []
    try:
        for path in map(_output_folder, map(Path, paths)):
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(path.parent, path.name)
            staged.append((path, Path(_made_in(path.parent, lambda path=path: tempfile.mkdtemp(
                prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)))))
        try:
            yield [tmp for _, tmp in staged]
        except Exception as exc:  # a full disk as the block writes: named by the output it was for
            named = _named_for_outputs(exc, list(map(Path, paths)), [tmp for _, tmp in staged])
            if named is exc:
                raise
            raise named from exc
        for _, tmp in staged:
            os.chmod(tmp, shared_mode(tmp))  # mkdtemp makes 0700
        if len(staged) > 1:
            _mark_set(staged)
        with _signals_held():
            done: list[tuple[Path, Path, bool]] = []
            try:
                for path, tmp in staged:
                    done.append((path, tmp, _replace_dir(tmp, path)))
            except BaseException:
                for path, tmp, had_earlier in reversed(done):
                    if had_earlier:
                        _replace_dir(tmp, path)  # the earlier folder back, the new one at tmp
                    else:
                        os.replace(path, tmp)
                raise
            for path, _ in staged:
                (path / SET_MARK).unlink(missing_ok=True)
    finally:
        for _, tmp in staged:  # a failed block's folders, or the earlier ones the replaces put there
            remove_tree(tmp)


# In each folder of a set atomic_dirs puts in place: a kill -9 between two of its replaces left the first
# folders new and the others old (a model beside the records of the run before it); the next step finishes
# the set from what this names (finish_replacing).
SET_MARK = ".rm_lib-set.json"


def _mark_set(staged: list[tuple[Path, Path]]) -> None:
    writer, identity = f"{os.getpid()}@{HOST}", uuid.uuid4().hex
    for path, tmp in staged:
        pairs = [[os.path.relpath(p, path), os.path.relpath(t, path)] for p, t in staged]
        (tmp / SET_MARK).write_text(json.dumps({"writer": writer, "id": identity, "set": pairs}), encoding="utf-8")


def _mark_of(folder: Path) -> str | None:
    """The set id of the mark in `folder`; None where it holds none (or one that cannot be read)."""
    try:
        return json.loads((folder / SET_MARK).read_text(encoding="utf-8")).get("id")
    except (OSError, ValueError, AttributeError):
        return None


def finish_replacing(path: str | Path) -> bool:
    """Folder `path` is in place but its set's writer died before putting the others in place (their new
    folders wait in its temporaries, marked with the set's id): put them in place too, and True. A set
    whose folders are all in place, killed as it cleared its marks, has them cleared (True). For a caller
    that holds the lock of the set's writer, so none is alive (its pid may be another process's by now).
    False where `path` holds no mark, its writer ran on another host (whose lock this one may not see),
    or a folder of the set is neither in place nor waiting while another waits (the marks then stay)."""
    path = _output_folder(Path(path))  # the marks name the folders from where atomic_dirs wrote, a link's target
    try:
        record = json.loads((path / SET_MARK).read_text(encoding="utf-8"))
        _, host = record["writer"].split("@")
        identity = record["id"]
        pairs = [(Path(os.path.normpath(path / p)), Path(os.path.normpath(path / t))) for p, t in record["set"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none; or not ours to judge: left as it is
        return False
    if host != HOST:
        return False
    # a folder is in place when its mark is this set's (another set's, left by a kill as marks were cleared,
    # is no proof), waiting when its temporary's is
    placed = [_mark_of(final) == identity for final, _ in pairs]
    waiting = [not done and _mark_of(tmp) == identity for (_, tmp), done in zip(pairs, placed)]
    if any(waiting) and not all(done or wait for done, wait in zip(placed, waiting)):
        return False
    for (final, tmp), wait in zip(pairs, waiting):
        if wait:
            _replace_dir(tmp, final)  # its earlier folder now at tmp: remove_stale clears it
    for final, _ in pairs:
        if _mark_of(final) == identity:
            (final / SET_MARK).unlink(missing_ok=True)
    return True


def remove_tree(path: Path, *, said: bool = True) -> None:
    """rmtree of a temporary that also empties the read-only folders in it (an earlier output the user made
    read-only, swapped out): ignoring those errors left a hidden copy of the whole output behind for good."""
    def writable(folder: str) -> None:
        if os.path.isdir(folder) and not os.path.islink(folder):
            with contextlib.suppress(OSError):
                os.chmod(folder, os.stat(folder).st_mode | stat.S_IRWXU)

    writable(str(path))
    for top, dirs, _ in os.walk(path):
        for name in dirs:  # before the walk goes into it
            writable(os.path.join(top, name))
    shutil.rmtree(path, ignore_errors=True)
    if said and os.path.lexists(path):  # a teammate's, in a folder made under umask 022: said, not kept in silence
        print(f"warning: {path} ({_owner(path)}'s) could not be removed: its owner can remove it; in a project folder "
              "a team shares, run every step under umask 002", file=sys.stderr)


def _named_for_outputs(exc: Exception, outputs: list[Path], temporaries: list[Path]) -> Exception:
    """`exc` naming the output a user knows, not the temporary folder it was written in (gone by the time
    anyone reads the message); a storage failure that named no file (safetensors' is no OSError) by the
    output, or the folder that holds them all where there are several."""
    if isinstance(exc, OSError):
        for output, tmp in zip(outputs, temporaries):
            for attribute in ("filename", "filename2"):
                name = getattr(exc, attribute)
                if isinstance(name, str) and (name == str(tmp) or name.startswith(f"{tmp}{os.sep}")):
                    setattr(exc, attribute, str(output) + name[len(str(tmp)):])
    where = outputs[0] if len(outputs) == 1 else Path(os.path.commonpath([str(p) for p in outputs]))
    return storage_error(exc, where) or exc


def _replace_dir(tmp: Path, path: Path) -> bool:
    """Put folder `tmp` at `path`, and the earlier folder, if there was one, at `tmp` (True). Where the
    system swaps two names in one step, no moment leaves `path` missing; elsewhere the earlier folder
    waits as .<name>.old between two renames, and `restore_interrupted` puts it back after a kill there."""
    if not path.exists():
        os.replace(tmp, path)
        return False
    if _exchange(tmp, path):
        return True
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    os.replace(old, tmp)  # a temporary's name: a kill while it is deleted leaves what remove_stale clears
    return True


def restore_interrupted(path: str | Path) -> bool:
    """A step killed between _replace_dir's two renames left `path` missing and its earlier folder as
    .<name>.old: put it back. For a caller that knows no writer of `path` is alive (a step's lock)."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if path.exists() or not old.is_dir():
        return False
    os.replace(old, path)
    return True


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or its file system cannot."""
    import ctypes
    import errno

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then act as sent. Python runs its handlers in the
    main thread whichever thread the kernel hands a signal to, so the handlers are swapped there (a
    blocked signal mask in one thread would not hold them); elsewhere there is nothing to hold."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    before = {kind: signal.signal(kind, lambda number, _frame: arrived.append(number)) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in before.items():
            signal.signal(kind, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


def special_file(path: str | Path) -> str | None:
    """What `path` is where it is neither missing, a regular file nor a folder (itself, or what its link
    names): a pipe, a device, a socket, or a link through /dev or /proc. None otherwise."""
    # a link into /dev or /proc is refused whatever it leads on to (/dev/stdout redirected to a file is a
    # regular file at the end of its links); a path there that is no link (/dev/shm/x.jsonl) is judged as any
    system = [p for p in _link_chain(path)[1:] if any(p == r or p.startswith(r + "/") for r in ("/dev", "/proc"))]
    if system:
        return f"a link to the system path {system[0]}"
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, or a link to nothing
        return None
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else None)
    if kind and Path(path).is_symlink():
        kind += f" (the link's target, {os.path.realpath(path)})"
    return kind


def _link_chain(path: str | Path, most: int = 40) -> list[str]:
    """`path` and every path its links lead through, absolute (/proc/self/fd/1 leads on to wherever
    stdout goes)."""
    chain = [os.path.abspath(path)]
    while os.path.islink(chain[-1]) and len(chain) <= most:
        chain.append(os.path.abspath(os.path.join(os.path.dirname(chain[-1]), os.readlink(chain[-1]))))
    return chain


def unwritable_folder(folder: str | Path, *, probe: bool = True) -> str | None:
    """Why files cannot be made in `folder` (made where missing), found before any work; None when they
    can. Its nearest existing ancestor must be a folder, and with `probe`, one a file can be made in:
    permissions alone do not say (root, read-only mounts, /proc)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if probe:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            return f"no file can be written in {existing} ({exc.strerror})"
    return None


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    with atomic_file(path) as handle:
        return write_rows(handle, rows)


def write_rows(handle: Any, rows: Iterable[dict]) -> int:
    """JSON Lines to an open text file (one of atomic_file's); the number of rows."""
    count = 0
    for row in rows:
        handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        count += 1
    return count


def where_kept(path: str | Path) -> Path:
    """`path` made absolute with its folders' links followed but not its own: a data file that DVC links
    into its cache (cache.type symlink) is where the project keeps it, not in .dvc/cache."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))
    return absolute.parent.resolve() / absolute.name


def open_lock(path: Path) -> int:
    """A lock file's descriptor, for flock, made with the mode the umask leaves of rw for all: under a team's
    umask 002 a teammate takes it too (made 0644, it stopped every step of the other user with "Permission
    denied"). One this user cannot open is one line naming its owner and the mend."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        why = not_yours(path)
        raise UserError(f"{path}: permission denied" + (f": {why}" if why else "")) from None


def flock_within(fd: int, wait_s: float, poll_s: float) -> bool:
    """An exclusive flock on `fd`, tried every `poll_s` for up to `wait_s`; whether it was taken."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)


def not_yours(path: str | Path) -> str | None:
    """Where another user owns a path of the project (or the folder that would hold it), made under a umask
    that left the group no write: whose it is, and the mend. None where it is this user's, or not there."""
    path = Path(path)
    held = path if os.path.lexists(path) else path.parent
    try:
        uid = os.lstat(held).st_uid
    except OSError:
        return None
    if uid == os.geteuid():
        return None
    owner = _owner(held)
    mend = f"chmod -R g+w {held}" if held.is_dir() else f"chmod g+w {held}"
    return (f"{'it' if held == path else 'its folder'} is {owner}'s and not writable for you. In a project folder a "
            f"team shares, run every step under umask 002; `{mend}` (as {owner}) mends what was made before")


def _owner(path: Path) -> str:
    import pwd

    try:
        uid = os.stat(path).st_uid
    except OSError:
        return "another user"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _umask() -> int:
    """The process's umask, read where Linux shows it (setting it to read it back is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(path: str | Path) -> int:
    """The one mode policy for outputs, whatever wrote them (mkstemp, mkdtemp and safetensors make 0600 and
    0700): what the user's umask leaves of rw for all, and x for a folder, as the shell would make them (0644
    and 0755 under umask 022; a team's 002 gives the group write, which a teammate's next step needs to replace
    the output; 077 keeps them private). A folder keeps its setgid bit: files made in it take its group."""
    kept = os.stat(path).st_mode
    if stat.S_ISDIR(kept):
        return (0o777 & ~_umask()) | (kept & stat.S_ISGID)
    return 0o666 & ~_umask()


def share_tree(folder: str | Path) -> None:
    """shared_mode on a folder and everything in it."""
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, shared_mode(path))


def missing(path: str | Path) -> str:
    """A file a step reads that is not there, in words: a link to nothing (a DVC cache link of a project moved,
    copied or given another cache since) is named as one, with the mend; rerunning the steps was no mend."""
    path = Path(path)
    if path.is_symlink():
        return (f"{path} is a link to {os.readlink(path)}, which is not there (a DVC cache link of a project moved "
                "or copied since, or of a cache cleared): `dvc checkout -f` links it again")
    return f"{path} is missing"


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise DataError(missing(path))
    if not path.exists():
        raise DataError("not found; run the step that writes it first", file=str(path))
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_json(path: str | Path) -> dict:
    """A JSON file a step wrote; one missing or damaged since is a DataError naming it."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise DataError(missing(path))
    if not path.exists():
        raise DataError("not found; run the step that writes it first", file=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # Recursion: nested too deep
        raise DataError(f"not valid JSON ({exc}): damaged since the step that writes it wrote it; run that step "
                        "again", file=str(path)) from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(folder: str | Path, names: list[str] | None = None) -> str:
    """One hash over the named files (default: every file) of a folder, by relative path."""
    folder = Path(folder)
    paths = [folder / n for n in names] if names else sorted(p for p in folder.rglob("*") if p.is_file())
    return tree_digest({str(path.relative_to(folder)): file_sha256(path) for path in paths})


def tree_digest(hashes: dict[str, str]) -> str:
    """tree_sha256 of files whose sha256 are known, by relative path, in the dict's order."""
    digest = hashlib.sha256()
    for name, sha in hashes.items():
        digest.update(name.encode() + b"\0" + sha.encode() + b"\n")
    return digest.hexdigest()


# What .dvcignore keeps out of DVC's hashes (bytecode, rm_lib's temporaries, a set's mark).
DVC_IGNORED = re.compile(r"(^|/)(__pycache__/|[^/]*\.pyc$|\.[^/]*\.tmp(/|$)|\.[^/]*\.old(/|$)|\.rm_lib-set\.json$)")


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What .dvcignore ignores in one folder alone (anchored there), by the folder's last two parts
DVC_IGNORED_IN = {("data", "sources"): {"README.md"}}


def dvc_md5(path: Path) -> str | None:
    """The md5 DVC 3 records for a file, or for a folder (md5 of its sorted file list + '.dir'), leaving
    out what .dvcignore ignores; None when the path does not exist."""
    if path.is_file():
        return _md5_file(path)
    if not path.is_dir():
        return None
    ignored = DVC_IGNORED_IN.get(path.parts[-2:], set())
    entries = [{"md5": _md5_file(p), "relpath": p.relative_to(path).as_posix()}
               for p in path.rglob("*") if p.is_file() and not DVC_IGNORED.search(p.relative_to(path).as_posix())
               and p.relative_to(path).as_posix() not in ignored]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode()).hexdigest() + ".dir"


def read_yaml(path: Path) -> dict[str, Any]:
    """dvc.yaml or dvc.lock as a mapping, or a UserError naming the file: a merge conflict left in
    dvc.lock (git's markers) made every read a bare ScannerError naming no file."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        conflict = " (a merge conflict left in it)" if "<<<<<<<" in path.read_text(encoding="utf-8") else ""
        fix = "resolve it, or run `dvc repro`, which writes it anew" if path.name == "dvc.lock" else "fix it"
        raise UserError(f"{path}: not valid YAML{line}{conflict}; {fix}") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a mapping of stages, got {type(document).__name__}")
    return document


def pipeline_written_files(root: Path) -> list[str]:
    """What `dvc repro` itself rewrites among git's files: dvc.lock, and the outs dvc.yaml keeps in git
    (`cache: false`, as data/evaluation/metrics.json), relative to `root`."""
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        spec = {}
    written = ["dvc.lock"]
    for stage in (spec.get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            for out in (stage.get(key) or []) if isinstance(stage, dict) else []:
                for path, options in (out.items() if isinstance(out, dict) else ()):
                    if isinstance(options, dict) and options.get("cache") is False:
                        written.append(posixpath.normpath(posixpath.join(stage.get("wdir", "."), path)))
    return written
