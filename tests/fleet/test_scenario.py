"""The scenario schema: shipped scenarios, every kind of error, defaults, overrides, round trips."""
from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fleet.scenario
from fleet.scenario import (AGGREGATION_DEFAULTS, ZOO_MODELS, DeviceGroup, Dropout, Periodic, Scenario,
                            ScenarioError, load_scenario, parse_scenario)

SHIPPED_RUNTIMES, SHIPPED_METRICS = fleet.scenario.AVAILABLE_RUNTIMES, fleet.scenario.METRICS_AVAILABLE


@pytest.fixture(autouse=True)
def whole_schema(monkeypatch):
    """These tests check the schema itself, including tables whose features are refused at load until they
    land (test_a_runtime_that_has_not_landed_is_refused_at_load checks the refusal)."""
    monkeypatch.setattr(fleet.scenario, "AVAILABLE_RUNTIMES", fleet.scenario.RUNTIMES)
    monkeypatch.setattr(fleet.scenario, "METRICS_AVAILABLE", True)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "scenarios").glob("*.toml"))

MINIMAL = {
    "name": "tiny",
    "model": {"name": "cct-digits"},
    "fleet": {"groups": [{"count": 3}]},
}


def parse(raw: dict) -> Scenario:
    return parse_scenario(raw, source="scenario.toml")


def changed(edit) -> dict:
    """A copy of a small valid scenario with ``edit(raw)`` applied."""
    raw = copy.deepcopy({
        "name": "base",
        "seed": 7,
        "model": {"name": "cct-digits"},
        "tuning": {"strategy": "lora", "rank": 4, "targets": ["*attn*"], "train": ["classifier.*"]},
        "training": {"rounds": 3, "fraction": 0.5, "local_steps": 5},
        "aggregation": {"strategy": "fedit"},
        "data": {"kind": "digits"},
        "fleet": {"groups": [{"name": "a", "count": 10, "memory_kib": 256},
                             {"name": "b", "count": 5, "memory_kib": 512}]},
    })
    edit(raw)
    return raw


def error_of(raw: dict) -> str:
    with pytest.raises(ScenarioError) as caught:
        parse(raw)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith("scenario.toml: "), message
    return message


# ---- shipped scenarios -----------------------------------------------------------------------------------

