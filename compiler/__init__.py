"""ONNX inference model + tuning choice → on-device training program.

    from compiler import compile_model, Program
    program = compile_model("deep-ae", tuning="lora", batch=8)
"""
from compiler.ir import CompileError
from compiler.pipeline import CompileOptions, compile_graph, compile_model
from compiler.program import Program
from compiler.tuning import LoraConfig, TuningSpec

__all__ = ["CompileError", "CompileOptions", "LoraConfig", "Program", "TuningSpec", "compile_graph",
           "compile_model"]
