"""Stage 1: caption pretraining. Teaches the projector (and the LLM) to talk about what the frozen CLIP tower
sees. Starts from a text-only MiniMind LLM, out/{dim}[_moe]_llm.pth; writes out/{dim}[_moe]_vlm_pretrain.safetensors.

  python 1-pretrain_vlm.py                                   # one process
  torchrun --nproc_per_node 2 1-pretrain_vlm.py              # DDP
"""
from trainer.train import Recipe, train

RECIPE = Recipe(
    stage="pretrain",
    description="MiniMind-V stage 1: image-caption pretraining (LLaVA-format data).",
    data_path="dataset/LLaVA-Pretrain/chat-translated.json",  # upstream v1's file and place
    images_dir="dataset/pretrain_images",
    init_suffix="_llm",
    init_help="Download the pretrained MiniMind v1 language model (512_llm.pth, 768_llm.pth or 512_moe_llm.pth, in "
              "the out/ folder of the jingyaogong/minimind-v_dataset repository on Hugging Face) into out/, and use "
              "upstream's tokenizer with it (see README, 'Training on real data').",
    allow_missing=("vision_proj.",),  # a text-only LLM has no projector yet
    epochs=4,
    batch_size=16,
    learning_rate=4e-4,
    max_seq_len=640,
)

if __name__ == "__main__":
    train(RECIPE)
