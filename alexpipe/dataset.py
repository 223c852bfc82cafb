"""A prepared dataset, read and checked once: what every stage after alexpipe-prepare takes.

    data = Prepared.open("OUT")            # manifest.json, and pca.json checked against it
    data.classes, data.split("train"), data.pca, data.identity

OUT holds what alexpipe-prepare wrote: per split its WebDataset shards (<split>/<split>-NNNNNN.tar
with DALI .idx files), and manifest.json, written last, listing every shard with its sample
count, byte size, sha256 and stored pixel count; then alexpipe-pca's pca.json, which records the
manifest's sha256 (its `identity`) so that statistics of other shards are refused.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .util import Bar, UserError, read_json, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "alexpipe-shards-v1"


def read_manifest(out: Path) -> dict:
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


@dataclass(frozen=True)
class Prepared:
    out: Path
    manifest: dict
    identity: str  # sha256 of manifest.json
    pca: dict | None = None  # OUT/pca.json, checked, where asked for
    pca_sha256: str | None = None

    @classmethod
    def open(cls, out, *, pca: bool = True) -> Prepared:
        """OUT's manifest and (with `pca`) its pca.json, refused if computed for other shards
        or if its numbers do not follow from its own sums."""
        out = Path(out)
        manifest = read_manifest(out)
        identity = sha256_file(out / MANIFEST)
        if not pca:
            return cls(out, manifest, identity)
        path = out / "pca.json"
        if not path.exists():
            raise UserError(f"{path}: not found (run alexpipe-pca {out})")
        stats = read_json(path, "pca.json")
        if stats.get("manifest_sha256") != identity:
            raise UserError(f"{path}: computed for other shards than {out / MANIFEST} (rerun alexpipe-pca)")
        check_sums(stats, path)
        return cls(out, manifest, identity, stats, sha256_file(path))

    @property
    def classes(self) -> list[list]:
        """[index, wnid, name] rows, in label order."""
        return self.manifest["classes"]

    def split(self, name: str) -> list[dict]:
        """The split's non-empty shards, with absolute tar and index paths."""
        splits = self.manifest["splits"]
        if name not in splits:
            raise UserError(f"{self.out / MANIFEST}: split {name!r} was not prepared "
                            f"(prepared: {', '.join(sorted(splits)) or 'none'})")
        shards = [{**s, "tar": str(self.out / s["tar"]), "idx": str(self.out / s["idx"])}
                  for s in splits[name]["shards"] if s["count"]]
        if not shards:
            raise UserError(f"{self.out}: split {name!r} has no samples")
        return shards

    def count(self, name: str) -> int:
        """Samples (a tile of alexpipe-prepare --tile is one sample)."""
        return sum(s["count"] for s in self.split(name))

    def tile(self, name: str) -> int:
        """Images per sample of the split (1, or K with alexpipe-prepare --tile K)."""
        return self.manifest["splits"][name].get("tile", 1)


def train_tile(out: Path) -> int:
    """The train split's tile in OUT's manifest, for defaults chosen before OUT is opened (1
    where it cannot be read: opening OUT then says why)."""
    try:
        return int(read_manifest(out)["splits"]["train"].get("tile", 1))
    except (UserError, KeyError, TypeError, AttributeError, ValueError):
        return 1


# ---------------------------------------------------------------------------- pca.json's numbers

def statistics(row) -> dict:
    """mean, std, cov, eigval, eigvec from exact sums: the covariance numerator
    n*ss - s s^T is formed in integers, then divided once (correctly rounded)."""
    n, s = int(row[1]), [int(v) for v in row[2:5]]
    rr, rg, rb, gg, gb, bb = (int(v) for v in row[5:11])
    ss = [[rr, rg, rb], [rg, gg, gb], [rb, gb, bb]]
    if n < 2:
        raise UserError("fewer than 2 pixels: nothing to compute")
    cov = np.array([[(n * ss[i][j] - s[i] * s[j]) / (n * (n - 1)) for j in range(3)] for i in range(3)])
    eigval, eigvec = np.linalg.eigh(cov)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    for k in range(3):  # sign convention: largest-magnitude component positive
        if eigvec[np.argmax(np.abs(eigvec[:, k])), k] < 0:
            eigvec[:, k] = -eigvec[:, k]
    return {"mean": [si / n for si in s], "std": np.sqrt(np.diag(cov)).tolist(), "cov": cov.tolist(),
            "eigval": eigval.tolist(), "eigvec": eigvec.tolist()}


