"""Hugging Face import and export: transformers' KimiLinearForCausalLM is the external reference.

A checkpoint saved by transformers imports with its logits; our export loads into transformers
with our logits; export -> import gives back the same weights bit for bit, also from checkpoints
saved under EP2 and PP2 (2 gloo processes); tensor and config mismatches are named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from deltatron.model.config import ModelConfig
from deltatron.model.hf import (
    deltatron_to_hf, from_hf_config, from_published, hf_to_deltatron, load_hf_into, to_published,
)
from deltatron.model.model import build_model

from conftest import REPO, subprocess_env
from distributed import run_distributed
from test_model import SMALL, _hf_reference

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# the bundled tokenizer has 4096 tokens
MODEL = dict(SMALL, vocab_size=4096)
TOKENIZER = os.path.join(REPO, "data", "tokenizer", "tokenizer.json")
TOKENS = torch.randint(0, MODEL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            return model(tokens).logits
        return model(tokens, None, None)


def _assert_close(got, ref):
    err = (got - ref).abs().max().item()
    assert err < 2e-5 * ref.abs().max().item() + 1e-6, f"max |logit diff| {err}"


def _weights(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _model_yaml(cfg: ModelConfig, path) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f)
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(cfg, transformers model with non-trivial norms and router bias, its save_pretrained dir)."""
    from deltatron.parallel.cpu_compat import initialize_rng
    from deltatron.parallel.setup import init_process_groups

    init_process_groups(seed=1234)
    initialize_rng(1234)
    cfg = ModelConfig(**MODEL)
    hf = _hf_reference(cfg)
    saved = tmp_path_factory.mktemp("hf") / "saved"
    hf.save_pretrained(saved)
    return cfg, hf, str(saved)


@pytest.fixture
def ours(reference):
    cfg, hf, _ = reference
    model = build_model(cfg).eval()
    load_hf_into(model, hf.state_dict(), cfg)
    return model


def _fresh(cfg: ModelConfig):
    torch.manual_seed(99)  # different init, so loading has to do the work
    return build_model(cfg).eval()


def test_mapping_is_a_bijection(reference, ours):
    cfg, hf, _ = reference
    hf_sd = hf.state_dict()
    back = deltatron_to_hf(hf_to_deltatron(hf_sd, cfg), cfg)
    assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    sd = _weights(ours)
    again = hf_to_deltatron(deltatron_to_hf(sd, cfg), cfg)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    published = to_published(hf_sd, cfg)
    assert any(".block_sparse_moe.experts.0.w1." in k for k in published)
    runtime = from_published(published)
    assert runtime.keys() == hf_sd.keys() and all(torch.equal(runtime[k], hf_sd[k]) for k in hf_sd)
    # tied embeddings: transformers' Kimi Linear does not tie, so lm_head is written as a copy
    tied = dataclasses.replace(cfg, untie_embeddings=False)
    sd = _weights(build_model(tied))
    hf_tied = deltatron_to_hf(sd, tied)
    assert torch.equal(hf_tied["lm_head.weight"], sd["embedding.word_embeddings.weight"])
    again = hf_to_deltatron(hf_tied, tied)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_to_deltatron({**hf_tied, "lm_head.weight": hf_tied["lm_head.weight"] + 1}, tied)


def test_config_round_trip_and_unsupported_fields(reference):
    cfg, _, saved = reference
    with open(os.path.join(saved, "config.json")) as f:
        hf_cfg = json.load(f)
    got = from_hf_config(hf_cfg, name=cfg.name)
    explicit = dataclasses.replace(cfg, mla_layers=[i + 1 for i in cfg.mla_layer_indices()])
    assert dataclasses.asdict(got) == dataclasses.asdict(explicit)
    # the published 48B architecture, through transformers' config and back
    from deltatron.model.hf import to_hf_config

    big = ModelConfig(**yaml.safe_load(open(os.path.join(REPO, "conf", "model", "kimi_linear_48b_a3b.yaml"))))
    published = to_hf_config(big).to_dict()
    for key in ("layer_types", "mlp_layer_types"):  # the published config.json has neither
        published.pop(key)
    got = from_hf_config(published, name=big.name)
    assert got.layer_pattern() == big.layer_pattern() and got.parameter_counts() == big.parameter_counts()
    with pytest.raises(ValueError) as err:
        from_hf_config({**hf_cfg, "hidden_act": "gelu", "q_lora_rank": 8, "num_key_value_heads": 1})
    for field in ("hidden_act='gelu'", "q_lora_rank=8", "num_key_value_heads=1"):
        assert field in str(err.value)


