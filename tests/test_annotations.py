"""The benchmarks' annotation readers, class-name and multi-label manifests,
time windows, mAP, multi-label fine-tuning and evaluation, and flips.

Each reader gets a small file written in its benchmark's released format
(the layouts in lookwhen.data.annotations' docstring)."""
import json
import os

import pytest
import torch

from lookwhen.cli import main
from lookwhen.data.annotations import (
    load_data,
    read_charades,
    read_class_file,
    read_diving48,
    read_epic_kitchens,
    read_jester,
    read_kinetics,
    read_ssv2,
)
from lookwhen.data.datasets import Sampling, VideoDataset, collate, read_manifest
from lookwhen.data.synthetic import write_dataset
from lookwhen.io.checkpoint import read_labels
from lookwhen.training.evaluate import ViewDataset, average_precision, mean_average_precision
from helpers import SMALL, decode_indices, make_video, run

pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")

# The smallest model the commands train here: 4 frames of 32 px.
SET = [f"{k}={v}" for k, v in dict(SMALL, frames=4, image_size=32, width=16, selector_width=16,
                                    score_hidden=16).items()]


# Readers ----------------------------------------------------------------------------
def test_kinetics(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                    "abseiling,--07WQ2iBlw,1,11,train,0\n"
                    '"air drumming",-2MvnRhYCn0,14,24,train,0\n'
                    "abseiling,0Rm_w2F2z4o,305,315,train,1\n")
    data = read_kinetics(path, tmp_path / "videos")
    assert data.classes == ["abseiling", "air drumming"] and not data.multi_label and data.flip
    assert [e.label for e in data.entries] == [0, 1, 0]
    assert data.entries[1].path == str(tmp_path / "videos" / "-2MvnRhYCn0_000014_000024.mp4")
    assert data.entries[0].start is None
    whole = read_kinetics(path, classes=["air drumming", "abseiling"], trimmed=False)
    assert whole.entries[2][1:] == (1, 305.0, 315.0) and whole.entries[2].path.endswith("0Rm_w2F2z4o.mp4")
    path.write_text("label,youtube_id,time_start,time_end,split\nabseiling,x,1,11,train\nabseiling,y,ten,20,train\n")
    with pytest.raises(ValueError, match=rf"{path}:3: time_start 'ten' is not an integer"):
        read_kinetics(path)
    path.write_text("youtube_id,time_start,time_end,split\nx,1,11,test\n")
    with pytest.raises(ValueError, match=rf"{path}:1: the header lacks the columns label"):
        read_kinetics(path)
    path.write_text("label,youtube_id,time_start,time_end,split\nabseiling,x,1,11,train\nbowling,y,1,11,train\n")
    with pytest.raises(ValueError, match=rf"{path}:3: class 'bowling' is not in the class list \(1 classes\)"):
        read_kinetics(path, classes=["abseiling"])


def test_something_something_v2(tmp_path):
    labels = {"Holding something next to something": "1", "Pushing something from left to right": "0"}
    (tmp_path / "something-something-v2-labels.json").write_text(json.dumps(labels))
    path = tmp_path / "something-something-v2-train.json"
    path.write_text(json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
        {"id": "42326", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
    ]))
    data = read_ssv2(path)
    assert data.classes == ["Pushing something from left to right", "Holding something next to something"]
    assert [e.label for e in data.entries] == [1, 0] and data.entries[0].path == str(tmp_path / "78687.webm")
    assert not data.flip
    path.write_text(json.dumps([{"id": "1", "template": "Holding [something]"}]))
    with pytest.raises(ValueError, match=rf"{path}: entry 0 \(id 1\): class 'Holding something' is not in"):
        read_ssv2(path)
    path.write_text(json.dumps([{"id": "1420"}]))
    with pytest.raises(ValueError, match="entry 0 .* has no template"):
        read_ssv2(path)
    (tmp_path / "something-something-v2-labels.json").unlink()
    with pytest.raises(ValueError, match="class list .*something-something-v2-labels.json is missing"):
        read_ssv2(path)


EPIC_HEADER = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
               "start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n")


