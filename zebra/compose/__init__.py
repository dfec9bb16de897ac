"""Composition: teacher loading, MLA/Mamba2 initialisation from attention, students, hybrid assembly, SMART.

Imports transformers, zebra.model and zebra.eval.metrics only (no Lightning or Hydra). Submodules:
- teacher: `load_teacher`, `load_tokenizer`, `load_teacher_config`, `tokenizer_differences`,
  `zebra_config_from_teacher`
- init_mla: `init_mla_from_attention`, `init_mamba_from_attention`
- students: `build_student`, `assemble_hybrid`
- smart: `layer_sensitivities`, `write_smart_outputs` (the choice of layers: zebra.plan.selection)
- report: `untrained_student_report`
"""

from zebra.compose.init_mla import init_mamba_from_attention, init_mla_from_attention
from zebra.compose.smart import layer_sensitivities, write_smart_outputs
from zebra.compose.students import assemble_hybrid, build_student
from zebra.compose.teacher import (Teacher, TeacherLoadError, UnsupportedTeacherError, load_teacher,
                                   load_teacher_config, load_tokenizer, tokenizer_differences,
                                   zebra_config_from_teacher)

__all__ = [
    "Teacher", "TeacherLoadError", "UnsupportedTeacherError", "assemble_hybrid", "build_student",
    "init_mamba_from_attention", "init_mla_from_attention", "layer_sensitivities", "load_teacher",
    "load_teacher_config", "load_tokenizer", "tokenizer_differences", "write_smart_outputs",
    "zebra_config_from_teacher",
]
