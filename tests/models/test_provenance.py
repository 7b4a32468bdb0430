"""models.evidence.provenance: what the file says about its origin, read defensively."""

from __future__ import annotations

import csv
import datetime
import io
import json
import warnings
from pathlib import Path
from typing import Any

import c2pa
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image, PngImagePlugin

from models.evidence.provenance import MAX_TEXT_BYTES, read_provenance

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
A1111_PARAMETERS = (
    "a lighthouse at dusk, oil painting\nNegative prompt: blurry\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0"
)


def _pixels(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def _encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _read(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return read_provenance(image, data)


def _kinds(result: dict[str, Any]) -> list[str]:
    return [signal["kind"] for signal in result["signals"]]


# --- PNG text chunks
# -------------------------------------------------------------------------------------------


def test_a1111_parameters_chunk_is_decisive() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_PARAMETERS)
    result = _read(_encode(_pixels(), "PNG", pnginfo=info))
    assert result["found"]
    assert result["says"] == "generated"
    assert result["decisive"]
    assert result["generator_hint"] == "v1-5-pruned-emaonly"
    detail = next(s["detail"] for s in result["signals"] if s["kind"] == "generation_parameters")
    assert "6ce0161689" in detail


def test_parameters_chunk_without_generation_settings_is_not_decisive() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "exposure +0.3, white balance auto")
    result = _read(_encode(_pixels(), "PNG", pnginfo=info))
    assert not result["decisive"]
    assert result["says"] is None
    assert "png_text" in _kinds(result)


def test_comfyui_prompt_names_the_checkpoint() -> None:
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "detail_tweaker.safetensors"}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}},
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    result = _read(_encode(_pixels(), "PNG", pnginfo=info))
    assert result["decisive"]
    assert result["generator_hint"] == "sd_xl_base_1.0.safetensors"
    assert "detail_tweaker.safetensors" in result["signals"][0]["detail"]


