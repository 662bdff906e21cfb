"""Readers of the annotation files of the paper's six benchmarks, as the
official releases ship them, into :class:`~lookwhen.data.datasets.Annotations`
(the entries a manifest holds: video path, class id or ids, time window).

Every reader takes the annotation file, ``root`` (the folder the videos lie
in; default: the annotation file's folder) and ``classes`` (the class names
in id order; each reader's default is below). A row that cannot be read
raises :class:`~lookwhen.data.datasets.DatasetError` (a ``ValueError``)
naming the file and line (CSV) or entry (JSON). Whether a video exists is
not checked here: training reports unreadable videos and skips them.

Kinetics-400 (``kinetics400/{train,validate,test}.csv``)
    CSV with a header: ``label,youtube_id,time_start,time_end,split`` (the
    original release adds ``is_cc``). ``label`` is the class name
    (``"air drumming"``), ``time_start``/``time_end`` whole seconds of the
    YouTube video the clip was cut from, ``split`` the file's own split.
    The downloaded clip is ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4``
    in ``root``; with ``trimmed=False`` the video is the whole
    ``<youtube_id>.mp4`` and clips are cut from the window. Classes: the
    names sorted (the usual Kinetics order).

Something-Something v2 (``something-something-v2-{train,validation}.json``)
    A JSON list of ``{"id": "78687", "label": "holding potato next to vicks
    vaporub bottle", "template": "Holding [something] next to [something]",
    "placeholders": ["potato", "vicks vaporub bottle"]}``. The class is the
    template with its brackets removed, looked up in
    ``something-something-v2-labels.json`` (``{"Holding something next to
    something": "59", ...}``: name to class id as a string), read from
    beside the annotation file unless ``classes`` is given. ``label`` and
    ``placeholders`` name the objects and are not the class. The video is
    ``<id>.webm``. No flip: "from left to right" and "from right to left"
    are different classes.

EPIC-Kitchens-100 (``EPIC_100_train.csv``, ``EPIC_100_validation.csv``)
    CSV with a header: ``narration_id,participant_id,video_id,
    narration_timestamp,start_timestamp,stop_timestamp,start_frame,
    stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,
    all_noun_classes``. Each row is an action segment of a long video
    (``P01_01``, at ``<participant_id>/videos/<video_id>.MP4`` under
    ``root``, the layout of the download scripts); the clip is cut from
    ``[start_timestamp, stop_timestamp)``, written ``HH:MM:SS.ff``.
    ``verb_class`` (97 classes) and ``noun_class`` (300) are class ids;
    ``verb``/``noun`` are the narrated words, which several map to one
    class. The label is a choice (``label=``): ``"verb"`` or ``"noun"``
    (the ids as they are) or ``"action"``, the ``(verb_class, noun_class)``
    pair as the class ``"<verb_class>:<noun_class>"``, classes sorted by
    the pair (validation pairs absent from the training list are refused).

Diving48 (``Diving48_V2_train.json``, ``Diving48_V2_test.json``)
    A JSON list of ``{"vid_name": "-mmq0PT-u8k_00155", "label": 0,
    "start_frame": 0, "end_frame": 62}``; ``label`` is the class id (48
    classes, named in ``Diving48_vocab.json``). The video is
    ``<vid_name>.mp4``, already cut to the dive: the frame range is that of
    the file itself, so the whole file is the clip (the range is checked,
    not applied).

Jester (``jester-v1-{train,validation}.csv``)
    No header, ``;``-separated: ``34870;Drumming Fingers`` (video id;
    class name). ``jester-v1-labels.csv`` lists the 27 class names, one a
    line, in id order; it is read from beside the annotation file unless
    ``classes`` is given. The release ships each video as a folder of JPEG
    frames (``<id>/00001.jpg``, 12 fps), which the decoder cannot read:
    encode each folder to ``<id>.mp4`` in ``root`` first, e.g. ``ffmpeg
    -framerate 12 -i 20bn-jester-v1/<id>/%05d.jpg -pix_fmt yuv420p
    <id>.mp4``. The reader refuses a ``root`` that holds the frame folders
    and not the videos. No flip: "Swiping Left" and "Swiping Right" are
    different classes.

Charades (``Charades_v1_train.csv``, ``Charades_v1_test.csv``)
    CSV with a header: ``id,subject,scene,quality,relevance,verified,
    script,objects,descriptions,actions,length``. ``actions`` lists the
    actions seen, ``;``-separated, each ``<class> <start s> <end s>``
    (``c092 11.90 21.20;c147 0.00 12.60``), and may be empty. A clip's
    label is the set of its classes (multi-label: the whole video, the
    usual classification task; the spans are checked, not applied); class
    ``cNNN`` is id ``NNN`` of 157 (``Charades_v1_classes.txt``). The video
    is ``<id>.mp4``.

:func:`load_data` is what the command's ``--data`` / ``--format`` /
``--classes`` options call.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Callable, Dict, List, Optional, Sequence

from lookwhen.data.datasets import (
    Annotations,
    DatasetError,
    Entry,
    check_window,
    class_ids,
    load_source,
    map_class_names,
    read_class_list,
)

EPIC_LABELS = ("verb", "noun", "action")
CHARADES_CLASSES = 157
_TIMESTAMP = re.compile(r"(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)")
_CHARADES_CLASS = re.compile(r"c(\d{3})")


def _base(path: str, root) -> str:
    return os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))


def _csv_rows(path: str, required: Sequence[str], delimiter: str = ","):
    """``(line, row)`` of a CSV file with a header holding ``required``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such annotation file")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = [name for name in required if name not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}:1: the header lacks the columns {', '.join(missing)} "
                               f"(it has {', '.join(reader.fieldnames or [])})")
        for row in reader:
            if any(row[name] is None for name in required):
                raise DatasetError(f"{path}:{reader.line_num}: the row has fewer fields than the header")
            yield reader.line_num, {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}


