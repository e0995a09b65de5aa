"""Pretrain a LLaMA-style causal LM sparse from scratch with Cannistraci-Hebb dynamic sparse training.

    accelerate launch recipes/pretrain.py --config recipes/tiny-llama-cpu.yaml [--key value ...]
    accelerate launch --config_file recipes/accelerate/multi_gpu_ddp.yaml recipes/pretrain.py \
        --config recipes/llama-60m-chtss.yaml
    python recipes/pretrain.py --config recipes/tiny-llama-cpu.yaml --training.max_steps 50

The steps (recipe -> output folder -> data -> tokenizer -> model -> sparsify ->
Trainer with the CHTss callback -> train -> evaluate -> save -> reload and
compare -> lm-eval -> summary) are spelt out, one commented block each, in
``hf_chts/recipe/pretrain.py``, which ships with the package: without this
repository, run ``accelerate launch -m hf_chts.recipe.pretrain --config <recipe.yaml>``.
"""

from hf_chts.recipe.pretrain import main

if __name__ == "__main__":
    main()
