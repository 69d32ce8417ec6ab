"""Test instrumentation for the real ComfyUI server: saves what flows through a graph.

Not part of the pack: the test fixture links it into custom_nodes next to the pack, so
tests can read CONDITIONING / subject / LATENT tensors that have no stock save node.
"""

import os

import folder_paths
from safetensors.torch import save_file


class ProbeSaveTensors:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "probe"})},
                "optional": {"conditioning": ("CONDITIONING",), "subject": ("BLIPD_SUBJECT",),
                             "latent": ("LATENT",), "image": ("IMAGE",)}}

    def save(self, name, conditioning=None, subject=None, latent=None, image=None):
        tensors, meta = {}, {}
        for i, (cond, extra) in enumerate(conditioning or []):
            tensors[f"cond{i}"] = cond
            if extra.get("pooled_output") is not None:
                tensors[f"pooled{i}"] = extra["pooled_output"]
            control = extra.get("control")
            meta[f"control{i}"] = str(_control_chain(control))
        if subject is not None:
            tensors["subject"] = subject.embeds
            meta["category"] = subject.category
            meta.update({f"subject.{k}": str(v) for k, v in subject.metadata.items()})
        if latent is not None:
            tensors["latent"] = latent["samples"]
        if image is not None:
            tensors["image"] = image
        folder = os.path.join(folder_paths.get_output_directory(), "probe")
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(folder, f"{name}.safetensors"), metadata=meta)
        return {"ui": {"probe": [name]}}


def _control_chain(control):
    """[(strength, start, end), ...] of a ControlNet chain, newest first."""
    chain = []
    while control is not None:
        chain.append((control.strength, *control.timestep_percent_range))
        control = control.previous_controlnet
    return chain


NODE_CLASS_MAPPINGS = {"ProbeSaveTensors": ProbeSaveTensors}
