"""ImageNet (ILSVRC2012) val and train with their VOC XML boxes, from a folder or the box archive itself."""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.classes import canonical_wnid, wnid_to_index
from pipeline.files import open_regular, read_regular
from pipeline.records import Box, RejectedInput, Rejection, SourceRecord
from pipeline.sources._common import (
    SOURCE_IMAGE_SUFFIXES,
    Found,
    Output,
    SourceError,
    check_boxes,
    checked_size,
    join_by_stem,
    most_common,
    printable,
    require_dir,
    scan,
    stem,
    wnid_for,
)


@dataclass(frozen=True)
class XmlRef:
    """One VOC XML: ``name`` for outputs, and either its bytes (from an archive) or the ``path`` to read."""

    name: str
    path: str | None = None
    data: bytes | None = None


def voc_box(wnid: str, xmin: float, ymin: float, xmax: float, ymax: float) -> Box:
    """VOC's 1-based inclusive corners -> half-open source pixels."""
    return Box(float(xmin) - 1.0, float(ymin) - 1.0, float(xmax), float(ymax), wnid)


@dataclass(frozen=True)
class VocAnnotation:
    """The parts of an ImageNet VOC XML the readers use; boxes in raw VOC numbers."""

    filename: str
    size: tuple[int, int] | None
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...]


def _number(node: ET.Element | None, what: str) -> float:
    if node is None or node.text is None:
        raise RejectedInput("malformed_annotation", f"missing <{what}>")
    try:
        return float(node.text.strip())
    except ValueError:
        raise RejectedInput("malformed_annotation", f"<{what}> is not a number: {printable(node.text.strip(), 24)}") from None