def test_hostile_text_chunks_are_bounded_and_never_raise() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", "[" * 200_000)  # deep nesting: json recursion
    info.add_text("prompt", "{" + '"a": 1,' * 400_000 + '"b": 2}')  # 3 MB, over the parse cap
    info.add_text("parameters", "Steps: " * 300_000)
    data = _encode(_pixels(), "PNG", pnginfo=info)
    result = _read(data)
    assert isinstance(result["signals"], list)
    for signal in result["signals"]:
        assert len(signal["detail"]) <= 500
    assert len(data) > MAX_TEXT_BYTES


def _png_text(**chunks: str) -> dict[str, Any]:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    return _read(_encode(_pixels(), "PNG", pnginfo=info))


def test_ordinary_words_in_metadata_decide_nothing() -> None:
    # "imagen" is Spanish for "image"; "Dream" is a word; a comment may mention a generator in passing.
    spanish = _read(_encode(_pixels(), "JPEG", exif=_exif(t0131="Editor de imagen 3.2")))
    assert not spanish["decisive"] and spanish["says"] is None
    for chunks in ({"Dream": "my holiday photo"}, {"Comment": "edited after a Midjourney tutorial"}):
        result = _png_text(**chunks)
        assert not result["decisive"], chunks
    # The comment is still shown to a reviewer as a signal pointing that way: a hint, not proof.
    signals = _png_text(Comment="edited after a Midjourney tutorial")["signals"]
    assert [(s["kind"], s["says"], s["decisive"]) for s in signals] == [
        ("png_text_comment", "generated", False)
    ]


def test_tools_and_dream_switches_still_decide() -> None:
    assert _read(_encode(_pixels(), "JPEG", exif=_exif(t0131="Google Imagen 3")))["decisive"]
    assert _png_text(Software="Midjourney v6")["decisive"]
    dream = _png_text(Dream='"a castle at dawn" -s 50 -S 1234 -W 512 -H 512 -C 7.5 -A k_lms')
    assert dream["decisive"] and dream["says"] == "generated"


# --- XMP / IPTC
# --------------------------------------------------------------------------------------------------


def _xmp(source_type: str, element: bool = False) -> bytes:
    uri = IPTC + source_type
    if element:
        body = f"<Iptc4xmpExt:DigitalSourceType>{uri}</Iptc4xmpExt:DigitalSourceType>"
        attribute = ""
    else:
        body = ""
        attribute = f' Iptc4xmpExt:DigitalSourceType="{uri}"'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        f"{attribute}>{body}</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


@pytest.mark.parametrize("element", [False, True])
def test_xmp_trained_algorithmic_media_is_decisive(element: bool) -> None:
    data = _encode(_pixels(), "JPEG", xmp=_xmp("trainedAlgorithmicMedia", element))
    result = _read(data)
    assert result["decisive"]
    assert result["says"] == "generated"
    assert "xmp_digital_source_type" in _kinds(result)


def test_xmp_source_type_is_found_across_whitespace_and_rdf_tags_and_a_crafted_packet_ends() -> None:
    spaced = _xmp("trainedAlgorithmicMedia", element=True).replace(
        b"DigitalSourceType>", b"DigitalSourceType>\n   <rdf:Alt> <rdf:li>  ", 1
    )
    assert _read(_encode(_pixels(), "JPEG", xmp=spaced))["decisive"]
    # A long run of spaces after the tag and nothing to match: backtracking once grew with the square of the
    # run (minutes at this size, hours at 900k); the scan must end, finding nothing.
    crafted = b"<x:xmpmeta>DigitalSourceType>" + b" " * 60_000 + b"</x:xmpmeta>"
    assert not _read(_encode(_pixels(), "PNG", pnginfo=_png_with_xmp(crafted)))["decisive"]


def test_xmp_composite_with_trained_media_read_from_bytes_alone() -> None:
    data = _encode(_pixels(), "PNG", pnginfo=_png_with_xmp(_xmp("compositeWithTrainedAlgorithmicMedia")))
    with Image.open(io.BytesIO(data)) as image:
        image.info.pop("XML:com.adobe.xmp", None)  # only the raw bytes carry the packet now
        result = read_provenance(image, data)
    assert result["decisive"]


def _png_with_xmp(packet: bytes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", packet.decode())
    return info


def test_xmp_digital_capture_is_camera_evidence_only() -> None:
    result = _read(_encode(_pixels(), "JPEG", xmp=_xmp("digitalCapture")))
    assert result["says"] == "camera"
    assert not result["decisive"]


# --- EXIF
# ------------------------------------------------------------------------------------------------------


def _exif(**tags: Any) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[int(tag.removeprefix("t"), 16)] = value
    return exif.tobytes()


def test_camera_make_and_model_are_evidence_but_never_decisive() -> None:
    data = _encode(
        _pixels(), "JPEG", exif=_exif(t010F="NIKON CORPORATION", t0110="NIKON D750", t0131="Ver.1.10")
    )
    result = _read(data)
    assert result["camera"] == {"make": "NIKON CORPORATION", "model": "NIKON D750", "software": "Ver.1.10"}
    assert result["says"] == "camera"
    assert not result["decisive"]
    assert result["generator_hint"] is None


def test_generator_named_in_software_is_decisive_and_beats_camera_exif() -> None:
    data = _encode(_pixels(), "JPEG", exif=_exif(t010F="Canon", t0110="Canon EOS R5", t0131="Adobe Firefly"))
    result = _read(data)
    assert result["says"] == "generated"
    assert result["decisive"]
    assert result["camera"]["make"] == "Canon"


def test_ordinary_editing_software_is_not_a_generator() -> None:
    result = _read(_encode(_pixels(), "JPEG", exif=_exif(t0131="Adobe Photoshop 25.0 (Macintosh)")))
    assert not result["decisive"]
    assert result["says"] is None


def test_a1111_parameters_in_exif_user_comment() -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111_PARAMETERS.encode("utf-16-be")
    result = _read(_encode(_pixels(), "JPEG", exif=exif.tobytes()))
    assert result["decisive"]
    assert result["generator_hint"] == "v1-5-pruned-emaonly"


def test_no_metadata_finds_nothing_and_says_nothing() -> None:
    result = _read(_encode(_pixels(), "PNG"))
    assert result == {
        "found": False,
        "says": None,
        "decisive": False,
        "signals": [],
        "generator_hint": None,
        "camera": None,
        "notes": [],
    }


def test_without_bytes_the_decoded_info_is_still_read() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_PARAMETERS)
    with Image.open(io.BytesIO(_encode(_pixels(), "PNG", pnginfo=info))) as image:
        result = read_provenance(image, None)
    assert result["decisive"]
    assert result["notes"]


# --- C2PA
# --------------------------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "synthguard tests"),
        ]
    )