def test_epic_kitchens(tmp_path):
    path = tmp_path / "EPIC_100_train.csv"
    path.write_text(EPIC_HEADER
                    + "P01_01_0,P01,P01_01,00:00:01.089,00:00:00.14,00:00:03.37,8,202,open door,open,3,door,3,"
                      "['door'],[3]\n"
                    + "P01_101_7,P01,P01_101,00:01:02.500,00:01:02.61,00:01:05.00,3131,3250,"
                      "rinse tap and sponge,rinse,10,tap,12,\"['tap', 'sponge']\",\"[12, 17]\"\n"
                    + "P02_01_3,P02,P02_01,00:00:05.000,00:00:05.00,00:00:06.50,250,325,wash pan,wash,10,pan,5,"
                      "['pan'],[5]\n")
    verbs = read_epic_kitchens(path, tmp_path, label="verb")
    assert [e.label for e in verbs.entries] == [3, 10, 10] and verbs.classes is None
    first = verbs.entries[1]
    assert first.path == str(tmp_path / "P01" / "videos" / "P01_101.MP4")
    assert first.start == pytest.approx(62.61) and first.end == pytest.approx(65.0)
    assert [e.label for e in read_epic_kitchens(path, label="noun").entries] == [3, 12, 5]
    actions = read_epic_kitchens(path, label="action")
    assert actions.classes == ["3:3", "10:5", "10:12"] and [e.label for e in actions.entries] == [0, 2, 1]
    with pytest.raises(ValueError, match=rf"{path}:4: class '10:5' is not in the class list"):
        read_epic_kitchens(path, label="action", classes=["3:3", "10:12"])
    path.write_text(EPIC_HEADER + "P01_01_0,P01,P01_01,00:00:01.089,00:00:03.37,00:00:00.14,8,202,open door,open,"
                                  "3,door,3,['door'],[3]\n")
    with pytest.raises(ValueError, match=rf"{path}:2: the window \[3.37, 0.14\) s is empty"):
        read_epic_kitchens(path)
    path.write_text(EPIC_HEADER + "P01_01_0,P01,P01_01,00:00:01.089,0:0:1,00:00:03.37,8,202,open door,open,"
                                  "3,door,3,['door'],[3]\n")
    with pytest.raises(ValueError, match=rf"{path}:2: start_timestamp '0:0:1' is not a time HH:MM:SS.ff"):
        read_epic_kitchens(path)


def test_diving48(tmp_path):
    path = tmp_path / "Diving48_V2_train.json"
    path.write_text(json.dumps([{"vid_name": "-mmq0PT-u8k_00155", "label": 0, "start_frame": 0, "end_frame": 62},
                                {"vid_name": "_8Vy3dlHg2w_00000", "label": 35, "start_frame": 0, "end_frame": 70}]))
    data = read_diving48(path)
    assert [e.label for e in data.entries] == [0, 35] and data.num_classes == 36
    assert data.entries[0] == (str(tmp_path / "-mmq0PT-u8k_00155.mp4"), 0, None, None)
    path.write_text(json.dumps([{"vid_name": "a", "label": 0, "start_frame": 0, "end_frame": 9},
                                {"vid_name": "b", "label": "3", "start_frame": 0, "end_frame": 9}]))
    with pytest.raises(ValueError, match=rf"{path}: entry 1: 'label' must be an integer, got '3'"):
        read_diving48(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        read_diving48(path)


def test_jester(tmp_path):
    (tmp_path / "jester-v1-labels.csv").write_text("Swiping Left\nSwiping Right\nDrumming Fingers\n")
    path = tmp_path / "jester-v1-train.csv"
    path.write_text("34870;Drumming Fingers\n56557;Swiping Right\n")
    data = read_jester(path)
    assert [e.label for e in data.entries] == [2, 1] and data.entries[0].path == str(tmp_path / "34870.mp4")
    assert data.classes == ["Swiping Left", "Swiping Right", "Drumming Fingers"] and not data.flip
    # The release's frame folders are refused with what to do instead.
    (tmp_path / "34870").mkdir()
    with pytest.raises(ValueError, match="frame folders .* encode each folder to <id>.mp4"):
        read_jester(path)
    path.write_text("34870;Drumming Fingers\n56557\n")
    with pytest.raises(ValueError, match=rf"{path}:2: expected 'id;label'"):
        read_jester(path)


def test_charades(tmp_path):
    path = tmp_path / "Charades_v1_train.csv"
    path.write_text("id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
                    '46GP8,HR43,Kitchen,6,7,Yes,"A person cooks, then eats.",food;dish,"A person cooks.",'
                    '"c092 11.90 21.20;c147 0.00 12.60",24.83\n'
                    "N11GT,0KZ7,Stairs,6,7,Yes,A person walks.,stairs,A person walks.,,11.00\n")
    data = read_charades(path)
    assert data.multi_label and data.num_classes == 157
    assert [e.label for e in data.entries] == [(92, 147), ()] and data.entries[0].path == str(tmp_path / "46GP8.mp4")
    path.write_text("id,actions\n46GP8,c092 11.90\n")
    with pytest.raises(ValueError, match=rf"{path}:2: action 'c092 11.90' is not 'cNNN start end'"):
        read_charades(path)


def test_class_files_and_formats(tmp_path):
    (tmp_path / "classes.txt").write_text("b\na\n")
    assert read_class_file(tmp_path / "classes.txt") == ["b", "a"]
    (tmp_path / "labels.json").write_text(json.dumps({"x": "1", "y": "0"}))
    assert read_class_file(tmp_path / "labels.json") == ["y", "x"]
    (tmp_path / "bad.json").write_text(json.dumps({"x": "1", "y": "1"}))
    with pytest.raises(ValueError, match="not 0 .. 1, each once"):
        read_class_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="reads an annotation file, not a folder"):
        load_data(tmp_path, format="charades")