def check_sums(result: dict, path) -> None:
    """Refuse a pca.json whose mean, std, covariance or eigen-decomposition do not follow from
    the exact sums it records (an edited or damaged file): they are recomputed here. Mean,
    std and covariance are exact functions of the sums; eigenpairs may differ in the last
    bits between LAPACK builds, hence the tolerance."""
    try:
        sums = result["sums"]
        row = [0, int(sums["pixels"]), *map(int, sums["s"]), *map(int, sums["rr_rg_rb_gg_gb_bb"])]
        want = statistics(np.array(row, dtype=object))
        for key, rtol in (("mean", 1e-12), ("std", 1e-12), ("cov", 1e-12), ("eigval", 1e-9), ("eigvec", 1e-6)):
            if not np.allclose(result[key], want[key], rtol=rtol, atol=rtol * 1e-3):
                raise UserError(f"{path}: its {key} does not follow from its own sums (edited or damaged; "
                                f"rerun alexpipe-pca)")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not an alexpipe-pca result ({type(e).__name__}: {e}; rerun alexpipe-pca)") from None


def check_shards(shards: list[dict], *, verify: bool, workers: int, show: bool = False) -> None:
    """Every shard and index present, with the manifest's byte size (and, with `verify`, its
    sha256): a missing, truncated or altered shard is named before any work starts, and in an
    altered one the JPEG that no longer decodes. This also keeps corrupt JPEGs away from
    DALI, whose CPU decoder can crash the process on one instead of raising. Threads:
    hashing releases the GIL; `show`: a bar while hashing (140 GB for ImageNet)."""
    def problem(s: dict) -> str | None:
        tar = Path(s["tar"])
        if not tar.exists():
            return f"{tar}: shard missing"
        if not Path(s["idx"]).exists():
            return f"{s['idx']}: index missing"
        if tar.stat().st_size != s["bytes"]:
            return f"{tar}: {tar.stat().st_size} bytes, the manifest says {s['bytes']} (truncated or rewritten)"
        if verify and sha256_file(tar) != s["sha256"]:
            return find_bad_sample([s]) or f"{tar}: sha256 differs from the manifest (corrupted or rewritten)"
        return None

    ex = ThreadPoolExecutor(max(1, workers))
    try:
        for p in Bar(ex.map(problem, shards), total=len(shards), desc="sha256", unit="shard",
                     disable=not (verify and show)):
            if p:
                raise UserError(p)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)  # report the first problem without hashing the rest


def check_over_ranks(shards: list[dict], *, verify: bool, workers: int, rank: int, world: int) -> None:
    """check_shards on this rank's share of `shards`; under torch.distributed every rank raises
    if any rank found a problem, so none is left waiting in a collective."""
    from .runtime import gather_objects
    try:
        check_shards(shards[rank::world], verify=verify, workers=workers, show=rank == 0)
        problem = None
    except UserError as e:
        problem = str(e)
    except Exception as e:  # noqa: BLE001 - an unreadable shard or index: every rank must hear of it
        problem = f"{shards[rank::world][0]['tar'] if shards[rank::world] else ''}: {type(e).__name__}: {e}"
    problem = next((p for p in gather_objects(problem) if p), None)
    if problem:
        raise UserError(problem)


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
    from PIL import Image

    for s in sorted(shards, key=lambda s: sha256_file(Path(s["tar"])) == s["sha256"]):
        for sample in iter_samples(s):
            try:
                with Image.open(io.BytesIO(sample["jpg"])) as img:
                    img.load()
            except Exception as e:  # noqa: BLE001 - whatever the decoder says
                return f"{s['tar']}: sample {sample['__key__']} does not decode ({type(e).__name__}: {e})"
    return None
