"""Exact TreeSHAP for LightGBM, computed once per cell of each tree's thresholds.

LightGBM's ``pred_contrib`` (path-dependent TreeSHAP) costs a few microseconds
per row *and tree*: for a 363-tree model, about 2.3 ms per row and thread.
Two facts make most of that work redundant on large frames:

1. SHAP values are additive over trees: the model's SHAP vector of a row is
   the sum of the SHAP vectors of each tree (the bias column included, as
   the sum of the trees' expected values).
2. Within one tree, path-dependent TreeSHAP reads the row only through the
   branch it would take at each internal node (at a node whose feature is in
   the coalition it follows the row's branch, otherwise it weights both
   children by their training cover). The branch at a node is a function of
   the row's value of the node's feature. So two rows that take the same
   branch at *every* node of the tree (not only on their own path) get
   exactly the same SHAP vector from that tree.

For a numerical split ``x <= threshold``, the branches a row takes at all
nodes splitting on feature ``f`` are determined by the bin of ``x[f]`` among
the tree's sorted thresholds on ``f``, except for missing values: depending on
the node's ``missing_type`` (``None``, ``Zero``, ``NaN``) and
``default_left``, NaN and zero may go the default way instead (LightGBM
reads every ``|x| <= kZeroThreshold``, the float ``1e-35f``, as exactly 0.0).
So each feature gets codes: its bin among the tree's thresholds, zero, NaN;
codes taking the same branch at every node of the tree are then merged, and
rows with the same codes take the same branches everywhere.
Categorical splits (``x in set``) are keyed by the exact value (NaN apart),
finer still. The per-feature bins of a tree combine into one integer key per
row; rows with equal keys form one *cell*, and per tree this module asks
LightGBM for the contributions of one representative row per cell
(``predict(..., start_iteration=t, num_iteration=1, pred_contrib=True)``) and
scatters them back to every row of the cell. The result equals the plain
``pred_contrib`` up to floating-point summation order (about 1e-14).

Distinct cells grow sublinearly with the rows (on the 1M-user benchmark's
model, about 4.7k cells per tree on 50k rows), so on large frames the SHAP work
drops several-fold; keying costs a few vectorised passes per tree. The bins of
every row are computed once per call against the union of all the trees'
thresholds on each feature (one ``searchsorted`` per feature); each tree then
maps those global bins to its own with a small lookup table.

Small frames, and frames where cells are nearly as many as the rows, go to the
plain ``pred_contrib`` (decided on the first trees, without wasting their work).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

__all__ = [
    "MIN_ROWS",
    "LeafTables",
    "Moves",
    "TreeTables",
    "build_tables",
    "contributions",
    "leaf_tables",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: LightGBM's ``kZeroThreshold`` is the float literal ``1e-35f``, widened to double.
ZERO_THRESHOLD: Final = float(np.float32(1e-35))
#: Below this many rows the plain ``pred_contrib`` is used.
MIN_ROWS: Final = 5_000
#: Rows keyed and explained together (bounds memory: the output and keys are
#: about ``(2 * n_features + 1) * 8`` bytes per row).
CHUNK_ROWS: Final = 100_000
#: Cell keys ranging up to this many times the rows are factorized through a dense table.
DENSE_KEYS: Final = 4
#: Trees looked at before deciding whether cells pay off.
PROBE_TREES: Final = 12
#: Cells per row (averaged over the probe trees) above which the rest of the
#: trees go to the plain ``pred_contrib``: keying costs about as much as
#: explaining a few percent of the rows, so the fast path wins well below 1.
MAX_CELL_SHARE: Final = 0.6
_MAX_KEY: Final = 2**62
#: LightGBM dumps a threshold of ``inf`` (every number goes left, missing values apart) as
#: this; the booster compares with ``inf``, so values above it (``inf`` included) go left.
_DUMPED_INF: Final = 1e300


@dataclass(frozen=True)
class _Tree:
    """The features one tree splits on and how its own bins derive from global bins."""

    numeric: tuple[int, ...]
    #: per numeric feature: global code -> this tree's code (see :func:`_tree_lut`)
    luts: tuple[IntArray, ...]
    radix: tuple[int, ...]
    categorical: tuple[int, ...]

    @property
    def features(self) -> tuple[int, ...]:
        return self.numeric + self.categorical


@dataclass(frozen=True)
class TreeTables:
    """What :func:`contributions` needs from a booster's trees, read once per model.

    Attributes
    ----------
    n_features
        Columns of the model's input.
    n_iterations
        Trees the plain ``pred_contrib`` uses (the best iteration, if any).
    thresholds
        Numerical feature -> sorted union of every tree's thresholds on it.
    categorical
        Features split categorically in some tree.
    trees
        Per tree, its split features and bin lookup tables.
    """

    n_features: int
    n_iterations: int
    thresholds: dict[int, FloatArray]
    categorical: frozenset[int]
    trees: tuple[_Tree, ...]
    #: private copies of the booster, one per worker thread (made on first use):
    #: LightGBM keeps a prediction's tree range on the booster, so concurrent
    #: predictions of different trees must not share one
    copies: list[Any] = field(default_factory=list, compare=False, repr=False)


#: a numerical split: threshold, missing type ("None", "Zero", "NaN"), default left
_Split = tuple[float, str, bool]


def _walk(node: dict[str, Any], numeric: dict[int, list[_Split]], categorical: set[int]) -> bool:
    """Collect a tree's splits; ``False`` when a node is not a plain numerical or categorical split."""
    if "split_feature" not in node:
        return "leaf_coeff" not in node  # linear trees: leaf outputs depend on x
    f = int(node["split_feature"])
    kind = node["decision_type"]
    if kind == "<=":
        th = float(node["threshold"])
        th = np.inf if th >= _DUMPED_INF else th  # the booster's own threshold
        split = (th, str(node["missing_type"]), bool(node["default_left"]))
        numeric.setdefault(f, []).append(split)
    elif kind == "==":
        categorical.add(f)
    else:
        return False
    return _walk(node["left_child"], numeric, categorical) and _walk(
        node["right_child"], numeric, categorical
    )


