"""Input statistics, pure numpy: binning, population stability index, running moments, and the
``baseline.npz`` format that training writes and the gateway reads.

Everything works on a 2-D float64 matrix ``values`` of shape (n, F): n observations of F
"features". An input monitored per feature has one column per monitored feature (n = samples);
an input monitored as a whole tensor has one column holding its pooled values (F = 1).

Bins: each feature has ``B`` bins cut by ``B - 1`` inner edges (quantiles of the baseline data).
Bin 0 is everything below the first inner edge (down to -inf), bin B-1 everything at or above the
last (up to +inf); a value equal to an edge goes to the bin on its right. Repeated edges (a feature
with few distinct values) make empty bins that are empty in the baseline too, so they add nothing
to the PSI. NaN never lands in a bin and is counted apart; +/-inf land in the outer bins and are
left out of mean, standard deviation, min and max, which cover finite values only.

``baseline.npz`` (format 1), written by :func:`write_baseline` and read by :func:`read_baseline`
(the gateway's ``baseline.served.npz``, learned from served samples, has the same format and is
written by :func:`create_baseline_file`):

    format        int64 scalar, 1
    inputs        unicode array of the input names; entries below are numbered by position i
    features_{i}  int64 (F,): -1 = the whole tensor pooled, k >= 0 = feature k of the flattened
                  sample (row-major over the non-batch dims)
    edges_{i}     float64 (F, B+1): bin edges; [:, 0] and [:, -1] are the data's min and max
                  (informational), [:, 1:-1] are the inner edges that cut the bins
    expected_{i}  float64 (F, B): the proportion of baseline values in each bin (rows sum to 1)
    count_{i}     int64 (F,): finite values seen per feature
    mean_{i}, std_{i}, min_{i}, max_{i}  float64 (F,): moments and range of the finite values
    samples_{i}   int64 scalar: samples (first-dimension rows) the baseline was built from
"""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
DEFAULT_BINS = 10
PSI_FLOOR = 1e-4  # proportions below this count as this much, so empty bins stay finite
TENSOR = -1  # feature index meaning "all values of the tensor pooled"
MAX_POOLED_VALUES = 1_000_000  # pooled tensor baselines subsample beyond this many values


# ---- bins and PSI -------------------------------------------------------------------------------

def quantile_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """(F, bins+1) edges per column: min, the inner quantiles of the finite values, max.

    A column without finite values gets all-zero edges (every value then falls in the outer bins).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError("values must be 2-D (observations x features)")
    if bins < 2:
        raise ValueError("at least 2 bins are needed")
    features = values.shape[1]
    edges = np.zeros((features, bins + 1))
    probabilities = np.linspace(0.0, 1.0, bins + 1)
    for f in range(features):
        column = values[:, f]
        finite = column[np.isfinite(column)]
        if finite.size:
            edges[f] = np.quantile(finite, probabilities, method="linear")
    return edges


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(F, B) counts of the non-NaN values of each column in its bins (see the module doc)."""
    values = np.asarray(values, dtype=np.float64)
    features, width = edges.shape
    bins = width - 1
    if values.shape[1] != features:
        raise ValueError(f"values have {values.shape[1]} columns, edges {features}")
    if not values.size:
        return np.zeros((features, bins), dtype=np.int64)
    inner = edges[:, 1:-1]  # (F, B-1)
    # index = how many inner edges are <= the value, one edge at a time over all values and
    # features (3-4x faster than one (n, F, B-1) comparison); NaN compares False: masked below
    index = np.zeros(values.shape, dtype=np.intp)
    for j in range(bins - 1):
        index += values >= inner[:, j]
    index += np.arange(features) * bins
    missing = np.isnan(values)
    flat = index[~missing] if missing.any() else index.ravel()
    counts = np.bincount(flat, minlength=features * bins)
    return counts.reshape(features, bins)


def proportions(counts: np.ndarray) -> np.ndarray:
    """Rows of counts as proportions; a row without any count becomes NaN."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def psi(expected: np.ndarray, actual: np.ndarray, floor: float = PSI_FLOOR) -> np.ndarray:
    """Population stability index per row: sum over bins of (a - e) * ln(a / e).

    ``expected`` and ``actual`` are proportions (rows summing to 1); each is clamped below at
    ``floor`` so an empty bin on either side adds a large but finite term. A NaN row in ``actual``
    (no observations) gives NaN. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    a = np.maximum(np.asarray(actual, dtype=np.float64), floor)  # NaN stays NaN
    return np.sum((a - e) * np.log(a / e), axis=-1)


# ---- running moments --------------------------------------------------------------------------

