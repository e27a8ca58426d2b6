"""Runs training programs on devices: numpy executor (default), QEMU, GVSoC, serial boards."""
from device_runtime.device import Device, DeviceError, EvalResult, Telemetry, TrainResult
from device_runtime.numpy_executor import NumpyDevice

__all__ = ["Device", "DeviceError", "EvalResult", "NumpyDevice", "Telemetry", "TrainResult"]
