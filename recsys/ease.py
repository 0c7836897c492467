"""EASE (Steck 2019) over the top-M items, accumulated and scored in customer chunks.

EASE learns an item x item weight matrix B = I - P / diag(P), P = (G + lambda I)^-1, with
G = X^T X the Gram matrix of the customer x item matrix X, and diag(B) = 0 (an item may not
explain itself). A customer's scores are x_u B. Only G (M x M) is needed to fit, so X never has
to exist: each chunk of customers adds its X_c^T X_c to G.

Our variant (chosen on a validation split of Online Retail, see recsys/evaluation.py):
- Gram weights decay with the age of the purchase (half-life `gram_half_life_days`): what was
  bought together recently says more about what will be bought next. Each pair weight is
  sqrt(decay) so a co-purchase of two items counts decay(item1)^.5 * decay(item2)^.5.
- Heavy buyers (wholesalers) are damped: a customer's weights are divided by
  n_items^activity_exponent, so one customer with 500 products does not dominate G.
- lambda is `l2_regularization` x the mean of diag(G): a relative strength that carries over
  from a 4,000-customer dataset to a 2,000,000-customer one.
- Scores: x_u B (x_u binary over the customer's bought model items) divided by its largest
  absolute value, plus `popularity_blend` x recent popularity (time-decayed buyer count,
  max = 1). The blend brings in what is selling now, which item-item weights cannot see.

Memory: G and B are M x M float32 (M = 8,192 -> 256 MiB each) and B is computed in G's buffer.
Scoring reads B by column blocks (`to_column_blocks_in_place`). Top-K per row avoids a full
argpartition: see `top_k_stable`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from recsys.purchases import MICROS_PER_DAY, CustomerChunk, ItemIndex, distinct_pairs
from recsys.text_neighbours import TextNeighbours

# Model columns are padded to a multiple of this so the top-K pre-filter can view a score row
# as GROUP_WIDTH x (columns / GROUP_WIDTH); padding columns are never candidates.
GROUP_WIDTH = 64


# x_u B adds one row of B per bought item: at M = 8,192 a row is 32 KiB, and B (256 MiB) is read
# from memory for every customer. A block of 1,024 columns (32 MiB) stays in the cache while a
# chunk's customers add its rows: the products take half the time (one thread), the whole
# scoring 4-6 % less on two threads (bench/score_layout.py); B is stored so, not copied.
COLUMN_BLOCK_WIDTH = 1024
ONE_BLOCK_UP_TO = 2048  # B at most 16 MiB: it stays in the cache anyway


def padded_width(n_items: int) -> int:
    return -(-n_items // GROUP_WIDTH) * GROUP_WIDTH


def column_block_width(width: int) -> int:
    """The widest block of at most COLUMN_BLOCK_WIDTH columns that divides `width` in whole
    GROUP_WIDTH pieces. A small matrix is one block, and so is one without a divisor of at least
    half that width (narrow blocks add a pass over the customers' items per block)."""
    if width <= ONE_BLOCK_UP_TO:
        return max(width, 1)
    groups = width // GROUP_WIDTH
    block = GROUP_WIDTH * max(d for d in range(1, COLUMN_BLOCK_WIDTH // GROUP_WIDTH + 1) if groups % d == 0)
    return block if 2 * block >= COLUMN_BLOCK_WIDTH else width


def to_column_blocks_in_place(matrix: np.ndarray, block_width: int | None = None) -> np.ndarray:
    """An R x C (C-ordered) matrix as C / w blocks of its columns, each R x w and C-ordered, in
    the matrix's own buffer (no second copy of 256 MiB): blocks[j] == matrix[:, j*w:(j+1)*w].

    The buffer holds an R x (C / w) grid of w-wide pieces; the blocked layout is that grid
    transposed. An in-place transpose moves each piece along its cycle of the permutation
    piece (r, c) -> (c, r), i.e. position i -> i R mod (R C / w - 1), with one piece aside."""
    rows, columns = matrix.shape
    width = block_width or column_block_width(columns)
    if columns % width or not matrix.flags.c_contiguous:
        raise ValueError(f"{columns} columns do not split into blocks of {width} (or not C-ordered)")
    n_blocks = columns // width
    pieces = matrix.reshape(rows * n_blocks, width)
    last = rows * n_blocks - 1
    if n_blocks > 1 and rows > 1:
        moved = np.zeros(last + 1, dtype=bool)
        for start in range(1, last):
            if moved[start]:
                continue
            aside, position = pieces[start].copy(), start
            while True:  # the piece that belongs at `position` now sits at position * n_blocks mod last
                source = position * n_blocks % last
                moved[position] = True
                if source == start:
                    pieces[position] = aside
                    break
                pieces[position] = pieces[source]
                position = source
    return pieces.reshape(n_blocks, rows, width)


def times_column_blocks(history: sp.csr_matrix, blocks: np.ndarray) -> np.ndarray:
    """history @ B for B given as column blocks: the same float32 sums, bit for bit (each entry
    adds the same rows' values in the same order)."""
    n_blocks, _, width = blocks.shape
    out = np.empty((history.shape[0], n_blocks * width), dtype=np.float32)
    for j in range(n_blocks):
        out[:, j * width:(j + 1) * width] = history @ blocks[j]
    return out


def decay(age_days: np.ndarray, half_life_days: float | None) -> np.ndarray:
    if half_life_days is None:
        return np.ones_like(age_days)
    return np.exp2(-np.maximum(age_days, 0.0) / half_life_days)


def pairs_with_last_purchase(
    row_customer: np.ndarray, row_item: np.ndarray, purchased_at: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (customer, item) pairs of rows with a known item, with their latest purchase time."""
    known = row_item >= 0
    keys = row_customer[known] * n_items + row_item[known]
    times = purchased_at[known]
    order = np.lexsort((times, keys))
    keys, times = keys[order], times[order]
    last_of_pair = np.append(keys[1:] != keys[:-1], True) if len(keys) else np.zeros(0, dtype=bool)
    keys = keys[last_of_pair]
    return keys // n_items, keys % n_items, times[last_of_pair]


@dataclass
class GramAccumulator:
    """Sums, over customer chunks, what EASE needs from the purchases before `cutoff_us`."""

    cutoff_us: int
    model_items: ItemIndex
    n_vocabulary: int
    gram_half_life_days: float | None
    activity_exponent: float
    popularity_half_life_days: float | None
    # popularity within segments too (segment_popularity model): segment per history customer
    segment_of: Callable[[CustomerChunk], np.ndarray] | None = None
    # False: no Gram matrix (a popularity model, or item-item weights that are already fitted)
    with_gram: bool = True
    segment_popularity: dict[int, np.ndarray] = field(init=False, default_factory=dict)
    width: int = field(init=False)  # model columns, padded
    gram: np.ndarray = field(init=False)
    recent_popularity: np.ndarray = field(init=False)
    vocabulary_spend: np.ndarray = field(init=False)
    vocabulary_buyers: np.ndarray = field(init=False)
    customers_with_history: int = 0
    pairs_total: int = 0
    pairs_in_model: int = 0

    def __post_init__(self) -> None:
        self.width = width = padded_width(len(self.model_items))
        self.gram = np.zeros((width, width) if self.with_gram else (0, 0), dtype=np.float32)
        self.recent_popularity = np.zeros(width, dtype=np.float64)
        self.vocabulary_spend = np.zeros(self.n_vocabulary, dtype=np.float64)
        self.vocabulary_buyers = np.zeros(self.n_vocabulary, dtype=np.int64)

    def add(self, chunk: CustomerChunk, vocabulary_position: np.ndarray, model_position: np.ndarray) -> None:
        keep = chunk.purchased_at < self.cutoff_us
        row_customer, purchased_at = chunk.row_customer[keep], chunk.purchased_at[keep]
        vocabulary_position, model_position = vocabulary_position[keep], model_position[keep]
        items_per_customer = self._add_spend(row_customer, vocabulary_position, chunk.amount[keep], chunk.n_customers)
        customer, column, last = pairs_with_last_purchase(
            row_customer, model_position, purchased_at, self.width
        )
        age_days = (self.cutoff_us - last) / MICROS_PER_DAY
        weight = np.sqrt(decay(age_days, self.gram_half_life_days))
        weight /= np.maximum(items_per_customer[customer], 1) ** self.activity_exponent
        self._add_gram(customer, column, weight.astype(np.float32), chunk.n_customers)
        recency = decay(age_days, self.popularity_half_life_days)
        self.recent_popularity += np.bincount(column, weights=recency, minlength=len(self.recent_popularity))
        if self.segment_of is not None:
            segment = self.segment_of(chunk.rows_where(keep))[customer]
            for value in np.unique(segment):
                counts = self.segment_popularity.setdefault(int(value), np.zeros(len(self.recent_popularity)))
                counts += np.bincount(column[segment == value], weights=recency[segment == value],
                                      minlength=len(counts))
        self.pairs_in_model += len(column)

    def _add_spend(self, row_customer, vocabulary_position, amount, n_customers) -> np.ndarray:
        """Spend and distinct buyers per product; returns distinct products per customer."""
        customer, item, _ = distinct_pairs(row_customer, vocabulary_position, self.n_vocabulary)
        self.vocabulary_buyers += np.bincount(item, minlength=self.n_vocabulary)
        known = vocabulary_position >= 0
        self.vocabulary_spend += np.bincount(
            vocabulary_position[known], weights=amount[known], minlength=self.n_vocabulary
        )
        items_per_customer = np.bincount(customer, minlength=n_customers)
        self.customers_with_history += int(np.count_nonzero(items_per_customer))
        self.pairs_total += len(item)
        return items_per_customer

    def _add_gram(self, customer, column, weight, n_customers) -> None:
        if len(column) == 0 or not self.with_gram:
            return
        x = sp.csr_matrix((weight, (customer, column)), shape=(n_customers, self.width), dtype=np.float32)
        co_purchases = (x.T @ x).tocoo()  # unique (i, j) entries, so the fancy += below is exact
        # The lower triangle only (half the scattered writes, the fit's costliest line at 2M):
        # `finish` mirrors it once. (i, j) and (j, i) are the same products summed in the same
        # order, so the mirrored matrix is the one the full scatter gave, bit for bit.
        lower = co_purchases.row >= co_purchases.col
        self.gram[co_purchases.row[lower], co_purchases.col[lower]] += co_purchases.data[lower]

    def finish(self) -> None:
        """After the last chunk: the Gram matrix made whole from its lower triangle."""
        if self.with_gram and self.gram.size:
            _mirror_lower_to_upper(self.gram)

    def normalized_popularity(self) -> np.ndarray:
        return _normalized(self.recent_popularity)

    def popularity_within_segments(self) -> SegmentPopularity:
        """Rows per segment, as ordinal-free scores: segment popularity plus a 1e-3 share of
        everyone's, so ties within a small segment are broken by what sells overall."""
        segments = sorted(self.segment_popularity)
        overall = self.normalized_popularity()
        rows = [_normalized(self.segment_popularity[s]) + np.float32(1e-3) * overall for s in segments] + [overall]
        return SegmentPopularity(self.segment_of, {s: i for i, s in enumerate(segments)},
                                 np.vstack(rows).astype(np.float32))


def _normalized(values: np.ndarray) -> np.ndarray:
    top = values.max(initial=0.0)
    return (values / top if top > 0 else values).astype(np.float32)


def solve_ease_in_place(gram: np.ndarray, n_items: int, l2_regularization: float) -> tuple[np.ndarray, float]:
    """B = I - P / diag(P), P = (G + lambda I)^-1, computed in G's own buffer.

    Returns (B, lambda). Padding columns (beyond n_items) get lambda only, so they stay zero in B.
    Cholesky in float32: G + lambda I is symmetric positive definite and lambda keeps it well
    conditioned (checked on Online Retail: the same top-10 lists as a float64 solve).
    """
    width = gram.shape[0]
    if width == 0:
        return gram, 0.0
    mean_diagonal = float(gram.diagonal()[:n_items].mean()) if n_items else 0.0
    strength = l2_regularization * mean_diagonal if mean_diagonal > 0 else max(l2_regularization, 1e-6)
    gram.flat[:: width + 1] += np.float32(strength)
    # gram is C-ordered and symmetric, so its transpose is the same matrix in Fortran order:
    # LAPACK then works in place. The inverse lands in gram's lower triangle.
    factor, info = lapack.spotrf(gram.T, lower=0, clean=0, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: Gram matrix not positive definite (potrf info={info})")
    inverse, info = lapack.spotri(factor, lower=0, overwrite_c=1)
    if info != 0 or not np.shares_memory(inverse, gram):
        raise np.linalg.LinAlgError(f"EASE: in-place inversion failed (potri info={info})")
    _mirror_lower_to_upper(gram)
    diagonal = gram.diagonal().copy()
    gram /= -diagonal[None, :]  # B[i, j] = -P[i, j] / P[j, j]
    gram.flat[:: width + 1] = 0.0
    if not np.isfinite(gram).all():
        raise np.linalg.LinAlgError("EASE: non-finite weights; raise l2_regularization")
    return gram, strength


def item_cosine_in_place(gram: np.ndarray) -> np.ndarray:
    """Item-kNN weights: cosine similarity of item columns, S[i, j] = G[i, j] / sqrt(G[i, i] G[j, j]),
    diag(S) = 0, computed in G's buffer. Every neighbour is kept: scoring sums a customer's
    items' similarities, so weak neighbours add little, and top-k pruning would be a knob more."""
    norm = np.sqrt(np.maximum(gram.diagonal(), 0.0)).astype(np.float32)
    inverse = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    gram *= inverse[:, None]
    gram *= inverse[None, :]
    gram.flat[:: gram.shape[0] + 1] = 0.0
    return gram


def _mirror_lower_to_upper(matrix: np.ndarray, block: int = 512) -> None:
    """Make a matrix symmetric from its lower triangle, in place, one block row at a time."""
    width = matrix.shape[0]
    for start in range(0, width, block):
        stop = min(start + block, width)
        diagonal_block = matrix[start:stop, start:stop]
        upper = np.triu_indices(stop - start, 1)
        diagonal_block[upper] = diagonal_block.T[upper]
        matrix[start:stop, stop:] = matrix[stop:, start:stop].T


@dataclass(frozen=True)
class Ranking:
    """Top-K of a chunk: one entry per recommendation, ordered by customer then rank."""

    row: np.ndarray  # chunk customer index
    column: np.ndarray  # model column
    score: np.ndarray  # float32
    rank: np.ndarray  # 1-based
    has_signal: np.ndarray  # per chunk customer: history holds at least one model item
    # With `track_hidden`: blocked (out-of-stock or uncatalogued), unbought model columns that
    # score at least the row's k-th recommendation (any, for a row with fewer than k): the
    # products that would enter the row's top-k if they became candidates.
    hidden_row: np.ndarray | None = None
    hidden_column: np.ndarray | None = None


@dataclass(frozen=True)
class SegmentPopularity:
    """Recent popularity within segments: one row per segment, the last row is everyone's."""

    segment_of: Callable[[CustomerChunk], np.ndarray]  # per customer of a history chunk
    segment_row: dict[int, int]
    rows: np.ndarray  # (segments + 1) x padded width, float32, max 1 per row

    def scores(self, history: CustomerChunk) -> np.ndarray:
        fallback = len(self.rows) - 1  # no history, or a segment unseen at fitting: everyone's
        index = [self.segment_row.get(int(s), fallback) for s in self.segment_of(history)]
        return self.rows[np.asarray(index, dtype=np.int64)]


@dataclass(frozen=True)
class EaseScorer:
    """Fitted weights over the model items (columns sorted by product_id) and how to rank.

    `weights` None: a popularity model (global, or within segments when `segments` is set):
    every customer is ranked by popularity, and no customer counts as collaborative."""

    items: ItemIndex
    weights: np.ndarray | None  # padded M x M float32, as column blocks (to_column_blocks_in_place)
    popularity: np.ndarray  # padded, max 1
    as_of_us: int
    popularity_blend: float
    segments: SegmentPopularity | None = None
    history_half_life_days: float | None = None  # None: every bought item counts the same

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights.ndim != 3:
            raise ValueError("EaseScorer weights are column blocks (to_column_blocks_in_place)")

    @property
    def width(self) -> int:
        return len(self.popularity)

    def history_matrix(self, chunk: CustomerChunk) -> sp.csr_matrix:
        """Customers x model-items matrix of purchases before as_of: 1 per bought item, or, with
        `history_half_life_days`, a weight that halves with the age of its last purchase."""
        return self._history_matrix(chunk.before(self.as_of_us))

    def _history_matrix(self, history: CustomerChunk) -> sp.csr_matrix:
        column = self.items.positions(history.product_ids) if len(self.items) else np.full(len(history.amount), -1)
        if self.history_half_life_days is None:
            customer, column, _ = distinct_pairs(history.row_customer, column, max(self.width, 1))
            weight = np.ones(len(column), dtype=np.float32)
        else:
            customer, column, last = pairs_with_last_purchase(history.row_customer, column, history.purchased_at,
                                                              max(self.width, 1))
            age_days = (self.as_of_us - last) / MICROS_PER_DAY
            weight = np.maximum(decay(age_days, self.history_half_life_days), 1e-30).astype(np.float32)
        return sp.csr_matrix((weight, (customer, column)), shape=(history.n_customers, self.width))

    def rank(self, chunk: CustomerChunk, blocked: np.ndarray, k: int, popularity_only: bool = False,
             text_neighbours: TextNeighbours | None = None, track_hidden: bool = False) -> Ranking:
        """Top-k per customer over the model columns and, given `text_neighbours`, the cold
        products scored through them (their columns follow the model's: width + position).
        `track_hidden` also returns the blocked model columns that would enter a row's top-k."""
        before = chunk.before(self.as_of_us)
        history = self._history_matrix(before)
        has_signal = np.diff(history.indptr) > 0
        if popularity_only or self.weights is None:
            has_signal = np.zeros_like(has_signal)
        if chunk.n_customers == 0 or blocked.all():  # nothing to rank (hidden: not tracked, None)
            return _empty_ranking(has_signal)
        scores = self._scores(chunk, history, has_signal)
        bought_rows = np.repeat(np.arange(history.shape[0]), np.diff(history.indptr))
        with_text = text_neighbours is not None and len(text_neighbours) > 0 and bool(has_signal.any())
        if with_text:  # the neighbours' scores that blocking hides: a bought neighbour still says what one likes
            hidden = _hidden_neighbour_scores(scores, text_neighbours.is_neighbour(self.width), blocked,
                                              bought_rows, history.indices)
        if track_hidden:
            blocked_items = np.flatnonzero(blocked[: len(self.items)])
            blocked_scores = np.take(scores, blocked_items, axis=1)  # 3.5x faster than scores[:, items]
            _hide_bought(blocked_scores, blocked_items, bought_rows, history.indices)
        np.copyto(scores, np.float32(-np.inf), where=blocked[None, :])  # 4x faster than a column mask
        scores[bought_rows, history.indices] = -np.inf  # never recommend what was already bought
        row, column, score, rank = top_k_stable(scores, k)
        if with_text:
            row, column, score, rank = self._with_text_neighbours(
                before, text_neighbours, hidden, has_signal, (row, column, score, rank), k)
        if not track_hidden:
            return Ranking(row=row, column=column, score=score, rank=rank, has_signal=has_signal)
        floor = np.full(before.n_customers, -np.inf, dtype=np.float32)
        floor[row[rank == k]] = score[rank == k]  # fewer than k: any candidate would enter
        hidden_row, position = np.nonzero(blocked_scores >= floor[:, None])  # >=: a tie may enter too
        return Ranking(row=row, column=column, score=score, rank=rank, has_signal=has_signal,
                       hidden_row=hidden_row, hidden_column=blocked_items[position])

    def _with_text_neighbours(self, before: CustomerChunk, neighbours: TextNeighbours, hidden, has_signal, top, k):
        """Merge cold products (columns width + position) into each row's top-k.

        A cold product scores at most its neighbour's score, so it can only enter a row's top-k
        through a neighbour scoring above the row's k-th best model score (the floor). An
        unblocked neighbour above the floor is in the top-k already; a blocked one is in
        `hidden`. So the top-k and `hidden` hold every neighbour that matters."""
        row, column, score, rank = top
        floor = np.full(before.n_customers, -np.inf, dtype=np.float32)
        last = rank == k
        floor[row[last]] = score[last]  # rows with fewer than k: any cold product may fill in
        is_neighbour = neighbours.is_neighbour(self.width)
        in_top = is_neighbour[column]
        hidden_row, hidden_column, hidden_score = hidden.above(floor)
        pair_row = np.concatenate([row[in_top], hidden_row])
        pair_column = np.concatenate([column[in_top], hidden_column])
        pair_score = np.concatenate([score[in_top], hidden_score])
        keep = has_signal[pair_row] & (pair_score > floor[pair_row])
        _, first = np.unique(pair_row[keep] * self.width + pair_column[keep], return_index=True)
        cold_row, cold, cold_score = neighbours.entries(
            pair_row[keep][first], pair_column[keep][first], pair_score[keep][first], floor)
        bought = neighbours.bought(before.row_customer, before.product_ids)
        fresh = ~np.isin(cold_row * len(neighbours) + cold, bought)
        if not fresh.any():
            return top
        return _top_k_of_entries(np.concatenate([row, cold_row[fresh]]),
                                 np.concatenate([column, cold[fresh] + self.width]),
                                 np.concatenate([score, cold_score[fresh]]), k)

    def _popularity_rows(self, chunk: CustomerChunk, n: int) -> np.ndarray:
        if self.segments is not None:
            return self.segments.scores(chunk.before(self.as_of_us))
        return np.repeat(self.popularity[None, :], n, axis=0)

    def _scores(self, chunk: CustomerChunk, history: sp.csr_matrix, has_signal: np.ndarray) -> np.ndarray:
        if not has_signal.any():
            return self._popularity_rows(chunk, history.shape[0])
        scores = times_column_blocks(history, self.weights)
        scale = np.maximum(scores.max(axis=1), -scores.min(axis=1))
        scale[scale <= 0] = 1.0
        scores *= (1.0 / scale)[:, None]
        if self.popularity_blend:
            scores += np.float32(self.popularity_blend) * self.popularity[None, :]
        scores[~has_signal] = self.popularity  # cold start: popularity alone, not 0 + blend
        return scores


def _hide_bought(blocked_scores: np.ndarray, blocked_items: np.ndarray, bought_rows: np.ndarray,
                 bought_columns: np.ndarray) -> None:
    """-inf where a row bought a blocked column (a bought product never enters the top-k)."""
    position = np.searchsorted(blocked_items, bought_columns)
    position = np.minimum(position, max(len(blocked_items) - 1, 0))
    bought = (blocked_items[position] == bought_columns) if len(blocked_items) else np.zeros(len(bought_columns), bool)
    blocked_scores[bought_rows[bought], position[bought]] = -np.inf


def _hidden_neighbour_scores(scores, is_neighbour, blocked, bought_rows, bought_columns) -> _HiddenScores:
    """The neighbour entries that blocking is about to set to -inf: the blocked (out-of-stock)
    neighbour columns, whole, and the bought neighbour entries."""
    blocked_columns = np.flatnonzero(blocked & is_neighbour)
    bought = is_neighbour[bought_columns]
    return _HiddenScores(blocked_columns, np.take(scores, blocked_columns, axis=1), bought_rows[bought],
                         bought_columns[bought], scores[bought_rows[bought], bought_columns[bought]])


@dataclass(frozen=True)
class _HiddenScores:
    blocked_columns: np.ndarray
    blocked_values: np.ndarray  # rows x blocked_columns
    bought_rows: np.ndarray
    bought_columns: np.ndarray
    bought_values: np.ndarray

    def above(self, floor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, score) of the hidden entries above their row's floor."""
        row, position = np.nonzero(self.blocked_values > floor[:, None])
        bought = self.bought_values > floor[self.bought_rows]
        return (np.concatenate([row, self.bought_rows[bought]]),
                np.concatenate([self.blocked_columns[position], self.bought_columns[bought]]),
                np.concatenate([self.blocked_values[row, position], self.bought_values[bought]]))


def _empty_ranking(has_signal: np.ndarray) -> Ranking:
    empty = np.zeros(0, dtype=np.int64)
    return Ranking(empty, empty, np.zeros(0, dtype=np.float32), empty, has_signal)


def top_k_stable(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k finite entries of each row: (row, column, score, rank), by row then rank.

    Order within a row: score descending, then column ascending (= product_id ascending), so
    ties are broken the same way every time. -inf entries are never returned.
    """
    n_rows, n_columns = scores.shape
    if n_rows == 0 or n_columns == 0 or k <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=scores.dtype), empty
    grouped_columns = n_columns - n_columns % GROUP_WIDTH
    if grouped_columns // GROUP_WIDTH >= 2 * k:
        row, column = _candidates_by_group_max(scores[:, :grouped_columns], k)
        # the last columns (fewer than GROUP_WIDTH) are all candidates: the prefix threshold is
        # still a lower bound for the whole row's k-th largest entry
        tail_row, tail_column = np.nonzero(np.isfinite(scores[:, grouped_columns:]))
        row, column = np.concatenate([row, tail_row]), np.concatenate([column, tail_column + grouped_columns])
    else:
        row, column = np.nonzero(np.isfinite(scores))  # small matrices: look at everything
    score = scores[row, column]
    finite = np.isfinite(score)
    return _top_k_of_entries(row[finite], column[finite], score[finite], k)


def _top_k_of_entries(row: np.ndarray, column: np.ndarray, score: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The k best (score descending, column ascending) entries of each row, by row then rank."""
    order = np.lexsort((column, -score, row))
    row, column, score = row[order], column[order], score[order]
    first_of_row = np.searchsorted(row, row, side="left")
    rank = np.arange(len(row)) - first_of_row + 1
    keep = rank <= k
    return row[keep], column[keep], score[keep], rank[keep]


def _candidates_by_group_max(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries that can be in a row's top-k, without partitioning the whole row.

    View each row as GROUP_WIDTH x G (group g = columns g, g + G, g + 2G, ...). The k-th largest
    group maximum is at most the row's k-th largest entry (the k largest maxima are k distinct
    entries), so every top-k entry is >= it and lies in a group whose maximum is >= it.
    """
    n_rows, n_columns = scores.shape
    n_groups = n_columns // GROUP_WIDTH
    grouped = scores.reshape(n_rows, GROUP_WIDTH, n_groups)  # a view, also of a column slice
    group_max = _group_max(grouped)
    threshold = np.partition(group_max, n_groups - k, axis=1)[:, n_groups - k]
    group_row, group_id = np.nonzero(group_max >= threshold[:, None])
    members = grouped[group_row, :, group_id]  # (selected groups, GROUP_WIDTH)
    member_column = np.arange(GROUP_WIDTH)[None, :] * n_groups + group_id[:, None]
    keep = members >= threshold[group_row][:, None]
    member_row = np.broadcast_to(group_row[:, None], members.shape)
    return member_row[keep], member_column[keep]


def _group_max(grouped: np.ndarray) -> np.ndarray:
    """grouped.max(axis=1), the same values: numpy reduces a middle axis element by element (8 ms
    for a chunk of 1,024 x 8,192 scores), while a maximum of whole G-wide slices runs vectorized
    (2.8 ms); at 2M customers the scoring's largest cost after the product with B."""
    group_max = grouped[:, 0, :].copy()
    for member in range(1, grouped.shape[1]):
        np.maximum(group_max, grouped[:, member, :], out=group_max)
    return group_max
