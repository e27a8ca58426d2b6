"""GVSoC: the device backend's parsing on real GVSoC transcripts (data/gvsoc/, captured with GVSoC's siracusa
target, see the .json beside each), the executable lookup, and, only where GVSoC is configured ($EDGEFLEET_GVSOC
or gvsoc on PATH), training on GVSoC against the numpy executor. GVSoC is on no package registry: these last
tests are the one accepted skip of the suite (README, "Tests")."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from compiler import compile_model
from compiler.targets import load_target, lower_to_target
from device_runtime import NumpyDevice
from device_runtime.device import DeviceError
from device_runtime.gvsoc import (GVSOC_ENV, GVSOC_HINT, GvsocDevice, find_gvsoc, firmware_exit_code, parse_profile,
                                  parse_transcript)
from device_runtime.qemu import MODE_TRAIN, OUT_HEADER, STEP_RECORD, TRAILER, _cause, decode_out
from tests.codegen.programs import AE_LORA, data_for, rel_diff

DATA = Path(__file__).parent / "data" / "gvsoc"
GVSOC_STEPS = 2
GVSOC_RTOL = 1e-4


def _saved(name: str) -> tuple[str, dict]:
    return (DATA / f"{name}.txt").read_text(), json.loads((DATA / f"{name}.json").read_text())


def test_reply_of_a_real_transcript_decodes_to_the_recorded_run():
    text, meta = _saved("cct-digits-lora-2steps")
    reply = parse_transcript(text)
    magic, _version, fingerprint, mode, steps, params_bytes, _out, _record = OUT_HEADER.unpack_from(reply)
    assert (magic, mode, steps) == (b"EFOT", MODE_TRAIN, meta["steps"])
    assert params_bytes == sum(size for _, size in meta["out_ranges"])
    out = decode_out(reply, MODE_TRAIN, fingerprint, steps, params_bytes, 0)
    np.testing.assert_allclose(out.losses, meta["numpy_losses"], rtol=GVSOC_RTOL)   # the numpy executor's losses
    assert out.cycles.tolist() == meta["step_cycles"]
    assert out.instructions.tolist() == meta["step_instructions"]
    assert (out.cycles > out.instructions).all()      # cluster core 0 stalls on L2 loads: CPI > 1
    assert len(out.params) == params_bytes and np.isfinite(np.frombuffer(out.params, np.float32)).all()
    assert reply.endswith(TRAILER.pack(b"EFND", steps))
    assert len(reply) == OUT_HEADER.size + steps * STEP_RECORD.itemsize + params_bytes + TRAILER.size


def test_profile_of_a_real_transcript_covers_every_program_step():
    text, meta = _saved("cct-digits-lora-2steps")
    profile = parse_profile(text)
    assert sorted(profile) == list(range(meta["train_steps"]))
    total = sum(profile.values())
    recorded = sum(meta["step_cycles"])
    assert 0.99 * recorded <= total <= recorded      # the steps' cycles, less the profiling marks themselves


def test_transcript_errors_are_one_line():
    with pytest.raises(DeviceError, match="no reply"):
        parse_transcript("hello\n")
    with pytest.raises(DeviceError, match="line 2 is not hex"):
        parse_transcript("EFO 00\nEFO zz\n")
    with pytest.raises(DeviceError, match="line 1 is not a profile line"):
        parse_profile("EFP 1\n")
    broken = parse_transcript(_saved("cct-digits-lora-2steps")[0])[:-3]
    with pytest.raises(DeviceError, match="truncated"):
        fingerprint = struct.unpack_from("<I", broken, 8)[0]
        decode_out(broken, MODE_TRAIN, fingerprint, 2, 7168, 0)


def test_a_failed_run_names_the_firmware_exit_code_and_cause():
    text = (DATA / "bad-job-exit-11.txt").read_text()
    assert firmware_exit_code(text) == 11
    assert _cause(11, text.encode()) == "job: bad header"
    assert firmware_exit_code("EFO 00\n") is None


def test_missing_gvsoc_is_one_line_saying_how_to_point_at_it(monkeypatch, tmp_path):
    monkeypatch.delenv(GVSOC_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceError) as err:
        find_gvsoc()
    assert str(err.value) == GVSOC_HINT and "--gvsoc PATH" in GVSOC_HINT and GVSOC_ENV in GVSOC_HINT
    with pytest.raises(DeviceError, match=f"--gvsoc names {tmp_path / 'nope'}, which is not an executable"):
        find_gvsoc(tmp_path / "nope")
    fake = tmp_path / "gvsoc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_gvsoc() == fake.resolve()                            # found on PATH
    monkeypatch.setenv(GVSOC_ENV, str(tmp_path / "missing"))
    with pytest.raises(DeviceError, match=GVSOC_ENV):
        find_gvsoc()
    assert find_gvsoc(fake) == fake.resolve()                        # the argument wins over the environment


# ---- on GVSoC (only where it is configured) ----------------------------------------------------------------
def _configured() -> bool:
    return bool(os.environ.get(GVSOC_ENV)) or shutil.which("gvsoc") is not None


needs_gvsoc = pytest.mark.skipif(not _configured(), reason=f"GVSoC is not configured (set {GVSOC_ENV} or put gvsoc "
                                                           f"on PATH; it is built from its public sources)")


@needs_gvsoc
@pytest.mark.parametrize("model, tuning, batch", [("deep-ae", AE_LORA, 4), ("cct-digits", "lora", 1)],
                         ids=["deep-ae-lora", "cct-digits-lora"])
def test_gvsoc_trains_like_numpy(tmp_path, model, tuning, batch):
    program = lower_to_target(compile_model(model, tuning=tuning, batch=batch, lr=0.05), load_target("siracusa"))
    x, y = data_for(program, 10)
    device = GvsocDevice(program, tmp_path)
    got = device.train(x, y, GVSOC_STEPS)
    want = NumpyDevice(program).train(x, y, GVSOC_STEPS)
    assert rel_diff(got.losses, want.losses) <= GVSOC_RTOL
    for name in want.params:
        assert rel_diff(got.params[name], want.params[name]) <= GVSOC_RTOL, name
    assert (device.last_step_cycles > 0).all() and got.telemetry.measured_cycles == int(device.last_step_cycles.sum())
    assert sorted(device.last_profile) == list(range(len(program.train.steps)))
