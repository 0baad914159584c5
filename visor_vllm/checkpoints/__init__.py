"""VISOR checkpoint directories: the file format, hub-free builders, the LLaVA-OV converter.

Import direction inside: `files` (the format) <- `convert` (weight map + pure function) <-
`build` (tiny and weightless builders, which run the converter). Imports `visor_vllm.model`.
"""
