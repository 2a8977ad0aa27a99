"""bombkd training: features from frozen backbones, converters and the fusion head, trained on
either loader. The modules, in data-flow order:

    config.py       every command's typed config (DataConfig nested in train/eval), checked first
    backbones/      frozen video models by name: clips [B, T, S, S, 3] -> features [B, T', D]
    featurize/      videos -> every backbone -> a feature cache (state, estimate, run)
    converters.py   student -> teacher feature maps: the model, its checkpoint record, its training
    data.py         the mode switch: cached batches, or clip batches through the student
    fusion.py       the residual-gated fusion head over the student and converted teachers
    trainer.py      the one training loop: setup_data, setup_model, setup_optim, train
    evaluate.py     top-1, top-5, per-class accuracy and the confusion matrix of a fusion head
    checkpoint.py   the checkpoint kinds, and how each is saved and loaded
    runtime.py      the process: rank and device under torchrun, torch's CPU threads
    demo.py         the whole path on the sample data, in both modes
    cli/            the ``bombkd`` command, one thin module per command group
"""