def test_there_are_shipped_scenarios():
    names = {path.stem for path in SHIPPED}
    assert {"quickstart", "digits-1000", "hetero-memory", "deep-ae-anomaly", "long-resume", "boards-qemu"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenario_validates_and_round_trips(path):
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert parse_scenario(tomllib.loads(scenario.to_toml())) == scenario
    assert parse_scenario(json.loads(json.dumps(scenario.to_dict()))) == scenario


def test_shipped_scenarios_say_what_the_brief_asks():
    quick = load_scenario(REPO / "scenarios/quickstart.toml")
    assert (quick.model.name, quick.tuning.strategy, quick.tuning.rank) == ("cct-digits", "lora", 4)
    assert quick.tuning.train == ("classifier.*",) and quick.aggregation.strategy == "fedit"
    assert (quick.training.rounds, quick.training.fraction, quick.training.local_steps,
            quick.training.batch_size) == (5, 0.5, 10, 16)
    assert 40 <= quick.device_count <= 60
    assert load_scenario(REPO / "scenarios/digits-1000.toml").device_count == 1000
    hetero = load_scenario(REPO / "scenarios/hetero-memory.toml")
    assert len({g.memory_kib for g in hetero.fleet.groups}) == 3
    assert hetero.tuning.rank_from_memory and hetero.aggregation.strategy == "hetlora"
    anomaly = load_scenario(REPO / "scenarios/deep-ae-anomaly.toml")
    assert (anomaly.model.name, anomaly.data.kind, anomaly.device_count) == ("deep-ae", "machine-sound", 200)
    assert load_scenario(REPO / "scenarios/long-resume.toml").training.rounds >= 100
    boards = load_scenario(REPO / "scenarios/boards-qemu.toml")
    assert [b.qemu for b in boards.fleet.boards] == [True, True] and boards.fleet.groups
    assert boards.training.fraction == 1.0  # every round shows the boards beside the simulated devices


def test_zoo_names_and_data_shapes_agree_with_the_compiler():
    from compiler import zoo
    from fleet.data import DIGITS_SHAPE, SOUND_FEATURES
    assert set(ZOO_MODELS) == set(zoo.names())
    assert zoo.input_shape("cct-digits") == DIGITS_SHAPE
    assert zoo.input_shape("deep-ae") == (SOUND_FEATURES,)


# ---- defaults --------------------------------------------------------------------------------------------

def test_minimal_scenario_gets_documented_defaults():
    s = parse(MINIMAL)
    assert s.seed == 0 and s.run_dir == "runs/tiny"
    assert s.model.pretrain_steps == 200
    assert (s.tuning.strategy, s.tuning.rank, s.tuning.alpha, s.tuning.targets, s.tuning.init) == \
        ("lora", 4, 4.0, ("auto",), "zero_b")  # the compiler's own LoRA defaults (alpha = rank)
    assert (s.training.rounds, s.training.local_steps, s.training.local_epochs) == (10, 10, None)
    assert s.aggregation.strategy == "fedavg"
    assert (s.data.kind, s.data.samples_per_device, s.data.anomaly_fraction) == ("digits", 32, None)
    group = s.fleet.groups[0]
    assert group == DeviceGroup(name="group0", count=3)
    assert (s.ray.address, s.ray.actors) == (None, 2)
    assert (s.metrics.enabled, s.metrics.address) == (False, None)


def test_strategy_defaults_are_resolved_and_others_left_unset():
    s = parse(changed(lambda r: r.update(aggregation={"strategy": "fedadam"})))
    assert (s.aggregation.server_lr, s.aggregation.beta_1, s.aggregation.tau) == (0.1, 0.9, 1e-9)
    assert s.aggregation.proximal_mu is None and s.aggregation.server_momentum is None
    assert set(AGGREGATION_DEFAULTS) == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                                        "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
                                        "fedit", "ffa-lora", "flexlora", "hetlora"}
    from fleet.strategies import STRATEGIES
    assert set(STRATEGIES) == set(AGGREGATION_DEFAULTS)  # every name a scenario can choose can be built


def test_local_epochs_replaces_local_steps():
    def epochs(raw):
        del raw["training"]["local_steps"]
        raw["training"]["local_epochs"] = 2
    s = parse(changed(epochs))
    assert (s.training.local_steps, s.training.local_epochs) == (None, 2)


def test_availability_kinds():
    s = parse(changed(lambda r: (
        r["fleet"]["groups"][0].update(availability={"kind": "dropout", "p": 0.25}),
        r["fleet"]["groups"][1].update(availability={"kind": "periodic", "on_rounds": 2, "off_rounds": 1}))))
    assert s.fleet.groups[0].availability == Dropout(p=0.25)
    assert s.fleet.groups[1].availability == Periodic(on_rounds=2, off_rounds=1, phase="random")


def test_a_runtime_that_has_not_landed_is_refused_at_load(monkeypatch):
    """Every runtime has landed (boards are [[fleet.boards]]); the gate that refused a runtime at load until its
    backend landed still works: one line when the scenario loads, not a failure at the first round."""
    assert SHIPPED_RUNTIMES == fleet.scenario.RUNTIMES and SHIPPED_METRICS
    monkeypatch.setattr(fleet.scenario, "AVAILABLE_RUNTIMES", ("numpy",))
    assert ('fleet.groups[0].runtime: "qemu" devices are not available in fleet runs yet (available: "numpy")'
            in error_of(changed(lambda r: r["fleet"]["groups"][0].update(runtime="qemu"))))


def test_metrics_address_enables_metrics():
    s = parse(changed(lambda r: r.update(metrics={"address": "0.0.0.0:9000"})))
    assert (s.metrics.enabled, s.metrics.address) == (True, "0.0.0.0:9000")
    s = parse(changed(lambda r: r.update(metrics={"enabled": True})))
    assert s.metrics.address == "127.0.0.1:9464"