def _tree_lut(glob: FloatArray, splits: list[_Split]) -> IntArray:
    """Global code -> this tree's code: codes taking the same branch at every split share one.

    Global codes of a feature with ``m`` union thresholds ``glob``: ``g`` in
    ``0..m`` a non-zero value in bin ``g`` (``glob[g-1] < x <= glob[g]``),
    ``m+1`` a zero, ``m+2`` NaN. LightGBM reads dense rows keeping only values
    with ``|x| > kZeroThreshold`` or NaN, so every zero (tiny ones included) is
    exactly 0.0 to the trees. Its numerical decision: NaN under
    ``missing_type`` other than ``NaN`` becomes 0.0; then zero under ``Zero``
    and NaN under ``NaN`` go the default way; everything else goes left iff
    ``x <= threshold``.
    """
    m = len(glob)
    bins = np.arange(m + 1)
    rows = []  # one column of branches (True = left) per split
    for th, missing, default_left in splits:
        j = int(np.searchsorted(glob, th))  # th == glob[j]
        regular = j >= bins
        zero = default_left if missing == "Zero" else bool(th >= 0.0)
        nan = default_left if missing in ("Zero", "NaN") else bool(th >= 0.0)  # NaN -> 0.0
        rows.append(np.concatenate([regular, [zero, nan]]))
    branches = np.stack(rows, axis=1)
    if branches.shape[1] < 63:  # pack each code's branches into one integer
        packed = branches.astype(np.int64) @ (np.int64(1) << np.arange(branches.shape[1]))
        _, lut = np.unique(packed, return_inverse=True)
    else:
        _, lut = np.unique(branches, axis=0, return_inverse=True)
    return np.asarray(lut, dtype=np.int64).ravel()


