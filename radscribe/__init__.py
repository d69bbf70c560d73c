"""radscribe: turn a general vision-language model into a radiology report assistant.

Stages: prepare (data) -> train (LoRA/QLoRA) -> eval (BLEU/ROUGE + clinical checks) -> chat/serve/export.
"""

__version__ = "0.1.0"