def test_group_ranges_number_devices_group_after_group():
    s = parse(changed(lambda r: None))
    assert [(g.name, r) for g, r in s.fleet.group_ranges()] == [("a", range(0, 10)), ("b", range(10, 15))]


# ---- errors ----------------------------------------------------------------------------------------------

def test_the_example_from_the_brief():
    raw = changed(lambda r: r["fleet"]["groups"][1].update(memory_kib="big"))
    assert error_of(raw) == 'scenario.toml: fleet.groups[1].memory_kib: expected an integer >= 1, got "big"'


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.update(trainng=r.pop("training")),
     "unknown key 'trainng.rounds' (did you mean 'training.rounds'?)"),
    (lambda r: r.update(sed=1), "unknown key 'sed' (did you mean 'seed'?)"),
    (lambda r: r["fleet"]["groups"][1].update(memroy_kib=3),
     "unknown key 'fleet.groups[1].memroy_kib' (did you mean 'fleet.groups[1].memory_kib'?)"),
    (lambda r: r["tuning"].update(rnak=2), "unknown key 'tuning.rnak' (did you mean 'tuning.rank'?)"),
    (lambda r: r["fleet"]["groups"][0].update(availability={"kind": "dropout", "prob": 0.1}),
     "unknown key 'fleet.groups[0].availability.prob' (did you mean 'fleet.groups[0].availability.p'?)"),
    (lambda r: r.update(zzzzz=1), "unknown key 'zzzzz'; expected one of: name, seed, run_dir"),
], ids=["section", "top", "group", "tuning", "availability", "no-suggestion"])
def test_unknown_keys_are_named_with_a_suggestion(edit, expected):
    assert expected in error_of(changed(edit))


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["training"].update(rounds=True), "training.rounds: expected an integer >= 1, got true"),
    (lambda r: r["training"].update(lr="fast"), 'training.lr: expected a number > 0, got "fast"'),
    (lambda r: r["tuning"].update(targets="*attn*"),
     'tuning.targets: expected a list of glob patterns (at least one), got "*attn*"'),
    (lambda r: r["tuning"].update(bias_only="yes"), 'tuning.bias_only: expected true or false, got "yes"'),
    (lambda r: r.update(seed=1.5), "seed: expected an integer in [0, "),
    (lambda r: r.update(model="cct-digits"), 'model: expected a table, got "cct-digits"'),
    (lambda r: r["fleet"].update(groups={"count": 1}), "fleet.groups: expected an array of tables"),
    (lambda r: r["fleet"]["groups"][0].update(availability="always"),
     'fleet.groups[0].availability: expected a table, got "always"'),
    (lambda r: r["aggregation"].update(strategy="fedavgg"),
     'aggregation.strategy: expected one of "fedavg", "fedprox"'),
    (lambda r: r["model"].update(name="cct-digit"), '(did you mean "cct-digits"?)'),
    (lambda r: r.update(name="my run"), 'name: expected a name of letters, digits'),
    (lambda r: r["fleet"]["groups"][0].update(target="Siracusa"), "fleet.groups[0].target: expected a target"),
    (lambda r: r.update(metrics={"address": "localhost"}), 'metrics.address: expected a "host:port" address'),
], ids=["bool-for-int", "str-for-float", "str-for-list", "str-for-bool", "float-for-int", "str-for-table",
        "table-for-array", "availability", "choice", "model", "name", "target", "address"])
