"""LoRA-aware Flower strategies, and a reply guard that works with any strategy.

Adapter convention. A strategy's ArrayRecord maps parameter names to arrays. A
LoRA-adapted layer ``L`` carries two factors::

    L.lora_a  (in_features, r)      L.lora_b  (r, out_features)
    ΔW = A @ B  (in, out);  the layer computes x @ W + (alpha / r) · (x @ A) @ B

Every other key (``classifier.weight``, ``classifier.bias``, ...) is a fully
trained parameter and is averaged weighted by ``num-examples``, as FedAvg does.

Each strategy is a small subclass of Flower's FedAvg that overrides the fewest
hooks it can and calls ``super()``; the arithmetic lives in plain module
functions over ``dict[str, np.ndarray]`` so it can be swapped and tested alone.

Config keys the ClientApp must honor (besides Flower's "server-round"):

    "freeze-lora-a": bool     FFALoRA: do not update any ``*.lora_a``.
    "lora-rank": int          FlexLoRA, HetLoRA: the rank of the factors sent;
                              the client may reply at a lower rank.
    "lora-prune-gamma": float HetLoRA with ``prune_gamma``: client-side
                              self-pruning ratio.
    "proximal-mu": float      stock FedProx.

Faults: ``Guarded(strategy)`` (or ``filter_replies``) leaves out replies that
carry an error, are malformed, have other keys or shapes than what was sent,
hold NaN/Inf, or (with ``max_update_norm``) move the arrays further than that
from what was sent, and counts them by cause in ``rejected`` / ``rejected_total``.
Guarded is the outermost wrapper, so no strategy (robust, DP or other) ever
sees such a reply.
"""

from __future__ import annotations

import logging
import math
from logging import INFO
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid

from device_runtime.protocol import FREEZE_LORA_A_KEY, LORA_RANK_KEY, PRUNE_GAMMA_KEY  # keys devices honour
from fleet.arrays import filled, from_array, from_record, stacked_records, to_record
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

logger = logging.getLogger(__name__)

LORA_A_SUFFIX = ".lora_a"
LORA_B_SUFFIX = ".lora_b"
REJECT_CAUSES = ("nan", "shape", "norm", "error")

State = dict[str, np.ndarray]
Shape = tuple[int, ...]


# --- plain aggregation functions (numpy in, numpy out) -------------------------


def lora_layers(keys: Iterable[str]) -> list[str]:
    """Names of the LoRA-adapted layers, in key order; a lone factor is an error."""
    keys = list(keys)
    a_layers = [k.removesuffix(LORA_A_SUFFIX) for k in keys if k.endswith(LORA_A_SUFFIX)]
    b_layers = {k.removesuffix(LORA_B_SUFFIX) for k in keys if k.endswith(LORA_B_SUFFIX)}
    lone = set(a_layers) ^ b_layers
    if lone:
        raise ValueError(f"LoRA factor without its partner in layers {sorted(lone)}")
    return a_layers


def lora_rank(a: np.ndarray, b: np.ndarray) -> int:
    """Rank r of a factor pair A (in, r), B (r, out); mismatched pairs are an error."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"not a LoRA pair: A {a.shape}, B {b.shape}")
    return a.shape[1]


def shape_ranks(shapes: Mapping[str, Shape]) -> dict[str, int]:
    """Rank of every LoRA layer, from the arrays' shapes alone."""
    ranks = {}
    for layer in lora_layers(shapes):
        a, b = shapes[layer + LORA_A_SUFFIX], shapes[layer + LORA_B_SUFFIX]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise ValueError(f"{layer}: not a LoRA pair: A {a}, B {b}")
        ranks[layer] = a[1]
    return ranks


