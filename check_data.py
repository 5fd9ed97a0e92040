"""Check a LLaVA-format dataset and its images before training: every problem with its file, line and record
id, counted per kind; exit status 1 if a record cannot be trained on or would be dropped.

  python check_data.py --data_path dataset/pretrain_data.jsonl --images_dir dataset/pretrain_images
  python check_data.py --data_path dataset/sft_data.jsonl --images_dir dataset/sft_images --full --report problems.jsonl

The training scripts run the same check with --check_data (on their own --data_path, --images_dir, ...).
"""
import sys

from trainer.data_check import main

if __name__ == "__main__":
    sys.exit(main())