def test_wrong_types_are_named(edit, expected):
    assert expected in error_of(changed(edit))


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["training"].update(fraction=0), "training.fraction: expected a number in (0, 1], got 0"),
    (lambda r: r["training"].update(fraction=1.5), "training.fraction: expected a number in (0, 1], got 1.5"),
    (lambda r: r["training"].update(momentum=1.0), "training.momentum: expected a number in [0, 1), got 1.0"),
    (lambda r: r["fleet"]["groups"][1].update(memory_kib=0),
     "fleet.groups[1].memory_kib: expected an integer >= 1, got 0"),
    (lambda r: r["fleet"]["groups"][0].update(count=0), "fleet.groups[0].count: expected an integer >= 1, got 0"),
    (lambda r: r["fleet"]["groups"][0].update(availability={"kind": "dropout", "p": 1.0}),
     "fleet.groups[0].availability.p: expected a number in [0, 1), got 1.0"),
    (lambda r: r["fleet"]["groups"][0].update(availability={"kind": "periodic", "on_rounds": 2, "off_rounds": 1,
                                                            "phase": 3}),
     'fleet.groups[0].availability.phase: expected "random" or an integer in [0, 2], got 3'),
    (lambda r: r["fleet"]["groups"][0].update(link_kbps=float("nan")),
     "fleet.groups[0].link_kbps: expected a number > 0"),
    (lambda r: r["fleet"]["groups"][0].update(deadline_s=-1),
     "fleet.groups[0].deadline_s: expected a number > 0, got -1"),
    (lambda r: r.update(metrics={"address": "localhost:70000"}), "metrics.address: expected a port in [0, 65535]"),
    (lambda r: r["tuning"].update(rank=0), "tuning.rank: expected an integer >= 1, got 0"),
    (lambda r: r["data"].update(dirichlet_alpha=0), "data.dirichlet_alpha: expected a number > 0, got 0"),
], ids=["fraction-0", "fraction-big", "momentum", "memory", "count", "p", "phase", "nan", "deadline", "port",
        "rank", "alpha"])
