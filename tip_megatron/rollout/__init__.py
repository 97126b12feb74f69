"""Rollouts: prompt data (`data`), tokenizers (`tokenizers`), and in-engine generation.

Submodules are imported explicitly (`from tip_megatron.data.prompts import PromptDataset`)
so that loading prompts never pulls in torch or megatron.
"""
