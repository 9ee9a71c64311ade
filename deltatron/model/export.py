"""deltatron-export: a deltatron checkpoint -> a Hugging Face Kimi Linear directory.

    deltatron-export CKPT_DIR --out HF_DIR [--model PRESET|YAML] [--tokenizer PATH]
                     [--dtype float32|bfloat16] [--max-shard-size 5GB] [--naming published|runtime]
                     [--overwrite]

CKPT_DIR is a model checkpoint (`save_model`, e.g. written by deltatron-import) or a training
checkpoint (`<save_dir>/step_NNNNNNN`), saved under any parallel layout; its weights are loaded
into one process on CPU. The architecture comes from the checkpoint (a training checkpoint's
common state, or the `model_config.yaml` deltatron-import writes), else from --model (a preset
name of conf/model/ or a yaml file); when both exist they must agree.

HF_DIR gets config.json (transformers' KimiLinearConfig), the weights as safetensors shards
(`model-0000X-of-0000N.safetensors` + `model.safetensors.index.json`, each shard at most
--max-shard-size) in the published checkpoints' naming (what transformers' save_pretrained writes;
--naming runtime gives transformers' module names; transformers loads both), and with --tokenizer
the tokenizer files. It is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Optional

import torch
import yaml

from deltatron.model.config import ModelConfig
from deltatron.model.hf import deltatron_to_hf, to_hf_config, to_published
from deltatron.model.import_hf import INDEX_FILE, MODEL_CONFIG_FILE, replace_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# kept in float32 whatever --dtype says (as in the published checkpoints)
FP32_TENSORS = ("A_log", "dt_bias", "e_score_correction_bias")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RUNTIME_MODEL_FIELDS = ("name", "kda_backend")


# ---------------------------------------------------------------------------- the model config
def preset_config(model: str) -> ModelConfig:
    """--model: a preset name of conf/model/ or a path to a yaml file of ModelConfig fields."""
    from deltatron.train.__main__ import conf_dir

    path = model if model.endswith((".yaml", ".yml")) else os.path.join(conf_dir(), "model", f"{model}.yaml")
    if not os.path.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir(), "model")) if f.endswith(".yaml"))
        raise FileNotFoundError(f"--model {model!r}: no file {path!r}; give a yaml file or one of {presets}")
    with open(path) as f:
        return ModelConfig(**yaml.safe_load(f))


def stored_config(ckpt_dir: str) -> tuple[Optional[ModelConfig], bool]:
    """(the architecture stored with the checkpoint or None, whether it is a training checkpoint)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    if isinstance(common, dict) and "model_config" in common:
        return _model_config(dict(common["model_config"]), f"{ckpt_dir} (common state)"), True
    sidecar = os.path.join(ckpt_dir, MODEL_CONFIG_FILE)
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            return _model_config(yaml.safe_load(f), sidecar), False
    return None, False


def _model_config(fields: dict, where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"the model config in {where} has fields this deltatron does not know: {unknown}")
    return ModelConfig(**{"name": "model", **fields})


def _architecture(cfg: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_MODEL_FIELDS + ("transformer_impl",)}


def resolve_config(ckpt_dir: str, model: Optional[str]) -> tuple[ModelConfig, bool]:
    stored, training = stored_config(ckpt_dir)
    given = preset_config(model) if model else None
    if stored is None and given is None:
        raise ValueError(
            f"{ckpt_dir!r} does not record its model config; name it with --model (a conf/model preset or a yaml file)"
        )
    if stored is not None and given is not None:
        a, b = _architecture(stored), _architecture(given)
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        if diff:
            raise ValueError(
                f"--model {model!r} differs from the config stored in {ckpt_dir!r} in (stored, given) {diff}; "
                "drop --model to use the stored one"
            )
    return (stored or given), training


# ---------------------------------------------------------------------------- loading
def load_checkpoint_model(ckpt_dir: str, cfg: ModelConfig, training: bool) -> torch.nn.Module:
    """A single-process model with the checkpoint's weights (saved under any layout). Needs
    megatron-core's process groups of one process."""
    from megatron.core import dist_checkpointing

    from deltatron.model.model import build_model
    from deltatron.train.checkpoint import check_complete

    check_complete(ckpt_dir)
    model = build_model(dataclasses.replace(cfg, transformer_impl="local"),
                        use_cpu_initialization=True, perform_initialization=False).eval()
    template = model.sharded_state_dict()
    try:
        state = dist_checkpointing.load({"model": template} if training else template, ckpt_dir)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"cannot load the model weights of {ckpt_dir!r} ({type(exc).__name__}: {first_line}); "
            "is the model config (stored or --model) the one it was saved with?"
        ) from exc
    model.load_state_dict(state["model"] if training else state, strict=True)
    return model