def test_out_of_range_values_are_named(edit, expected):
    assert expected in error_of(changed(edit))


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.pop("name"), "name: missing required key, expected a name"),
    (lambda r: r.pop("model"), "model: missing required key, expected a table"),
    (lambda r: r["model"].pop("name"), "model.name: missing required key, expected a zoo model"),
    (lambda r: r.pop("fleet"), "fleet: missing required key"),
    (lambda r: r["fleet"].pop("groups"), "fleet.groups: missing required key"),
    (lambda r: r["fleet"].update(groups=[]),
     "fleet.groups: expected an array of tables ([[fleet.groups]]), at least one, got []"),
    (lambda r: r["fleet"]["groups"][1].pop("count"),
     "fleet.groups[1].count: missing required key, expected an integer >= 1"),
    (lambda r: r["fleet"]["groups"][0].update(availability={"kind": "dropout"}),
     "fleet.groups[0].availability.p: missing required key"),
    (lambda r: r.update(data={"kind": "npz"}), "data.path: missing required key"),
], ids=["name", "model", "model.name", "fleet", "groups", "empty-groups", "count", "p", "npz-path"])
def test_missing_required_keys_are_named(edit, expected):
    assert expected in error_of(changed(edit))


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["tuning"].update(strategy="full") or r["tuning"].clear() or r["tuning"].update(strategy="full"),
     'aggregation.strategy: "fedit" aggregates LoRA adapters and needs tuning.strategy = "lora", got "full"'),
    (lambda r: r.update(tuning={"strategy": "selective", "train": ["classifier.*"]},
                        aggregation={"strategy": "hetlora"}),
     'aggregation.strategy: "hetlora" aggregates LoRA adapters and needs tuning.strategy = "lora"'),
    (lambda r: r["tuning"].update(rank_from_memory=True),
     'tuning.rank_from_memory: devices of different rank need aggregation.strategy "flexlora" or "hetlora", '
     'got "fedit"'),
    (lambda r: r["tuning"].update(init="random") or r["aggregation"].update(strategy="ffa-lora"),
     'tuning.init: "ffa-lora" keeps A frozen at its random start and needs B to start at zero '
     '(init = "zero_b" or "gaussian"), got "random"'),
    # the compiler's schema is the scenario's: an init the compiler does not know is refused at load
    (lambda r: r["tuning"].update(init="zero_a"),
     'tuning.init: expected one of "zero_b", "gaussian", "random", got "zero_a"'),
    (lambda r: r["tuning"].update(strategy="full"),
     'tuning.rank: only used when strategy is "lora", got strategy = "full"'),
    (lambda r: r.update(tuning={"strategy": "selective"}, aggregation={}),
     'tuning.train: strategy "selective" needs at least one of train, last_k or bias_only = true'),
    (lambda r: r["aggregation"].update(proximal_mu=0.1),
     'aggregation.proximal_mu: only used when strategy is "fedprox", got strategy = "fedit"'),
    (lambda r: r["data"].update(path="somewhere"), 'data.path: only used when kind is "npz", got kind = "digits"'),
    (lambda r: r["data"].update(anomaly_fraction=0.1),
     'data.anomaly_fraction: only used when kind is "machine-sound", got kind = "digits"'),
    (lambda r: r["model"].update(name="deep-ae"),
     'data.kind: model "deep-ae" needs one of "machine-sound", "npz", got "digits"'),
    (lambda r: r["data"].update(kind="machine-sound"),
     'data.kind: model "cct-digits" needs one of "digits", "npz", got "machine-sound"'),
    (lambda r: r["model"].update(name="ds-cnn") or r["data"].update(kind="machine-sound"),
     'model.name: data.kind "machine-sound" needs one of "deep-ae" or an .onnx model, got "ds-cnn"'),
    (lambda r: r["training"].update(local_epochs=1),
     "training.local_epochs: set exactly one of local_steps and local_epochs"),
    (lambda r: r["training"].update(batch_size=64),
     "training.batch_size: expected an integer <= data.samples_per_device (32), got 64"),
    (lambda r: r["fleet"]["groups"][0].update(port="/dev/ttyUSB0"),
     "unknown key 'fleet.groups[0].port'"),
    (lambda r: r["fleet"]["groups"][0].update(runtime="serial"),
     "fleet.groups[0].runtime: boards on serial lines are listed as [[fleet.boards]]"),
    (lambda r: r["fleet"]["groups"][1].update(name="a"),
     'fleet.groups[1].name: expected a unique group name, got "a" (also fleet.groups[0])'),
    (lambda r: r["fleet"]["groups"][0].update(availability={"kind": "always", "p": 0.5}),
     'fleet.groups[0].availability.p: only used when kind is "dropout", got kind = "always"'),
], ids=["fedit-needs-lora", "hetlora-needs-lora", "rank-from-memory", "ffa-lora-init", "init-unknown", "full-has-no-rank",
        "selective-selects", "proximal-mu", "path-only-npz", "anomaly-only-sound", "deep-ae-data",
        "cct-digits-data", "sound-model", "steps-and-epochs", "batch-size", "group-port", "group-serial",
        "unique-names", "availability-keys"])
def test_rules_across_keys_are_named(edit, expected):
    assert expected in error_of(changed(edit))


def test_load_scenario_names_the_file(tmp_path):
    path = tmp_path / "scenario.toml"
    path.write_text('name = "x"\n[model]\nname = "cct-digits"\n[[fleet.groups]]\ncount = "many"\n')
    with pytest.raises(ScenarioError, match=r"^.*scenario\.toml: fleet\.groups\[0\]\.count: expected an integer "
                                            r'>= 1, got "many"$'):
        load_scenario(path)
    path.write_text("name = \n")
    with pytest.raises(ScenarioError, match=r"scenario\.toml: not valid TOML: "):
        load_scenario(path)
    with pytest.raises(ScenarioError, match=r"missing\.toml: cannot read"):
        load_scenario(tmp_path / "missing.toml")


def test_relative_paths_are_resolved_against_the_scenario_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "own.toml"
    path.write_text('name = "own"\n[model]\nname = "models/net.onnx"\n[data]\nkind = "npz"\npath = "data"\n'
                    '[[fleet.groups]]\ncount = 2\ntarget = "targets/board.toml"\n')
    s = load_scenario(path)
    assert Path(s.model.name) == tmp_path / "sub" / "models" / "net.onnx" and s.model.is_onnx
    assert Path(s.data.path) == tmp_path / "sub" / "data"
    assert Path(s.fleet.groups[0].target) == tmp_path / "sub" / "targets" / "board.toml"
    assert s.run_dir == "runs/own"
    assert load_scenario_from_text(tmp_path, s.to_toml()) == s  # resolved paths stay put