def _json_file(path: str, what: str):
    """The parsed JSON of ``path``, or a DatasetError naming it (``what``: the kind of file)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such {what}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not a JSON file ({error})") from None


def _json_list(path: str) -> list:
    path = os.fspath(path)
    data = _json_file(path, "annotation file")
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _field(path: str, index: int, item, name: str, kind: type):
    """Entry ``index``'s ``name``, of type ``kind``."""
    if not isinstance(item, dict):
        raise DatasetError(f"{path}: entry {index}: expected an object, got {item!r:.80}")
    value = item.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or kind is str and not value.strip():
        expected = "a non-empty string" if kind is str else "an integer"
        raise DatasetError(f"{path}: entry {index}: {name!r} must be {expected}, got {value!r:.80}")
    return value


def _integer(text: str, where: str, name: str, low: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DatasetError(f"{where}: {name} {text!r} is not an integer") from None
    if value < low:
        raise DatasetError(f"{where}: {name} {value} is below {low}")
    return value


def _seconds(text: str, where: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {name} {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise DatasetError(f"{where}: {name} {value} is not a time in seconds (finite, >= 0)")
    return value


def _beside(path: str, name: str, what: str) -> List[str]:
    """The class list ``name`` from the annotation file's folder."""
    labels = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(labels):
        raise DatasetError(f"{path}: the {what} class list {labels} is missing (give the class list)")
    return read_class_file(labels)


def read_class_file(path) -> List[str]:
    """Class names in id order: a text file with one name a line, or a JSON
    list of names, or a JSON object of names to ids (Something-Something's
    ``something-something-v2-labels.json``)."""
    path = os.fspath(path)
    if not path.lower().endswith(".json"):
        return read_class_list(path)
    data = _json_file(path, "class list")
    if isinstance(data, list) and data and all(isinstance(name, str) for name in data):
        names = data
    elif isinstance(data, dict) and data:
        try:
            ids = {name: int(index) for name, index in data.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: expected class names mapped to integer ids") from None
        if sorted(ids.values()) != list(range(len(ids))):
            raise DatasetError(f"{path}: the class ids are not 0 .. {len(ids) - 1}, each once")
        names = sorted(ids, key=ids.get)
    else:
        raise DatasetError(f"{path}: expected a JSON list of class names or an object of names to ids")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: class names listed twice")
    return list(names)


def read_kinetics(path, root=None, *, classes: Optional[Sequence[str]] = None, trimmed: bool = True) -> Annotations:
    """Kinetics-400's CSV (see the module docstring)."""
    path = os.fspath(path)
    base = _base(path, root)
    rows, names = [], []
    for line, row in _csv_rows(path, ("label", "youtube_id", "time_start", "time_end")):
        where = f"{path}:{line}"
        if not row["youtube_id"]:
            raise DatasetError(f"{where}: youtube_id is empty")
        if not row["label"]:
            raise DatasetError(f"{where}: label is empty (the test split's file has no labels)")
        start = _integer(row["time_start"], where, "time_start")
        end = _integer(row["time_end"], where, "time_end")
        check_window(float(start), float(end), where)
        if trimmed:
            rows.append((os.path.join(base, f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"), None, None))
        else:
            rows.append((os.path.join(base, f"{row['youtube_id']}.mp4"), float(start), float(end)))
        names.append((path, line, row["label"]))
    labels, classes = map_class_names(names, classes)
    return Annotations([Entry(video, label, start, end) for (video, start, end), label in zip(rows, labels)],
                       classes, source=path)


def read_ssv2(path, root=None, *, classes: Optional[Sequence[str]] = None) -> Annotations:
    """Something-Something v2's JSON (see the module docstring)."""
    path = os.fspath(path)
    base = _base(path, root)
    data = _json_list(path)
    classes = list(classes) if classes is not None else _beside(path, "something-something-v2-labels.json",
                                                                "Something-Something")
    ids = class_ids(classes)
    entries = []
    for index, item in enumerate(data):
        video = _field(path, index, item, "id", str)
        if "template" not in item:
            raise DatasetError(f"{path}: entry {index} (id {video}) has no template (the test split has no labels)")
        name = _field(path, index, item, "template", str).replace("[", "").replace("]", "")
        if name not in ids:
            raise DatasetError(f"{path}: entry {index} (id {video}): class {name!r} is not in the class list "
                               f"({len(classes)} classes)")
        entries.append(Entry(os.path.join(base, f"{video}.webm"), ids[name]))
    return Annotations(entries, classes, flip=False, source=path)


def _timestamp(text: str, where: str, name: str) -> float:
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise DatasetError(f"{where}: {name} {text!r} is not a time HH:MM:SS.ff")
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def read_epic_kitchens(path, root=None, *, label: str = "verb",
                       classes: Optional[Sequence[str]] = None) -> Annotations:
    """EPIC-Kitchens-100's CSV (see the module docstring); ``label``:
    ``"verb"``, ``"noun"`` or ``"action"``."""
    if label not in EPIC_LABELS:
        raise ValueError(f"label must be one of {EPIC_LABELS}, got {label!r}")
    path = os.fspath(path)
    base = _base(path, root)
    rows, labels = [], []
    for line, row in _csv_rows(path, ("participant_id", "video_id", "start_timestamp", "stop_timestamp",
                                      "verb_class", "noun_class")):
        where = f"{path}:{line}"
        if not row["participant_id"] or not row["video_id"]:
            raise DatasetError(f"{where}: participant_id and video_id must not be empty")
        start = _timestamp(row["start_timestamp"], where, "start_timestamp")
        stop = _timestamp(row["stop_timestamp"], where, "stop_timestamp")
        check_window(start, stop, where)
        verb = _integer(row["verb_class"], where, "verb_class")
        noun = _integer(row["noun_class"], where, "noun_class")
        rows.append((os.path.join(base, row["participant_id"], "videos", f"{row['video_id']}.MP4"), start, stop))
        labels.append((line, verb, noun))
    if label == "action":
        if classes is None:
            classes = [f"{v}:{n}" for v, n in sorted({(v, n) for _, v, n in labels})]
        ids, classes = map_class_names([(path, line, f"{v}:{n}") for line, v, n in labels], classes)
    else:
        ids = [v if label == "verb" else n for _, v, n in labels]
        classes = None if classes is None else list(classes)
    return Annotations([Entry(video, i, start, stop) for (video, start, stop), i in zip(rows, ids)], classes,
                       source=path)


def read_diving48(path, root=None, *, classes: Optional[Sequence[str]] = None) -> Annotations:
    """Diving48's V2 JSON (see the module docstring)."""
    path = os.fspath(path)
    base = _base(path, root)
    entries = []
    for index, item in enumerate(_json_list(path)):
        video = _field(path, index, item, "vid_name", str)
        label = _field(path, index, item, "label", int)
        start, end = _field(path, index, item, "start_frame", int), _field(path, index, item, "end_frame", int)
        if label < 0 or not 0 <= start <= end:
            raise DatasetError(f"{path}: entry {index} ({video}): expected label >= 0 and 0 <= start_frame <= "
                               f"end_frame, got {label}, {start} and {end}")
        entries.append(Entry(os.path.join(base, f"{video}.mp4"), label))
    return Annotations(entries, None if classes is None else list(classes), source=path)


def read_jester(path, root=None, *, classes: Optional[Sequence[str]] = None) -> Annotations:
    """Jester's CSV (see the module docstring)."""
    path = os.fspath(path)
    base = _base(path, root)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such annotation file")
    classes = list(classes) if classes is not None else _beside(path, "jester-v1-labels.csv", "Jester")
    ids = class_ids(classes)
    entries = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line, fields in enumerate(csv.reader(handle, delimiter=";"), 1):
            if not fields or not "".join(fields).strip():
                continue
            where = f"{path}:{line}"
            if len(fields) != 2 or not fields[0].strip():
                raise DatasetError(f"{where}: expected 'id;label', got {';'.join(fields)!r} (the test split's "
                                   "file has no labels)")
            video, name = fields[0].strip(), fields[1].strip()
            if name not in ids:
                raise DatasetError(f"{where}: class {name!r} is not in the class list ({len(classes)} classes)")
            entries.append(Entry(os.path.join(base, f"{video}.mp4"), ids[name]))
    if entries:
        first = entries[0].path
        if not os.path.exists(first) and os.path.isdir(first[: -len(".mp4")]):
            raise DatasetError(f"{base} holds Jester's frame folders ({first[: -len('.mp4')]}/), not videos: "
                               "encode each folder to <id>.mp4 first (see lookwhen.data.annotations)")
    return Annotations(entries, classes, flip=False, source=path)


def read_charades(path, root=None, *, classes: Optional[Sequence[str]] = None) -> Annotations:
    """Charades' CSV (see the module docstring)."""
    path = os.fspath(path)
    base = _base(path, root)
    classes = list(classes) if classes is not None else [f"c{i:03d}" for i in range(CHARADES_CLASSES)]
    ids = class_ids(classes)
    entries = []
    for line, row in _csv_rows(path, ("id", "actions")):
        where = f"{path}:{line}"
        if not row["id"]:
            raise DatasetError(f"{where}: id is empty")
        found = set()
        for action in filter(None, (a.strip() for a in row["actions"].split(";"))):
            parts = action.split()
            if len(parts) != 3 or not _CHARADES_CLASS.fullmatch(parts[0]):
                raise DatasetError(f"{where}: action {action!r} is not 'cNNN start end'")
            _seconds(parts[1], where, "an action's start")
            _seconds(parts[2], where, "an action's end")
            if parts[0] not in ids:
                raise DatasetError(f"{where}: class {parts[0]!r} is not in the class list ({len(classes)} classes)")
            found.add(ids[parts[0]])
        entries.append(Entry(os.path.join(base, f"{row['id']}.mp4"), tuple(sorted(found))))
    return Annotations(entries, classes, multi_label=True, source=path)


READERS: Dict[str, Callable[..., Annotations]] = {
    "kinetics": read_kinetics,
    "ssv2": read_ssv2,
    "epic-kitchens-verb": lambda *a, **k: read_epic_kitchens(*a, label="verb", **k),
    "epic-kitchens-noun": lambda *a, **k: read_epic_kitchens(*a, label="noun", **k),
    "epic-kitchens-action": lambda *a, **k: read_epic_kitchens(*a, label="action", **k),
    "diving48": read_diving48,
    "jester": read_jester,
    "charades": read_charades,
}
FORMATS = ("auto", *READERS)


def load_data(source, *, format: str = "auto", root=None, classes: Optional[Sequence[str]] = None) -> Annotations:
    """The command's ``--data``: ``format="auto"`` reads a folder tree or a
    manifest (:mod:`lookwhen.data.datasets`), any other name that
    benchmark's annotation file; ``classes`` as the readers take it."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "auto":
        return load_source(source, root, classes)
    if os.path.isdir(os.fspath(source)):
        raise DatasetError(f"{os.fspath(source)}: --format {format} reads an annotation file, not a folder")
    return READERS[format](source, root, classes=classes)