# ---------------------------------------------------------------------------- writing
def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: give bytes or a size like 500MB or 5GB")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match.group(2).upper()]
    return max(1, int(float(match.group(1)) * scale))


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most max_bytes (a larger tensor gets its own)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def write_safetensors(hf_sd: dict[str, torch.Tensor], out_dir: str, max_bytes: int, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    def dtype_of(name):
        return torch.float32 if name.endswith(FP32_TENSORS) else dtype

    def cast(name, t):
        return t.detach().to(dtype_of(name))

    umask = os.umask(0)
    os.umask(umask)
    sizes = {n: t.numel() * torch.empty((), dtype=dtype_of(n)).element_size() for n, t in hf_sd.items()}
    shards = plan_shards(sizes, max_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # clones: the mapping returns views (halves of fused weights), which safetensors refuses
        path = os.path.join(out_dir, file)
        save_file({n: cast(n, hf_sd[n]).contiguous().clone() for n in names}, path, metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~umask)  # safetensors creates its files private (0600)
        weight_map.update({n: file for n in names})
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)


def copy_tokenizer(tokenizer: str, out_dir: str, vocab_size: int) -> None:
    from deltatron.data.tokenizer import load_tokenizer, tokenizer_file

    tok_vocab = load_tokenizer(tokenizer).get_vocab_size()
    if tok_vocab > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer!r} has {tok_vocab} tokens, more than the model's vocab_size {vocab_size}"
        )
    shutil.copyfile(tokenizer_file(tokenizer), os.path.join(out_dir, "tokenizer.json"))
    if os.path.isdir(tokenizer):
        for name in TOKENIZER_FILES[1:]:
            if os.path.isfile(os.path.join(tokenizer, name)):
                shutil.copyfile(os.path.join(tokenizer, name), os.path.join(out_dir, name))


def export_model(model: torch.nn.Module, cfg: ModelConfig, out_dir: str, *, tokenizer: Optional[str] = None,
                 dtype: str = "float32", max_shard_size: str = "5GB", naming: str = "published",
                 overwrite: bool = False) -> None:
    """Write a single-process model as a Hugging Face directory at out_dir, atomically."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; pass --overwrite to replace it")
    if naming not in ("published", "runtime"):
        raise ValueError(f"naming={naming!r}: choose published or runtime")
    max_bytes = parse_size(max_shard_size)
    hf_sd = deltatron_to_hf(model.state_dict(), cfg)
    if naming == "published":
        hf_sd = to_published(hf_sd, cfg)
    staging = f"{out_dir}.exporting-{os.getpid()}"
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    try:
        hf_cfg = to_hf_config(cfg, dtype=dtype)
        hf_cfg.architectures = ["KimiLinearForCausalLM"]
        hf_cfg.save_pretrained(staging)
        write_safetensors(hf_sd, staging, max_bytes, DTYPES[dtype])
        if tokenizer:
            copy_tokenizer(tokenizer, staging, cfg.vocab_size)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_checkpoint(ckpt_dir: str, out_dir: str, model: Optional[str] = None, **kwargs) -> ModelConfig:
    """Load a checkpoint (see the module docstring) and export it; kwargs go to export_model."""
    if os.path.exists(out_dir) and not kwargs.get("overwrite"):
        raise FileExistsError(f"{os.path.abspath(out_dir)!r} exists; pass --overwrite to replace it")
    from deltatron.train.checkpoint import check_complete

    check_complete(ckpt_dir)
    cfg, training = resolve_config(ckpt_dir, model)
    export_model(load_checkpoint_model(ckpt_dir, cfg, training), cfg, out_dir, **kwargs)
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deltatron-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="model checkpoint (save_model) or training checkpoint (step_NNNNNNN)")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write")
    parser.add_argument("--model", help="conf/model preset or yaml, when the checkpoint does not record its config")
    parser.add_argument("--tokenizer", help="tokenizer.json or a directory holding one, copied into --out")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="weight dtype (A_log, dt_bias and the router bias stay float32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--naming", choices=["published", "runtime"], default="published",
                        help="tensor names: the published checkpoints' (default) or transformers' modules'")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    from deltatron.parallel.setup import destroy_process_groups, init_process_groups

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        print("deltatron-export: run it as one process (it loads checkpoints of any layout)", file=sys.stderr)
        return 2
    init_process_groups()
    try:
        cfg = export_checkpoint(args.checkpoint, args.out, args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, naming=args.naming, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"deltatron-export: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy_process_groups()
    print(f"deltatron-export: wrote {args.out} ({cfg.num_layers} layers, vocab {cfg.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
