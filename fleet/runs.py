"""The run directory: scenario.toml, metrics.jsonl, checkpoints/round-N.npz (no pickle), state.json,
summary.json, manifest.json and lock. It survives a crash at any point:

- Files are replaced atomically (a temporary file, fsync, rename, fsync of the directory).
- metrics.jsonl is appended a round at a time in one write; every line ends in its own CRC-32
  (``"crc32": "…"``, over the line's bytes before that field). A torn or corrupt tail (a full disk, a kill
  mid-write) is cut off on resume, with the records of rounds that no checkpoint holds.
- manifest.json holds the SHA-256 of scenario.toml (and its values), of the base model and of every
  checkpoint. ``resume`` verifies them: a changed scenario is refused naming the keys that differ (unless
  they are safe to change and allowed); a checkpoint that is missing, undecodable or not the one written is
  named, and the run resumes from the newest valid one.
- ``lock`` holds an flock on ``lock`` (with the holder's PID in it) for the process's lifetime: a second
  process is refused with one line; a dead holder's lock is free (the kernel drops it) and is taken over.
- Non-finite numbers are written as ``null`` with the record's ``"nonfinite"`` table naming each such field
  and its value ("nan", "inf", "-inf"), so the file is strict JSON; ``metrics()`` gives the floats back.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import time
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SCENARIO = "scenario.toml"
METRICS = "metrics.jsonl"
STATE = "state.json"
SUMMARY = "summary.json"
LOG = "run.log"
MANIFEST = "manifest.json"
LOCK = "lock"
CHECKPOINTS = "checkpoints"
CRC_KEY = "crc32"
NONFINITE_KEY = "nonfinite"
_CRC_FIELD = f'"{CRC_KEY}":"'.encode()  # a line's CRC field up to its 8 hex digits
# Scenario keys a resumed run may change (with --allow-changes): they do not change what a finished round
# computed, only how many rounds follow or where the work runs.
SAFE_CHANGES = ("training.rounds", "ray.actors", "ray.devices_per_call", "ray.address", "metrics.enabled",
                "metrics.address", "run_dir")

_HELD_LOCKS: dict[Path, int] = {}  # run directory → lock file descriptor held by this process


class RunError(RuntimeError):
    """A run directory problem; one line naming the cause and the file."""


# ---- atomic files -------------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes | memoryview, sync_dir: bool = True) -> None:
    """``path`` holds either its old content or ``data``, whatever happens (power loss included). With
    ``sync_dir`` False the rename is made durable by a later directory fsync (``save_checkpoint`` leaves
    the run directory's to ``write_state``: a checkpoint or manifest entry lost to a power cut falls back to
    the previous round on resume)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise RunError(f"{path}: cannot write ({error.strerror or error})") from None
    if sync_dir:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a dict of arrays (e.g. the base model)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


# ---- metrics records ----------------------------------------------------------------------------------------

def encode_record(record: Mapping[str, Any]) -> bytes:
    """One metrics.jsonl line: strict JSON, non-finite numbers as null + "nonfinite", CRC-32 at the end."""
    try:
        body = _RECORD_ENCODER.encode(record).encode()
    except ValueError:
        flags: dict[str, str] = {}
        clean = _finite_only(record, "", flags)
        clean[NONFINITE_KEY] = flags
        body = _RECORD_ENCODER.encode(clean).encode()
    head = body[:-1] + b"," if len(body) > 2 else body[:-1]
    return b"%s%s%08x\"}\n" % (head, _CRC_FIELD, zlib.crc32(head))


