"""The Transformer-Patcher editing algorithm (trainer, memory, replay, losses), with the data model it is used with."""

from transformer_patcher.core.editor import Editor, EditRecord
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.prompts import Prompter, PromptFormat
from transformer_patcher.core.tasks import Batch, CausalLMTask, ClassificationTask, Seq2SeqTask, Task, task_for_model
from transformer_patcher.methods.patcher.config import MARGINS, EditConfig
from transformer_patcher.methods.patcher.memory import MemoryBank, build_memory, collect_queries, memory_key
from transformer_patcher.methods.patcher.replay import ForwardReplay
from transformer_patcher.methods.patcher.trainer import PatchTrainer

__all__ = [
    "MARGINS",
    "Batch",
    "CausalLMTask",
    "ClassificationTask",
    "EditConfig",
    "EditExample",
    "EditRecord",
    "Editor",
    "ForwardReplay",
    "MemoryBank",
    "PatchTrainer",
    "PromptFormat",
    "Prompter",
    "Seq2SeqTask",
    "Task",
    "build_memory",
    "collect_queries",
    "memory_key",
    "task_for_model",
]
