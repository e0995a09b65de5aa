"""The names of the files hf_chts adds to a model folder (docs/checkpoint-format.md).

A leaf module: the checkpoint format (:mod:`hf_chts.checkpointing.format`) and the
model card (:mod:`hf_chts.model_card`) both name these files, and neither imports the other for it.
"""

#: the bit-packed masks of the sparsified layers (docs/checkpoint-format.md#2-sparsitysafetensors-the-masks)
SPARSITY_FILE = "sparsity.safetensors"

#: the SparsifyConfig, summary, engine progress, save id and manifest (docs/checkpoint-format.md#3-sparsify_configjson)
CONFIG_FILE = "sparsify_config.json"

#: the live values of the sparsified weights in the compact format
SPARSE_WEIGHTS_FILE = "sparse_weights.safetensors"
