"""Subject fine-tuning through the real server: the original recipe against a diffusers training loop, LAVIS
checkpoints against diffusers' UNet, the saved files through stock ComfyUI's LoRA loader, the loss falling over
40 steps, and the bad inputs of docs/reliability.md (rows registered with covers())."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from blip_diffusion_nodes.tests.comfy.reliability import covers, failed, healthy, rejected
from blip_diffusion_nodes.tests.comfy.test_reliability import pickle_bomb, run_and_interrupt
from blip_diffusion_nodes.tests.graphs import Graph, finetune, probe, shrink, twin

CAT = "blipd_example_cat.jpg"
PHOTOS = "blipd_finetune_photos"  # a folder of the input folder: the training photos, each of its own size
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what LoadImageDataSetFromFolder lists
EVAL_STEPS = "20,150,300,450,600,750,900,980"
# At 64x64 the tiny UNet's mid block sees a 1x1 latent: its self-attention has one key, the softmax is constant,
# so its query and key weights get no gradient (both sides hold rounding noise, ~1e-9): judged as zero, not
# relative to themselves. The threshold is relative to the norm of the whole gradient (~10).
ZERO_GRADIENT = 1e-7
SUBJECT = "ctx_embeddings_cache"
ZERO_BY_CONSTRUCTION = {
    f"unet.mid_block.attentions.0.transformer_blocks.0.attn1.{name}.weight" for name in ("to_q", "to_k")
}


@pytest.fixture(scope="module")
def photos(comfy) -> str:
    """Three photos of the example cat at three sizes: 64x64 (what the model trains on), a 96x72 mirror image
    and an 80x100 close-up, so the node resizes and crops two of them as the original does."""
    cat = Image.open(comfy.base / "input" / CAT).convert("RGB")
    folder = comfy.base / "input" / PHOTOS
    folder.mkdir(exist_ok=True)
    cat.resize((64, 64), Image.BICUBIC).save(folder / "a_square.png")
    cat.transpose(Image.FLIP_LEFT_RIGHT).resize((96, 72), Image.BICUBIC).save(folder / "b_wide.png")
    w, h = cat.size
    cat.crop((w // 4, h // 8, w * 3 // 4, h * 7 // 8)).resize((80, 100), Image.BICUBIC).save(folder / "c_tall.png")
    return PHOTOS


def photo_files(comfy, folder: str) -> list[str]:
    """The training photos in the order the server's LoadImageDataSetFromFolder lists them (os.listdir)."""
    base = comfy.base / "input" / folder
    return [str(base / f) for f in os.listdir(base) if f.lower().endswith(IMAGE_SUFFIXES)]


