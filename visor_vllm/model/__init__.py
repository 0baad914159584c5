"""The VISOR model itself, shared by everything else; imports no vLLM and no other subpackage.

* `config` -- `VisorConfig` (LLaVA-OV config + the checked per-layer ``layer_types`` schedule)
  and the presets;
* `plan` -- the layout document: sequence order, RoPE positions, routing votes, per-image conv;
* `packing` -- VISOR-TR token packing (paper Appendix I);
* `budget` -- per-request budgets and how they restrict the router (the reference model honours
  them, so they are part of the model; serving only exposes them);
* `flops` -- the analytic FLOP model;
* `reference` -- plain-PyTorch VISOR, the specification every other implementation is held to.
"""
