"""The Transformer-Patcher editing algorithm and the fine-tuning baselines, built on the patch adapter."""

from .baselines import FineTuneConfig, FineTuneEditor
from .config import MARGINS, EditConfig
from .editor import Editor
from .memory import MemoryBank, build_memory, collect_queries, memory_key
from .prompts import Prompter, PromptFormat
from .replay import ForwardReplay
from .tasks import Batch, CausalLMTask, ClassificationTask, EditExample, Seq2SeqTask, Task, task_for_model
from .trainer import EditRecord, PatchTrainer

__all__ = [
    "MARGINS",
    "Batch",
    "CausalLMTask",
    "ClassificationTask",
    "EditConfig",
    "EditExample",
    "EditRecord",
    "Editor",
    "FineTuneConfig",
    "FineTuneEditor",
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