def load_scenario_from_text(directory: Path, text: str) -> Scenario:
    copy_path = directory / "elsewhere.toml"
    copy_path.write_text(text)
    return load_scenario(copy_path)


# ---- round trip and overrides ----------------------------------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda r: None,
    lambda r: r.update(tuning={"strategy": "full"}, aggregation={"strategy": "fedprox", "proximal_mu": 0.5}),
    lambda r: r.update(tuning={"strategy": "selective", "last_k": 2, "bias_only": True},
                       aggregation={"strategy": "fedavgm"}),
    lambda r: r.update(model={"name": "deep-ae"}, data={"kind": "machine-sound", "anomaly_fraction": 0.2}),
    lambda r: r.update(data={"kind": "npz", "path": "/data/fleet"}),
    lambda r: r["fleet"].update(boards=[{"name": "board", "port": "socket://localhost:5000", "baud": 921600,
                                         "resource": "lab-node-3", "step_timeout_s": 5},
                                        {"name": "emu", "qemu": True, "target": "siracusa-small-l2"}]),
    lambda r: r.update(ray={"address": "auto", "actors": 8}, metrics={"address": "[::1]:9464"}),
], ids=["base", "full-fedprox", "selective", "sound", "npz", "serial", "ray-metrics"])
def test_to_dict_round_trips(edit):
    s = parse(changed(edit))
    assert parse_scenario(s.to_dict()) == s
    assert parse_scenario(tomllib.loads(s.to_toml())) == s
    assert parse_scenario(json.loads(json.dumps(s.to_dict()))) == s


def test_to_dict_does_not_share_state_with_the_scenario():
    s = parse(changed(lambda r: None))
    d = s.to_dict()
    d["tuning"]["targets"].append("x")
    d["fleet"]["groups"][0]["count"] = 99
    assert s.tuning.targets == ("*attn*",) and s.fleet.groups[0].count == 10


def test_overrides_rounds_and_run_dir():
    s = parse(changed(lambda r: None))
    t = s.with_overrides(rounds=50, run_dir="/tmp/elsewhere")
    assert (t.training.rounds, t.run_dir) == (50, "/tmp/elsewhere")
    assert (s.training.rounds, s.run_dir) == (3, "runs/base")  # the original is untouched
    assert s.with_overrides() == s
    with pytest.raises(ScenarioError, match=r"^override: training\.rounds: expected an integer >= 1, got 0$"):
        s.with_overrides(rounds=0)


def test_override_devices_scales_groups_in_proportion():
    s = parse(changed(lambda r: r["fleet"]["groups"].append({"name": "c", "count": 5})))  # 10, 5, 5
    assert [g.count for g in s.with_overrides(devices=1000).fleet.groups] == [500, 250, 250]
    assert [g.count for g in s.with_overrides(devices=7).fleet.groups] == [3, 2, 2]  # 3.5, 1.75, 1.75
    assert [g.count for g in s.with_overrides(devices=3).fleet.groups] == [1, 1, 1]
    scaled = s.with_overrides(devices=1001)
    assert scaled.device_count == 1001
    assert [g.memory_kib for g in scaled.fleet.groups] == [256, 512, None]  # only counts change
    with pytest.raises(ScenarioError, match=r"^override: devices: expected an integer >= 3 \(one per simulated "
                                            r"group\), got 2$"):
        s.with_overrides(devices=2)


