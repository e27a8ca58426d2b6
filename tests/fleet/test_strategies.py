"""LoRA strategies and the reply guard, against hand-computed numpy values.

Replies are real Flower 1.41 Messages: an instruction ``Message(content,
dst_node_id, message_type)`` and its reply ``Message(content, reply_to=ins)``
(or ``Message(Error(...), reply_to=ins)``). Building any instruction Message
needs a task identity, which a ServerApp process sets; the ``task_identity``
fixture sets it the same way Flower's simulation does.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import logging  # noqa: E402
from collections.abc import Callable, Iterable, Mapping  # noqa: E402
from uuid import uuid4  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fleet.strategies import (  # noqa: E402
    FREEZE_LORA_A_KEY,
    LORA_RANK_KEY,
    PRUNE_GAMMA_KEY,
    STRATEGIES,
    FedIT,
    aggregate_metrics,
    checked_replies,
    FFALoRA,
    FlexLoRA,
    Guarded,
    HetLoRA,
    filter_replies,
    flexlora_aggregate,
    hetlora_aggregate,
    make_strategy,
    pad_rank,
    svd_factors,
    truncate_rank,
    truncate_state,
    weighted_average,
)

RUN_ID = 7


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process sets before its strategy builds Messages."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in state.items()})


def to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def reply(node_id: int, state: Mapping[str, np.ndarray], num_examples, **metrics) -> Message:
    """A train reply from ``node_id``, built the way a ClientApp builds one."""
    instruction = Message(RecordDict(), node_id, MessageType.TRAIN)
    content = RecordDict(
        {"arrays": to_record(state), "metrics": MetricRecord({"num-examples": num_examples, **metrics})}
    )
    return Message(content, reply_to=instruction)


def error_reply(node_id: int) -> Message:
    instruction = Message(RecordDict(), node_id, MessageType.TRAIN)
    return Message(Error(code=1, reason="device lost"), reply_to=instruction)


class LoopbackGrid(Grid):
    """A Grid whose nodes are in-process functions: a transport test double only.

    Each client maps an instruction Message to reply content (RecordDict or
    Error); replies are ready as soon as a message is pushed, so no call waits.
    """

    def __init__(self, clients: Mapping[int, Callable[[Message], RecordDict | Error]]) -> None:
        self._clients = dict(clients)
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's InMemoryGrid does
            self.sent.append(message)
            out = self._clients[message.metadata.dst_node_id](message)
            self._replies[message.metadata.message_id] = Message(out, reply_to=message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def sent_to(self, node_id: int, message_type: str = MessageType.TRAIN) -> list[Message]:
        return [m for m in self.sent if m.metadata.dst_node_id == node_id and m.metadata.message_type == message_type]


def numpy_client(step: float, num_examples: int, corrupt: bool = False) -> Callable[[Message], RecordDict]:
    """Adds ``step`` to every trainable array (A too unless frozen); honors "freeze-lora-a"."""

    def run(message: Message) -> RecordDict:
        n = num_examples
        if message.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord({"num-examples": n, "eval-loss": step})})
        config = message.content["config"]
        state = to_state(message.content["arrays"])
        frozen = config.get(FREEZE_LORA_A_KEY, False)
        out = {k: v if (frozen and k.endswith(".lora_a")) else v + step for k, v in state.items()}
        if corrupt:
            out = {k: v * np.nan for k, v in out.items()}
        return RecordDict({"arrays": to_record(out), "metrics": MetricRecord({"num-examples": n, "train-loss": step})})

    return run


RNG = np.random.default_rng(0)


def adapter_state(rank: int, n_in: int = 4, n_out: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "enc.lora_a": rng.normal(size=(n_in, rank)),
        "enc.lora_b": rng.normal(size=(rank, n_out)),
        "classifier.weight": rng.normal(size=(n_out, 2)),
        "classifier.bias": rng.normal(size=(2,)),
    }


def best_rank_r(delta: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


# --- plain functions -----------------------------------------------------------------


def test_weighted_average_by_hand():
    got = weighted_average([np.array([1.0, 2.0]), np.array([5.0, 10.0])], [1, 3])
    np.testing.assert_array_equal(got, [(1 + 15) / 4, (2 + 30) / 4])
    assert weighted_average([np.float32([1]), np.float32([3])], [1, 1]).dtype == np.float32
    with pytest.raises(ValueError, match="shapes"):
        weighted_average([np.zeros(2), np.zeros(3)], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([np.zeros(2)], [0])


def test_pad_and_truncate_rank():
    a, b = np.arange(6.0).reshape(3, 2), np.arange(8.0).reshape(2, 4)
    pa, pb = pad_rank(a, b, 5)
    assert pa.shape == (3, 5) and pb.shape == (5, 4)
    np.testing.assert_array_equal(pa[:, 2:], 0)
    np.testing.assert_array_equal(pb[2:], 0)
    np.testing.assert_array_equal(pa @ pb, a @ b)
    ta, tb = truncate_rank(pa, pb, 1)
    np.testing.assert_array_equal(ta, a[:, :1])
    np.testing.assert_array_equal(tb, b[:1])
    with pytest.raises(ValueError):
        pad_rank(a, b, 1)
    with pytest.raises(ValueError):
        truncate_rank(a, b, 3)
    with pytest.raises(ValueError, match="LoRA pair"):
        pad_rank(a, b.T, 4)


@pytest.mark.parametrize("split", ["sqrt", "a", "b"])
def test_svd_factors_are_the_best_rank_r_approximation(split):
    delta = RNG.normal(size=(6, 5))
    a, b = svd_factors(delta, 3, split)
    assert a.shape == (6, 3) and b.shape == (3, 5)
    np.testing.assert_allclose(a @ b, best_rank_r(delta, 3), atol=1e-12)
    # Singular values are sorted, so a prefix of the factors is the best lower-rank one.
    a2, b2 = truncate_rank(a, b, 2)
    np.testing.assert_allclose(a2 @ b2, best_rank_r(delta, 2), atol=1e-12)


def test_svd_factors_sqrt_split_and_padding_past_full_rank():
    delta = RNG.normal(size=(3, 2))
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    a, b = svd_factors(delta, 4)
    np.testing.assert_allclose(a[:, :2], u * np.sqrt(s))
    np.testing.assert_allclose(b[:2], np.sqrt(s)[:, None] * vt)
    np.testing.assert_array_equal(a[:, 2:], 0)
    np.testing.assert_array_equal(b[2:], 0)
    np.testing.assert_allclose(a @ b, delta, atol=1e-12)


# --- FedIT ------------------------------------------------------------------------------


def test_fedit_is_a_hand_weighted_average_of_a_and_b_separately():
    s1 = {"l.lora_a": np.full((2, 1), 1.0), "l.lora_b": np.full((1, 3), 2.0), "classifier.bias": np.array([0.0, 4.0])}
    s2 = {"l.lora_a": np.full((2, 1), 5.0), "l.lora_b": np.full((1, 3), 6.0), "classifier.bias": np.array([8.0, 0.0])}
    arrays, metrics = FedIT().aggregate_train(1, [reply(1, s1, 1, loss=1.0), reply(2, s2, 3, loss=5.0)])
    got = to_state(arrays)
    np.testing.assert_allclose(got["l.lora_a"], np.full((2, 1), (1 + 15) / 4))
    np.testing.assert_allclose(got["l.lora_b"], np.full((1, 3), (2 + 18) / 4))
    np.testing.assert_allclose(got["classifier.bias"], [24 / 4, 4 / 4])
    assert metrics["loss"] == pytest.approx(4.0)


# --- FFA-LoRA ---------------------------------------------------------------------------


def test_ffa_lora_sends_freeze_key_keeps_a_and_averages_b():
    initial = adapter_state(2)
    grid = LoopbackGrid({1: numpy_client(1, 1), 2: numpy_client(3, 3)})
    strategy = FFALoRA()
    caller_config = ConfigRecord({"lr": 0.1})
    messages = list(strategy.configure_train(1, to_record(initial), caller_config, grid))
    assert all(m.content["config"][FREEZE_LORA_A_KEY] is True for m in messages)
    assert dict(caller_config) == {"lr": 0.1}  # the caller's config is not mutated

    # Node 2 ignores the freeze and changes A anyway; the server keeps the initial A.
    s1 = {k: v + (0 if k.endswith(".lora_a") else 1.0) for k, v in initial.items()}
    s2 = {k: v + 3.0 for k, v in initial.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, s1, 1), reply(2, s2, 3)])
    got = to_state(arrays)
    np.testing.assert_array_equal(got["enc.lora_a"], initial["enc.lora_a"])
    np.testing.assert_allclose(got["enc.lora_b"], initial["enc.lora_b"] + (1 * 1 + 3 * 3) / 4)
    np.testing.assert_allclose(got["classifier.weight"], initial["classifier.weight"] + 2.5)


# --- FlexLoRA ---------------------------------------------------------------------------


def test_flexlora_equals_fedit_delta_when_clients_share_a():
    """Shared A: mean(A @ B_i) = A @ mean(B_i), which is FedIT's ΔW, and has rank ≤ r."""
    base = adapter_state(2)
    s1 = dict(base)
    s2 = {**base, "enc.lora_b": base["enc.lora_b"] * -2 + 1, "classifier.bias": base["classifier.bias"] + 4}
    replies = lambda: [reply(1, s1, 2), reply(2, s2, 6)]  # noqa: E731
    fedit = to_state(FedIT().aggregate_train(1, replies())[0])
    flex = to_state(FlexLoRA().aggregate_train(1, replies())[0])
    np.testing.assert_allclose(
        flex["enc.lora_a"] @ flex["enc.lora_b"], fedit["enc.lora_a"] @ fedit["enc.lora_b"], atol=1e-12
    )
    np.testing.assert_allclose(
        fedit["enc.lora_a"] @ fedit["enc.lora_b"],
        base["enc.lora_a"] @ (0.25 * s1["enc.lora_b"] + 0.75 * s2["enc.lora_b"]),
        atol=1e-12,
    )
    for key in ("classifier.weight", "classifier.bias"):
        np.testing.assert_allclose(flex[key], fedit[key])


