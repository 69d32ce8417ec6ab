"""BLIP-Diffusion core: the subject encoder, subjects, the prompt layout and the reference sampler.

Pure PyTorch; nothing here imports ComfyUI. Modules take an optional `operations`
namespace (default `torch.nn`) so a host can supply its own Linear/LayerNorm/... classes.
The names below are the API for users of the core; the ComfyUI nodes import the modules.
"""

from .prompt import build_prompt
from .sampling import reference_sigmas, sample_plms
from .subject import Subject
from .subject_blend import average_views, blend
from .subject_encoder import SubjectEncoder, load_subject_encoder
from .subject_file import load_subject, save_subject, subject_from_lavis

__all__ = [
    "Subject",
    "SubjectEncoder",
    "average_views",
    "blend",
    "build_prompt",
    "load_subject",
    "load_subject_encoder",
    "reference_sigmas",
    "sample_plms",
    "save_subject",
    "subject_from_lavis",
]