class RunningStats:
    """Count, mean, variance (Chan et al.'s parallel update), min and max per column, over finite
    values only; NaN and +/-inf are counted in ``nonfinite``."""

    __slots__ = ("count", "m2", "maximum", "mean", "minimum", "nonfinite")

    def __init__(self, features: int):
        self.count = np.zeros(features, dtype=np.int64)
        self.mean = np.zeros(features)
        self.m2 = np.zeros(features)
        self.minimum = np.full(features, np.inf)
        self.maximum = np.full(features, -np.inf)
        self.nonfinite = np.zeros(features, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if not values.size:
            return
        finite = np.isfinite(values)
        n_b = finite.sum(axis=0)
        self.nonfinite += values.shape[0] - n_b
        zeroed = np.where(finite, values, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = np.where(n_b > 0, zeroed.sum(axis=0) / np.maximum(n_b, 1), 0.0)
        m2_b = np.where(finite, (zeroed - mean_b) ** 2, 0.0).sum(axis=0)
        n_a = self.count
        total = n_a + n_b
        safe = np.maximum(total, 1)
        delta = mean_b - self.mean
        self.mean = np.where(total > 0, self.mean + delta * (n_b / safe), 0.0)
        self.m2 = self.m2 + m2_b + delta ** 2 * (n_a * n_b / safe)
        self.count = total
        self.minimum = np.minimum(self.minimum, np.where(finite, values, np.inf).min(axis=0))
        self.maximum = np.maximum(self.maximum, np.where(finite, values, -np.inf).max(axis=0))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (NaN where nothing finite was seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / np.maximum(self.count, 1)), np.nan)


# ---- baselines ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Baseline:
    """Training-time statistics of one input: one row per feature (see the module doc)."""

    features: np.ndarray  # int64 (F,)
    edges: np.ndarray  # (F, B+1)
    expected: np.ndarray  # (F, B)
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    samples: int

    @property
    def bins(self) -> int:
        return self.expected.shape[1]

    def select(self, features: np.ndarray) -> Baseline | None:
        """The rows for these features in this order, or None if any is missing."""
        position = {int(f): i for i, f in enumerate(self.features)}
        try:
            rows = np.array([position[int(f)] for f in features], dtype=np.int64)
        except KeyError:
            return None
        return Baseline(self.features[rows], self.edges[rows], self.expected[rows],
                        self.count[rows], self.mean[rows], self.std[rows], self.minimum[rows],
                        self.maximum[rows], self.samples)


def build_baseline(values: np.ndarray, features: np.ndarray, samples: int,
                   bins: int = DEFAULT_BINS) -> Baseline:
    """A baseline from observations ``values`` (n, F) of ``features``: quantile edges, the
    proportions in them, and the moments."""
    values = np.asarray(values, dtype=np.float64)
    edges = quantile_edges(values, bins)
    counts = bin_counts(values, edges)
    totals = counts.sum(axis=1, keepdims=True)
    expected = np.where(totals > 0, counts / np.maximum(totals, 1), 1.0 / bins)
    stats = RunningStats(values.shape[1])
    stats.update(values)
    return Baseline(np.asarray(features, dtype=np.int64), edges, expected, stats.count,
                    stats.mean, stats.std, stats.minimum, stats.maximum, int(samples))


def sample_matrix(data: np.ndarray) -> np.ndarray:
    """(N, ...) samples as an (N, D) float64 matrix, one row per sample."""
    array = np.asarray(data)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"numeric data needed, got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError("data needs a first (sample) dimension")
    return array.reshape(array.shape[0], -1).astype(np.float64, copy=False)


def pooled_column(matrix: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """All values of an (N, D) matrix as one column, subsampled evenly to at most ``limit``."""
    flat = matrix.reshape(-1)
    if flat.size > limit:
        flat = flat[np.sort(rng.choice(flat.size, limit, replace=False))]
    return flat.reshape(-1, 1)


def write_baseline(path, data: dict[str, np.ndarray], bins: int = DEFAULT_BINS,
                   max_features: int = 256, seed: int = 0) -> Path:
    """Write ``baseline.npz`` for the inputs in ``data`` (input name -> array of N samples,
    first dimension the sample, as the model's inputs are batched).

    Every input gets a pooled whole-tensor row (feature -1); inputs with at most ``max_features``
    values per sample also get one row per feature, so the gateway can monitor either way.
    Bin edges are the quantiles of the training data, ``expected`` the proportions in them.
    """
    if not data:
        raise ValueError("no inputs given")
    rng = np.random.default_rng(seed)
    baselines = {}
    for name, values in data.items():
        matrix = sample_matrix(values)
        if not matrix.shape[0]:
            raise ValueError(f"input {name!r}: no samples")
        if not np.isfinite(matrix).any():
            raise ValueError(f"input {name!r}: no finite values")
        parts = [build_baseline(pooled_column(matrix, MAX_POOLED_VALUES, rng), [TENSOR],
                                matrix.shape[0], bins)]
        if matrix.shape[1] <= max_features:
            parts.append(build_baseline(matrix, np.arange(matrix.shape[1]), matrix.shape[0], bins))
        baselines[name] = _concatenate(parts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:  # a file object: savez adds no second suffix
        np.savez(handle, **_arrays(baselines))
    temporary.replace(path)  # readers (a polling gateway) never see half a file
    return path


def create_baseline_file(path, baselines: dict[str, Baseline]) -> bool:
    """Write ``baselines`` (input name -> Baseline, e.g. learned from served samples) to
    ``path`` in the ``baseline.npz`` format if no file is there yet: True if this call wrote
    it, False if one was already there (another process came first; read that one).

    The file appears whole or not at all (a hard link of a finished temporary file, which
    fails if the name exists), so concurrent writers agree on one winner and readers never see
    half a file. Where the file system has no hard links, an exclusive create is used instead.
    OSError for anything else (a read-only repository, a missing directory).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **_arrays(baselines))
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                 errno.EMLINK):
                raise
            try:  # no hard links here: an exclusive create (a reader may see it half-written)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as out:
                out.write(temporary.read_bytes())
        return True
    finally:
        try:
            temporary.unlink()
        except OSError:
            pass


def _concatenate(parts: list[Baseline]) -> Baseline:
    """The rows of several baselines of one input as one."""
    return Baseline(*(np.concatenate([getattr(p, a) for p in parts]) for a in (
        "features", "edges", "expected", "count", "mean", "std", "minimum", "maximum")),
        parts[0].samples)


def _arrays(baselines: dict[str, Baseline]) -> dict[str, np.ndarray]:
    """The npz arrays of the format (see the module doc) for these inputs' baselines."""
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT, dtype=np.int64),
                                     "inputs": np.array(list(baselines), dtype=np.str_)}
    for i, b in enumerate(baselines.values()):
        arrays[f"features_{i}"] = np.asarray(b.features, dtype=np.int64)
        arrays[f"edges_{i}"] = b.edges
        arrays[f"expected_{i}"] = b.expected
        for key, attr in (("count", "count"), ("mean", "mean"), ("std", "std"),
                          ("min", "minimum"), ("max", "maximum")):
            arrays[f"{key}_{i}"] = getattr(b, attr)
        arrays[f"samples_{i}"] = np.array(b.samples, dtype=np.int64)
    return arrays


def read_baseline(path) -> dict[str, Baseline]:
    """Read and check ``baseline.npz``; ValueError says what is wrong with it (whatever the
    file holds: it may come from a remote publisher)."""
    try:
        npz = np.load(Path(path), allow_pickle=False)
    except Exception as exc:  # OSError, ValueError, EOFError (empty), BadZipFile (broken) ...
        raise ValueError(f"not a readable npz file ({type(exc).__name__})") from None
    if isinstance(npz, np.ndarray):  # the file's content is wrong, not a caller's type
        raise ValueError("a single .npy array, not an npz archive of baseline arrays")  # noqa: TRY004
    with npz:
        try:
            return _read_arrays(npz)
        except KeyError as exc:
            raise ValueError(f"missing array {exc.args[0]!r}") from None
        except ValueError:
            raise
        except Exception as exc:  # a damaged member (BadZipFile, zlib.error), odd shapes ...
            raise ValueError(f"an array cannot be read ({type(exc).__name__})") from None


def _read_arrays(npz) -> dict[str, Baseline]:
    version = int(npz["format"])
    if version != FORMAT:
        raise ValueError(f"format {version} is not supported (expected {FORMAT})")
    names = [str(n) for n in npz["inputs"]]
    result = {}
    for i, name in enumerate(names):
        baseline = Baseline(
            npz[f"features_{i}"].astype(np.int64),
            npz[f"edges_{i}"].astype(np.float64),
            npz[f"expected_{i}"].astype(np.float64),
            npz[f"count_{i}"].astype(np.int64),
            npz[f"mean_{i}"].astype(np.float64),
            npz[f"std_{i}"].astype(np.float64),
            npz[f"min_{i}"].astype(np.float64),
            npz[f"max_{i}"].astype(np.float64),
            int(npz[f"samples_{i}"]))
        _check(name, baseline)
        result[name] = baseline
    return result


def _check(name: str, b: Baseline) -> None:
    features = b.features.shape[0] if b.features.ndim == 1 else -1
    if features < 1 or b.expected.ndim != 2 or b.edges.shape != (features, b.bins + 1) \
            or b.expected.shape[0] != features or b.bins < 2:
        raise ValueError(f"input {name!r}: arrays have inconsistent shapes")
    for array in (b.count, b.mean, b.std, b.minimum, b.maximum):
        if array.shape != (features,):
            raise ValueError(f"input {name!r}: statistics have inconsistent shapes")
    inner = b.edges[:, 1:-1]
    if np.isnan(inner).any() or (np.diff(inner, axis=1) < 0).any():
        raise ValueError(f"input {name!r}: bin edges must be sorted numbers")
    if not np.isfinite(b.expected).all() or (b.expected < 0).any() \
            or not np.allclose(b.expected.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"input {name!r}: expected proportions must be >= 0 and sum to 1")
