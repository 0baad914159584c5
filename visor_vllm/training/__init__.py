"""Training VISOR (paper Sec. 4.2.3, 5.1): data, the batched model, stages, the recipe.

* `synthetic` -- the embedded easy/hard grid task (``visor-vllm data synth``);
* `data` -- LLaVA conversation files / `datasets` -> the tokens the server sees, bad samples
  counted and skipped;
* `model` -- the batched, trainable VISOR forward (the reference model's modules), the answer
  loss, what each stage trains;
* `recipe` -- one versioned YAML per run; `trainer` -- the Accelerate loop with save/resume
  (``visor-vllm train``, ``accelerate launch -m visor_vllm.training``);
* `evaluate` -- offline accuracy per family and configuration;
* `pipeline` -- ``visor-vllm recipe synthetic``: data, dense baseline, convert, stage 1,
  stage 2, evaluation, ``report.json``.

Imports `visor_vllm.model` and `visor_vllm.checkpoints`; never vLLM, the engine or serving, so
it runs on machines without vLLM (the GPU image used for real-size training has none).
"""
