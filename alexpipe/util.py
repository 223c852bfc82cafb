"""Pieces every stage shares: the one-line user error, --help and progress bars, config
printing, atomic file writes (and a full disk), the ILSVRC-2012 class list."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


class UserError(Exception):
    """Bad input from the user (a path, an argument, a file's contents).

    Every console script catches it and prints it as one line with exit code 2, so a
    user sees what to fix instead of a traceback."""


def run_main(prog: str, body, argv) -> int:
    """Run a console script's body, turning UserError into `prog: error: ...` + exit 2
    and Ctrl-C into exit 130 (what was already written is complete by construction)."""
    try:
        return body(argv) or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help that shows every option's real default once: "(default: X)" is appended to its
    text unless the text already gives one (defaults worked out at run time say it in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Bar(tqdm):
    """A progress bar (count, rate, ETA) that draws its final state once: tqdm redraws on
    close, so the update that completes it is not drawn as well."""

    def update(self, n=1):
        if self.total is not None and self.n + n >= self.total:
            self.n += n
            return None
        return super().update(n)


def default_workers() -> int:
    """All cores this process may run on (respects taskset/cgroup CPU affinity)."""
    return len(os.sched_getaffinity(0))


def config_dict(cfg) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def print_config(prog: str, cfg) -> None:
    """Print the whole config at start, one key a line, so a log says what ran."""
    print(f"{prog} config:")
    for k, v in config_dict(cfg).items():
        print(f"  {k}: {v}")


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A write to `path` failed for lack of space (ENOSPC, or a quota)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(f"{path}: disk full (no space left on device); the file before it, if any, is intact")


@contextlib.contextmanager
def atomic_file(path: Path):
    """A binary file written under a temporary name beside `path`, fsync'd, then renamed over
    it: a reader (or a rerun after a crash) sees the old file or the whole new one, never a
    part. On any error the temporary is removed; a full disk becomes DiskFull(path)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if no_space(e):
            raise DiskFull(path) from None
        raise


def no_space(e: BaseException | None) -> bool:
    """Whether ENOSPC (or a quota) is behind `e`: writers such as torch.save report it as an
    error of their own, with the OSError as its context."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        e = e.__cause__ or e.__context__
    return False


def save_png(picture, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure (then closed) or a PIL image as PNG, atomically (atomic_file)."""
    with atomic_file(path) as f:
        if hasattr(picture, "savefig"):
            picture.savefig(f, format="png", dpi=dpi)
        else:
            picture.save(f, format="PNG")
    if hasattr(picture, "savefig"):
        import matplotlib.pyplot as plt
        plt.close(picture)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, what: str) -> dict:
    """Read a JSON file that alexpipe wrote, with a one-line error if it is missing or broken."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read {what}: {e}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def imagenet_classes() -> list[tuple[int, str, str]]:
    """The 1000 ILSVRC-2012 classes as (index, wnid, name); index = position of the wnid in
    sorted order, the labelling torchvision and every published checkpoint use."""
    rows = []
    for line in (Path(__file__).parent / "classes.tsv").read_text().splitlines()[1:]:
        index, wnid, name = line.split("\t")
        rows.append((int(index), wnid, name))
    return rows
