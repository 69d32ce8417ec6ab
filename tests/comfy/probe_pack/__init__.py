"""Test instrumentation for the real ComfyUI server: saves what flows through a graph.

Not part of the pack: the test fixture links it into custom_nodes next to the pack, so
tests can read CONDITIONING / subject / LATENT tensors that have no stock save node.
"""

import os

import folder_paths
import torch
from safetensors.torch import save_file


class ProbeSaveTensors:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"name": ("STRING", {"default": "probe"})},
            "optional": {
                "conditioning": ("CONDITIONING",),
                "subject": ("BLIPD_SUBJECT",),
                "latent": ("LATENT",),
                "image": ("IMAGE",),
            },
        }

    def save(self, name, conditioning=None, subject=None, latent=None, image=None):
        tensors, meta = {}, {}
        for i, (cond, extra) in enumerate(conditioning or []):
            tensors[f"cond{i}"] = cond
            if extra.get("pooled_output") is not None:
                tensors[f"pooled{i}"] = extra["pooled_output"]
            control = extra.get("control")
            meta[f"control{i}"] = str(_control_chain(control))
            for j, hint in enumerate(_chain_hints(control)):
                tensors[f"hint{i}_{j}"] = hint
        if subject is not None:
            tensors["subject"] = subject.embeds
            meta["category"] = subject.category
            meta.update({f"subject.{k}": str(v) for k, v in subject.metadata.items()})
        if latent is not None:
            tensors["latent"] = latent["samples"]
        if image is not None:
            tensors["image"] = image
        _save(name, tensors, meta)
        return {"ui": {"probe": [name]}}


def _control_chain(control):
    """[(strength, start, end), ...] of a ControlNet chain, newest first."""
    chain = []
    while control is not None:
        chain.append((control.strength, *control.timestep_percent_range))
        control = control.previous_controlnet
    return chain


def _chain_hints(control):
    """The control images ([B,C,H,W]) of a ControlNet chain as attached, newest first."""
    hints = []
    while control is not None:
        hints.append(control.cond_hint_original)
        control = control.previous_controlnet
    return hints


def _save(name, tensors, metadata=None):
    """output/probe/<name>.safetensors, every tensor as float32 (what tests/comfy reads with comfy.probe)."""
    folder = os.path.join(folder_paths.get_output_directory(), "probe")
    os.makedirs(folder, exist_ok=True)
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
        os.path.join(folder, f"{name}.safetensors"),
        metadata=metadata,
    )


class ProbeControlResiduals:
    """Patches a MODEL to save the ControlNet residuals of the first sampling step, per CFG half:
    `{cond|uncond}_down{i}` (one per UNet input block, diffusers' down_block_res_samples order) and
    `{cond|uncond}_mid`."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "residuals"})}}

    def patch(self, model, name):
        model = model.clone()
        saved = {}

        def wrapper(apply_model, args):
            control = args["c"].get("control")
            first_sigma = args["c"]["transformer_options"]["sample_sigmas"][0]
            if control is not None and float(args["timestep"][0]) == float(first_sigma):
                halves = len(args["cond_or_uncond"])
                labels = ["cond" if kind == 0 else "uncond" for kind in args["cond_or_uncond"]]
                # copies: the UNet pops the residuals out of these lists
                for i, residual in enumerate(control["output"]):
                    for label, part in zip(labels, residual.chunk(halves)):
                        saved[f"{label}_down{i}"] = part.clone()
                for label, part in zip(labels, control["middle"][0].chunk(halves)):
                    saved[f"{label}_mid"] = part.clone()
                _save(name, saved)
            return apply_model(args["input"], args["timestep"], **args["c"])

        model.set_model_unet_function_wrapper(wrapper)
        return (model,)


class ProbeSaveControlNet:
    """Writes a CONTROL_NET's model as ComfyUI holds it (LDM keys) into models/controlnet/<filename>."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net": ("CONTROL_NET",), "filename": ("STRING", {"default": "probe.safetensors"})}}

    def save(self, control_net, filename):
        path = os.path.join(folder_paths.get_folder_paths("controlnet")[0], filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in control_net.control_model.state_dict().items()}, path)
        return {"ui": {"probe": [filename]}}


class ProbeImageChannels:
    """An IMAGE with other channel counts than ComfyUI's loaders make: gray [B,H,W,1] or RGBA [B,H,W,4]."""

    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "mode": (["gray", "rgba"],)}}

    def convert(self, image, mode):
        if mode == "gray":
            return (image[..., :1],)
        return (torch.cat([image, torch.full_like(image[..., :1], 0.5)], dim=-1),)


class ProbeEmptyLatent:
    """A LATENT of zero images, which no stock node makes."""

    CATEGORY = "testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return ({"samples": torch.zeros(0, 4, 8, 8)},)


class _GivenNoise:
    """A NOISE whose samples are a given tensor (SamplerCustomAdvanced calls generate_noise)."""

    def __init__(self, noise):
        self.seed, self.noise = 0, noise

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if tuple(samples.shape) != tuple(self.noise.shape):
            raise ValueError(f"ProbeFileNoise: noise {tuple(self.noise.shape)} for a latent {tuple(samples.shape)}")
        return self.noise.clone()


class ProbeFileNoise:
    """A NOISE read from input/<file> (its tensor "noise"): a test's given start, for SamplerCustomAdvanced."""

    CATEGORY = "testing"
    RETURN_TYPES = ("NOISE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": ("STRING", {"default": "noise.safetensors"})}}

    def make(self, file):
        from safetensors.torch import load_file

        return (_GivenNoise(load_file(os.path.join(folder_paths.get_input_directory(), file))["noise"]),)


class ProbeEditMaps:
    """Patches a BLIP-Diffusion Prompt-to-Prompt MODEL to save LocalBlend's normalised map after every model call
    (`maps` [calls, h, w]): what the pack's EditRun (transformer option "blipd_edit_run") thresholds."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "edit_maps"})}}

    def patch(self, model, name):
        import comfy.patcher_extension

        model = model.clone()
        maps = []

        def predict_noise(executor, x, timestep, model_options, seed):
            out = executor(x, timestep, model_options, seed)
            run = model_options["transformer_options"]["blipd_edit_run"]
            if run.call == 0:
                maps.clear()
            maps.append(run.blend_map())
            _save(name, {"maps": torch.stack(maps)})
            return out

        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "probe", predict_noise)
        return (model,)


class ProbeStackConditioning:
    """Two single-entry CONDITIONINGs of one row each as one CONDITIONING of two batch rows (row i for latent i),
    which no stock node makes: a plain generation of two prompts in one batch."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "stack"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"first": ("CONDITIONING",), "second": ("CONDITIONING",)}}

    def stack(self, first, second):
        (a, a_extra), (b, b_extra) = first[0], second[0]
        return (
            [[torch.cat([a, b]), {"pooled_output": torch.cat([a_extra["pooled_output"], b_extra["pooled_output"]])}]],
        )


NODE_CLASS_MAPPINGS = {
    "ProbeStackConditioning": ProbeStackConditioning,
    "ProbeFileNoise": ProbeFileNoise,
    "ProbeEditMaps": ProbeEditMaps,
    "ProbeSaveTensors": ProbeSaveTensors,
    "ProbeControlResiduals": ProbeControlResiduals,
    "ProbeSaveControlNet": ProbeSaveControlNet,
    "ProbeImageChannels": ProbeImageChannels,
    "ProbeEmptyLatent": ProbeEmptyLatent,
}