def state_ranks(state: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Rank of every LoRA layer in a state."""
    return shape_ranks({k: np.shape(v) for k, v in state.items()})


def weighted_average(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ w_i·x_i / Σ w_i, accumulated in float64, returned in the inputs' float dtype."""
    if not arrays or len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} arrays but {len(weights)} weights")
    if len({np.shape(x) for x in arrays}) != 1:
        raise ValueError(f"cannot average shapes {[np.shape(x) for x in arrays]}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    dtype = np.result_type(*arrays)
    if not np.issubdtype(dtype, np.inexact):
        dtype = np.dtype(np.float64)
    acc = sum((w / total) * np.asarray(x, dtype=np.float64) for x, w in zip(arrays, weights))
    return np.asarray(acc, dtype=dtype)


def pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad A (in, r) → (in, rank) and B (r, out) → (rank, out); A @ B is unchanged."""
    extra = rank - lora_rank(a, b)
    if extra < 0:
        raise ValueError(f"cannot pad rank {a.shape[1]} down to {rank}")
    return np.pad(a, ((0, 0), (0, extra))), np.pad(b, ((0, extra), (0, 0)))


def truncate_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``rank`` columns of A and rows of B."""
    if not 1 <= rank <= lora_rank(a, b):
        raise ValueError(f"cannot truncate rank {a.shape[1]} to {rank}")
    return a[:, :rank].copy(), b[:rank, :].copy()


# Where the singular values go when ΔW ≈ U_r S_r V_rᵀ is split into A @ B.
Split = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
SVD_SPLITS: dict[str, Split] = {
    "sqrt": lambda u, s, vt: (u * np.sqrt(s), np.sqrt(s)[:, None] * vt),  # balanced
    "a": lambda u, s, vt: (u * s, vt),  # B has orthonormal rows
    "b": lambda u, s, vt: (u, s[:, None] * vt),  # A has orthonormal columns
}


def svd_factors(delta: np.ndarray, rank: int, split: str = "sqrt") -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors of ``delta`` (Eckart–Young), singular values descending.

    ``split="sqrt"``: A = U_r·sqrt(S_r), B = sqrt(S_r)·V_rᵀ. Singular directions
    past rank(delta) come out as zero columns of A and zero rows of B (padding
    when ``rank`` > min(in, out)). Because the values are sorted, truncating
    these factors to r' < rank gives the best rank-r' factors too.
    """
    if split not in SVD_SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SVD_SPLITS)}")
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.size)
    a, b = SVD_SPLITS[split](u[:, :k], s[:k], vt[:k])
    return pad_rank(a, b, rank)


def truncate_state(state: Mapping[str, np.ndarray], rank: int) -> State:
    """Every LoRA layer cut to min(rank, its rank); other keys unchanged."""
    out = dict(state)
    for layer, r in state_ranks(state).items():
        ka, kb = layer + LORA_A_SUFFIX, layer + LORA_B_SUFFIX
        out[ka], out[kb] = truncate_rank(state[ka], state[kb], min(rank, r))
    return out


def _average_rest(states: Sequence[State], weights: Sequence[float], done: State) -> State:
    """Average every key not in ``done``; keep the first state's key order."""
    return {
        k: done[k] if k in done else weighted_average([s[k] for s in states], weights)
        for k in states[0]
    }


def hetlora_aggregate(
    states: Sequence[State],
    weights: Sequence[float],
    ranks: Mapping[str, int] | None = None,
    sparsity_weighted: bool = False,
) -> State:
    """HetLoRA: zero-pad each client's A and B to the global rank, then average.

    ``ranks`` gives each layer's global rank (default: the largest reply rank).
    With ``sparsity_weighted`` a layer's factors are weighted by ‖A_i B_i‖_F
    instead of num-examples (HetLoRA's sparsity-weighted aggregation, per layer);
    all-zero updates fall back to num-examples.
    """
    ranks = ranks or {}
    done: State = {}
    for layer in lora_layers(states[0]):
        ka, kb = layer + LORA_A_SUFFIX, layer + LORA_B_SUFFIX
        rank = ranks.get(layer) or max(s[ka].shape[1] for s in states)
        padded = [pad_rank(s[ka], s[kb], rank) for s in states]
        layer_weights = weights
        if sparsity_weighted:
            norms = [float(np.linalg.norm(s[ka] @ s[kb])) for s in states]
            layer_weights = norms if sum(norms) > 0 else weights
        done[ka] = weighted_average([a for a, _ in padded], layer_weights)
        done[kb] = weighted_average([b for _, b in padded], layer_weights)
    return _average_rest(states, weights, done)


def flexlora_aggregate(
    states: Sequence[State],
    weights: Sequence[float],
    ranks: Mapping[str, int] | None = None,
    split: str = "sqrt",
) -> State:
    """FlexLoRA: average the full ΔW_i = A_i @ B_i, then SVD back to the global rank.

    ``ranks`` gives each layer's global rank (default: the largest reply rank).
    """
    ranks = ranks or {}
    done: State = {}
    for layer in lora_layers(states[0]):
        ka, kb = layer + LORA_A_SUFFIX, layer + LORA_B_SUFFIX
        rank = ranks.get(layer) or max(s[ka].shape[1] for s in states)
        delta = weighted_average([s[ka] @ s[kb] for s in states], weights)
        done[ka], done[kb] = svd_factors(delta, rank, split)
    return _average_rest(states, weights, done)


# --- reading replies without Flower's typed views ------------------------------------
# ``content.array_records`` / ``metric_records`` build and re-check a new view on each access (~7 µs);
# at thousands of replies a round the guard and the aggregators read the records directly.


def records_of(content: RecordDict) -> tuple[list[ArrayRecord], list[MetricRecord]]:
    """The ArrayRecords and the MetricRecords a reply holds, in order."""
    arrays, metrics = [], []
    for record in content.__dict__["_data"].values():  # (Flower's values() view: cast and typed access)
        if isinstance(record, ArrayRecord):
            arrays.append(record)
        elif isinstance(record, MetricRecord):
            metrics.append(record)
    return arrays, metrics


def first_metrics(content: RecordDict) -> MetricRecord:
    return next(r for r in content.values() if isinstance(r, MetricRecord))


def first_arrays(content: RecordDict) -> ArrayRecord:
    return next(r for r in content.values() if isinstance(r, ArrayRecord))


def aggregate_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's ``aggregate_metricrecords`` (the default ``*_metrics_aggr_fn`` of every FedAvg-family
    strategy), the same arithmetic in the same order, reading the records directly."""
    metric_records = [[r for r in record.values() if isinstance(r, MetricRecord)] for record in records]
    weights = [float(found[0][weighting_metric_name]) for found in metric_records]
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    aggregated: dict[str, object] = {}
    first = metric_records[0][0] if metric_records and metric_records[0] else {}
    if all(len(found) == 1 and found[0].keys() == first.keys() for found in metric_records):
        # one record each, the same keys: a key at a time over all replies. value·share elementwise and a
        # running sum in reply order (np.cumsum adds strictly left to right) are Flower's float operations
        share = np.array(shares)
        for key in first:
            if key == weighting_metric_name:
                continue
            values = np.array([found[0][key] for found in metric_records])
            if values.dtype.kind not in "biuf" or values.ndim != 1:  # list-valued metrics: Flower's loop below
                aggregated = {}
                break
            aggregated[key] = float(np.cumsum(values * share)[-1])
        else:
            return filled(MetricRecord, aggregated)
    for found, weight in zip(metric_records, shares, strict=True):
        for record in found:
            for key, value in record.items():
                if key == weighting_metric_name:
                    continue
                current = aggregated.get(key)
                if current is None:
                    aggregated[key] = [v * weight for v in value] if isinstance(value, list) else value * weight
                elif isinstance(value, list):
                    aggregated[key] = [c + v * weight for c, v in zip(current, value, strict=True)]
                else:
                    aggregated[key] = current + value * weight
    return filled(MetricRecord, aggregated)


def checked_replies(strategy: FedAvg, replies: Iterable[Message], is_train: bool) -> list[Message]:
    """FedAvg's ``_check_and_log_replies``: the replies with content, after the same consistency checks
    (one ArrayRecord with the same keys for training, one MetricRecord with the same keys holding a scalar
    weight), raising Flower's ``InconsistentMessageReplies`` as it does."""
    valid, errors = [], []
    for reply in replies:
        (errors if reply.has_error() else valid).append(reply)
    if not valid and not errors:
        return valid
    flwr_log(INFO, "%s: Received %s results and %s failures",
             "aggregate_train" if is_train else "aggregate_evaluate", len(valid), len(errors))
    for reply in errors:
        flwr_log(INFO, "\t> Received error in reply from node %d: %s", reply.metadata.src_node_id, reply.error.reason)
    if not valid:
        return valid
    found = [records_of(m.content) for m in valid]
    if is_train:
        if any(len(arrays) != 1 for arrays, _ in found):
            raise InconsistentMessageReplies(reason="Expected exactly one ArrayRecord in replies.")
        keys = found[0][0][0].keys()
        if any(arrays[0].keys() != keys for arrays, _ in found[1:]):
            raise InconsistentMessageReplies(reason="All ArrayRecords must have the same keys for aggregation.")
    if any(len(metrics) != 1 for _, metrics in found):
        raise InconsistentMessageReplies(reason="Expected exactly one MetricRecord in replies.")
    keys = found[0][1][0].keys()
    if any(metrics[0].keys() != keys for _, metrics in found[1:]):
        raise InconsistentMessageReplies(reason="All MetricRecords must have the same keys for aggregation.")
    if strategy.weighted_by_key not in keys:
        raise InconsistentMessageReplies(reason=f"Missing required key `{strategy.weighted_by_key}`.")
    if any(isinstance(metrics[0][strategy.weighted_by_key], list) for _, metrics in found):
        raise InconsistentMessageReplies(reason=f"Key `{strategy.weighted_by_key}` must be a single value.")
    return valid


