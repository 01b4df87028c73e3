from .aim import AIM, PRESETS, ModelArgs, last_probe_layers, preset_args, sincos_pos_embed

__all__ = ["AIM", "PRESETS", "ModelArgs", "last_probe_layers", "preset_args", "sincos_pos_embed"]