def _key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.fixture(scope="module")
def c2pa_signer_material() -> tuple[bytes, bytes]:
    """A throwaway CA and signing certificate (PEM chain, PEM key), made here: nothing is read from disk."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=7))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("synthguard test CA"))
        .issuer_name(_name("synthguard test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(sign=False, ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("synthguard test signer"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign=True, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, private


def _signed_jpeg(material: tuple[bytes, bytes], source_type: str, agent: str) -> bytes:
    manifest = {
        "claim_generator_info": [{"name": "synthguard-tests", "version": "1"}],
        "title": "image.jpg",
        "format": "image/jpeg",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": IPTC + source_type,
                            "softwareAgent": {"name": agent},
                        }
                    ]
                },
            }
        ],
    }
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", material[0], material[1], None))
    destination = io.BytesIO()
    with c2pa.Builder(json.dumps(manifest)) as builder:
        builder.sign(signer, "image/jpeg", io.BytesIO(_encode(_pixels(), "JPEG", quality=90)), destination)
    return destination.getvalue()


def test_c2pa_manifest_declaring_trained_media_is_decisive(c2pa_signer_material: tuple[bytes, bytes]) -> None:
    result = _read(_signed_jpeg(c2pa_signer_material, "trainedAlgorithmicMedia", "DreamPainter 3"))
    assert result["decisive"]
    assert result["says"] == "generated"
    assert result["generator_hint"] == "DreamPainter 3"
    signal = next(s for s in result["signals"] if s["kind"] == "c2pa")
    assert "trainedAlgorithmicMedia" in signal["detail"]
    assert "untrusted" in signal["detail"]  # a throwaway CA is on no trust list, and the reader says so


def test_c2pa_capture_manifest_is_camera_evidence(c2pa_signer_material: tuple[bytes, bytes]) -> None:
    result = _read(_signed_jpeg(c2pa_signer_material, "digitalCapture", "PhoneCam"))
    assert result["says"] == "camera"
    assert not result["decisive"]


def test_damaged_c2pa_manifest_is_recorded_not_raised(c2pa_signer_material: tuple[bytes, bytes]) -> None:
    data = bytearray(_signed_jpeg(c2pa_signer_material, "trainedAlgorithmicMedia", "DreamPainter 3"))
    marker = data.find(b"c2pa.signature")
    assert marker > 0
    for offset in range(marker + 40, marker + 240, 7):
        data[offset] ^= 0xFF
    result = _read(bytes(data))
    kinds = _kinds(result)
    assert "c2pa" in kinds or "c2pa_error" in kinds
    if "c2pa" in kinds:
        detail = next(s["detail"] for s in result["signals"] if s["kind"] == "c2pa")
        assert "validation problems" in detail


# --- shared files
# ------------------------------------------------------------------------------------------------


def _provenance_rows(shared_datasets: Path) -> list[dict[str, str]]:
    with (shared_datasets / "provenance" / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_shared_comfyui_outputs_are_decisively_generated(shared_datasets: Path) -> None:
    fakes = [row for row in _provenance_rows(shared_datasets) if row["label"] == "fake"]
    assert len(fakes) == 4
    for row in fakes:
        path = shared_datasets / "provenance" / row["relpath"]
        result = _read(path.read_bytes())
        assert result["decisive"], row["relpath"]
        assert "comfyui_workflow" in _kinds(result)
        listed = row["notes"].split("embedded workflow models:")[1].strip().split("|")
        assert result["generator_hint"] in listed, (row["relpath"], result["generator_hint"], listed)


def test_shared_camera_jpegs_are_never_decisive(shared_datasets: Path) -> None:
    reals = [row for row in _provenance_rows(shared_datasets) if row["label"] == "real"]
    assert len(reals) == 4
    with_camera = 0
    for row in reals:
        path = shared_datasets / "provenance" / row["relpath"]
        result = _read(path.read_bytes())
        assert not result["decisive"]
        assert result["says"] in {"camera", None}
        if result["camera"]:
            with_camera += 1
            brand = Path(row["relpath"]).stem.split()[0].lower()
            assert brand in result["camera"]["make"].lower()
    assert with_camera == 3  # the Casio file carries no EXIF at all


def test_hostile_metadata_files_never_raise(shared_datasets: Path) -> None:
    folder = shared_datasets / "hostile" / "pillow-tests"
    names = ["itxt_chunks.png", "hopper_bad_exif.jpg", "exif-ifd-offset.jpg", "exif_typeerror.jpg"]
    names += ["exif-dpi-zerodivision.jpg", "icc_profile_big.jpg", "icc-after-SOF.jpg", "pil_sample_cmyk.jpg"]
    names += sorted(p.name for p in folder.glob("invalid-exif*.jpg"))
    for name in names:
        data = (folder / name).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # opening may warn about the damage; that is the decoder's business
            image = Image.open(io.BytesIO(data))
        result = read_provenance(image, data)  # under filterwarnings=error: neither raises nor warns
        assert set(result) == {"found", "says", "decisive", "signals", "generator_hint", "camera", "notes"}
