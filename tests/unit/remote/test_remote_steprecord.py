"""Published step records: tags, round trips, and every way a record can fail verification."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import pytest

from microagent.compiler.keys import StepKind, step_key
from microagent.compiler.plan import Step
from microagent.digests import canonical_json
from microagent.errors import IntegrityError
from microagent.oci import documents as oci
from microagent.remotecache.records import (
    STEP_ANNOTATION,
    BaseDocs,
    LayerRef,
    PublishedStep,
    inputs_digest,
    key_of_tag,
    layer_descriptor,
    parse_step_manifest,
    step_tag,
    verify_base,
    verify_chain,
)

TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
PLATFORM = "linux/amd64"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(n: int) -> LayerRef:
    return LayerRef(oci.OCI_LAYER_ZSTD, _digest(b"blob%d" % n), 100 + n, _digest(b"tar%d" % n))


def _setup(parent: str, run: str, layers: tuple[LayerRef, ...]) -> PublishedStep:
    inputs = {"run": run, "interpreter": ["/bin/sh", "-eu", "-c"]}
    key = step_key(parent, StepKind.SETUP, inputs)
    return PublishedStep(key, StepKind.SETUP, parent, inputs, inputs_digest(inputs), layers)


def _manifest(step: PublishedStep, layers: list[dict[str, Any]] | None = None) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": _digest(b"{}"),
            "size": 2,
        },
        "layers": layers if layers is not None else [layer_descriptor(x) for x in step.layers],
        "annotations": {STEP_ANNOTATION: canonical_json(step.to_json()).decode()},
    }
    return canonical_json(doc)


PARENT = _digest(b"parent")


def test_step_tags_are_valid_registry_tags_and_reversible() -> None:
    key = _digest(b"x")
    tag = step_tag(key)
    assert TAG_RE.match(tag) and len(tag) == 69
    assert key_of_tag(tag) == key
    assert key_of_tag("latest") is None and key_of_tag("step-zz") is None


def test_record_round_trips_and_verifies() -> None:
    step = _setup(PARENT, "pip install x", (_layer(0), _layer(1)))
    again = parse_step_manifest(_manifest(step), step.key)
    assert again == step and again.layer == _layer(1)


def test_record_for_another_key_is_refused() -> None:
    step = _setup(PARENT, "a", (_layer(0),))
    other = _setup(PARENT, "b", (_layer(0),))
    with pytest.raises(IntegrityError, match="the record is for"):
        parse_step_manifest(_manifest(step), other.key)


def test_edited_inputs_are_refused() -> None:
    step = _setup(PARENT, "a", (_layer(0),))
    edited = PublishedStep(
        step.key,
        step.kind,
        step.parent,
        {**(step.inputs or {}), "run": "evil"},
        step.inputs_digest,
        step.layers,
    )
    with pytest.raises(IntegrityError, match="inputsDigest"):
        parse_step_manifest(_manifest(edited), step.key)
    forged = PublishedStep(
        step.key,
        step.kind,
        step.parent,
        edited.inputs,
        inputs_digest(edited.inputs or {}),
        step.layers,
    )
    with pytest.raises(IntegrityError, match="do not hash to the key"):
        parse_step_manifest(_manifest(forged), step.key)


def test_manifest_layers_must_match_the_record() -> None:
    step = _setup(PARENT, "a", (_layer(0), _layer(1)))
    with pytest.raises(IntegrityError, match="other layers"):
        parse_step_manifest(_manifest(step, [layer_descriptor(_layer(0))]), step.key)


def test_missing_annotation_and_bad_json_are_refused() -> None:
    step = _setup(PARENT, "a", (_layer(0),))
    doc = json.loads(_manifest(step))
    del doc["annotations"]
    with pytest.raises(IntegrityError, match=r"no io\.microagent\.step\.v1"):
        parse_step_manifest(canonical_json(doc), step.key)
    with pytest.raises(IntegrityError):
        parse_step_manifest(b"not json", step.key)


def test_config_steps_carry_only_the_inputs_digest() -> None:
    inputs = {"env": {"A": "secret-ish"}, "entrypoint": ["x"]}
    key = step_key(PARENT, StepKind.CONFIG, inputs)
    step = PublishedStep(
        key, StepKind.CONFIG, PARENT, None, inputs_digest(inputs), (), summary={"envKeys": ["A"]}
    )
    data = _manifest(step)
    assert b"secret-ish" not in data
    plan_step = Step(StepKind.CONFIG, key, PARENT, inputs, "x")
    assert parse_step_manifest(data, key, plan_step).summary == {"envKeys": ["A"]}
    other = Step(StepKind.CONFIG, key, PARENT, {**inputs, "entrypoint": ["y"]}, "y")
    with pytest.raises(IntegrityError, match="differ from the local plan"):
        parse_step_manifest(data, key, other)
    setup = PublishedStep(key, StepKind.SETUP, PARENT, None, inputs_digest(inputs), ())
    with pytest.raises(IntegrityError, match="must carry its inputs"):
        setup.verify(key)


def test_chain_must_extend_the_parent_by_one_layer() -> None:
    step = _setup(PARENT, "a", (_layer(0), _layer(1), _layer(2)))
    verify_chain(step, (_layer(0), _layer(1)))
    with pytest.raises(IntegrityError, match="does not extend"):
        verify_chain(step, (_layer(0),))
    with pytest.raises(IntegrityError, match="does not extend"):
        verify_chain(step, (_layer(0), _layer(3)))


def _base(*, index: bool, layers: tuple[LayerRef, ...] | None = None) -> PublishedStep:
    config = _digest(b"config")
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": config, "size": 6},
            "layers": [layer_descriptor(x) for x in (_layer(0), _layer(1))],
        }
    )
    docs = {_digest(manifest): manifest}
    top = _digest(manifest)
    if index:
        entry = {
            "mediaType": oci.OCI_MANIFEST,
            "digest": _digest(manifest),
            "size": len(manifest),
            "platform": {"os": "linux", "architecture": "amd64"},
        }
        other = {
            **entry,
            "digest": _digest(b"arm"),
            "platform": {"os": "linux", "architecture": "arm64"},
        }
        index_doc = canonical_json(
            {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [other, entry]}
        )
        top = _digest(index_doc)
        docs[top] = index_doc
    inputs = {"digest": top, "platform": PLATFORM}
    key = step_key(None, StepKind.BASE, inputs)
    base = BaseDocs("example/ref", _digest(manifest), config, docs)
    chain = layers if layers is not None else (_layer(0), _layer(1))
    return PublishedStep(key, StepKind.BASE, None, inputs, inputs_digest(inputs), chain, base)


@pytest.mark.parametrize("index", [False, True])
def test_base_documents_tie_the_layers_to_the_image_digest(index: bool) -> None:
    step = _base(index=index)
    again = parse_step_manifest(_manifest(step), step.key)
    assert verify_base(again).config.digest == _digest(b"config")


def test_base_with_other_layers_than_its_image_is_refused() -> None:
    step = _base(index=True, layers=(_layer(0), _layer(5)))
    with pytest.raises(IntegrityError, match="base layers differ"):
        verify_base(parse_step_manifest(_manifest(step), step.key))


def test_base_documents_are_checked_against_their_digests() -> None:
    step = _base(index=False)
    raw = step.to_json()
    digest = next(iter(raw["base"]["documents"]))
    raw["base"]["documents"][digest] = base64.b64encode(b"{}").decode()
    with pytest.raises(IntegrityError, match="does not match its digest"):
        PublishedStep.from_json(raw)
    missing = _base(index=True)
    assert missing.base is not None
    docs = {d: v for d, v in missing.base.documents.items() if d == missing.base.manifest}
    cut = PublishedStep(
        missing.key,
        missing.kind,
        None,
        missing.inputs,
        missing.inputs_digest,
        missing.layers,
        BaseDocs("r", missing.base.manifest, missing.base.config, docs),
    )
    with pytest.raises(IntegrityError, match=r"image document .* is missing"):
        verify_base(cut)


def test_docker_gzip_layers_are_published_with_the_oci_type() -> None:
    layer = LayerRef.from_json(
        {
            "mediaType": oci.DOCKER_LAYER_GZIP,
            "digest": _digest(b"a"),
            "size": 1,
            "diffId": _digest(b"b"),
        }
    )
    assert layer_descriptor(layer)["mediaType"] == oci.OCI_LAYER_GZIP
    with pytest.raises(IntegrityError, match="bad layer size"):
        LayerRef.from_json({"digest": _digest(b"a"), "size": -1, "diffId": _digest(b"b")})
