"""BLIP-Diffusion core: subject encoder, prompt layout, reference text encoder and sampler.

Pure PyTorch; nothing here imports ComfyUI. Modules take an optional `operations`
namespace (default `torch.nn`) so a host can supply its own Linear/LayerNorm/... classes.
"""

from .config import QFormerConfig, SubjectEncoderConfig, VisionConfig
from .control import resize_control_image
from .loading import read_state_dict
from .preprocess import preprocess
from .prompt import CTX_BEGIN_POS, MAX_LENGTH, NUM_QUERY_TOKENS, build_prompt, splice_context
from .sampling import alphas_cumprod, plms_call_timesteps, reference_sigmas, reference_timesteps, sample_plms
from .subject_blend import average_views, blend, parse_weights
from .subject_encoder import Subject, SubjectEncoder, SubjectEncoderModel, load_subject_encoder
from .subject_file import load_subject, save_subject, subject_from_lavis
from .text_encoder import TextEncoder, load_text_encoder

__all__ = [
    "CTX_BEGIN_POS", "MAX_LENGTH", "NUM_QUERY_TOKENS", "QFormerConfig", "Subject", "SubjectEncoder",
    "SubjectEncoderConfig", "SubjectEncoderModel", "TextEncoder", "VisionConfig", "alphas_cumprod", "average_views",
    "blend", "build_prompt", "load_subject", "load_subject_encoder", "load_text_encoder", "parse_weights",
    "plms_call_timesteps", "preprocess", "read_state_dict", "reference_sigmas", "reference_timesteps",
    "resize_control_image", "sample_plms", "save_subject", "splice_context", "subject_from_lavis",
]