def test_flexlora_heterogeneous_ranks_svd_and_per_node_configure():
    s1, s2 = adapter_state(1, n_in=5, n_out=4, seed=1), adapter_state(2, n_in=5, n_out=4, seed=2)
    mean_delta = (1 * s1["enc.lora_a"] @ s1["enc.lora_b"] + 3 * s2["enc.lora_a"] @ s2["enc.lora_b"]) / 4
    strategy = FlexLoRA(node_ranks={1: 1, 2: 2})
    grid = LoopbackGrid({1: numpy_client(0, 1), 2: numpy_client(0, 3), 3: numpy_client(0, 1)})
    initial = adapter_state(3, n_in=5, n_out=4)  # its rank, 3, is the global rank
    list(strategy.configure_train(1, to_record(initial), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, [reply(1, s1, 1), reply(2, s2, 3)])
    got = to_state(arrays)
    assert got["enc.lora_a"].shape == (5, 3) and got["enc.lora_b"].shape == (3, 4)
    # The mean of a rank-1 and a rank-2 ΔW has rank ≤ 3: the global factors hold it exactly.
    np.testing.assert_allclose(got["enc.lora_a"] @ got["enc.lora_b"], mean_delta, atol=1e-12)
    np.testing.assert_allclose(got["classifier.bias"], (s1["classifier.bias"] + 3 * s2["classifier.bias"]) / 4)

    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(), grid)}
    for node, rank in ((1, 1), (2, 2), (3, 3)):  # node 3 is unknown: global rank
        sent = to_state(messages[node].content["arrays"])
        assert sent["enc.lora_a"].shape == (5, rank) and sent["enc.lora_b"].shape == (rank, 4)
        assert messages[node].content["config"][LORA_RANK_KEY] == rank
        np.testing.assert_allclose(sent["enc.lora_a"] @ sent["enc.lora_b"], best_rank_r(mean_delta, rank), atol=1e-12)
        u, s, vt = np.linalg.svd(mean_delta, full_matrices=False)  # the documented sqrt split (up to sign)
        np.testing.assert_allclose(np.abs(sent["enc.lora_a"]), np.abs(u[:, :rank] * np.sqrt(s[:rank])), atol=1e-10)


