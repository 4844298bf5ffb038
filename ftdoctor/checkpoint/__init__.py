"""Every model format in, every format out: safety, architectures, atomic writes (SPEC §3 "Models", §8).

A checkpoint is untrusted input. :func:`load_model` reads it once
(:mod:`.reading`: ``torch.load(weights_only=True)`` and nothing else unless
``--trust-checkpoint``; a pickle that asks for more is refused, naming the
globals it wants) and hands it to the first registered model source that
recognises it (:mod:`.sources`):

==================  =======================================================  ========================
source              recognises                                               module
==================  =======================================================  ========================
``torchscript``     a TorchScript archive (needs ``--trust-checkpoint``)     :mod:`.torchscript`
``pickled-module``  a full pickled ``nn.Module`` (``--trust-checkpoint``)    :mod:`.pickled`
``onnx``            a ``.onnx`` export (onnx2torch; written back as ONNX)     :mod:`.onnx`
``hf``              a Hugging Face ``save_pretrained`` folder (transformers)  :mod:`.hf`
``timm``            a timm hub folder, or a state dict with ``--arch         :mod:`.timm`
                    timm:NAME`` (timm installed)
``import-path``     a state dict with ``--arch pkg.module:callable``         :mod:`.importpath`
``torchvision``     a state dict with ``--arch NAME``, or recognised by its  :mod:`.torchvision`
                    keys and shapes (candidates built on ``meta``)
==================  =======================================================  ========================

A state dict may be bare or wrapped (``state_dict``, ``model``,
``model_state_dict``, ``net``), keys prefixed by ``module.`` or ``model.``,
in a ``torch.save`` file or ``.safetensors``. A model folder (``config.json`` beside the weights) is read
as one checkpoint (:mod:`.folder`). :func:`save_model` writes a
changed model back the way it came (same format, wrapper, key names, prefix,
dtypes), atomically, through the source that read it.
"""
from __future__ import annotations

from ftdoctor.checkpoint import hf, importpath, onnx, pickled, timm, torchscript, torchvision  # noqa: F401,E402  (registration)
from ftdoctor.checkpoint.common import (
                                        AFFINE_TYPES,
                                        STRIPPED_PREFIXES,
                                        WRAPPER_KEYS,
                                        Container,
                                        LoadedModel,
                                        ModelOptions,
                                        affine_modules,
                                        sha256_file,
)
from ftdoctor.checkpoint.loading import (
                                        check_arch,
                                        load_model,
                                        parse_device,
                                        validate_options,
)
from ftdoctor.checkpoint.reading import CheckpointFile, read_checkpoint, torch_is_safe
from ftdoctor.checkpoint.sources import (
                                        MODEL_SOURCES,
                                        ModelSource,
                                        register_model_source,
)
from ftdoctor.checkpoint.writing import check_output_path, save_model, write_sidecar
from ftdoctor.outputs import atomic_write

FORMATS = ("state_dict", "safetensors", "module", "torchscript", "onnx")

__all__ = ["AFFINE_TYPES", "FORMATS", "MODEL_SOURCES", "STRIPPED_PREFIXES", "WRAPPER_KEYS", "CheckpointFile",
           "Container", "LoadedModel", "ModelOptions", "ModelSource", "affine_modules", "atomic_write",
           "check_arch", "check_output_path", "load_model", "parse_device", "read_checkpoint",
           "register_model_source", "save_model", "sha256_file", "torch_is_safe", "validate_options",
           "write_sidecar"]