def test_transformers_checkpoint_imports_with_equal_logits(reference, tmp_path):
    from deltatron.model.import_hf import MODEL_CONFIG_FILE, import_hf
    from deltatron.train.checkpoint import load_model

    cfg, hf, saved = reference
    # transformers writes the published naming (per-expert w1/w2/w3, q/k/v_conv1d, block_sparse_moe)
    assert any("experts.0.w1" in k for k in safetensors_torch.load_file(os.path.join(saved, "model.safetensors")))
    imported = import_hf(saved, str(tmp_path / "ckpt"))
    assert imported.layer_pattern() == cfg.layer_pattern()
    with open(tmp_path / "ckpt" / MODEL_CONFIG_FILE) as f:
        assert ModelConfig(**yaml.safe_load(f)) == dataclasses.replace(imported, transformer_impl="auto")
    model = _fresh(imported)
    load_model([model], str(tmp_path / "ckpt"))
    _assert_close(_logits(model), _logits(hf))
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_hf(saved, str(tmp_path / "ckpt"))


def test_export_loads_into_transformers_with_equal_logits(reference, ours, tmp_path):
    from deltatron.model.export import export_checkpoint
    from deltatron.train.checkpoint import save_model

    cfg, _, _ = reference
    save_model([ours], str(tmp_path / "ckpt"))
    out = tmp_path / "hf"
    export_checkpoint(str(tmp_path / "ckpt"), str(out), model=_model_yaml(cfg, tmp_path / "m.yaml"),
                      tokenizer=TOKENIZER, max_shard_size="300KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(files)
    assert not [p for p in os.listdir(tmp_path) if ".exporting" in p]
    assert json.load(open(out / "config.json"))["model_type"] == "kimi_linear"
    loaded = transformers.KimiLinearForCausalLM.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager"
    ).float().eval()
    _assert_close(_logits(loaded), _logits(ours))
    # transformers' module naming loads as well
    export_checkpoint(str(tmp_path / "ckpt"), str(out), model=_model_yaml(cfg, tmp_path / "m.yaml"),
                      naming="runtime", overwrite=True)
    loaded = transformers.KimiLinearForCausalLM.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager"
    ).float().eval()
    _assert_close(_logits(loaded), _logits(ours))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(str(tmp_path / "ckpt"), str(out), model=_model_yaml(cfg, tmp_path / "m.yaml"))


def test_tied_embeddings_round_trip(reference, tmp_path):
    from deltatron.model.export import export_checkpoint
    from deltatron.model.import_hf import import_hf
    from deltatron.train.checkpoint import load_model, save_model

    cfg = dataclasses.replace(reference[0], untie_embeddings=False)
    model = _fresh(cfg)
    save_model([model], str(tmp_path / "ckpt"))
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), model=_model_yaml(cfg, tmp_path / "m.yaml"))
    loaded = transformers.KimiLinearForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", experts_implementation="eager"
    ).eval()
    _assert_close(_logits(loaded), _logits(model))
    assert import_hf(str(tmp_path / "hf"), str(tmp_path / "back")).untie_embeddings is False
    back = build_model(cfg).eval()
    load_model([back], str(tmp_path / "back"))
    assert torch.equal(_logits(back), _logits(model))


def _save_under_layouts(rank, world_size, cfg_fields, init_ckpt, out_dir):
    """Load the imported checkpoint under EP2 and under PP2, save it under that layout:
    EP2 as a model checkpoint, PP2 in a training checkpoint's structure (model under "model",
    the architecture in the common state)."""
    from deltatron.parallel.setup import init_process_groups
    from deltatron.train.checkpoint import load_model, model_sharded_state_dict, save_model, save_sharded
    from deltatron.train.resume import _architecture
    from deltatron.train.trainer import stage_pattern

    cfg = ModelConfig(**cfg_fields)
    init_process_groups(ep=2)
    model = build_model(cfg, expert_model_parallel_size=2)
    load_model([model], init_ckpt)
    save_model([model], f"{out_dir}/ep2")

    from megatron.core import parallel_state

    init_process_groups(pp=2)
    model = build_model(
        cfg, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, layer_pattern=stage_pattern(cfg.layer_pattern(), 2),
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    )
    load_model([model], init_ckpt)
    save_sharded({"model": model_sharded_state_dict([model]), "model_config": _architecture(cfg)},
                 f"{out_dir}/step_0000001")
    return True


