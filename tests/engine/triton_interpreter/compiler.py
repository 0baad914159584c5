"""The interpreter backend's compiler: refuses to compile; TRITON_INTERPRET=1 never asks it to."""

from triton.backends.compiler import BaseBackend


class InterpreterBackend(BaseBackend):
    @staticmethod
    def supports_target(target):
        return target.backend == "cpu"

    def hash(self) -> str:
        return "visor-triton-interpreter"

    def parse_options(self, options: dict):
        raise NotImplementedError("set TRITON_INTERPRET=1: this backend only interprets")

    def add_stages(self, stages, options, language) -> None:
        raise NotImplementedError("set TRITON_INTERPRET=1: this backend only interprets")

    def load_dialects(self, context) -> None:
        return None

    def get_module_map(self):
        return {}
