"""Pieces every stage shares: the one-line user error, config printing and saving,
atomic file writes, the ILSVRC-2012 class list and the manifest that ties the stages
together. Kept to plain functions so each stage module reads top to bottom."""

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

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "alexpipe-shards-v1"


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


def load_manifest(out: Path) -> dict:
    """The manifest alexpipe-prepare wrote last; its absence means OUT is not (fully) prepared."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such directory (run alexpipe-prepare first)")
    path = out / MANIFEST
    if not path.exists():
        raise UserError(f"{path}: not found - {out} is not a finished alexpipe-prepare output "
                        f"(run or rerun alexpipe-prepare)")
    manifest = read_json(path, "manifest")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not an alexpipe manifest (format {manifest.get('format')!r})")
    return manifest


def manifest_sha256(out: Path) -> str:
    """Identity of a prepared dataset: later files (pca.json, checkpoints) record it so a
    stale one is refused."""
    return sha256_file(Path(out) / MANIFEST)


def split_shards(manifest: dict, out: Path, split: str) -> list[dict]:
    """The non-empty shards of a split, with absolute tar and index paths."""
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{Path(out) / MANIFEST}: split {split!r} was not prepared "
                        f"(prepared: {', '.join(sorted(splits)) or 'none'})")
    shards = []
    for s in splits[split]["shards"]:
        if s["count"]:
            shards.append({**s, "tar": str(Path(out) / s["tar"]), "idx": str(Path(out) / s["idx"])})
    return shards


def check_shards(shards: list[dict], hash_them: bool, workers: int, show: bool = False) -> None:
    """Every shard and index present, with the manifest's byte size (and sha256): a
    missing, truncated or altered shard is named before any work starts, and in an altered
    one the JPEG that no longer decodes. This is also what keeps corrupt JPEGs away from
    DALI: its CPU decoder (2.4.0) can crash the process on one (a segfault in
    ImageDecoder's worker lambda, seen here) instead of raising. Threads: hashing
    releases the GIL. `show`: a progress bar while hashing (140 GB for ImageNet)."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(s: dict) -> str | None:
        tar = Path(s["tar"])
        if not tar.exists():
            return f"{tar}: shard missing"
        if not Path(s["idx"]).exists():
            return f"{s['idx']}: index missing"
        if tar.stat().st_size != s["bytes"]:
            return f"{tar}: {tar.stat().st_size} bytes, the manifest says {s['bytes']} (truncated or rewritten)"
        if hash_them and sha256_file(tar) != s["sha256"]:
            return find_bad_sample([s]) or f"{tar}: sha256 differs from the manifest (corrupted or rewritten)"
        return None

    ex = ThreadPoolExecutor(max(1, workers))
    try:
        for p in Bar(ex.map(problem, shards), total=len(shards), desc="sha256", unit="shard",
                     disable=not (hash_them and show)):
            if p:
                raise UserError(p)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)  # report the first problem without hashing the rest


def iter_samples(shard: dict):
    """A shard's samples as {"__key__", ext: bytes...}, located through its index file."""
    lines = Path(shard["idx"]).read_text().splitlines()[1:]
    with open(shard["tar"], "rb") as f:
        for line in lines:
            fields = line.split()
            sample = {}
            for ext, offset, size, name in zip(*[iter(fields)] * 4):
                f.seek(int(offset))
                sample[ext], sample["__key__"] = f.read(int(size)), name.split(".")[0]
            yield sample


def find_bad_sample(shards: list[dict]) -> str | None:
    """Name the shard and key of a JPEG that does not decode (DALI's decoder error does not
    say which sample failed); shards whose sha256 differs from the manifest are searched
    first. Returns None if every JPEG decodes with PIL."""
    import io

    from PIL import Image

    for s in sorted(shards, key=lambda s: sha256_file(Path(s["tar"])) == s["sha256"]):
        for sample in iter_samples(s):
            try:
                with Image.open(io.BytesIO(sample["jpg"])) as img:
                    img.load()
            except Exception as e:  # noqa: BLE001 - whatever the decoder says
                return f"{s['tar']}: sample {sample['__key__']} does not decode ({type(e).__name__}: {e})"
    return None