def eval_probe(g: Graph, node: str, model: list, subject: list, name: str, loader: str = "1") -> None:
    """The UNet of `model` on the square training photo noised at EVAL_STEPS (seeded noise), conditioned on the
    training caption "a cat" with `subject` (its first 20 tokens: BOS, a, 16 subject vectors, cat, EOS)."""
    photo = g.add("LoadImage", f"{node}1", image=f"{PHOTOS}/a_square.png")
    latent = g.add("VAEEncode", f"{node}2", pixels=photo, vae=[loader, 2])
    text = g.add(
        "BlipDiffusionMultimodalPromptFuse",
        f"{node}3",
        clip=[loader, 1],
        subject=subject,
        prompt="",
        target_subject="",
        prompt_strength=1.0,
        prompt_reps=1,
        multi_image="average",
    )
    g.add(
        "ProbeUNetNoise",
        f"{node}4",
        model=model,
        conditioning=text,
        latent=latent,
        tokens=20,
        timesteps=EVAL_STEPS,
        seed=7,
        name=name,
    )


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(max |difference| / max |reference|, ||difference|| / ||reference||)."""
    ours, theirs = ours.double(), theirs.double()
    scale = theirs.abs().max().clamp_min(1e-30)
    return float((ours - theirs).abs().max() / scale), float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))


def worst(names: list[str], stats: np.ndarray, skip: set[str] = frozenset()) -> tuple[float, float, str]:
    """The largest norm-relative and max-relative errors over the tensors of run_finetune.py's statistics
    (rows: ||ours - ref||, ||ref||, ||ours||, max |ours - ref|, max |ref|), and the name of the worst (norm)."""
    keep = np.array([n not in skip for n in names])
    norm = stats[keep, 0] / np.maximum(stats[keep, 1], 1e-30)
    top = stats[keep, 3] / np.maximum(stats[keep, 4], 1e-30)
    return float(norm.max()), float(top.max()), [n for n in names if n not in skip][int(norm.argmax())]


# --- the original recipe against diffusers ------------------------------------------------------------------


@covers("finetune-images-other-sizes")
@pytest.mark.reference
def test_three_steps_match_a_diffusers_training_loop(comfy, tiny_model, photos, reference, tmp_path):
    """3 steps of unet+subject on photos of three sizes: the draws are the documented ones, and the loss, every
    gradient, the trained UNet and subject, and the fine-tuned MODEL's noise prediction agree with a loop built
    from diffusers' UNet2DConditionModel, DDPMScheduler.add_noise, ContextCLIPTextModel and torch's AdamW."""
    g = finetune(tiny_model, photos, steps=3, seed=11, trace="ft_parity")
    probe(g, "7", "ft_parity_start", subject=["3", 0])
    probe(g, "8", "ft_parity_trained", subject=["6", 1])
    eval_probe(g, "9", ["6", 0], ["6", 1], "ft_parity_eps")
    comfy.run_ok(g)
    start = comfy.probe("ft_parity_start")[0]["subject"]
    trained = comfy.probe("ft_parity_trained")[0]["subject"]
    ours_eps = comfy.probe("ft_parity_eps")[0]
    np.save(tmp_path / "subject.npy", start.numpy())
    for key in ("z", "t", "context"):
        np.save(tmp_path / f"{key}.npy", ours_eps[key].numpy())
    trace = comfy.base / "output" / "probe" / "ft_parity"
    ref = reference(
        "run_finetune.py",
        model=str(comfy.base / "models" / "blip_diffusion" / tiny_model),
        images=photo_files(comfy, photos),
        category="cat",
        subject=str(tmp_path / "subject.npy"),
        steps=3,
        learning_rate=5e-6,
        batch_size=3,
        weight_decay=0.01,
        seed=11,
        resolution=64,
        ours=str(trace),
        probe={k: str(tmp_path / f"{k}.npy") for k in ("z", "t", "context")},
    )
    names = [str(n) for n in ref["names"]]
    report = []
    for k in (1, 2, 3):
        with safe_open(str(trace / f"step{k}.safetensors"), "pt") as f:
            ours = {n: f.get_tensor(n) for n in f.keys() if not n.startswith("grad.")}
        for name in ("photos", "timesteps", "noise"):
            assert torch.equal(ours[f"draws.{name}"], torch.from_numpy(ref[f"draws{k}_{name}"])), (k, name)
        loss_err = abs(float(ours["loss"]) - ref["loss"][k - 1]) / abs(ref["loss"][k - 1])
        stats = ref[f"grad{k}"]
        total = float(np.linalg.norm(stats[:, 1]))
        zero = {n for n, row in zip(names, stats) if row[1] < ZERO_GRADIENT * total}
        assert zero == ZERO_BY_CONSTRUCTION, zero
        assert all(row[2] < ZERO_GRADIENT * total for n, row in zip(names, stats) if n in zero)
        g_norm, g_max, g_name = worst(names, stats, skip=zero)
        report.append(
            f"step {k}: loss {float(ours['loss']):.6f} (rel. error {loss_err:.1e}), gradients per tensor norm "
            f"{g_norm:.1e} / max {g_max:.1e} of the reference (worst: {g_name}), all together "
            f"{np.linalg.norm(stats[:, 0]) / total:.1e}"
        )
        assert loss_err <= 1e-5
        assert g_norm <= 1e-5, g_name
    final = ref["final"]
    w_norm, w_max, w_name = worst(names, final, skip={SUBJECT})
    row = final[names.index(SUBJECT)]
    subject_norm = row[0] / row[1]
    with safe_open(str(trace / "final.safetensors"), "pt") as f:
        assert torch.equal(trained[0], f.get_tensor(SUBJECT)[0])
    eps_max, eps_norm = relative(ours_eps["eps"], torch.from_numpy(ref["eps"]))
    report.append(
        f"trained UNet per tensor norm {w_norm:.1e} / max {w_max:.1e} (worst: {w_name}); subject {subject_norm:.1e}; "
        f"the fine-tuned MODEL's noise prediction max {eps_max:.1e} / norm {eps_norm:.1e}"
    )
    print("\nfine-tuning parity with diffusers (relative to the reference):\n  " + "\n  ".join(report))
    assert w_norm <= 1e-5 and subject_norm <= 1e-5 and eps_norm <= 1e-5
    shutil.rmtree(trace)  # a full UNet's gradients per step: 1.2 GB on a shared disk


# --- LAVIS checkpoints ---------------------------------------------------------------------------------------


def lavis_checkpoint(path: Path, unet: dict[str, torch.Tensor], subject: torch.Tensor, **extra) -> None:
    """A checkpoint laid out as LAVIS's runner writes one: trained tensors and buffers under "model", the
    optimizer state, the run's config as plain containers."""
    model = {f"unet.{k}": v for k, v in unet.items()}
    model["ctx_embeddings_cache"] = subject
    model["text_encoder.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # a frozen part's buffer
    optimizer = {
        "state": {
            i: {"step": torch.tensor(40.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
            for i, v in enumerate(model.values())
            if v.is_floating_point()
        },
        "param_groups": [{"lr": 5e-6, "weight_decay": 0.01, "params": list(range(len(model)))}],
    }
    config = {
        "model": {"arch": "blip_diffusion", "qformer_train": False, "sd_train_text_encoder": False},
        "datasets": {"blip_diffusion_finetune": {"build_info": {"subject_text": "dog", "images": {"storage": "x"}}}},
        "run": {"max_iters": 40, "init_lr": 5e-6, "batch_size_train": 3},
    }
    torch.save({"model": model, "optimizer": optimizer, "config": config, "scaler": None, "epoch": 39, **extra}, path)


@pytest.fixture(scope="module")
def finetuned_folder(comfy_base) -> Path:
    folder = comfy_base / "models" / "blip_diffusion_finetuned"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def lavis_file(comfy, tiny_model, finetuned_folder) -> Iterator[str]:
    """checkpoint_39.pth: the tiny UNet moved as a fine-tune moves it (about 1e-3 per weight) and a subject."""
    base = load_file(
        str(comfy.base / "models" / "blip_diffusion" / tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    )
    g = torch.Generator().manual_seed(3)
    unet = {k: v.float() + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    path = finetuned_folder / "checkpoint_39.pth"
    lavis_checkpoint(path, unet, 0.5 * torch.randn(1, 16, 768, generator=g))
    yield path.name
    path.unlink()  # 0.9 GB (the optimizer state): CI shares its disk with everything else on the machine


def lavis_graph(tiny_model: str, checkpoint: str, name: str) -> Graph:
    """Loader -> LAVIS Fine-tuned Loader -> its subject saved and its UNet probed (needs the `photos` fixture: a
    LoadImage of a missing file would only skip the probe, as ComfyUI runs the outputs that validate)."""
    g = Graph()
    g.add("BlipDiffusionLoader", "1", model_name=tiny_model, weight_dtype="auto")
    g.add("BlipDiffusionLAVISFinetunedLoader", "2", model=["1", 0], checkpoint=checkpoint, category="")
    probe(g, "3", f"{name}_subject", subject=["2", 1])
    eval_probe(g, "4", ["2", 0], ["2", 1], f"{name}_eps")
    return g


@pytest.mark.reference
def test_lavis_checkpoint_loads_to_the_unet_diffusers_loads(comfy, tiny_model, photos, lavis_file, reference, tmp_path):
    comfy.run_ok(lavis_graph(tiny_model, lavis_file, "lavis"))
    subject, meta = comfy.probe("lavis_subject")
    ours = comfy.probe("lavis_eps")[0]
    checkpoint = comfy.base / "models" / "blip_diffusion_finetuned" / lavis_file
    expected = torch.load(checkpoint, weights_only=True)["model"]["ctx_embeddings_cache"]
    assert torch.equal(subject["subject"], expected) and meta["category"] == "dog"
    for key in ("z", "t", "context"):
        np.save(tmp_path / f"{key}.npy", ours[key].numpy())
    request = {k: str(tmp_path / f"{k}.npy") for k in ("z", "t", "context")}
    model = str(comfy.base / "models" / "blip_diffusion" / tiny_model)
    theirs = reference("run_unet.py", model=model, checkpoint=str(checkpoint), **request)["eps"]
    base = reference("run_unet.py", model=model, checkpoint=None, **request)["eps"]
    err_max, err_norm = relative(ours["eps"], torch.from_numpy(theirs))
    moved = relative(torch.from_numpy(base), torch.from_numpy(theirs))[1]
    print(
        f"\nLAVIS checkpoint: noise prediction vs diffusers with its weights: max {err_max:.1e}, norm {err_norm:.1e} "
        f"(the fine-tune moved it by {moved:.1e})"
    )
    assert err_norm <= 1e-5 < moved


def test_lavis_checkpoint_and_a_lora_apply_in_either_order(comfy, tiny_model, lavis_file, saved_lora):
    """The checkpoint is a difference from the MODEL's own weights: a LoRA before or after it gives the same UNet."""
    g = Graph()
    g.add("BlipDiffusionLoader", "1", model_name=tiny_model, weight_dtype="auto")
    before = g.add("LoraLoaderModelOnly", "2", model=["1", 0], lora_name=saved_lora, strength_model=1.0)
    g.add("BlipDiffusionLAVISFinetunedLoader", "3", model=before, checkpoint=lavis_file, category="")
    g.add("BlipDiffusionLAVISFinetunedLoader", "4", model=["1", 0], checkpoint=lavis_file, category="")
    after = g.add("LoraLoaderModelOnly", "5", model=["4", 0], lora_name=saved_lora, strength_model=1.0)
    eval_probe(g, "6", ["3", 0], ["3", 1], "order_before")
    eval_probe(g, "7", after, ["4", 1], "order_after")
    eval_probe(g, "8", ["4", 0], ["4", 1], "order_none")
    comfy.run_ok(g)
    first, second, none = (comfy.probe(f"order_{n}")[0]["eps"] for n in ("before", "after", "none"))
    torch.testing.assert_close(first, second, rtol=0, atol=1e-5)
    assert (first - none).abs().max() > 1e-3  # the LoRA did change the UNet


# --- files stock ComfyUI loads -------------------------------------------------------------------------------


def saved_files(comfy, entry: dict, node: str) -> list[Path]:
    return [comfy.base / "output" / f["subfolder"] / f["filename"] for f in entry["outputs"][node]["finetune"]]


def train_and_save(comfy, tiny_model, photos, train: str, name: str, **settings) -> list[Path]:
    g = finetune(tiny_model, photos, steps=2, train=train, batch_size=1, **settings)
    g.add("BlipDiffusionSaveFinetune", "7", model=["6", 0], subject=["6", 1], filename_prefix=f"ft_tests/{name}")
    eval_probe(g, "8", ["6", 0], ["6", 1], f"{name}_trained")
    return saved_files(comfy, comfy.run_ok(g), "7")


def reload_graph(tiny_model: str, lora: str, subject: str, name: str) -> Graph:
    """Stock LoraLoaderModelOnly with the saved weights, Load Subject with the saved subject."""
    g = Graph()
    g.add("BlipDiffusionLoader", "1", model_name=tiny_model, weight_dtype="auto")
    g.add("LoraLoaderModelOnly", "2", model=["1", 0], lora_name=lora, strength_model=1.0)
    g.add("BlipDiffusionLoadSubject", "3", subject_file=subject)
    eval_probe(g, "4", ["2", 0], ["3", 0], f"{name}_reloaded")
    return g


def install(comfy, weights: Path, subject: Path) -> tuple[str, str]:
    """The saved files where stock ComfyUI looks: models/loras and models/blip_diffusion_subjects."""
    for kind, file in (("loras", weights), ("blip_diffusion_subjects", subject)):
        (comfy.base / "models" / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, comfy.base / "models" / kind / file.name)
    return weights.name, subject.name


@pytest.fixture(scope="module")
def saved_lora(comfy, tiny_model, photos) -> str:
    """A lora+subject fine-tune saved and installed in models/loras (trained at 1e-3 so that it shows)."""
    weights, subject = train_and_save(comfy, tiny_model, photos, "lora+subject", "lora", learning_rate=1e-3, rank=4)
    return install(comfy, weights, subject)[0]


def test_lora_file_reloads_to_the_same_unet(comfy, tiny_model, saved_lora):
    weights = comfy.base / "models" / "loras" / saved_lora
    with safe_open(str(weights), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in keys
    )
    assert meta["format"] == "blip_diffusion_finetune" and meta["kind"] == "lora" and meta["rank"] == "4"
    comfy.run_ok(
        reload_graph(tiny_model, saved_lora, saved_lora.replace("_.safetensors", "_subject.safetensors"), "lora")
    )
    trained, reloaded = comfy.probe("lora_trained")[0], comfy.probe("lora_reloaded")[0]
    assert torch.equal(trained["context"], reloaded["context"])  # the subject file holds the trained subject exactly
    torch.testing.assert_close(reloaded["eps"], trained["eps"], rtol=0, atol=1e-6)


def test_weight_difference_file_reloads_to_the_same_unet(comfy, tiny_model, photos):
    weights, subject = train_and_save(comfy, tiny_model, photos, "unet+subject", "diff", learning_rate=1e-4)
    with safe_open(str(weights), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in keys[:5]}
    assert all(k.startswith("lora_unet_") and k.endswith((".diff", ".diff_b")) for k in keys)
    assert meta["kind"] == "diff" and dtypes == {torch.float16} and len(json.loads(meta["losses"])) == 2
    lora, subject_file = install(comfy, weights, subject)
    comfy.run_ok(reload_graph(tiny_model, lora, subject_file, "diff"))
    trained, reloaded = comfy.probe("diff_trained")[0], comfy.probe("diff_reloaded")[0]
    assert torch.equal(trained["context"], reloaded["context"])
    err = relative(reloaded["eps"], trained["eps"])[1]
    print(f"\nweight difference saved in float16, reloaded by LoraLoaderModelOnly: noise prediction within {err:.1e}")
    assert err <= 1e-4


def test_subject_only_training_changes_only_the_subject(comfy, tiny_model, photos):
    g = finetune(tiny_model, photos, steps=2, train="subject", batch_size=1, learning_rate=1e-3)
    g.add("BlipDiffusionSaveFinetune", "7", model=["6", 0], subject=["6", 1], filename_prefix="ft_tests/subject_only")
    probe(g, "8", "subject_only_start", subject=["3", 0])
    probe(g, "9", "subject_only_trained", subject=["6", 1])
    eval_probe(g, "10", ["6", 0], ["3", 0], "subject_only_unet")
    eval_probe(g, "11", ["1", 0], ["3", 0], "subject_only_base")
    files = saved_files(comfy, comfy.run_ok(g), "7")
    assert [f.name for f in files] == ["subject_only_00001_subject.safetensors"]  # no weights to save
    start, trained = comfy.probe("subject_only_start")[0]["subject"], comfy.probe("subject_only_trained")[0]["subject"]
    assert (trained - start).abs().max() > 1e-4
    assert torch.equal(comfy.probe("subject_only_unet")[0]["eps"], comfy.probe("subject_only_base")[0]["eps"])


# --- the loss falls -------------------------------------------------------------------------------------------


def test_the_loss_on_the_training_photos_falls_over_40_steps(comfy, tiny_model, photos):
    """The original recipe, 40 steps: the noise-prediction loss on a training photo at fixed timesteps and noise
    falls below the untrained model's, and the training curve's running mean falls."""
    g = finetune(tiny_model, photos, steps=40, seed=5)
    g.add("BlipDiffusionSaveFinetune", "7", model=["6", 0], subject=["6", 1], filename_prefix="ft_tests/curve")
    eval_probe(g, "8", ["6", 0], ["6", 1], "curve_after")
    eval_probe(g, "9", ["1", 0], ["3", 0], "curve_before")
    g.add("SaveImage", "10", images=["6", 2], filename_prefix="ft_tests/curve")
    entry = comfy.run_ok(g, timeout=3600)
    weights = saved_files(comfy, entry, "7")[0]
    with safe_open(str(weights), "pt") as f:
        losses = json.loads(f.metadata()["losses"])
    before, after = (comfy.probe(f"curve_{n}")[0] for n in ("before", "after"))
    loss_before = ((before["eps"] - before["noise"]) ** 2).mean().item()
    loss_after = ((after["eps"] - after["noise"]) ** 2).mean().item()
    window = [float(np.mean(losses[i : i + 10])) for i in range(0, 40, 10)]
    print(f"\n40 steps of unet+subject: training losses {', '.join(f'{v:.4f}' for v in losses)}")
    print(f"  mean of steps 1-10, 11-20, 21-30, 31-40: {', '.join(f'{v:.4f}' for v in window)}")
    print(f"  loss on the square training photo at {EVAL_STEPS}: before {loss_before:.4f}, after {loss_after:.4f}")
    assert comfy.image(entry, "10").shape[2] == 3
    assert loss_after < 0.99 * loss_before
    assert window[-1] < window[0]


# --- the example workflow ---------------------------------------------------------------------------------


def test_the_example_workflow_runs(comfy, tiny_model):
    graph = shrink(twin("finetune_subject"), size=64, steps=2)
    entry = comfy.run_ok(graph)
    assert any(out.get("finetune") for out in entry["outputs"].values())
    # a picture from the fine-tuned model, not only the Subject Encoder's preview of what it encoded
    assert any(out.get("images") for node, out in entry["outputs"].items() if graph[node]["class_type"] == "SaveImage")


# --- bad input (docs/reliability.md) -----------------------------------------------------------------------------


@covers("finetune-no-images")
def test_no_images(comfy, tiny_model, photos):
    g = finetune(tiny_model, photos, steps=1)
    g["4"] = {"class_type": "ProbeEmptyImage", "inputs": {}}
    failed(comfy, g, "BlipDiffusionFinetune", "images: no photos")
    healthy(comfy, tiny_model)


@covers("finetune-steps-zero")
def test_zero_steps(comfy, tiny_model, photos):
    rejected(comfy, finetune(tiny_model, photos, steps=0), "6", "steps", "Value 0 smaller than min of 1")


@covers("finetune-lr-negative")
def test_negative_learning_rate(comfy, tiny_model, photos):
    g = finetune(tiny_model, photos, learning_rate=-1e-5)
    rejected(comfy, g, "6", "learning_rate", "learning_rate: -1e-05 is below the minimum of 0")


@covers("finetune-lr-nan")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_learning_rate_that_is_not_a_number(comfy, tiny_model, photos, value):
    rejected(comfy, finetune(tiny_model, photos, learning_rate=value), "6", "learning_rate", "expected a finite number")
    healthy(comfy, tiny_model)


def without_training(g: Graph) -> Graph:
    """The graph of `finetune` with only its loader, subject photo and subject (1, 2, 3)."""
    return Graph({k: v for k, v in g.items() if k in ("1", "2", "3")})


def base_eps(comfy, tiny_model: str, name: str) -> torch.Tensor:
    """The base MODEL's noise prediction (the probe reruns: its name changes; the loader is ComfyUI's cached one)."""
    g = without_training(finetune(tiny_model, PHOTOS))
    eval_probe(g, "9", ["1", 0], ["3", 0], name)
    comfy.run_ok(g)
    return comfy.probe(name)[0]["eps"]


@covers("finetune-out-of-memory")
def test_out_of_memory_names_the_settings_and_leaves_the_model(comfy, tiny_model, photos):
    before = base_eps(comfy, tiny_model, "oom_before")
    g = finetune(tiny_model, photos, steps=2)
    g.add("ProbeOutOfMemory", "7", model=["1", 0])
    g["6"]["inputs"]["model"] = ["7", 0]
    message = failed(comfy, g, "BlipDiffusionFinetune", "ran out of memory", "lower batch_size or resolution")
    assert "train lora+subject or subject" in message and "input MODEL is unchanged" in message
    assert torch.equal(base_eps(comfy, tiny_model, "oom_after"), before)
    healthy(comfy, tiny_model)


@covers("finetune-cancel")
def test_cancel_mid_training_leaves_the_model(comfy, tiny_model, photos):
    before = base_eps(comfy, tiny_model, "cancel_before")
    end, steps = asyncio.run(run_and_interrupt(comfy, finetune(tiny_model, photos, steps=40, seed=99), 2, node="6"))
    assert end == "execution_interrupted" and 2 <= max(steps) < 40
    assert torch.equal(base_eps(comfy, tiny_model, "cancel_after"), before)
    healthy(comfy, tiny_model)
    assert comfy.get_json("/queue") == {"queue_running": [], "queue_pending": []}


@covers("finetune-save-not-finetuned")
def test_saving_a_model_that_was_not_fine_tuned(comfy, tiny_model, photos):
    g = without_training(finetune(tiny_model, photos))
    g.add("BlipDiffusionSaveFinetune", "7", model=["1", 0], subject=["3", 0], filename_prefix="ft_tests/plain")
    failed(comfy, g, "BlipDiffusionSaveFinetune", "model: this MODEL carries no fine-tune")


def lavis_failure(comfy, tiny_model: str, checkpoint: str, *expected: str) -> str:
    return failed(
        comfy, lavis_graph(tiny_model, checkpoint, "lavis_bad"), "BlipDiffusionLAVISFinetunedLoader", *expected
    )


@covers("lavis-checkpoint-other-architecture")
def test_lavis_checkpoint_of_another_architecture(comfy, tiny_model, photos, finetuned_folder):
    g = torch.Generator().manual_seed(0)
    sd2 = {
        "conv_in.weight": torch.randn(320, 4, 3, 3, generator=g),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(320, 1024, generator=g),
    }
    lavis_checkpoint(finetuned_folder / "sd2_unet.pth", sd2, torch.randn(1, 16, 768, generator=g))
    lavis_failure(comfy, tiny_model, "sd2_unet.pth", "UNet tensors of other shapes than this MODEL's", "(320, 1024)")
    torch.save(
        {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}},
        finetuned_folder / "sd15.ckpt",
    )
    lavis_failure(
        comfy, tiny_model, "sd15.ckpt", "not a LAVIS BLIP-Diffusion fine-tuned checkpoint", "checkpoint loader"
    )
    healthy(comfy, tiny_model)


@covers("lavis-checkpoint-pickle")
def test_lavis_checkpoint_that_would_run_code(comfy, tiny_model, photos, finetuned_folder, tmp_path):
    marker = tmp_path / "pwned-lavis"
    pickle_bomb(finetuned_folder / "bomb.pth", marker)
    lavis_failure(comfy, tiny_model, "bomb.pth", "refused to load", "weights_only=True rejected it")
    assert not marker.exists()
    healthy(comfy, tiny_model)
