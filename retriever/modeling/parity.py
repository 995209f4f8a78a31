"""Train/serve parity: a query encoder must embed like the encoder that made the index.

In: the encoder settings an index recorded (``Encoder.settings()`` of the encode pipeline, kept
in the embeddings manifest's ``encoder`` and carried into the index manifest's
``source.encoder``; :func:`index_settings`) and those of the query encoder about to search it
(:func:`query_settings`, read without loading weights). Out: :func:`check_encoder_matches`
returns the differences, or raises :class:`EncoderMismatch` naming the index and every differing
field with both values.

Compared (:data:`MUST_MATCH`): the weights' content identity (``model_hash``,
``ResolvedModel.fingerprint``; the model name when a side recorded no hash), pooling,
normalisation, the one-word prompt, the query prefix (instruction included) and query max
length, the appended EOS and the vector dimension. Recorded only: the passage prefix and max
length (they shaped the stored vectors, not the query's) and the precisions ``dtype`` and
``query_dtype`` (a float32 CPU query encoder searching bfloat16 GPU embeddings runs the same
model). A field the index did not
record (an older manifest) is not compared. ``allow_asymmetric`` says the difference is
intended (an asymmetric query encoder, e.g. a distilled query tower): it is logged, not refused.
"""

from __future__ import annotations

import logging

from retriever.errors import InputError

log = logging.getLogger(__name__)

MUST_MATCH = ("model_hash", "pooling", "normalize", "prompt", "query_prefix",
              "query_max_length", "append_eos", "dim")
FLAG = "--allow-asymmetric-encoder"


class EncoderMismatch(InputError):
    """The query encoder is not the one the index was encoded with."""


def index_settings(manifest: dict) -> dict:
    """The encoder settings an index manifest recorded, with the index's own ``dim``."""
    recorded = dict((manifest.get("source") or {}).get("encoder") or {})
    if manifest.get("dim") is not None:
        recorded["dim"] = int(manifest["dim"])
    return recorded


def query_settings(config) -> dict:
    """``Encoder.settings()`` of the query encoder ``config`` (an ``EncoderConfig``) would
    build: tokenizer, defaults and weights identity, no weights loaded."""
    from retriever.modeling.encoder import WeightlessEncoder

    return WeightlessEncoder(config, device="cpu").settings()


def differences(index: dict, query: dict) -> dict[str, tuple]:
    """``{field: (index value, query value)}`` for each :data:`MUST_MATCH` field the index
    recorded and the query side resolves otherwise."""
    names = list(MUST_MATCH)
    if not (index.get("model_hash") and query.get("model_hash")):
        names[0] = "model"  # an older record: the name is all there is to compare
    return {name: (index[name], query.get(name)) for name in names
            if index.get(name) is not None and index[name] != query.get(name)}


def check_encoder_matches(index: dict, query: dict, *, allow_asymmetric: bool = False,
                          index_name: str = "the index") -> dict[str, tuple]:
    """Refuse (:class:`EncoderMismatch`) a query encoder whose settings ``query`` differ from
    the index's recorded ``index`` settings, unless ``allow_asymmetric``; returns the
    differences (empty when they match)."""
    found = differences(index, query)
    if not found:
        return found
    lines = "; ".join(f"{name}: index {old!r} vs query {new!r}"
                      for name, (old, new) in found.items())
    message = (f"{index_name} was encoded with model {index.get('model')!r}, the query "
               f"encoder is {query.get('model')!r}, and they differ in {lines}")
    if not allow_asymmetric:
        raise EncoderMismatch(f"{message}. Serve or evaluate with the index's own encoder, or "
                              f"pass {FLAG} if the query encoder is meant to differ")
    log.warning("%s (allowed: asymmetric query encoder)", message)
    return found
