"""Build the small demo model shipped in the package (gka_jax/assets/demo): run once, commit the output.

A tiny hybrid GKA model (pattern *-GKA-*-GKA, hidden 128) with RANDOM weights, a byte-level BPE tokenizer
trained here on the package's own documentation with Qwen3's special tokens, and the Qwen3 chat template.
It exists so that `gka-jax generate` works on a fresh machine with no download; its text is noise.
"""

import json
import os
import pathlib
import sys

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gka_jax.config import ATTENTION, GKA, GKAConfig, ModelConfig, RopeConfig  # noqa: E402
from gka_jax.layers import host_init  # noqa: E402
from gka_jax.params import abstract_model, flat_variables, param_table, to_hf  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
           "<tool_response>", "</tool_response>"]


def main(out=REPO / "gka_jax" / "assets" / "demo", template=None):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [p.read_text() for p in [REPO / "README.md", *sorted((REPO / "gka_jax").glob("*.py"))]]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = pathlib.Path(template or REPO.parent / "shared" / "fixtures" / "qwen3_chat_template.jinja").read_text()
    (out / "chat_template.jinja").write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "model_max_length": 4096}, indent=1))
    vocab = tok.get_vocab_size()
    cfg = ModelConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                      head_dim=32, layer_types=(ATTENTION, GKA, ATTENTION, GKA), rope=RopeConfig(theta=1e6),
                      gka=GKAConfig(), max_position_embeddings=4096, dtype="float32")
    hf = cfg.to_hf()
    hf["eos_token_id"] = tok.token_to_id("<|im_end|>")
    hf["description"] = "gka-jax demo model: random weights, for smoke tests only"
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}, indent=1))
    from flax import nnx
    _, state = nnx.split(abstract_model(cfg, np.float32))
    rng = np.random.default_rng(0)
    params = {}
    for path, var in flat_variables(state):
        meta = var.get_metadata()
        params[path] = host_init(meta["init"], var.get_value().shape, meta["fan_in"], rng)
    tensors = {e.hf_name: to_hf(e.groups, params[e.path]) for e in param_table(cfg)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    total = sum(os.path.getsize(p) for p in out.iterdir())
    print(f"wrote {out}: vocab {vocab}, {sum(t.size for t in tensors.values()):,} parameters, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
