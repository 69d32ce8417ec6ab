"""Turn a LAVIS BLIP-Diffusion fine-tuned subject into a subject file for the Load Subject node.

    python tools/import_lavis_subject.py CHECKPOINT.pth OUT.safetensors --category dog

LAVIS fine-tuning learns a subject embedding, `ctx_embeddings_cache` [1, 16, 768], saved in
the training checkpoint under "model" (or alone in ctx_embeddings_cache/ctx_embeddings_cache.pt).
The checkpoint is read with torch.load(weights_only=True), which refuses pickles that would run
code. Put OUT.safetensors in ComfyUI/models/blip_diffusion_subjects/.

LAVIS fine-tunes the whole UNet together with this embedding; the subject file holds only the
embedding, so with the base BLIP-Diffusion UNet it is an approximation of the fine-tuned model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blip_diffusion_nodes.blip_core.subject_file import save_subject, subject_from_lavis


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="LAVIS fine-tuned checkpoint (.pth) or ctx_embeddings_cache.pt")
    p.add_argument("out", type=Path, help="subject file to write (.safetensors)")
    p.add_argument("--category", required=True, help="the subject's category word, e.g. dog")
    args = p.parse_args(argv)
    if args.out.suffix.lower() != ".safetensors":
        p.error(f"{args.out}: the subject file must end in .safetensors")
    try:
        subject = subject_from_lavis(args.checkpoint, args.category)
        save_subject(subject, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {subject.category!r}, embeddings {tuple(subject.embeds.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