# --- reply guard -----------------------------------------------------------------


def shapes_of(record: ArrayRecord) -> dict[str, Shape]:
    """Shape of every array in a record (read from the header, not deserialized)."""
    return {k: tuple(v.shape) for k, v in record.items()}


def _shape_problem(got: Mapping[str, Shape], sent: Mapping[str, Shape], rank_flexible: bool) -> str | None:
    if set(got) != set(sent):
        return f"keys differ: missing {sorted(set(sent) - set(got))}, extra {sorted(set(got) - set(sent))}"
    for key, shape in sent.items():
        ok = got[key] == shape
        if not ok and rank_flexible and len(shape) == len(got[key]) == 2:
            # A client may reply at a lower rank: (in, r' ≤ r) and (r' ≤ r, out).
            if key.endswith(LORA_A_SUFFIX):
                ok = got[key][0] == shape[0] and 1 <= got[key][1] <= shape[1]
            elif key.endswith(LORA_B_SUFFIX):
                ok = got[key][1] == shape[1] and 1 <= got[key][0] <= shape[0]
        if not ok:
            return f"{key}: sent {shape}, got {got[key]}"
    for key in got:
        partner = key.removesuffix(LORA_A_SUFFIX) + LORA_B_SUFFIX
        if key.endswith(LORA_A_SUFFIX) and partner in got and got[key][1] != got[partner][0]:
            return f"{key} has rank {got[key][1]} but {partner} has rank {got[partner][0]}"
    return None