def build_tables(booster: Any) -> TreeTables | None:
    """Read a LightGBM booster's splits; ``None`` when the cell method does not apply.

    It applies to single-output models (binary, regression) of ordinary trees;
    multiclass, random-forest averaging and linear trees get ``None`` (use the
    plain ``pred_contrib``). The trees are those the plain ``predict`` uses:
    up to the best iteration when there is one.
    """
    dump = booster.dump_model()  # the same default tree range as predict
    if int(dump.get("num_tree_per_iteration", 1)) != 1 or dump.get("average_output", False):
        return None
    n_features = int(dump["max_feature_idx"]) + 1
    per_tree: list[tuple[dict[int, list[_Split]], set[int]]] = []
    union: dict[int, set[float]] = {}
    categorical: set[int] = set()
    for info in dump["tree_info"]:
        num: dict[int, list[_Split]] = {}
        cat: set[int] = set()
        if not _walk(info["tree_structure"], num, cat):
            return None
        per_tree.append((num, cat))
        categorical |= cat
        for f, splits in num.items():
            union.setdefault(f, set()).update(th for th, _, _ in splits)
    # a feature split both ways (possible only in odd models) is keyed by exact value
    thresholds = {
        f: np.array(sorted(ths), dtype=np.float64)
        for f, ths in union.items()
        if f not in categorical
    }
    trees = []
    for num, cat in per_tree:
        feats = tuple(sorted(f for f in num if f not in categorical))
        luts = tuple(_tree_lut(thresholds[f], num[f]) for f in feats)
        radix = tuple(int(lut.max()) + 1 for lut in luts)
        cats = tuple(sorted(cat | (set(num) & categorical)))
        trees.append(_Tree(feats, luts, radix, cats))
    return TreeTables(
        n_features=n_features,
        n_iterations=len(trees),
        thresholds=thresholds,
        categorical=frozenset(categorical),
        trees=tuple(trees),
    )


def _global_codes(x: FloatArray, tables: TreeTables) -> tuple[dict[int, IntArray], dict[int, int]]:
    """Per split feature, each row's code: bin among all thresholds, or NaN / zero / category.

    Numerical features: the bin ``g`` among the ``m`` union thresholds
    (``searchsorted`` left: bin ``g`` holds ``glob[g-1] < x <= glob[g]``,
    matching LightGBM's ``x <= threshold``), ``m+1`` zero, ``m+2`` NaN (see
    :func:`_tree_lut`).
    Categorical features: the rank of the exact value (NaNs share one), and
    its number of distinct values as the radix.
    """
    codes = {f: _codes(glob, x[:, f]) for f, glob in tables.thresholds.items()}
    radix: dict[int, int] = {}
    for f in tables.categorical:
        values, inv = np.unique(x[:, f], return_inverse=True)
        codes[f] = inv.astype(np.int64).ravel()
        radix[f] = max(1, len(values))
    return codes, radix


def _codes(glob: FloatArray, col: FloatArray) -> IntArray:
    """Each value's global code among a feature's thresholds ``glob`` (:func:`_global_codes`)."""
    m = len(glob)
    code = np.searchsorted(glob, col, side="left").astype(np.int64)
    code[np.abs(col) <= ZERO_THRESHOLD] = m + 1
    code[np.isnan(col)] = m + 2
    return code