def test_override_devices_keeps_physical_boards():
    s = parse(changed(lambda r: r["fleet"].update(boards=[{"name": "board", "port": "/dev/ttyUSB0"}])))
    scaled = s.with_overrides(devices=101)
    assert [g.count for g in scaled.fleet.groups] == [67, 33]
    assert scaled.fleet.boards == s.fleet.boards and scaled.device_count == 101
    with pytest.raises(ScenarioError, match=r"^override: devices: expected an integer >= 3 \(one per simulated "
                                            r"group plus 1 boards\), got 2$"):
        s.with_overrides(devices=2)


def test_boards_are_numbered_after_the_groups_and_take_defaults():
    s = parse(changed(lambda r: r["fleet"].update(boards=[{"name": "b0", "qemu": True},
                                                          {"name": "b1", "port": "/dev/ttyUSB0"}])))
    assert s.device_count == 17
    assert [(b.name, i) for b, i in s.fleet.board_indices()] == [("b0", 15), ("b1", 16)]
    b0, b1 = s.fleet.boards
    assert (b0.port, b0.qemu, b0.baud, b0.target, b0.ray_resource) == (None, True, 115200, "siracusa", "board:b0")
    assert (b1.port, b1.qemu, b1.step_timeout_s) == ("/dev/ttyUSB0", False, 60.0)


def test_board_program_paths_are_resolved_against_the_scenario_file(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text('name = "lab"\n[model]\nname = "cct-digits"\n[[fleet.groups]]\ncount = 2\n'
                    '[[fleet.boards]]\nname = "b0"\nport = "/dev/ttyUSB0"\nprogram = "build/cct"\n')
    assert load_scenario(path).fleet.boards[0].program == str(tmp_path / "build" / "cct")


@pytest.mark.parametrize("board, expected", [
    ({"name": "b"}, 'fleet.boards[0].port: missing required key, expected the board\'s port'),
    ({"name": "b", "qemu": True, "port": "/dev/pts/1"}, "fleet.boards[0].port: not used with qemu = true"),
    ({"port": "/dev/ttyUSB0"}, "fleet.boards[0].name: missing required key"),
    ({"name": "a", "qemu": True}, 'fleet.boards[0].name: expected a name no group or other board has, got "a" '
                                  '(also fleet.groups[0])'),
    ({"name": "b", "qemu": True, "baud": 100000}, "fleet.boards[0].baud: expected a standard baud rate"),
    ({"name": "b", "qemu": "yes"}, 'fleet.boards[0].qemu: expected true or false, got "yes"'),
    ({"name": "b", "qemu": True, "resource": "board 1"}, "fleet.boards[0].resource: expected a Ray resource name"),
    ({"name": "b", "qemu": True, "step_timeout_s": 0}, "fleet.boards[0].step_timeout_s: expected a number > 0"),
    ({"name": "b", "qemu": True, "prot": 1}, "unknown key 'fleet.boards[0].prot' (did you mean "
                                             "'fleet.boards[0].port'?)"),
], ids=["no-port", "port-and-qemu", "no-name", "name-taken", "baud", "qemu-type", "resource", "timeout", "typo"])
def test_board_errors_are_named(board, expected):
    assert expected in error_of(changed(lambda r: r["fleet"].update(boards=[board])))


@pytest.mark.parametrize("key, value", [("name", "b0"), ("port", "/dev/ttyUSB0"), ("resource", "node-1")])
def test_two_boards_cannot_share_a_name_port_or_resource(key, value):
    boards = [{"name": "b0", "port": "/dev/ttyUSB0", "resource": "node-1"},
              {"name": "b1", "port": "/dev/ttyUSB1", "resource": "node-2"}]
    boards[1][key] = value
    assert (f"fleet.boards[1].{key}: expected one board per {key}, got \"{value}\" (also fleet.boards[0])"
            in error_of(changed(lambda r: r["fleet"].update(boards=boards))))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=6), st.integers(0, 20_000))
def test_override_devices_totals_exactly(counts, extra):
    raw = changed(lambda r: r["fleet"].update(groups=[{"name": f"g{i}", "count": c} for i, c in enumerate(counts)]))
    devices = len(counts) + extra
    groups = parse(raw).with_overrides(devices=devices).fleet.groups
    assert sum(g.count for g in groups) == devices
    assert all(g.count >= 1 for g in groups)
    total = sum(counts)
    for group, weight in zip(groups, counts):
        share = devices * weight / total
        if all(devices * c / total >= 1 for c in counts):  # no group was lifted to its minimum of one
            assert abs(group.count - share) < 1