def _finite(value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(math.isfinite(v) for v in values)


def update_norm(got: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """‖reply − sent‖₂ over all arrays; a lower-rank LoRA reply is compared with the sent factors' leading
    columns/rows (what the device was given at its rank)."""
    total = 0.0
    for key, value in got.items():
        base = np.asarray(sent[key])[tuple(slice(0, n) for n in np.shape(value))]
        diff = np.asarray(value, np.float64) - base
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def finite_records(replies: Sequence[Message]) -> dict[int, bool]:
    """id(reply) → whether every array of its one ArrayRecord is finite, for replies whose records have the
    same names (the rest: {}), checked a host's stack at a time (``fleet.arrays.stacked_records``)."""
    records = [found[0] for found in (records_of(r.content)[0] for r in replies) if len(found) == 1]
    if len(records) != len(replies) or not records:
        return {}
    names = records[0].keys()
    if any(r.keys() != names for r in records[1:]):
        return {}
    ok = np.ones(len(records), bool)
    for stacks, positions in stacked_records(records):
        for value in stacks.values():
            ok[positions] &= np.isfinite(value).reshape(len(positions), -1).all(axis=1)
    return {id(reply): bool(good) for reply, good in zip(replies, ok)}


def check_reply(
    reply: Message,
    sent: Mapping[str, Shape] | None,
    weighted_by_key: str = "num-examples",
    rank_flexible: bool = False,
    sent_arrays: Mapping[str, np.ndarray] | None = None,
    max_update_norm: float | None = None,
    arrays_finite: bool | None = None,
) -> tuple[str, str] | None:
    """(cause, reason) if a train reply must be left out of aggregation, else None. With ``max_update_norm``
    (and the ``sent_arrays``), a reply further than that from what was sent is left out as "norm".
    ``arrays_finite``: already known for the reply's arrays (``finite_records``), else checked here."""
    if reply.has_error():
        return "error", f"client error {reply.error.code}: {reply.error.reason}"
    if not reply.has_content():
        return "error", "reply has neither content nor error"
    array_records, metric_records = records_of(reply.content)
    if len(array_records) != 1 or len(metric_records) != 1:
        return "error", "expected exactly one ArrayRecord and one MetricRecord"
    record, metrics = array_records[0], metric_records[0]
    weight = metrics.get(weighted_by_key)
    if not isinstance(weight, (int, float)):
        return "error", f"missing or non-scalar {weighted_by_key!r}"
    if sent is None:
        return "error", "reply from a node that was sent no instruction"
    problem = _shape_problem(shapes_of(record), sent, rank_flexible)
    if problem:
        return "shape", problem
    bad = [] if arrays_finite else [k for k, v in record.items() if not np.isfinite(from_array(v)).all()]
    values = list(metrics.values())
    if not all(isinstance(v, (int, float)) for v in values) or not all(map(math.isfinite, values)):
        bad += [k for k, v in metrics.items() if not _finite(v)]
    if bad:
        return "nan", f"non-finite values in {bad}"
    if weight <= 0:
        return "error", f"{weighted_by_key!r} is {weight}"
    if max_update_norm is not None and sent_arrays is not None:
        norm = update_norm({k: from_array(v) for k, v in record.items()}, sent_arrays)
        if norm > max_update_norm:
            return "norm", f"update norm {norm:.4g} > max_update_norm {max_update_norm:g}"
    return None


def _signature(reply: Message) -> tuple:
    content = reply.content
    names = {type(r): (k, r) for k, r in content.items()}
    metrics_name, metrics = names[MetricRecord]
    return names[ArrayRecord][0], metrics_name, frozenset(metrics.keys())


def filter_replies(
    replies: Iterable[Message],
    expected_shapes: Mapping[str, Shape] | Mapping[int, Mapping[str, Shape]],
    *,
    weighted_by_key: str = "num-examples",
    rank_flexible: bool = False,
    server_round: int = 0,
    sent_arrays: Callable[[int], Mapping[str, np.ndarray] | None] | None = None,
    max_update_norm: float | None = None,
) -> tuple[list[Message], Counter]:
    """Split train replies into those fit to aggregate and counts of the rest by cause.

    ``expected_shapes`` is either one ``{key: shape}`` for every node, or
    ``{node_id: {key: shape}}`` (what each node was sent). With ``rank_flexible``
    a reply may carry LoRA factors at a lower rank than sent. Replies whose record
    names or metric keys differ from the majority are left out as "error" too, as
    Flower's FedAvg would otherwise refuse the whole round. With
    ``max_update_norm``, ``sent_arrays(node_id)`` gives what that node was sent.
    One log line per rejected reply.
    """
    uniform = bool(expected_shapes) and all(isinstance(k, str) for k in expected_shapes)
    good: list[Message] = []
    rejected: Counter = Counter()

    def reject(reply: Message, cause: str, reason: str) -> None:
        rejected[cause] += 1
        logger.warning(
            "round %d: rejected reply from %s (%s): %s",
            server_round, _sender(reply), cause, reason,
        )

    replies = list(replies)
    finite = finite_records([r for r in replies if not r.has_error()])
    for reply in replies:
        if reply.has_error():  # the device did not answer (failed, offline, dropped out): counted by the round
            continue           # driver under its cause, not a reply the guard rejects
        sent = expected_shapes if uniform else expected_shapes.get(reply.metadata.src_node_id)
        node = reply.metadata.src_node_id
        base = sent_arrays(node) if (sent_arrays is not None and max_update_norm is not None) else None
        verdict = check_reply(reply, sent, weighted_by_key, rank_flexible, base, max_update_norm,
                              finite.get(id(reply)))
        if verdict:
            reject(reply, *verdict)
        else:
            good.append(reply)
    if good:
        majority, _ = Counter(_signature(r) for r in good).most_common(1)[0]
        for reply in [r for r in good if _signature(r) != majority]:
            good.remove(reply)
            reject(reply, "error", f"record names / metric keys {_signature(reply)} differ from {majority}")
    return good, rejected


def _sender(reply: Message) -> str:
    """"device N" when the reply says which device it is (edgefleet replies do), else "node N"."""
    if reply.has_content():
        for metrics in records_of(reply.content)[1]:
            if isinstance(metrics.get("device"), int):
                return f"device {metrics['device']}"
    return f"node {reply.metadata.src_node_id}"


def _copy_config(config: ConfigRecord) -> ConfigRecord:
    return ConfigRecord(dict(config))


def _sent_shapes(message: Message) -> dict[str, Shape]:
    return {k: s for record in records_of(message.content)[0] for k, s in shapes_of(record).items()}


class Guarded(Strategy):
    """Wrap any strategy so that bad train replies never reach its aggregate_train.

    ``rejected`` counts the last round's rejected replies by cause ("nan",
    "shape", "error"), ``rejected_total`` all rounds'. A round without a valid
    reply returns no arrays, so ``Strategy.start`` keeps the global state.
    Replies are checked against what ``configure_train`` sent to each node, so
    it must run first (``start`` does). The wrapped strategy gets a copy of each
    config, never the caller's.
    """

    def __init__(self, strategy: Strategy, *, rank_flexible: bool | None = None,
                 max_update_norm: float | None = None) -> None:
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        self.strategy = strategy
        self.max_update_norm = max_update_norm
        if rank_flexible is None:
            rank_flexible = getattr(strategy, "rank_flexible", False)
        self.rank_flexible = rank_flexible
        self.weighted_by_key: str = getattr(strategy, "weighted_by_key", "num-examples")
        self.rejected: Counter = Counter()
        self.rejected_total: Counter = Counter()
        self._sent: dict[int, dict[str, Shape]] = {}
        self._sent_records: dict[int, RecordDict] = {}  # node → what it was sent (shared between nodes)
        self._decoded: dict[int, State] = {}            # id(RecordDict) → its arrays, decoded once

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, _copy_config(config), grid))
        shapes: dict[int, dict[str, Shape]] = {}  # id(content) → its shapes: FedAvg shares one content
        self._sent = {}
        for m in messages:
            if id(m.content) not in shapes:
                shapes[id(m.content)] = _sent_shapes(m)
            self._sent[m.metadata.dst_node_id] = shapes[id(m.content)]
        self._sent_records = {m.metadata.dst_node_id: m.content for m in messages}
        self._decoded = {}
        return messages

    def _sent_arrays(self, node_id: int) -> State | None:
        content = self._sent_records.get(node_id)
        if content is None:
            return None
        if id(content) not in self._decoded:
            self._decoded[id(content)] = {k: from_array(v) for record in records_of(content)[0]
                                          for k, v in record.items()}
        return self._decoded[id(content)]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good, self.rejected = filter_replies(
            replies,
            self._sent,
            weighted_by_key=self.weighted_by_key,
            rank_flexible=self.rank_flexible,
            server_round=server_round,
            sent_arrays=self._sent_arrays,
            max_update_norm=self.max_update_norm,
        )
        self._sent_records, self._decoded = {}, {}
        self.rejected_total.update(self.rejected)
        if not good:
            logger.warning("round %d: no valid train reply, global arrays unchanged", server_round)
            return None, None
        return self.strategy.aggregate_train(server_round, good)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, _copy_config(config), grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        logger.info("Guarded %s (rank_flexible=%s)", type(self.strategy).__name__, self.rank_flexible)
        self.strategy.summary()