def test_flexlora_learns_node_rank_from_reply():
    strategy = FlexLoRA()
    strategy.aggregate_train(1, [reply(5, adapter_state(1), 1), reply(6, adapter_state(2), 1)])
    assert strategy.node_ranks == {5: 1, 6: 2}


# --- HetLoRA ----------------------------------------------------------------------------


def test_hetlora_equals_fedit_when_ranks_are_equal():
    s1, s2 = adapter_state(2, seed=3), adapter_state(2, seed=4)
    fedit = to_state(FedIT().aggregate_train(1, [reply(1, s1, 2), reply(2, s2, 5)])[0])
    het = to_state(HetLoRA().aggregate_train(1, [reply(1, s1, 2), reply(2, s2, 5)])[0])
    assert het.keys() == fedit.keys()
    for key in het:
        np.testing.assert_allclose(het[key], fedit[key])


def test_hetlora_pads_then_truncates():
    a1, b1 = np.array([[1.0], [2.0]]), np.array([[1.0, 1.0, 1.0]])
    a2, b2 = np.array([[3.0, 4.0], [5.0, 6.0]]), np.array([[2.0, 2.0, 2.0], [8.0, 8.0, 8.0]])
    s1 = {"l.lora_a": a1, "l.lora_b": b1}
    s2 = {"l.lora_a": a2, "l.lora_b": b2}
    strategy = HetLoRA(node_ranks={1: 1, 2: 2})
    got = to_state(strategy.aggregate_train(1, [reply(1, s1, 1), reply(2, s2, 3)])[0])
    # Column 0: both clients; column 1: node 1 contributes zeros (its padding).
    np.testing.assert_allclose(got["l.lora_a"], [[(1 + 9) / 4, 12 / 4], [(2 + 15) / 4, 18 / 4]])
    np.testing.assert_allclose(got["l.lora_b"], [[(1 + 6) / 4] * 3, [24 / 4] * 3])

    grid = LoopbackGrid({1: numpy_client(0, 1), 2: numpy_client(0, 3)})
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, to_record(got), ConfigRecord(), grid)}
    np.testing.assert_allclose(to_state(messages[1].content["arrays"])["l.lora_a"], [[10 / 4], [17 / 4]])
    np.testing.assert_allclose(to_state(messages[1].content["arrays"])["l.lora_b"], [[7 / 4] * 3])
    np.testing.assert_allclose(to_state(messages[2].content["arrays"])["l.lora_a"], got["l.lora_a"])


