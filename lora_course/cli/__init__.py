"""The command lines: `python -m lora_course.finetune` and `python -m lora_course.distributed` (or torchrun).

    common        one usage-error path (status 2, one line, nothing written) and the models both build
    finetune      fine-tune GPT-2 with LoRA or fully, save a PEFT adapter and run.json
    distributed   check the input, launch torchrun, or (under torchrun) run the experiment
    ddp_runs      the experiment inside each torchrun process: DDP, one-process reference, unused adapters, FSDP
"""