# Manifests ----------------------------------------------------------------------------
def test_manifest_names_windows_and_multi_label(tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_text('a.mp4,jump\n"b, 2.mp4",run,1.5,3\nc.mp4 jump\n')
    data = read_manifest(manifest)
    assert data.classes == ["jump", "run"] and [e.label for e in data.entries] == [0, 1, 0]
    assert data.entries[1] == (str(tmp_path / "b, 2.mp4"), 1, 1.5, 3.0)
    assert [e.label for e in read_manifest(manifest, classes=["run", "jump", "swim"]).entries] == [1, 0, 1]
    # embed reads the paths alone, whatever the labels.
    assert [e.path for e in read_manifest(manifest, labels=False).entries] == [
        str(tmp_path / name) for name in ("a.mp4", "b, 2.mp4", "c.mp4")]
    multi = tmp_path / "multi.csv"
    multi.write_text("path,labels\na.mp4,c092;c147\nb.mp4,\nc.mp4,c147\n")
    data = read_manifest(multi)
    assert data.multi_label and data.classes == ["c092", "c147"]
    assert [e.label for e in data.entries] == [(0, 1), (), (1,)]
    for text, message in [("a.mp4,x,1\n", "train.csv:1: expected 'path,label' or 'path,label,start,end'"),
                          ("a.mp4,x\nb.mp4,x,2,1\n", r"train.csv:2: the window \[2.0, 1.0\) s is empty"),
                          ("a.mp4,x,one,2\n", "train.csv:1: 'one' is not a time in seconds"),
                          ("a.mp4,x\nb.mp4,\n", "train.csv:2: the label is empty")]:
        manifest.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_manifest(manifest)


def test_time_window_picks_the_frames_inside_it(tmp_path):
    video = make_video(tmp_path / "v.mp4", 40, 64, 48, fps=10)
    (tmp_path / "m.csv").write_text("v.mp4,0,1.0,2.0\nv.mp4,0\n")
    dataset = VideoDataset(tmp_path / "m.csv", sampling=Sampling(frames=4, size=32, train=False))
    assert decode_indices(dataset.clip(0, 0)) == [11, 13, 16, 18] and decode_indices(dataset.clip(1, 0))[0] == 5
    train = VideoDataset(tmp_path / "m.csv", sampling=Sampling(frames=4, size=32, stride=2))
    assert all(10 <= i < 20 for i in decode_indices(train.clip(0, 3)))
    views = ViewDataset(dataset.items, 2, 32, (2, 1))[0]["views"]
    assert [decode_indices(v) for v in views] == [[11, 13], [16, 18]]
    assert video


# mAP ------------------------------------------------------------------------------------
def test_average_precision_by_hand_and_against_sklearn():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    # Positives at ranks 1, 3 and 4: (1/1 + 2/3 + 3/4) / 3.
    assert average_precision(scores, torch.tensor([1, 0, 1, 1, 0]).bool()) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # Ties are one threshold: ranks 1-2 hold one positive (precision 1/2), rank 3 the other (2/3).
    tied = average_precision(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([0, 1, 1]).bool())
    assert tied == pytest.approx((1 / 2 + 2 / 3) / 2)
    # A class without positives is skipped, not counted as 0.
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 1]])
    table = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.4, 0.8], [0.5, 0.5, 0.1]])
    by_hand = (1.0 + (1 / 1 + 2 / 3) / 2) / 2
    assert mean_average_precision(table, targets) == pytest.approx(by_hand)
    try:
        from sklearn.metrics import average_precision_score
    except ImportError:
        return  # scikit-learn is not a dependency; the hand-computed cases above stand
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (50, 7), generator=generator).float()  # many ties
    truth = torch.rand((50, 7), generator=generator) < 0.3
    for c in range(7):
        assert average_precision(scores[:, c], truth[:, c]) == pytest.approx(
            average_precision_score(truth[:, c].numpy(), scores[:, c].numpy()))