def test_hetlora_sparsity_weighted_and_prune_gamma():
    s1 = {"l.lora_a": np.array([[1.0]]), "l.lora_b": np.array([[3.0]])}  # ‖ΔW‖ = 3
    s2 = {"l.lora_a": np.array([[1.0, 0.0]]), "l.lora_b": np.array([[1.0], [5.0]])}  # ‖ΔW‖ = 1
    got = hetlora_aggregate([s1, s2], [100, 1], sparsity_weighted=True)
    np.testing.assert_allclose(got["l.lora_a"], [[(3 * 1 + 1 * 1) / 4, 0.0]])
    np.testing.assert_allclose(got["l.lora_b"], [[(3 * 3 + 1 * 1) / 4], [(1 * 5) / 4]])

    grid = LoopbackGrid({1: numpy_client(0, 1), 2: numpy_client(0, 1)})
    messages = HetLoRA(prune_gamma=0.9).configure_train(1, to_record(s2), ConfigRecord(), grid)
    assert all(m.content["config"][PRUNE_GAMMA_KEY] == 0.9 for m in messages)


def test_module_functions_match_each_other():
    states = [adapter_state(2, seed=5), adapter_state(2, seed=6)]
    het = hetlora_aggregate(states, [1, 2])
    flex = flexlora_aggregate(states, [1, 2], {"enc": 3})
    assert flex["enc.lora_a"].shape == (4, 3)
    np.testing.assert_allclose(flex["classifier.weight"], het["classifier.weight"])
    cut = truncate_state(het, 1)
    assert cut["enc.lora_a"].shape == (4, 1) and cut["classifier.bias"] is het["classifier.bias"]