def _factorize(key: IntArray, size: int) -> tuple[IntArray, IntArray]:
    """One representative row per distinct key, and each row's cell (``key == key[reps][cell]``).

    ``key`` lies in ``0..size-1``. Any row of a cell represents it (its rows take the
    same branch at every node, so their SHAP vectors are the same). A key range up to
    :data:`DENSE_KEYS` times the rows goes through a dense table of the range (a few
    vectorised passes); a wider one through a hash-based unique and join (Polars, about
    2x faster than ``np.unique``'s sort).
    """
    n = len(key)
    if size <= DENSE_KEYS * n:
        seen = np.zeros(size, dtype=np.bool_)
        seen[key] = True
        some_row = np.empty(size, dtype=np.int64)
        some_row[key] = np.arange(n, dtype=np.int64)  # any of a key's rows
        cells = np.cumsum(seen, dtype=np.int64) - 1
        return some_row[seen], cells[key]
    s = pl.Series("k", key)
    reps = s.arg_unique().to_numpy().astype(np.int64)
    table = pl.DataFrame({"k": s.gather(reps), "c": np.arange(len(reps), dtype=np.int64)})
    cell = (
        s.to_frame()
        .join(table, on="k", how="left", maintain_order="left")["c"]
        .to_numpy()
        .astype(np.int64)
    )
    return reps, cell


def _tree_key(
    tree: _Tree, codes: dict[int, IntArray], cat_radix: dict[int, int], n: int
) -> tuple[IntArray, int]:
    """Each row's cell key in one tree (its per-feature tree bins in mixed radix), and
    the keys' range.

    When the radix product would overflow int64, the key so far is re-densified
    (its distinct values renumbered ``0..c-1``) and the combination goes on.
    """
    key = np.zeros(n, dtype=np.int64)
    stride = 1
    parts: list[tuple[int, IntArray | None, int]] = [
        (f, tree.luts[i], tree.radix[i]) for i, f in enumerate(tree.numeric)
    ]
    parts += [(f, None, cat_radix[f]) for f in tree.categorical]
    for f, lut, radix in parts:
        if stride * radix > _MAX_KEY:
            _, key = _factorize(key, stride)
            stride = int(key.max()) + 1
        bins = codes[f] if lut is None else lut[codes[f]]
        if stride == 1:
            key += bins
        else:
            key += bins * stride
        stride *= radix
    return key, stride


def _plain(
    booster: Any, x: FloatArray, threads: int, start: int = 0, count: int | None = None
) -> FloatArray:
    kwargs: dict[str, Any] = {"pred_contrib": True, "num_threads": threads}
    if start or count is not None:
        kwargs |= {"start_iteration": start, "num_iteration": count}
    out: FloatArray = np.asarray(booster.predict(x, **kwargs), dtype=np.float64)
    return out