def parse_voc_xml(data: bytes) -> VocAnnotation:
    """Parse one ImageNet/VOC annotation; RejectedInput says what is wrong.

    The reason is ``malformed_annotation``, or ``decompression_bomb`` for a
    ``<size>`` larger than any image the builder decodes.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise RejectedInput("malformed_annotation", f"XML: {exc}") from None
    if root.tag != "annotation":
        raise RejectedInput("malformed_annotation", f"root element is <{printable(root.tag, 24)}>, not <annotation>")
    size: tuple[int, int] | None = None
    size_node = root.find("size")
    if size_node is not None:
        size = checked_size(_number(size_node.find("width"), "width"), _number(size_node.find("height"), "height"))
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise RejectedInput("malformed_annotation", "<object> without <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise RejectedInput("malformed_annotation", f"<object> {printable(name, 24)} without <bndbox>")
        corners = tuple(_number(bb.find(t), t) for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name, corners))
    return VocAnnotation((root.findtext("filename") or "").strip(), size, tuple(objects))


def voc_record(key: str, image: Found, data: bytes, where: str, source: str, label_wnid: str | None = None) -> Output:
    """One VOC annotation + its image -> record, keeping only boxes of the label class.

    Pairing uses the XML's file name, never its ``<filename>``: some ImageNet
    train XMLs literally say ``%s`` there.
    """
    try:
        voc = parse_voc_xml(data)
    except RejectedInput as exc:
        return Rejection(key, exc.reason, f"{where}: {exc.detail}", source)
    if label_wnid is None:
        if not voc.objects:
            return Rejection(key, "no_box", f"{where}: no <object>", source)
        label_wnid = most_common(name for name, _ in voc.objects)
    label = wnid_to_index().get(label_wnid)
    if label is None:
        return Rejection(key, "unknown_wnid", f"{where}: {printable(label_wnid, 24)} is not an ImageNet-1k class", source)
    shared = canonical_wnid(label)
    boxes = [voc_box(shared, *c) for name, c in voc.objects if name == label_wnid]
    clean, reason, detail = check_boxes(boxes, voc.size)
    if reason is not None:
        return Rejection(key, reason, f"{where}: {detail}", source)
    return SourceRecord(
        key=key,
        image=image.path,
        label=label,
        wnid=shared,
        boxes=clean,
        size=voc.size,
        source=source,
        annotation=where,
    )


# --------------------------------------------------------------------------- where the XMLs are


def read_xml_archive(archive: Path) -> dict[str, list[XmlRef]]:
    """stem -> XMLs streamed from a .tar/.tgz without unpacking, named ``<archive name>::<member>``."""
    found: dict[str, list[XmlRef]] = defaultdict(list)
    try:
        with open_regular(archive) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if not member.isfile() or not name.lower().endswith(".xml") or base.startswith("."):
                    continue
                member_fh = tar.extractfile(member)
                data = member_fh.read() if member_fh is not None else b""
                found[stem(name)].append(XmlRef(f"{archive.name}::{printable(name, 200)}", data=data))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"cannot read box archive {str(archive)!r}: {exc}") from None
    return {s: sorted(refs, key=lambda r: r.name) for s, refs in found.items()}


def read_xml_folder(folder: Path) -> dict[str, list[XmlRef]]:
    """stem -> XMLs of a folder (one level of subfolders), named relative to it; read when paired."""
    return {
        s: [XmlRef(printable(f.name, 200), path=f.path) for f in files]
        for s, files in scan(folder, {".xml"}, depth=1).items()
    }


def _xml_bytes(ref: XmlRef) -> bytes:
    return ref.data if ref.data is not None else read_regular(ref.path)


def _paired(key: str, image: Found, ref: XmlRef, source: str, label_wnid: str | None = None) -> Output:
    try:
        data = _xml_bytes(ref)
    except OSError as exc:  # including a FIFO or device named .xml: never waited on
        return Rejection(key, "malformed_annotation", f"{ref.name}: {exc.strerror or 'not a regular file'}", source)
    return voc_record(key, image, data, ref.name, source, label_wnid)


def _describe(ref: XmlRef) -> str:
    return ref.name


# --------------------------------------------------------------------------- readers


def read_imagenet_val(images: str | Path, annotations: str | Path) -> Iterator[Output]:
    """ILSVRC2012 val: flat ``ILSVRC2012_val_*.JPEG`` + VOC XMLs (folder or the bbox .tgz itself).

    Images may also sit one folder deep (val sorted into class folders). The
    label is the most common ``<name>`` among an XML's objects and only boxes
    of that class are kept (val images have one class; this only matters for
    hand-edited files).
    """
    source = "imagenet-val"
    root = require_dir(images, "val image folder")
    boxes_path = Path(annotations) if annotations is not None else None
    if boxes_path is not None and boxes_path.is_dir():
        refs: Mapping[str, Sequence[XmlRef]] = read_xml_folder(boxes_path)
    elif boxes_path is not None and boxes_path.is_file():
        refs = read_xml_archive(boxes_path)
    else:
        raise SourceError(f"val boxes {str(annotations)!r} is neither a folder nor an archive")
    found = scan(root, SOURCE_IMAGE_SUFFIXES, depth=1)

    def build(key: str, image: Found, ref: XmlRef) -> Output:
        return _paired(key, image, ref, source)

    return iter(join_by_stem(found, refs, build, source, describe=_describe))


def read_imagenet_train(images: str | Path, annotations: str | Path | None = None) -> Iterator[Output]:
    """ILSVRC2012 train: ``<images>/<wnid>/<wnid>_<n>.JPEG`` + ``<annotations>/<wnid>/<wnid>_<n>.xml``.

    ``annotations`` defaults to the image root (boxes next to the images). The
    label is the class folder (or the file name's wnid prefix for a flat
    folder), not the XML, and only boxes of that class are kept. Only about
    40% of train images have boxes, so most become ``missing_annotation``.
    """
    source = "imagenet-train"
    images_root = require_dir(images, "train image folder")
    xml_root = require_dir(annotations, "train box folder") if annotations is not None else images_root
    found = scan(images_root, SOURCE_IMAGE_SUFFIXES, depth=1)
    refs = read_xml_folder(xml_root)

    def build(key: str, image: Found, ref: XmlRef) -> Output:
        wnid = wnid_for(image, key)
        if wnid is None:
            detail = f"{printable(image.name)}: no class folder or wnid prefix"
            return Rejection(key, "unknown_wnid", detail, source)
        return _paired(key, image, ref, source, label_wnid=wnid)

    return iter(join_by_stem(found, refs, build, source, describe=_describe))
