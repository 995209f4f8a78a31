"""Contrastive fine-tuning of retrievers on Ray Train: DeepSpeed ZeRO-3 (or ZeRO-2, DDP) + LoRA.

Modules, driver to worker: ``config`` (TrainConfig), ``run`` (TorchTrainer, scaling, storage,
failure handling), ``loop`` (the per-worker loop), ``batches`` (deterministic sharded groups),
``texts`` (the Encoder's tokenization rules), ``model`` (backbone under HfDeepSpeedConfig,
pooling), ``losses`` (InfoNCE, Matryoshka), ``gradcache`` (GradCache: large contrastive
batches in chunks), ``lora``, ``engines`` (ZeRO-3 / ZeRO-2 / DDP behind one interface),
``checkpoint`` and ``export`` (safetensors + JSON; adapter and merged model directories).
Nothing here is imported eagerly: DeepSpeed and Ray load only where they are used.
"""
