"""The package's folders say what may import what, and the contract is spelled in one place."""
from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest

from vocos_triton import contract
from vocos_triton.launcher.runtime import default_runtime_python, runtime_environment

from triton_helpers import implementation_import

ROOT = Path(__file__).resolve().parents[1]
STUB_MODULES = sorted({implementation_import(path.read_text()).module
                       for path in ROOT.glob("model_repository/*/1/model.py")})
#: what a stub process must never load: build-time code, the launcher, the reference packages
FORBIDDEN = ("vocos_triton.build", "vocos_triton.launcher", "vocos", "encodec", "torchaudio")


def test_every_model_py_imports_the_serving_package():
    assert STUB_MODULES and all(name.startswith("vocos_triton.serving.") for name in STUB_MODULES), STUB_MODULES


#: the models whose stub runs numpy on a CPU instance and must not pay for a torch import (~140 MB each): the
#: numpy models, and the batched TorchScript models, whose forwards run in a worker of the torch host
TORCH_FREE_MODELS = (contract.Model.ENCODEC_EMBEDDING, contract.Model.MEL_FEATURES, contract.Model.VOCOS_MEL,
                     contract.Model.VOCOS_ENCODEC, contract.Model.ENCODEC_ENCODER)


def stub_module(model: str) -> str:
    return implementation_import((ROOT / "model_repository" / model / "1" / "model.py").read_text()).module


def loaded_modules(module: str) -> list:
    """In the serving runtime, as a stub would: import the module, then list what got loaded."""
    probe = (f"import importlib, json, sys; importlib.import_module({module!r}); "
             "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([str(default_runtime_python()), "-c", probe], capture_output=True, text=True,
                            env=runtime_environment(), timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", STUB_MODULES)
def test_serving_stubs_import_neither_export_code_nor_reference_packages(module):
    loaded = loaded_modules(module)
    bad = [name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"{module} loads {bad}"


@pytest.mark.parametrize("model", TORCH_FREE_MODELS)
def test_numpy_stubs_import_no_torch(model):
    module = stub_module(model)
    assert module in STUB_MODULES
    torch_modules = [name for name in loaded_modules(module) if name == "torch" or name.startswith("torch.")]
    assert not torch_modules, f"{model}: {module} imports torch ({len(torch_modules)} modules)"


def _contract_names() -> set:
    models = {v for k, v in vars(contract.Model).items() if k.isupper()}
    # "audio", "mel", "codes" and "bandwidth" double as the SDK's keyword names and checkpoint variants;
    # the tensor names that mean nothing else are checked with the model names.
    return models | {contract.Tensor.WAVEFORM, contract.Tensor.FEATURES, contract.Tensor.BANDWIDTH_ID}


#: other projects' names that coincide with a contract name, where they are read: the transformers port's
#: ``model_type`` of its EnCodec Vocos is "vocos_encodec", a config.json value, not our Triton model
FOREIGN_NAMES = {"handlers/vocos_triton/build/hf_layout.py": {contract.Model.VOCOS_ENCODEC}}


def _code_files() -> list:
    files = [p for folder in ("handlers", "client", "load_tests") for p in (ROOT / folder).rglob("*.py")]
    return [p for p in files if p.name != "contract.py" or p.parent.name != "vocos_triton"]


def test_no_model_or_tensor_name_is_spelled_outside_the_contract():
    names = _contract_names()
    found = []
    for path in _code_files():
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in names and node.value not in FOREIGN_NAMES.get(str(path.relative_to(ROOT)), ()):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    makefile = (ROOT / "Makefile").read_text()
    found += [f"Makefile: {name}" for name in names if name in makefile]
    assert not found, "spell these with vocos_triton.contract.Model / Tensor:\n" + "\n".join(found)
