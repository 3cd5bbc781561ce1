"""The trainer's parts: batches and losses, engines (plain / DeepSpeed), trainable modes, checkpoints, resume, exports,
EMA, metrics and the memory plan. ``patchdpo_fast.train`` assembles them into a run."""