def decode_record(line: bytes) -> dict[str, Any] | None:
    """The record of a line written by ``encode_record``; None if it is torn or corrupt."""
    cut = line.rfind(_CRC_FIELD)
    if cut < 0 or not line.endswith(b'"}\n') or len(line) - cut != len(_CRC_FIELD) + 11:
        return None
    if b"%08x" % zlib.crc32(line[:cut]) != line[cut + len(_CRC_FIELD):-3]:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    record.pop(CRC_KEY)
    for path, text in record.pop(NONFINITE_KEY, {}).items():
        _set_path(record, path, float(text))
    return record


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Inf)."""
    return _finite_only(value, "", {})


def _decode_legacy(line: bytes) -> dict[str, Any] | None:
    """A line of a metrics.jsonl written before records carried a CRC: whole lines of JSON."""
    if not line.endswith(b"\n"):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def _finite_only(value: Any, path: str, flags: dict[str, str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _finite_only(v, f"{path}.{k}" if path else str(k), flags) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_finite_only(v, f"{path}.{i}", flags) for i, v in enumerate(list(value))]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        flags[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    return value


def _set_path(record: dict, path: str, value: float) -> None:
    keys = path.split(".")
    node: Any = record
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# one encoder for every record: json.dumps with options builds a new JSONEncoder per call, which at 20,000
# records a round (10,000 devices) costs more than their CRCs
_RECORD_ENCODER = json.JSONEncoder(allow_nan=False, default=_plain, separators=(",", ":"))


# ---- the run directory --------------------------------------------------------------------------------------

@dataclass
class Resume:
    """Where a resumed run continues: the newest round whose checkpoint is valid (round 0 with no arrays when
    the run was stopped before its first checkpoint), and what was wrong."""
    scenario_toml: str
    rounds_completed: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    problems: list[str] = field(default_factory=list)   # one line each: a skipped checkpoint, a cut tail


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._manifest: dict[str, Any] | None = None  # manifest.json as last written by this process

    # ---- lock -------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the run directory for this process (until it exits); a live holder → RunError."""
        key = self.path.resolve()
        if key in _HELD_LOCKS:
            return
        path = self.path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{self.path}: in use by process {holder} (lock file {path}); wait for it to end "
                           "or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD_LOCKS[key] = fd

    def unlock(self) -> None:
        fd = _HELD_LOCKS.pop(self.path.resolve(), None)
        if fd is not None:
            os.close(fd)

    # ---- creation / resume ------------------------------------------------------------------------------
    def create(self, scenario_toml: str) -> None:
        """A new run directory (call only once the scenario is validated and the fleet fits)."""
        if self.path.exists() and any(p.name != LOCK for p in self.path.iterdir()):
            raise RunError(f"run directory {self.path} already holds a run; use --resume {self.path} or "
                           "another --run-dir")
        (self.path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.lock()
        atomic_write(self.path / SCENARIO, scenario_toml.encode())
        self._write_manifest({"version": 1, "scenario": self._scenario_entry(scenario_toml), "base": None,
                              "checkpoints": {}})
        self.write_state({"rounds_completed": 0, "finished": False})

    def resume(self, allow_changes: Sequence[str] = ()) -> Resume:
        """Lock, verify scenario.toml against the manifest, cut metrics back to the newest valid checkpoint."""
        if not (self.path / STATE).exists() and not (self.path / SCENARIO).exists():
            raise RunError(f"{self.path}: not an edgefleet run directory (no {STATE})")
        self.lock()
        state = self.state()  # a finished run is verified too (the caller may extend it with more rounds)
        text = self.scenario_text()
        self.accept_scenario(text, allow_changes)
        problems: list[str] = []
        done = int(state["rounds_completed"])
        arrays: dict[str, np.ndarray] = {}
        strategy_state: dict[str, np.ndarray] = {}
        for round_ in range(done, -1, -1):
            if round_ == 0 and self.checkpoint_path(0).name not in self.manifest()["checkpoints"]:
                break  # killed before the first checkpoint: the run starts over from its initial arrays
            try:
                arrays, strategy_state = self.load_checkpoint(round_)
                break
            except RunError as error:
                problems.append(f"{error}; resuming from an earlier round")
        else:
            raise RunError(f"{self.path / CHECKPOINTS}: no valid checkpoint ({'; '.join(problems)})")
        cut = self.truncate_metrics(round_)
        if cut:
            problems.append(cut)
        if round_ != done:
            self.write_state({"rounds_completed": round_, "finished": False})
            self.log(f"resuming from round {round_}: " + "; ".join(problems))
        return Resume(text, round_, arrays, strategy_state, problems)

    def scenario_text(self) -> str:
        path = self.path / SCENARIO
        try:
            return path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise RunError(f"{path}: missing; not an edgefleet run directory") from None
        except UnicodeDecodeError as error:
            raise RunError(f"{path}: not UTF-8 text (byte {error.start})") from None

    def accept_scenario(self, scenario_toml: str, allow_changes: Sequence[str] = ()) -> None:
        """Check ``scenario_toml`` against the one the run started with; write it if it differs only in
        allowed keys. A key outside SAFE_CHANGES cannot be allowed."""
        unsafe = sorted(set(allow_changes) - set(SAFE_CHANGES))
        if unsafe:
            raise RunError(f"--allow-changes: {', '.join(unsafe)} cannot change during a run (safe to change: "
                           f"{', '.join(SAFE_CHANGES)})")
        manifest = self.manifest()
        recorded = manifest.get("scenario") or {}
        entry = self._scenario_entry(scenario_toml)
        if entry["sha256"] == recorded.get("sha256"):
            return
        changed = _differing_keys(recorded.get("values", {}), entry["values"])
        refused = [k for k in changed if k not in allow_changes]
        if refused:
            hint = (f" (--allow-changes {' '.join(k for k in refused if k in SAFE_CHANGES)} to accept)"
                    if all(k in SAFE_CHANGES for k in refused) else "")
            raise RunError(f"{self.path / SCENARIO}: changed since the run started: {', '.join(refused)}{hint}")
        atomic_write(self.path / SCENARIO, scenario_toml.encode())
        manifest["scenario"] = entry
        self._write_manifest(manifest)

    def write_scenario(self, scenario_toml: str) -> None:
        """The run's scenario after an allowed change (more rounds); the manifest follows it."""
        self.accept_scenario(scenario_toml, SAFE_CHANGES)

    def log(self, line: str) -> None:
        """One timestamped line in run.log: what happened to the run, for people reading it later."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.path / LOG, "a", encoding="utf-8") as f:
                f.write(f"{stamp} {line}\n")
        except OSError:
            pass  # a note for people: never the reason a run stops

    def _scenario_entry(self, scenario_toml: str) -> dict[str, Any]:
        try:
            values = tomllib.loads(scenario_toml)
        except tomllib.TOMLDecodeError as error:
            raise RunError(f"{self.path / SCENARIO}: not valid TOML ({error})") from None
        return {"sha256": hashlib.sha256(scenario_toml.encode()).hexdigest(), "values": values}

    # ---- manifest ---------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if self._manifest is not None:
            return self._manifest
        path = self.path / MANIFEST
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            raise RunError(f"{path}: missing (a run directory from before integrity manifests?)") from None
        except ValueError as error:
            raise RunError(f"{path}: corrupt ({error})") from None

    def _write_manifest(self, manifest: dict[str, Any], sync_dir: bool = True) -> None:
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode(), sync_dir)
        self._manifest = manifest if self.path.resolve() in _HELD_LOCKS else None  # cached while we own the run

    def check_base(self, base: Mapping[str, np.ndarray]) -> None:
        """Record the base model's digest (first call) or verify it (resume): a resumed run must train the
        adapters on the same base."""
        manifest = self.manifest()
        digest = state_digest(base)
        if manifest.get("base") is None:
            manifest["base"] = digest
            self._write_manifest(manifest)
        elif manifest["base"] != digest:
            raise RunError(f"{self.path / MANIFEST}: the base model differs from the one this run started with "
                           f"(sha256 {digest[:12]}…, recorded {manifest['base'][:12]}…)")

    # ---- state ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        path = self.path / STATE
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            raise RunError(f"{self.path}: no {STATE}; not an edgefleet run directory") from None
        except ValueError as error:
            raise RunError(f"{path}: corrupt ({error})") from None

    def write_state(self, state: Mapping[str, Any]) -> None:
        atomic_write(self.path / STATE, json.dumps(state, indent=1).encode())

    # ---- metrics ----------------------------------------------------------------------------------------
    def append_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append whole records in one write; a failure leaves at most a torn tail (cut on resume)."""
        data = b"".join(encode_record(r) for r in records)
        path = self.path / METRICS
        try:
            with open(path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            raise RunError(f"{path}: cannot append ({error.strerror or error})") from None

    def metrics(self) -> list[dict[str, Any]]:
        """Every intact record, in order (reading stops at a torn or corrupt line)."""
        return [record for _, record in self._scan()]

    def _scan(self) -> Iterable[tuple[int, dict[str, Any]]]:
        """(end offset, record) per intact line, up to the first bad one."""
        path = self.path / METRICS
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        offset = 0
        legacy = not data.startswith(b"{") or f'"{CRC_KEY}":"'.encode() not in data.split(b"\n", 1)[0]
        for line in data.splitlines(keepends=True):
            record = _decode_legacy(line) if legacy else decode_record(line)
            if record is None:
                return
            offset += len(line)
            yield offset, record

    def truncate_metrics(self, rounds_completed: int) -> str:
        """Cut metrics.jsonl after the records of ``rounds_completed`` (a torn tail and the records of rounds
        to be run again); returns a line saying what was cut ("" if nothing)."""
        path = self.path / METRICS
        if not path.exists():
            return ""
        size = path.stat().st_size
        keep = 0
        for end, record in self._scan():
            if record.get("round", 0) > rounds_completed:
                break
            keep = end
        if keep == size:
            return ""
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
        return f"{path}: cut {size - keep} bytes after round {rounds_completed} (a torn tail or unfinished round)"

    # ---- checkpoints ------------------------------------------------------------------------------------
    def checkpoint_path(self, round_: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{round_:04d}.npz"

    def save_checkpoint(self, round_: int, arrays: Mapping[str, np.ndarray],
                        strategy_state: Mapping[str, np.ndarray]) -> Path:
        """The checkpoint (hashed from the bytes written, never read back) and its manifest entry, each
        atomic. The checkpoints directory is fsynced here; the manifest's rename becomes durable with the
        next fsync of the run directory (``write_state``'s, which follows every round): until then a power
        cut can only lose this round, and resume falls back to the previous one."""
        path = self.checkpoint_path(round_)
        buffer = io.BytesIO()
        np.savez(buffer, **{f"arrays/{k}": v for k, v in arrays.items()},
                 **{f"strategy/{k}": v for k, v in strategy_state.items()})
        data = buffer.getbuffer()
        atomic_write(path, data, sync_dir=False)
        manifest = self.manifest()
        manifest["checkpoints"][path.name] = hashlib.sha256(data).hexdigest()
        self._write_manifest(manifest, sync_dir=False)
        _fsync_dir(path.parent)
        return path

    def load_checkpoint(self, round_: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        path = self.checkpoint_path(round_)
        expected = self.manifest()["checkpoints"].get(path.name)
        if expected is None:
            raise RunError(f"{path}: not in {MANIFEST} (never completed)")
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise RunError(f"{path}: missing") from None
        if digest != expected:
            raise RunError(f"{path}: not the checkpoint this run wrote (sha256 {digest[:12]}…, "
                           f"recorded {expected[:12]}…)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                items = {k: npz[k] for k in npz.files}
        except Exception as error:  # a zip, npy or pickle refusal: all mean "cannot decode"
            raise RunError(f"{path}: cannot decode checkpoint ({type(error).__name__}: {error})") from None
        arrays = {k[len("arrays/"):]: v for k, v in items.items() if k.startswith("arrays/")}
        state = {k[len("strategy/"):]: v for k, v in items.items() if k.startswith("strategy/")}
        return arrays, state

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write(self.path / SUMMARY, json.dumps(finite_json(summary), indent=1, default=_plain).encode())


def _differing_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted key paths whose values differ (lists of tables compared item by item)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differing_keys(a, b, path + ".")
        elif (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
              and all(isinstance(x, Mapping) and isinstance(y, Mapping) for x, y in zip(a, b))):
            for i, (x, y) in enumerate(zip(a, b)):
                out += _differing_keys(x, y, f"{path}[{i}].")
        elif a != b:
            out.append(path)
    return out
