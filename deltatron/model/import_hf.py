"""deltatron-import: a Hugging Face Kimi Linear directory -> a deltatron model checkpoint.

    deltatron-import HF_DIR --out CKPT_DIR [--dtype auto|float32|bfloat16] [--overwrite]

HF_DIR holds config.json and the weights as safetensors (one `model.safetensors`, or shards with
`model.safetensors.index.json`), in transformers' naming or the published checkpoints' naming
(both are accepted; see deltatron/model/hf.py). The config is mapped to a ModelConfig (fields
deltatron cannot represent are listed and stop the import), every tensor's name and shape is
checked against that model before anything is loaded (missing, extra and mis-shaped tensors are
all reported at once), then the weights are converted and saved with `save_model`: a
dist_checkpointing directory that `load_model` loads under any parallel layout (TP/PP/EP/VPP).

The conversion runs in one process on CPU: it holds the Hugging Face tensors and the model at the
same time, about twice the checkpoint's size in memory. CKPT_DIR also gets `model_config.yaml`
(the ModelConfig fields; copy it to conf/model/ to train that architecture, and deltatron-export
reads it). CKPT_DIR appears complete or not at all.
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
from deltatron.model.hf import deltatron_to_hf, from_hf_config, from_published, hf_to_deltatron, to_published

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_CONFIG_FILE = "model_config.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TensorMismatch(ValueError):
    """The checkpoint's tensors do not match the architecture its config.json describes."""


def read_hf_config(hf_dir: str) -> ModelConfig:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir!r} has no {CONFIG_FILE}: give a Hugging Face model directory")
    with open(path) as f:
        hf = json.load(f)
    return from_hf_config(hf, name=os.path.basename(os.path.normpath(hf_dir)))


def weight_files(hf_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        absent = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(hf_dir, f))})
        if absent:
            raise FileNotFoundError(f"{index} names shard files that are not there: {absent}")
        return {name: os.path.join(hf_dir, f) for name, f in weight_map.items()}
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{hf_dir!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def tensor_shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading any tensor."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(set(files.values())):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if files.get(name) == path:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    missing_in_files = sorted(set(files) - set(shapes))
    if missing_in_files:
        raise TensorMismatch(f"the index lists tensors its shard files lack: {missing_in_files[:10]}")
    return shapes


def expected_shapes(cfg: ModelConfig) -> tuple[dict, dict]:
    """(runtime naming, published naming) -> shape of every tensor this architecture has."""
    from deltatron.model.model import build_model_on_meta

    local = dataclasses.replace(cfg, transformer_impl="local")
    runtime = deltatron_to_hf(build_model_on_meta(local).state_dict(), local)
    published = to_published(runtime, local)
    return ({k: tuple(v.shape) for k, v in runtime.items()}, {k: tuple(v.shape) for k, v in published.items()})


def _dense_as_mlp(name: str, cfg: ModelConfig) -> str:
    match = re.match(r"^model\.layers\.(\d+)\.block_sparse_moe\.", name)
    if match and int(match.group(1)) < cfg.first_k_dense:
        return name.replace(".block_sparse_moe.", ".mlp.", 1)
    return name


def check_tensors(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    """Every expected tensor present with its shape and nothing else; reports all differences,
    against whichever naming (runtime or published) the checkpoint uses more."""
    runtime, published = expected_shapes(cfg)
    if not cfg.untie_embeddings:  # a tied lm_head may be stored or not
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
        runtime.pop("lm_head.weight")
        published.pop("lm_head.weight")
    # transformers' save_pretrained names dense layers block_sparse_moe too; published files say mlp
    original = {_dense_as_mlp(k, cfg): k for k in shapes}
    shapes = {_dense_as_mlp(k, cfg): v for k, v in shapes.items()}
    expected = max((runtime, published), key=lambda e: len(set(e) & set(shapes)))
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(original[k] for k in set(shapes) - set(expected))
    misshaped = [f"{original[k]}: {shapes[k]} (expected {expected[k]})"
                 for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]]
    if missing or extra or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing)}")
        if extra:
            parts.append(f"extra {len(extra)}: {', '.join(extra)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {'; '.join(misshaped)}")
        raise TensorMismatch(
            "the checkpoint's tensors do not match the architecture in its config.json ("
            + " | ".join(parts) + "); fix config.json or the weight files"
        )


def read_tensors(files: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(set(files.values())):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if files.get(name) == path:
                    out[name] = f.get_tensor(name)
    return out


def read_hf_checkpoint(hf_dir: str, cfg: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, state dict in transformers' runtime naming) of a checked HF directory."""
    cfg = cfg or read_hf_config(hf_dir)
    files = weight_files(hf_dir)
    check_tensors(tensor_shapes(files), cfg)
    return cfg, from_published(read_tensors(files))


def resolve_dtype(name: str, hf_sd: dict[str, torch.Tensor]) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return hf_sd["model.embed_tokens.weight"].dtype


def import_hf(hf_dir: str, out_dir: str, dtype: str = "auto", overwrite: bool = False) -> ModelConfig:
    """Convert HF_DIR into a model checkpoint at out_dir. Needs megatron-core's process groups
    of a single process (deltatron.parallel.setup.init_process_groups())."""
    from deltatron.model.model import build_model
    from deltatron.train.checkpoint import save_model

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; pass --overwrite to replace it")
    cfg, hf_sd = read_hf_checkpoint(hf_dir)
    cfg = dataclasses.replace(cfg, transformer_impl="local")
    params_dtype = resolve_dtype(dtype, hf_sd)
    model = build_model(cfg, use_cpu_initialization=True, perform_initialization=False,
                        params_dtype=params_dtype).eval()
    ours = hf_to_deltatron(hf_sd, cfg)
    del hf_sd
    result = model.load_state_dict(ours, strict=False)
    unloaded = [k for k in result.missing_keys if not k.endswith(("_extra_state", "local_tokens_per_expert"))]
    if unloaded or result.unexpected_keys:
        raise TensorMismatch(f"conversion left model tensors unset {unloaded} or unknown {result.unexpected_keys}")
    staging = out_dir + ".importing"
    save_model([model], staging)
    with open(os.path.join(staging, MODEL_CONFIG_FILE), "w") as f:
        yaml.safe_dump(dataclasses.asdict(dataclasses.replace(cfg, transformer_impl="auto")), f, sort_keys=False)
    replace_dir(staging, out_dir)
    return cfg


def replace_dir(src: str, dst: str) -> None:
    """Move the finished directory src to dst, replacing dst only once src is complete."""
    if os.path.exists(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deltatron-import", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="Hugging Face Kimi Linear directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="model checkpoint directory to write")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="parameter dtype of the checkpoint (auto: the Hugging Face weights')")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    from deltatron.parallel.setup import destroy_process_groups, init_process_groups

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        print("deltatron-import: run it as one process (it is a conversion; the checkpoint it writes "
              "loads under any layout)", file=sys.stderr)
        return 2
    init_process_groups()
    try:
        cfg = import_hf(args.hf_dir, args.out, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"deltatron-import: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy_process_groups()
    print(f"deltatron-import: wrote {args.out} ({cfg.num_layers} layers, {cfg.parameter_counts()['total']:,} "
          f"parameters); architecture in {os.path.join(args.out, MODEL_CONFIG_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
