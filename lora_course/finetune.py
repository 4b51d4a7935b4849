"""`python -m lora_course.finetune`: fine-tune GPT-2 with LoRA (or fully) from a terminal.

The command line lives in `lora_course.cli.finetune` (`--help` lists its options).
"""

from .cli.finetune import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

if __name__ == "__main__":
    raise SystemExit(main())