# --- stock strategies on adapters ------------------------------------------------------


def test_stock_fedavg_on_adapter_records():
    s1, s2 = adapter_state(2, seed=7), adapter_state(2, seed=8)
    got = to_state(FedAvg().aggregate_train(1, [reply(1, s1, 1), reply(2, s2, 4)])[0])
    for key in s1:
        np.testing.assert_allclose(got[key], (s1[key] + 4 * s2[key]) / 5)


def test_stock_fedadam_on_adapter_records():
    current = adapter_state(2, seed=9)
    strategy = make_strategy("fedadam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    grid = LoopbackGrid({1: numpy_client(0, 1), 2: numpy_client(0, 1)})
    list(strategy.configure_train(1, to_record(current), ConfigRecord(), grid))
    s1 = {k: v + 1.0 for k, v in current.items()}
    s2 = {k: v + 3.0 for k, v in current.items()}
    got = to_state(strategy.aggregate_train(1, [reply(1, s1, 1), reply(2, s2, 1)])[0])
    delta = 2.0  # mean update
    m, v = 0.1 * delta, 0.01 * delta**2
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    for key in current:
        np.testing.assert_allclose(got[key], current[key] + eta_norm * m / (np.sqrt(v) + 1e-3))


def test_metric_aggregation_is_flowers_to_the_bit():
    """The metric averaging every strategy gets (it reads the records directly) gives Flower's own
    ``aggregate_metricrecords`` result exactly: same keys, same floats, lists included."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    rng = np.random.default_rng(3)
    replies = [reply(n, adapter_state(2, seed=n), int(rng.integers(1, 50)), loss=float(rng.normal()),
                     device=n, curve=[float(v) for v in rng.normal(size=3)]) for n in range(1, 40)]
    contents = [r.content for r in replies]
    ours, flowers = aggregate_metrics(contents, "num-examples"), aggregate_metricrecords(contents, "num-examples")
    assert dict(ours) == dict(flowers) and set(ours) == {"loss", "device", "curve"}
    # scalars only (what devices send): summed a key at a time over all replies, still Flower's floats
    scalars = [reply(n, adapter_state(2, seed=n), int(rng.integers(1, 50)), loss=float(rng.normal() * 1e3),
                     device=n, wall=float(rng.exponential())).content for n in range(1, 600)]
    ours, flowers = aggregate_metrics(scalars, "num-examples"), aggregate_metricrecords(scalars, "num-examples")
    assert dict(ours) == dict(flowers) and set(ours) == {"loss", "device", "wall"}
    assert FedIT().aggregate_evaluate(1, replies) == FedAvg().aggregate_evaluate(1, replies)


def test_reply_checks_refuse_what_flowers_refuse():
    from flwr.serverapp.exception import InconsistentMessageReplies
    good = [reply(1, adapter_state(2, seed=1), 3), reply(2, adapter_state(2, seed=2), 5)]
    assert checked_replies(FedIT(), good + [error_reply(3)], is_train=True) == good
    other_keys = reply(4, {"other": np.ones(2, np.float32)}, 2)
    no_weight = reply(5, adapter_state(2, seed=5), 1)
    no_weight.content["metrics"] = MetricRecord({"loss": 1.0})
    for bad in (other_keys, no_weight):
        for strategy in (FedIT(), FedAvg()):
            with pytest.raises(InconsistentMessageReplies):
                strategy.aggregate_train(1, good + [bad])


# --- the guard ---------------------------------------------------------------------------


def guarded_fedit_after_configure(initial, nodes=(1, 2, 3, 4, 5, 6, 7)) -> Guarded:
    strategy = Guarded(FedIT(min_train_nodes=1, min_available_nodes=1))
    grid = LoopbackGrid({n: numpy_client(0, 1) for n in nodes})
    list(strategy.configure_train(1, to_record(initial), ConfigRecord(), grid))
    return strategy


def test_guard_excludes_and_counts_bad_replies(caplog):
    initial = adapter_state(2)
    strategy = guarded_fedit_after_configure(initial)
    good1 = {k: v + 1 for k, v in initial.items()}
    good2 = {k: v + 3 for k, v in initial.items()}
    nan = {**initial, "enc.lora_b": initial["enc.lora_b"] * np.nan}
    inf = {**initial, "classifier.bias": np.array([np.inf, 0.0])}
    wrong_shape = {**initial, "enc.lora_a": np.zeros((4, 3))}
    missing_key = {k: v for k, v in initial.items() if k != "classifier.bias"}
    replies = [
        reply(1, good1, 1),
        reply(2, good2, 3),
        reply(3, nan, 100),
        reply(4, inf, 100),
        reply(5, wrong_shape, 100),
        reply(6, missing_key, 100),
        error_reply(7),
    ]
    with caplog.at_level(logging.WARNING, logger="fleet.strategies"):
        arrays, _ = strategy.aggregate_train(1, replies)
    # the error reply (a device that did not answer) is left out silently: the round driver counts it under
    # its cause; the guard counts and logs only replies that arrived and are unfit
    assert strategy.rejected == {"nan": 2, "shape": 2}
    assert len([r for r in caplog.records if "rejected reply" in r.getMessage()]) == 4
    got = to_state(arrays)
    for key in initial:
        np.testing.assert_allclose(got[key], initial[key] + 2.5)

    # A second round with one bad reply: last round vs total.
    strategy.aggregate_train(2, [reply(1, good1, 1), reply(2, nan, 1)])
    assert strategy.rejected == {"nan": 1}
    assert strategy.rejected_total == {"nan": 3, "shape": 2}


def test_guard_rejects_malformed_and_unexpected_replies():
    initial = adapter_state(2)
    strategy = guarded_fedit_after_configure(initial, nodes=(1, 2))
    no_weight = Message(
        RecordDict({"arrays": to_record(initial), "metrics": MetricRecord({"loss": 1.0})}),
        reply_to=Message(RecordDict(), 1, MessageType.TRAIN),
    )
    stranger = reply(99, initial, 1)  # a node that was sent nothing
    zero_weight = reply(2, initial, 0)
    assert strategy.aggregate_train(1, [no_weight, stranger, zero_weight]) == (None, None)
    assert strategy.rejected == {"error": 3}


def test_guard_drops_minority_metric_keys_instead_of_failing_the_round():
    initial = adapter_state(2)
    strategy = guarded_fedit_after_configure(initial, nodes=(1, 2, 3))
    replies = [reply(1, initial, 1, loss=1.0), reply(2, initial, 1, loss=2.0), reply(3, initial, 1, accuracy=0.5)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["loss"] == pytest.approx(1.5)
    assert strategy.rejected == {"error": 1}


def test_guard_rank_flexibility():
    sent = {"l.lora_a": (4, 3), "l.lora_b": (3, 2)}
    lower = reply(1, {"l.lora_a": np.ones((4, 2)), "l.lora_b": np.ones((2, 2))}, 1)
    mismatched = reply(1, {"l.lora_a": np.ones((4, 2)), "l.lora_b": np.ones((1, 2))}, 1)
    higher = reply(1, {"l.lora_a": np.ones((4, 4)), "l.lora_b": np.ones((4, 2))}, 1)
    good, rejected = filter_replies([lower], sent)
    assert not good and rejected == {"shape": 1}
    good, rejected = filter_replies([lower], sent, rank_flexible=True)
    assert len(good) == 1 and not rejected
    good, rejected = filter_replies([mismatched, higher], {1: sent}, rank_flexible=True)
    assert not good and rejected == {"shape": 2}
    assert Guarded(FlexLoRA()).rank_flexible and not Guarded(FedIT()).rank_flexible


def test_all_bad_round_keeps_global_state_through_start():
    initial = adapter_state(2)
    grid = LoopbackGrid({1: numpy_client(1, 1, corrupt=True), 2: numpy_client(3, 3, corrupt=True)})
    strategy = make_strategy("fedit")
    result = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=2)
    assert strategy.rejected_total == {"nan": 4}
    assert len(result.arrays) == 0  # no round produced arrays
    round2 = grid.sent_to(1)[1]
    assert round2.content["config"]["server-round"] == 2
    for key, value in to_state(round2.content["arrays"]).items():
        np.testing.assert_array_equal(value, initial[key])


# --- factory ---------------------------------------------------------------------------


def test_make_strategy_names_options_and_errors():
    for name in STRATEGIES:
        strategy = make_strategy(name)
        assert isinstance(strategy, Guarded) and isinstance(strategy.strategy, Strategy)
    assert isinstance(make_strategy("fedadam", guard=False), FedAdam)
    assert make_strategy("fedprox", proximal_mu=0.5).strategy.proximal_mu == 0.5
    assert make_strategy("flexlora", node_ranks={1: 2}, fraction_train=0.5).strategy.fraction_train == 0.5
    with pytest.raises(ValueError, match="fedavg.*hetlora"):
        make_strategy("fedsgd")
    with pytest.raises(TypeError, match="fedit"):
        make_strategy("fedit", proximal_mu=0.1)


# --- the real Strategy.start() loop ---------------------------------------------------------


def run_two_rounds(name: str, initial: dict, **options):
    grid = LoopbackGrid({1: numpy_client(1.0, 1), 2: numpy_client(3.0, 3), 3: numpy_client(2.0, 4)})
    strategy = make_strategy(name, **options)
    result = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=2)
    assert strategy.rejected_total == {}
    assert result.evaluate_metrics_clientapp[2]["eval-loss"] == pytest.approx((1 * 1 + 3 * 3 + 4 * 2) / 8)
    assert result.train_metrics_clientapp[1]["train-loss"] == pytest.approx(18 / 8)
    return grid, to_state(result.arrays)


@pytest.mark.parametrize("name", ["fedavg", "fedit", "fedprox", "fedavgm"])
def test_start_loop_uniform(name):
    initial = adapter_state(2)
    _, got = run_two_rounds(name, initial, **({"proximal_mu": 0.01} if name == "fedprox" else {}))
    for key in initial:
        np.testing.assert_allclose(got[key], initial[key] + 2 * 18 / 8)


def test_start_loop_ffa_lora():
    initial = adapter_state(2)
    grid, got = run_two_rounds("ffa-lora", initial)
    assert all(m.content["config"][FREEZE_LORA_A_KEY] for m in grid.sent_to(1))
    np.testing.assert_array_equal(got["enc.lora_a"], initial["enc.lora_a"])
    np.testing.assert_allclose(got["enc.lora_b"], initial["enc.lora_b"] + 2 * 18 / 8)


@pytest.mark.parametrize(
    ("name", "aggregate"),
    [("flexlora", lambda s, w: flexlora_aggregate(s, w, {"enc": 4})), ("hetlora", hetlora_aggregate)],
)
def test_start_loop_heterogeneous_ranks(name, aggregate):
    ranks = {1: 1, 2: 2, 3: 4}
    steps, weights = {1: 1.0, 2: 3.0, 3: 2.0}, {1: 1, 2: 3, 3: 4}
    initial = adapter_state(4, n_in=6, n_out=5)
    grid, got = run_two_rounds(name, initial, node_ranks=ranks)
    assert got["enc.lora_a"].shape == (6, 4)

    expected = initial  # replay the two rounds with the plain functions
    for round_ in (1, 2):
        for node, rank in ranks.items():
            sent = to_state(grid.sent_to(node)[round_ - 1].content["arrays"])
            assert sent["enc.lora_a"].shape == (6, rank)
            np.testing.assert_allclose(sent["enc.lora_a"], expected["enc.lora_a"][:, :rank], atol=1e-12)
        states = [{k: v + steps[n] for k, v in truncate_state(expected, ranks[n]).items()} for n in ranks]
        expected = aggregate(states, [weights[n] for n in ranks])
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-10)
    evaluated = to_state(grid.sent_to(1, MessageType.EVALUATE)[0].content["arrays"])
    assert evaluated["enc.lora_a"].shape == (6, 1)


def test_replies_from_a_hosts_stack_are_checked_and_averaged_a_stack_at_a_time():
    """Replies whose arrays crossed from a host stacked (rows of one array per name) are checked for NaN and
    averaged per stack: the same verdicts as reply by reply, and FedAvg's mean up to the last bits."""
    from device_runtime.protocol import JobResult, decode_results, encode_results
    from fleet.arrays import stacked_records
    from fleet.messages import reply_from_result
    states = [adapter_state(2, seed=s) for s in range(6)]
    states[4] = {k: np.full_like(v, np.nan) if i == 0 else v for i, (k, v) in enumerate(states[4].items())}
    results = decode_results(encode_results([JobResult(d, "train", arrays=st, num_examples=d + 1, loss=0.1,
                                                       loss_after=0.1) for d, st in enumerate(states)]))
    replies = [reply_from_result(Message(RecordDict(), 100 + d, MessageType.TRAIN), r)
               for d, r in enumerate(results)]
    records = [next(iter(r.content.array_records.values())) for r in replies]
    groups = stacked_records(records)
    assert len(groups) == 1 and groups[0][1] == list(range(6))  # one host call's stacks, taken whole
    shuffled = [records[i] for i in (3, 0, 5, 1, 4, 2)]  # replies in another order: the same stacks, no copy
    ((stacks, positions),) = stacked_records(shuffled)
    assert stacks is groups[0][0] and [shuffled[p] for p in positions] == records
    records[2]["extra"] = records[2][next(iter(states[0]))]  # a record changed after it arrived: its own group
    assert [positions for _, positions in stacked_records(records)] == [[0, 1, 3, 4, 5], [2]]
    del records[2]["extra"]
    good, rejected = filter_replies(replies, {k: v.shape for k, v in states[0].items()})
    assert rejected == {"nan": 1} and [r.metadata.src_node_id for r in good] == [100, 101, 102, 103, 105]
    ours = to_state(FedIT().aggregate_train(1, good)[0])
    stock = to_state(FedAvg().aggregate_train(1, [reply(i, states[i], i + 1) for i in (0, 1, 2, 3, 5)])[0])
    for k in stock:
        np.testing.assert_allclose(ours[k], stock[k], rtol=1e-6, atol=1e-7)
        assert ours[k].dtype == stock[k].dtype