def test_export_import_round_trip_from_ep2_and_pp2(reference, ours, tmp_path):
    from deltatron.model.export import export_checkpoint
    from deltatron.model.import_hf import import_hf
    from deltatron.train.checkpoint import load_model

    cfg, hf, saved = reference
    import_hf(saved, str(tmp_path / "init"))  # the imported checkpoint loads under EP2 and PP2
    run_distributed(_save_under_layouts, 2, dataclasses.asdict(cfg), str(tmp_path / "init"), str(tmp_path))
    ref_logits = _logits(ours)
    for name, model_arg in (("ep2", _model_yaml(cfg, tmp_path / "m.yaml")), ("step_0000001", None)):
        hf_dir, back = tmp_path / f"hf-{name}", tmp_path / f"back-{name}"
        export_checkpoint(str(tmp_path / name), str(hf_dir), model=model_arg, max_shard_size="1MB")
        import_hf(str(hf_dir), str(back))
        model = _fresh(cfg)
        load_model([model], str(back))
        got, want = _weights(model), _weights(ours)
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert torch.equal(_logits(model), ref_logits), name
    loaded = transformers.KimiLinearForCausalLM.from_pretrained(
        tmp_path / "hf-step_0000001", attn_implementation="eager", experts_implementation="eager"
    ).float().eval()
    _assert_close(_logits(loaded), _logits(hf))


def test_checkpoints_use_the_transformer_engine_key_for_the_dense_pre_mlp_norm(reference, ours, tmp_path):
    """A TE model stores the dense MLP's pre-norm inside linear_fc1 (linear_fc1.layer_norm_weight);
    the local model saves it under that key too, so one checkpoint serves both, and export reads it."""
    from deltatron.model.export import load_checkpoint_model
    from deltatron.train.checkpoint import save_sharded

    cfg, _, _ = reference
    sharded = ours.sharded_state_dict()
    assert sharded["decoder.layers.1.pre_mlp_layernorm.weight"].key == "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    save_sharded(sharded, str(tmp_path / "ckpt"))
    loaded = load_checkpoint_model(str(tmp_path / "ckpt"), cfg, training=False)
    got, want = _weights(loaded), _weights(ours)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _broken_copy(saved: str, dst, edit) -> str:
    shutil.copytree(saved, dst)
    path = os.path.join(dst, "model.safetensors")
    sd = safetensors_torch.load_file(path)
    edit(sd)
    safetensors_torch.save_file(sd, path, metadata={"format": "pt"})
    return str(dst)


def test_missing_extra_and_misshaped_tensors_are_named(reference, tmp_path):
    from deltatron.model.import_hf import TensorMismatch, import_hf

    _, _, saved = reference

    def edit(sd):
        del sd["model.layers.1.self_attn.q_proj.weight"]
        del sd["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
        sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        sd["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(3, 16)

    broken = _broken_copy(saved, tmp_path / "broken", edit)
    with pytest.raises(TensorMismatch) as err:
        import_hf(broken, str(tmp_path / "out"))
    msg = str(err.value)
    for name in ("missing 2: ", "model.layers.1.self_attn.q_proj.weight",
                 "model.layers.2.block_sparse_moe.experts.3.w2.weight",
                 "extra 1: model.layers.0.self_attn.extra.weight",
                 "model.layers.3.self_attn.kv_b_proj.weight: (3, 16) (expected (64, 16))"):
        assert name in msg, msg
    assert not os.path.exists(tmp_path / "out")


def test_cli_reports_errors_and_exit_code(reference, tmp_path):
    _, _, saved = reference
    broken = _broken_copy(saved, tmp_path / "broken", lambda sd: sd.pop("model.norm.weight"))
    run = subprocess.run(
        [sys.executable, "-m", "deltatron.model.import_hf", broken, "--out", str(tmp_path / "out")],
        env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert "deltatron-import:" in run.stderr and "missing 1: model.norm.weight" in run.stderr