def _tree_part(
    boosters: SimpleQueue[Any],
    x: FloatArray,
    tables: TreeTables,
    codes: dict[int, IntArray],
    cat_radix: dict[int, int],
    t: int,
) -> tuple[list[int], FloatArray, IntArray]:
    """Tree ``t``'s contributions: (output columns, their values per cell, each row's cell)."""
    tree = tables.trees[t]
    n = len(x)
    if tree.features:
        reps, cell = _factorize(*_tree_key(tree, codes, cat_radix, n))
    else:  # a single leaf: only the bias
        reps, cell = np.zeros(1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    # one LightGBM thread per call: an OpenMP team costs ~10 ms per call on a
    # busy machine, more than the call's work; trees run in parallel instead
    booster = boosters.get()  # a copy no other thread is predicting with
    try:
        contrib = _plain(booster, x[reps], 1, start=t, count=1)
    finally:
        boosters.put(booster)
    cols = [*tree.features, tables.n_features]
    return cols, np.ascontiguousarray(contrib[:, cols].T), cell


def _chunk(booster: Any, x: FloatArray, tables: TreeTables, threads: int) -> FloatArray:
    n, n_cols, n_trees = len(x), tables.n_features + 1, len(tables.trees)
    codes, cat_radix = _global_codes(x, tables)
    out_t = np.zeros((n_cols, n), dtype=np.float64)  # one contiguous row per output column
    cells = 0
    threads = max(1, threads)
    while len(tables.copies) < threads:
        tables.copies.append(type(booster)(model_str=booster.model_to_string(num_iteration=-1)))
    boosters: SimpleQueue[Any] = SimpleQueue()
    for copy in tables.copies[:threads]:
        boosters.put(copy)

    def part(t: int) -> tuple[list[int], FloatArray, IntArray]:
        return _tree_part(boosters, x, tables, codes, cat_radix, t)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        window = 2 * threads  # trees in flight: bounds the cells held in memory
        pending: deque[Future[tuple[list[int], FloatArray, IntArray]]] = deque()
        submitted = 0
        for t in range(n_trees):
            if t == PROBE_TREES and cells > MAX_CELL_SHARE * n * t:
                for future in pending:
                    future.cancel()
                rest = _plain(booster, x, threads, start=t, count=tables.n_iterations - t)
                out_t += rest.T
                break
            while submitted < n_trees and len(pending) < window:
                pending.append(pool.submit(part, submitted))
                submitted += 1
            cols, values, cell = pending.popleft().result()  # in tree order: deterministic sums
            cells += values.shape[1]
            for j, col in zip(cols, values, strict=True):
                out_t[j] += col[cell]
    return np.ascontiguousarray(out_t.T)


def contributions(
    booster: Any,
    x: FloatArray,
    tables: TreeTables | None,
    *,
    num_threads: int,
    min_rows: int = MIN_ROWS,
    chunk_rows: int = CHUNK_ROWS,
) -> FloatArray:
    """``booster.predict(x, pred_contrib=True)``, computed once per tree cell when that pays.

    Parameters
    ----------
    booster
        A fitted single-output ``lightgbm.Booster``.
    x
        Rows as float64, the model's feature order (categories as codes).
    tables
        :func:`build_tables` of ``booster`` (``None``: plain ``pred_contrib``).
    num_threads
        LightGBM threads.
    min_rows
        Fewer rows than this use the plain ``pred_contrib``.
    chunk_rows
        Rows keyed together (more rows per chunk share more cells, but cost
        memory: keys and output are about ``(2 * n_features + 1) * 8`` bytes a row).

    Returns
    -------
    numpy.ndarray
        ``(n_rows, n_features + 1)`` SHAP values in raw score units, bias last;
        equal to the plain ``pred_contrib`` up to float summation order.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    n = len(x)
    if tables is None or n < max(1, min_rows) or x.shape[1] != tables.n_features:
        return _plain(booster, x, num_threads)
    n_chunks = -(-n // max(1, chunk_rows))
    size = -(-n // n_chunks)  # equal chunks: no tiny tail
    out = np.empty((n, tables.n_features + 1), dtype=np.float64)
    for start in range(0, n, size):
        out[start : start + size] = _chunk(booster, x[start : start + size], tables, num_threads)
    return out


# -- moving one input: the change of the raw score from the trees that split on it ---------


@dataclass(frozen=True)
class LeafTables:
    """Each tree's raw output per cell key (:func:`_tree_key`), for every key.

    Moving one input of a row changes the outputs of the trees that split on it only,
    and within such a tree its key by one digit, so the change of the raw score is a
    sum of table lookups (:meth:`Moves.delta`), not a prediction through every tree.
    """

    tables: TreeTables
    #: per tree: its output for each key ``0..prod(radix)-1``
    values: tuple[FloatArray, ...]
    #: per tree: the stride of each numeric feature's digit in the key
    strides: tuple[tuple[int, ...], ...]
    #: feature -> the trees splitting on it
    by_feature: dict[int, tuple[int, ...]]


#: Trees with more keys than this leave :func:`leaf_tables` to ``None``.
MAX_TREE_KEYS: Final = 1 << 16


def _representatives(glob: FloatArray) -> list[float | None]:
    """A value of each global code of a feature (``None``: no value has that code)."""
    m = len(glob)
    out: list[float | None] = []
    for g in range(m + 1):
        # inside the bin, away from its thresholds (a threshold as dumped may be rounded)
        if g < m:
            below = glob[g - 1] if g else glob[0] - 2.0
            mid = (below + glob[g]) / 2
            tries = [float(mid), float((mid + glob[g]) / 2), float((below + mid) / 2)]
        elif np.isinf(glob[m - 1]):
            tries = []  # a threshold at inf: nothing is above it
        else:
            tries = [float(glob[m - 1] + 1.0), float(abs(glob[m - 1]) * 2 + 1.0)]
        codes = _codes(glob, np.array(tries, dtype=np.float64))
        out.append(next((v for v, c in zip(tries, codes, strict=True) if c == g), None))
    return [*out, 0.0, float("nan")]


def leaf_tables(booster: Any, tables: TreeTables | None) -> LeafTables | None:
    """Each tree's output per cell key (one small prediction per tree); ``None`` when a
    tree splits categorically or has more than :data:`MAX_TREE_KEYS` keys."""
    if tables is None or tables.categorical:
        return None
    reps = {f: _representatives(glob) for f, glob in tables.thresholds.items()}
    values, strides = [], []
    by_feature: dict[int, list[int]] = {}
    for t, tree in enumerate(tables.trees):
        size = int(np.prod(tree.radix)) if tree.radix else 1
        if size > MAX_TREE_KEYS:
            return None
        stride = tuple(int(np.prod(tree.radix[:i])) for i in range(len(tree.numeric)))
        keys = np.arange(size)
        x = np.full((size, tables.n_features), np.nan)
        for f, lut, radix, s in zip(tree.numeric, tree.luts, tree.radix, stride, strict=True):
            # a value of each of the tree's codes of f: NaN only when nothing else has it
            # (a code no value has is never looked up)
            of_code = np.full(radix, np.nan)
            found = np.zeros(radix, dtype=np.bool_)
            for g, v in enumerate(reps[f]):
                if v is not None and not found[lut[g]]:
                    of_code[lut[g]], found[lut[g]] = v, True
            x[:, f] = of_code[(keys // s) % radix]
            by_feature.setdefault(f, []).append(t)
        raw = booster.predict(x, start_iteration=t, num_iteration=1, raw_score=True, num_threads=1)
        values.append(np.asarray(raw, dtype=np.float64))
        strides.append(stride)
    return LeafTables(
        tables,
        tuple(values),
        tuple(strides),
        {f: tuple(ts) for f, ts in by_feature.items()},
    )


@dataclass(frozen=True)
class Moves:
    """The rows of one frame, ready for :meth:`delta`."""

    leaves: LeafTables
    codes: dict[int, IntArray]

    @classmethod
    def of(cls, leaves: LeafTables, x: FloatArray) -> Moves:
        return cls(leaves, _global_codes(np.ascontiguousarray(x), leaves.tables)[0])

    def delta(self, rows: IntArray, cols: IntArray, values: FloatArray) -> FloatArray:
        """Per ``rows[i]``, the change of its raw score when input ``cols[i]`` is set to
        ``values[i]`` (exact leaf values; summed per tree, so equal to the difference of
        two predictions up to float summation order)."""
        leaves, tables = self.leaves, self.leaves.tables
        out = np.zeros(len(rows), dtype=np.float64)
        for j in np.unique(cols).tolist():
            if j not in leaves.by_feature:
                continue  # no tree splits on it: the score does not move
            at = np.flatnonzero(cols == j)
            r = rows[at]
            new = _codes(tables.thresholds[j], values[at])
            codes: dict[int, IntArray] = {}  # these rows' codes, gathered once per feature
            for t in leaves.by_feature[j]:
                tree = tables.trees[t]
                key = np.zeros(len(r), dtype=np.int64)
                for f, lut, s in zip(tree.numeric, tree.luts, leaves.strides[t], strict=True):
                    if f not in codes:
                        codes[f] = self.codes[f][r]
                    key += lut[codes[f]] * s
                i = tree.numeric.index(j)
                lut, s = tree.luts[i], leaves.strides[t][i]
                table = leaves.values[t]
                out[at] += table[key + (lut[new] - lut[codes[j]]) * s] - table[key]
        return out
