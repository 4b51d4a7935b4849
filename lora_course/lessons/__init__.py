"""One module per notebook: its widgets, exercise checkers, toy data and lesson-only experiments.

    l01_low_rank        notebook 01, SVD and low rank
    l02_intrinsic_rank  notebook 02, intrinsic rank
    l03_lora_linear     notebook 03, LoRALinear from scratch
    l04_rank_alpha      notebook 04, rank and alpha
    l05_transformer     notebook 05, LoRA in a transformer
    l06_finetune        notebook 06, fine-tuning GPT-2
    common              what the lessons' exercise checkers share

A notebook imports the library (`lora_course`) and its own lesson module, never another
notebook's. Widgets are thin shells over pure functions that the tests call directly.
"""
