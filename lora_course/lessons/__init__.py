"""One module per notebook: its widgets, exercise checkers, toy data and lesson-only experiments.

    l01_low_rank        notebook 01, SVD and low rank
    l02_intrinsic_rank  notebook 02, intrinsic rank
    l03_lora_linear     notebook 03, LoRALinear from scratch
    l04_rank_alpha      notebook 04, rank and alpha
    l05_transformer     notebook 05, LoRA in a transformer
    l06_finetune        notebooks 06 and 06b, fine-tuning GPT-2: LoRA against full fine-tuning, and the gap's ladder
    l07_qlora           notebook 07, QLoRA: NF4 by hand and a 4-bit base
    l08_variants        notebook 08, DoRA, PiSSA and many adapters on one base
    l09_distributed     notebook 09, DDP, FSDP and the bytes LoRA puts on the wire
    l10_adapter_algebra notebook 10, merging adapters and intruder dimensions
    common              what the lessons' exercise checkers share

A notebook imports the library (`lora_course`) and its own lesson module, never another
notebook's. Widgets are thin shells over pure functions that the tests call directly.
"""
