"""Stage 2: instruction tuning on image Q&A (single- and multi-turn). Starts from stage 1's
out/{dim}[_moe]_vlm_pretrain (.safetensors or .pth); writes out/{dim}[_moe]_vlm_sft.safetensors.

  python 2-sft_vlm.py
  torchrun --nproc_per_node 2 2-sft_vlm.py
"""
from trainer.train import Recipe, train

RECIPE = Recipe(
    stage="sft",
    description="MiniMind-V stage 2: supervised fine-tuning on image Q&A (LLaVA-format data).",
    data_path="dataset/LLaVA-Instruct/llava_instruct_230k.json",  # upstream v1's file and place
    images_dir="dataset/sft_images",  # COCO_train2014_{name}: found by the prefix lookup
    init_suffix="_vlm_pretrain",
    init_help="Run 1-pretrain_vlm.py first, or download a released *_vlm_pretrain.pth into out/.",
    allow_missing=(),
    epochs=4,
    batch_size=8,
    learning_rate=1e-5,
    max_seq_len=640,
)

if __name__ == "__main__":
    train(RECIPE)