def test_gvsoc_group_needs_gvsoc_and_a_siracusa_target(monkeypatch, tmp_path):
    """A runtime = "gvsoc" group is checked at load: GVSoC must be found (one line saying how to point edgefleet at
    one) and the group's target must be a siracusa target (its firmware is the siracusa ELF)."""
    from device_runtime.gvsoc import GVSOC_ENV, GVSOC_HINT
    monkeypatch.setattr(fleet.scenario, "AVAILABLE_RUNTIMES", SHIPPED_RUNTIMES)
    monkeypatch.delenv(GVSOC_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    gvsoc_group = changed(lambda r: r["fleet"]["groups"][0].update(runtime="gvsoc"))
    assert error_of(gvsoc_group) == f"scenario.toml: fleet.groups[0].runtime: {GVSOC_HINT}"
    fake = tmp_path / "gvsoc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert parse(gvsoc_group).fleet.groups[0].runtime == "gvsoc"
    monkeypatch.setenv(GVSOC_ENV, str(tmp_path / "missing"))
    assert f"fleet.groups[0].runtime: {GVSOC_ENV} names" in error_of(gvsoc_group)
    monkeypatch.setenv(GVSOC_ENV, str(fake))
    on_qemu = changed(lambda r: r["fleet"]["groups"][0].update(runtime="gvsoc", target="rv32-qemu"))
    assert 'fleet.groups[0].target: runtime = "gvsoc" runs the siracusa firmware' in error_of(on_qemu)


SPARSE_GROUPS = {"groups": [{"name": "a", "count": 2, "memory_kib": 256}, {"name": "b", "count": 2}]}


@pytest.mark.parametrize("tuning, groups, match", [
    ({"strategy": "sparse", "sparse_from_memory": True}, SPARSE_GROUPS,
     r"^test: fleet\.groups\[1\]\.memory_kib: tuning\.sparse_from_memory chooses each group's sparse scheme"),
    ({"strategy": "sparse"}, None, r"^test: tuning\.sparse: strategy \"sparse\" needs either a sparse table"),
    ({"strategy": "sparse", "sparse": {"classifier": "1/4"}, "sparse_from_memory": True}, None,
     r"^test: tuning\.sparse: strategy \"sparse\" needs either"),
    ({"strategy": "sparse", "sparse": {"classifier": "half"}}, None, r"^test: tuning\.sparse: sparse choice 'half'"),
    ({"strategy": "sparse", "sparse": {"classifier": "1/4"}, "rank": 4}, None,
     r"^test: tuning\.rank: only used when strategy is \"lora\""),
])
def test_sparse_tuning_errors_are_one_line(tuning, groups, match):
    raw = {"name": "s", "model": {"name": "ds-cnn"}, "tuning": tuning, "data": {"kind": "digits"},
           "fleet": groups or {"groups": [{"name": "a", "count": 2}]}}
    with pytest.raises(ScenarioError, match=match) as exc:
        parse_scenario(raw, source="test")
    assert "\n" not in str(exc.value)


def test_sparse_tuning_round_trips():
    for tuning in ({"strategy": "sparse", "sparse_from_memory": True, "train": ["classifier.*"]},
                   {"strategy": "sparse", "sparse": {"blocks.3.pw": "1/4", "classifier": "all"}}):
        raw = {"name": "s", "model": {"name": "ds-cnn"}, "tuning": tuning, "data": {"kind": "digits"},
               "fleet": {"groups": [{"name": "a", "count": 2, "memory_kib": 300}]}}
        s = parse_scenario(raw, source="test")
        assert s.tuning.strategy == "sparse"
        again = parse_scenario({**raw, "tuning": s.to_dict()["tuning"]}, source="test")
        assert again.tuning == s.tuning