# --- LoRA strategies ------------------------------------------------------------------


def _to_state(record: ArrayRecord) -> State:
    return from_record(record)


def _to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return to_record(state)


class FastAverage(FedAvg):
    """FedAvg's aggregate_train and aggregate_evaluate: the same num-examples weighted mean of every array
    (summed a host's stack of devices at a time, ``fleet.arrays.stacked_records``, so the roundings differ from
    FedAvg's reply-by-reply sums in the last bits), Flower's metric aggregation to the bit, and the same
    checks; records are read directly and no .npy header is re-parsed."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid = checked_replies(self, replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        weights = [float(first_metrics(c)[self.weighted_by_key]) for c in contents]
        total = sum(weights)
        factors = np.array([w / total for w in weights])
        summed: dict[str, np.ndarray] = {}
        for stacks, positions in stacked_records([first_arrays(c) for c in contents]):  # a host's call at a time
            for key, stack in stacks.items():
                term = np.tensordot(factors[positions].astype(stack.dtype), stack, axes=1)
                summed[key] = term if key not in summed else summed[key] + term
        return to_record(summed), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = checked_replies(self, replies, is_train=False)
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)


def _at_node_ranks(
    strategy: FedAvg, messages: Iterable[Message], node_ranks: Mapping[int, int]
) -> list[Message]:
    """Give each of FedAvg's messages the global factors cut to its node's rank.

    FedAvg puts one shared RecordDict in every message; each message gets its own
    (one ArrayRecord per distinct rank). Unknown nodes get the global rank. The
    config gains "lora-rank".
    """
    messages = list(messages)
    if not messages:
        return messages
    keys = strategy.arrayrecord_key, strategy.configrecord_key
    state = _to_state(messages[0].content[keys[0]])
    global_rank = max(state_ranks(state).values(), default=0)
    if global_rank == 0:  # no LoRA layers: nothing to cut
        return messages
    records: dict[int, ArrayRecord] = {}
    for message in messages:
        rank = min(node_ranks.get(message.metadata.dst_node_id, global_rank), global_rank)
        if rank not in records:
            records[rank] = _to_record(truncate_state(state, rank))
        config = _copy_config(message.content[keys[1]])
        config[LORA_RANK_KEY] = rank
        message.content = RecordDict({keys[0]: records[rank], keys[1]: config})
    return messages


def _aggregate_states(
    strategy: FedAvg,
    replies: Iterable[Message],
    aggregate: Callable[[list[State], list[float]], State],
) -> tuple[ArrayRecord | None, MetricRecord | None, dict[int, int]]:
    """FedAvg's reply checks and metric averaging around a state-level ``aggregate``.

    Also returns each replying node's rank (its smallest layer rank).
    """
    valid = checked_replies(strategy, replies, is_train=True)
    if not valid:
        return None, None, {}
    contents = [m.content for m in valid]
    states = [_to_state(first_arrays(c)) for c in contents]
    weights = [float(first_metrics(c)[strategy.weighted_by_key]) for c in contents]
    reply_ranks = {
        m.metadata.src_node_id: min(ranks.values())
        for m, ranks in zip(valid, map(state_ranks, states))
        if ranks
    }
    arrays = _to_record(aggregate(states, weights))
    return arrays, strategy.train_metrics_aggr_fn(contents, strategy.weighted_by_key), reply_ranks


def _check_node_ranks(node_ranks: Mapping[int, int] | None) -> dict[int, int]:
    node_ranks = dict(node_ranks or {})
    if any(r < 1 for r in node_ranks.values()):
        raise ValueError(f"node ranks must be ≥ 1, got {node_ranks}")
    return node_ranks


class FedIT(FastAverage):
    """FedIT (Zhang et al., 2024): FedAvg on the LoRA factors, A and B averaged separately.

    Each of ``L.lora_a``, ``L.lora_b`` and every other key is a num-examples
    weighted mean, exactly what FedAvg does to any array (FastAverage only
    decodes faster). Note mean(A_i) @ mean(B_i) ≠ mean(A_i @ B_i): FedIT's update is
    not the mean of the clients' updates (FFA-LoRA and FlexLoRA address that).
    All clients must share one rank.
    """


class FFALoRA(FastAverage):
    """FFA-LoRA (Sun et al., 2024): A frozen at its initial value, only B is averaged.

    Sends ``"freeze-lora-a": True``. The first ``configure_train`` stores the
    initial A factors; the aggregate always carries those, whatever clients send.
    """

    def __init__(self, **fedavg_options) -> None:
        super().__init__(**fedavg_options)
        self.frozen_a: dict[str, Array] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.frozen_a is None:
            self.frozen_a = {k: v for k, v in arrays.items() if k.endswith(LORA_A_SUFFIX)}
        config = _copy_config(config)
        config[FREEZE_LORA_A_KEY] = True
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.frozen_a:
            arrays = ArrayRecord({k: self.frozen_a.get(k, v) for k, v in arrays.items()})
        return arrays, metrics


class PerNodeRank(FedAvg):
    """What FlexLoRA and HetLoRA share: global factors at the rank of ``initial_arrays``; each node is sent
    the first r_i columns of A and rows of B; a node's rank comes from ``node_ranks`` (node id → rank) and
    is updated from the shapes of its last reply (unknown nodes get the global rank). Subclasses give
    ``aggregate_states`` and may add to the train config."""

    rank_flexible = True

    def __init__(self, *, node_ranks: Mapping[int, int] | None = None, **fedavg_options) -> None:
        super().__init__(**fedavg_options)
        self.node_ranks = _check_node_ranks(node_ranks)
        self.global_ranks: dict[str, int] = {}

    def train_config(self, config: ConfigRecord) -> ConfigRecord:
        return config

    def aggregate_states(self, states: list[State], weights: list[float]) -> State:
        raise NotImplementedError

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_ranks = shape_ranks(shapes_of(arrays))
        messages = super().configure_train(server_round, arrays, self.train_config(_copy_config(config)), grid)
        return _at_node_ranks(self, messages, self.node_ranks)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, _copy_config(config), grid)
        return _at_node_ranks(self, messages, self.node_ranks)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics, reply_ranks = _aggregate_states(self, replies, self.aggregate_states)
        self.node_ranks.update(reply_ranks)
        return arrays, metrics


class FlexLoRA(PerNodeRank):
    """FlexLoRA (Bai et al., 2024): clients of different ranks, ΔW averaged, SVD per client.

    The global ArrayRecord holds factors at the rank of ``initial_arrays``
    (the largest rank any node may use), split from the SVD of the
    num-examples weighted mean of ΔW_i = A_i @ B_i (see ``svd_factors`` for
    ``split``). Since singular values are sorted, each node's first r_i
    columns of A and rows of B are the best rank-r_i approximation of the mean ΔW.
    """

    def __init__(
        self, *, node_ranks: Mapping[int, int] | None = None, split: str = "sqrt", **fedavg_options
    ) -> None:
        super().__init__(node_ranks=node_ranks, **fedavg_options)
        if split not in SVD_SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {sorted(SVD_SPLITS)}")
        self.split = split

    def aggregate_states(self, states: list[State], weights: list[float]) -> State:
        return flexlora_aggregate(states, weights, self.global_ranks, self.split)


class HetLoRA(PerNodeRank):
    """HetLoRA (Cho et al., 2024): zero-pad factors to the global rank, average, truncate.

    Options: ``sparsity_weighted`` (weights ‖A_i B_i‖_F instead of num-examples) and ``prune_gamma`` (sent
    as "lora-prune-gamma" for client-side self-pruning; a client then replies at its lower rank).
    """

    def __init__(
        self,
        *,
        node_ranks: Mapping[int, int] | None = None,
        sparsity_weighted: bool = False,
        prune_gamma: float | None = None,
        **fedavg_options,
    ) -> None:
        super().__init__(node_ranks=node_ranks, **fedavg_options)
        self.sparsity_weighted = sparsity_weighted
        self.prune_gamma = prune_gamma

    def train_config(self, config: ConfigRecord) -> ConfigRecord:
        if self.prune_gamma is not None:
            config[PRUNE_GAMMA_KEY] = self.prune_gamma
        return config

    def aggregate_states(self, states: list[State], weights: list[float]) -> State:
        return hetlora_aggregate(states, weights, self.global_ranks, self.sparsity_weighted)


# --- factory --------------------------------------------------------------------------

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "fedit": FedIT,
    "ffa-lora": FFALoRA,
    "flexlora": FlexLoRA,
    "hetlora": HetLoRA,
}


# Flower's server-side DP wrappers, by the name [aggregation.dp] clipping gives.
DP_WRAPPERS: dict[str, Callable[..., Strategy]] = {
    "fixed": DifferentialPrivacyServerSideFixedClipping,
    "adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
}


def make_strategy(name: str, *, guard: bool = True, max_update_norm: float | None = None,
                  dp: Mapping[str, object] | None = None, **options) -> Strategy:
    """Build a strategy by name with its constructor's keyword ``options``.

    Stock names give Flower's strategies unchanged. ``dp`` ({"clipping": "fixed" | "adaptive", and the
    wrapper's keyword arguments}) wraps it in Flower's server-side DP clipping. With ``guard`` (default) the
    result is wrapped in ``Guarded`` (outermost, enforcing ``max_update_norm``).
    """
    factory = STRATEGIES.get(name.lower())
    if factory is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if isinstance(factory, type) and issubclass(factory, FedAvg):  # Flower's own default, read directly
        options.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        options.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
    try:
        strategy = factory(**options)
    except TypeError as err:
        raise TypeError(f"strategy {name!r}: {err}") from err
    if dp is not None:
        dp = dict(dp)
        wrapper = DP_WRAPPERS.get(str(dp.pop("clipping", "")))
        if wrapper is None:
            raise ValueError(f"unknown DP clipping {dp!r}; known: {', '.join(DP_WRAPPERS)}")
        strategy = wrapper(strategy, **dp)
    if not guard:
        if max_update_norm is not None:
            raise ValueError("max_update_norm is enforced by the guard: needs guard=True")
        return strategy
    return Guarded(strategy, max_update_norm=max_update_norm)


def strategy_from_spec(aggregation, *, fraction: float, devices: int,
                       node_ranks: Mapping[int, int] | None = None) -> Strategy:
    """The strategy a scenario's ``[aggregation]`` table (``fleet.scenario.AggregationSpec``) names, guarded,
    for a fleet of ``devices`` of which ``fraction`` train each round."""
    a = aggregation
    options: dict[str, object] = {"fraction_train": fraction, "fraction_evaluate": fraction,
                                  "min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}
    if a.strategy == "fedavgm":
        extra = {"server_learning_rate": a.server_lr, "server_momentum": a.server_momentum}
    else:
        extra = {"proximal_mu": a.proximal_mu, "eta": a.server_lr, "beta_1": a.beta_1, "beta_2": a.beta_2,
                 "tau": a.tau, "beta": a.beta, "num_malicious_nodes": a.num_malicious_nodes,
                 "num_nodes_to_select": a.num_nodes_to_select}
    options.update({k: v for k, v in extra.items() if v is not None})
    if a.strategy in ("flexlora", "hetlora"):
        options["node_ranks"] = dict(node_ranks or {})
    dp = None
    if a.dp is not None:
        dp = {k: v for k, v in a.dp.to_dict().items()}
        dp.setdefault("num_sampled_clients", max(1, int(fraction * devices)))  # Flower samples int(f·n)
    return make_strategy(a.strategy, max_update_norm=a.max_update_norm, dp=dp, **options)


# --- what a strategy sends the devices ------------------------------------------------------------


class _ProbeGrid(Grid):
    """A grid of ``nodes`` idle nodes that only builds messages: what ``configure_train`` asks of it."""

    def __init__(self, nodes: int = 16) -> None:
        from flwr.supercore.run import Run
        self._run = Run.create_empty(1)
        self.nodes = list(range(100, 100 + nodes))

    @property
    def run(self):
        return self._run

    def set_run(self, run) -> None:
        self._run = run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError("the probe grid only builds messages")

    def pull_messages(self, message_ids):
        raise NotImplementedError("the probe grid only builds messages")

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError("the probe grid only builds messages")


def check_strategy_config(strategy: Strategy, arrays: Mapping[str, np.ndarray],
                          train_config: Mapping[str, object], where: str = "aggregation.strategy") -> set[str]:
    """The configuration keys ``strategy`` sends with a train instruction (probed by building one round's
    messages); a key that no device honours raises ``ProtocolError`` naming it. Returns the keys."""
    from device_runtime.protocol import check_config
    import random
    state = random.getstate()  # sampling nodes must not disturb the run's own draws
    try:
        messages = list(strategy.configure_train(1, to_record(arrays), ConfigRecord(dict(train_config)),
                                                 _ProbeGrid()))
    finally:
        random.setstate(state)
    keys: set[str] = set()
    for message in messages:
        for record in message.content.config_records.values():
            keys.update(record.keys())
    check_config({k: None for k in keys}, where=f"{where} {type(getattr(strategy, 'strategy', strategy)).__name__}")
    return keys