# Fine-tuning and evaluation ---------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotations")
    write_dataset(root / "clips", 2, task="colour", frames=6, size=32, object_size=10, seed=5)
    return root


def test_multi_label_finetune_and_evaluate(videos, tmp_path, capsys):
    """A multi-label manifest of class names trains with BCE, the checkpoint
    keeps the class list, and evaluate maps another manifest's names
    through it and reports mAP."""
    rows = ["path,labels"]
    for colour in ("red", "green", "blue"):
        for i in range(2):
            rows.append(f"{videos / 'clips' / colour / f'{i:04d}.mp4'},{colour}" + (";bright" if i else ""))
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    # Another order of lines and a class subset: ids come from the checkpoint.
    (tmp_path / "val.csv").write_text("path,labels\n" + "\n".join(reversed(rows[3:])) + "\n")
    out = tmp_path / "ft"
    common = ["finetune", "--data", str(tmp_path / "train.csv"), "--set", *SET, "--steps", "2", "--batch-size", "2",
              "--no-flip"]
    assert main([*common, "--out", str(out)]) == 0
    labels = read_labels(out / "model.safetensors")
    assert labels == {"classes": ["blue", "bright", "green", "red"], "multi_label": True}
    record = json.loads((out / "run.json").read_text())
    assert record["labels"] == labels and record["sampling"]["flip"] is False
    assert main(["evaluate", "--data", str(tmp_path / "val.csv"), "--checkpoint", str(out / "model.safetensors"),
                 "--json", str(tmp_path / "val.json")]) == 0
    result = json.loads((tmp_path / "val.json").read_text())
    assert 0 < result["mAP"] <= 1 and result["top1"] is None and result["videos"] == 4
    # A resume with flips would cut other clips: refused.
    common[common.index("--steps") + 1] = "3"
    code, _, err = run(capsys, *common[:-1], "--out", str(out), "--resume")
    assert code == 1 and "holds a run of another sampling (flip)" in err[-1]
    dataset = VideoDataset(tmp_path / "train.csv", sampling=Sampling(frames=4, size=32))
    batch = collate([dataset[0], dataset[1]])
    assert batch["labels"].tolist() == [[0, 0, 0, 1], [0, 1, 0, 1]]


def test_flip_follows_the_data_set(videos, tmp_path):
    """--no-flip and a reader's default (Jester) give unflipped clips, the
    same on every call; flips otherwise happen for some clips."""
    names = ["red", "green", "blue"]
    (tmp_path / "jester-v1-labels.csv").write_text("\n".join(names) + "\n")
    rows = [f"{colour}/{i:04d};{colour}" for colour in names for i in range(2)]
    (tmp_path / "jester-v1-train.csv").write_text("\n".join(rows) + "\n")
    for colour in names:
        os.makedirs(tmp_path / colour, exist_ok=True)
        for i in range(2):
            os.symlink(videos / "clips" / colour / f"{i:04d}.mp4", tmp_path / colour / f"{i:04d}.mp4")
    jester = load_data(tmp_path / "jester-v1-train.csv", format="jester")
    assert not jester.flip
    flipping = VideoDataset(jester, sampling=Sampling(frames=4, size=32, scale=(1.0, 1.0)))
    plain = VideoDataset(jester, sampling=Sampling(frames=4, size=32, scale=(1.0, 1.0), flip=False))
    flipped = [not torch.equal(flipping.clip(i, 0), plain.clip(i, 0)) for i in range(len(plain))]
    assert any(flipped) and torch.equal(plain.clip(0, 0), plain.clip(0, 0))
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(tmp_path / "jester-v1-train.csv"), "--format", "jester", "--set", *SET,
                 "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["sampling"]["flip"] is False and record["labels"]["classes"] == names
