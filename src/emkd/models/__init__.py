"""Models: the efficient student, teachers from Hugging Face checkpoints, and offline tokenizers.

Importing this package registers the student's model_type ``emkd_mllm`` with ``AutoConfig`` and the Auto model
classes, so ``AutoModelForCausalLM.from_pretrained(local_dir)`` loads a saved student.
"""

from emkd.models.base import AdapterOutput, DistillAdapter, VisionSide, check_same_tokenization
from emkd.models.student import EfficientMLLMConfig, EfficientMLLMForCausalLM
from emkd.models.student_side import EfficientMLLMAdapter, EfficientMLLMSide, load_student
from emkd.models.teachers import TEACHER_REGISTRY, HFTeacherAdapter, load_teacher, load_teacher_side, register_teacher
from emkd.models.tiny_teachers import save_tiny_teacher
from emkd.models.tokenizer import build_tokenizer

__all__ = [
    "AdapterOutput",
    "DistillAdapter",
    "EfficientMLLMAdapter",
    "EfficientMLLMConfig",
    "EfficientMLLMForCausalLM",
    "EfficientMLLMSide",
    "HFTeacherAdapter",
    "TEACHER_REGISTRY",
    "VisionSide",
    "build_tokenizer",
    "check_same_tokenization",
    "load_student",
    "load_teacher",
    "load_teacher_side",
    "register_teacher",
    "save_tiny_teacher",
]
